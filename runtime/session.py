"""A loaded bundle on one backend: ``generate``, ``stream``, ``reset``, ``state_dict``/``load_state``.

Weights are shared, state is per stream (whisper.cpp splits context and state the same way): a
``Session`` is one stream over a ``LoadedModel``; ``Session.fork()`` opens another stream on the
same weights. Memory is constant in the stream's length: state has a fixed size and prompts are
prefilled in chunks of at most the graph's ``max_chunk`` tokens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgeseq import tokenize
from edgeseq.bundle import BundleError, Manifest, read_manifest
from edgeseq.registry import get_backend
from edgeseq.runtime.backends.base import LoadedModel
from edgeseq.runtime.decoding import SamplingConfig, next_token

STATE_PREFIX = "state."


class Session:
    """One stream of a causal LM bundle."""

    def __init__(self, root: Path, manifest: Manifest, backend: str, model: LoadedModel):
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.model = model
        self.tokenizer = tokenize.load(root, manifest.tokenizer)
        self.max_chunk = manifest.graphs["prefill"].max_chunk or 64
        self.reset()

    # -- stream state ---------------------------------------------------------------------
    def reset(self, batch: int = 1) -> None:
        """Start a fresh stream: initial state, nothing pending."""
        self._batch = batch
        self._state = self.model.init_state(batch)
        self._logits: np.ndarray | None = None    # (b, v): next-token logits, if known
        self._pending: np.ndarray | None = None   # (b,): emitted tokens not yet fed to the model
        self._rng = np.random.default_rng()
        self.position = 0

    def fork(self) -> "Session":
        """A new, fresh stream sharing this session's loaded weights."""
        return Session(self.root, self.manifest, self.backend, self.model)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume this stream, as named numpy arrays (safetensors-ready)."""
        out = {f"{STATE_PREFIX}{s.name}": a
               for s, a in zip(self.model.specs, self.model.to_numpy(self._state))}
        if self._logits is not None:
            out["logits"] = self._logits.copy()
        if self._pending is not None:
            out["pending"] = self._pending.copy()
        out["position"] = np.array([self.position], dtype=np.int64)
        rng = json.dumps(self._rng.bit_generator.state).encode()
        out["rng"] = np.frombuffer(rng, dtype=np.uint8).copy()
        return out

    def load_state(self, sd: dict[str, np.ndarray]) -> None:
        """Resume a stream saved by ``state_dict`` (possibly in another process)."""
        arrays = []
        for s in self.model.specs:
            key = f"{STATE_PREFIX}{s.name}"
            if key not in sd:
                raise BundleError(f"state_dict lacks {key}")
            a = np.asarray(sd[key])
            if a.shape[1:] != tuple(s.shape[1:]) or a.dtype != np.dtype(s.dtype):
                raise BundleError(f"state_dict {key}: shape {a.shape} dtype {a.dtype} does not "
                                  f"match the bundle's {s.shape} {s.dtype}")
            arrays.append(a)
        self._batch = arrays[0].shape[0] if arrays else 1
        self._state = self.model.from_numpy(arrays)
        self._logits = np.array(sd["logits"]) if "logits" in sd else None
        self._pending = np.array(sd["pending"]) if "pending" in sd else None
        self.position = int(sd["position"][0]) if "position" in sd else 0
        self._rng = np.random.default_rng()
        if "rng" in sd:
            self._rng.bit_generator.state = json.loads(bytes(np.asarray(sd["rng"])).decode())

    # -- model calls ----------------------------------------------------------------------
    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        """Feed (b, l) tokens in chunks of at most ``max_chunk``; return (b, l, v) logits."""
        logits = []
        # a speculative plan short of memory may load ``verify`` alone: it takes prompts too
        graph = "prefill" if "prefill" in self.model.runners else "verify"
        # ``max_chunk`` may be lowered, never raised past the graph's bound (a static-length
        # scan cannot take more)
        c = min(self.max_chunk, self.manifest.graphs[graph].max_chunk or self.max_chunk)
        for i in range(0, input_ids.shape[1], c):
            out, self._state = self.model.run(graph, {"input_ids": input_ids[:, i:i + c]},
                                              self._state)
            logits.append(out["logits"])
        self.position += input_ids.shape[1]
        return np.concatenate(logits, axis=1)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per stream (b,); return next-token logits (b, v)."""
        out, self._state = self.model.run("step", {"input_ids": tokens}, self._state)
        self.position += 1
        return out["logits"]

    def feed(self, input_ids: Sequence[int] | np.ndarray) -> None:
        """Append tokens to the stream (after any pending token) without generating."""
        ids = _as_batch(input_ids)
        self._flush_pending()
        if ids.shape[1]:
            if self.position == 0 and ids.shape[0] != self._batch:
                self.reset(ids.shape[0])
            self._logits = self.prefill(ids)[:, -1]

    def _flush_pending(self) -> None:
        if self._pending is not None:
            self._logits = self.step(self._pending)
            self._pending = None

    # -- generation -----------------------------------------------------------------------
    def stream(self, input_ids: Sequence[int] | np.ndarray | None = None, max_new_tokens: int = 32,
               do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True
               ) -> Iterator[np.ndarray]:
        """Yield new tokens, (b,) per step, as they are chosen.

        With ``input_ids`` the stream restarts from them; with ``None`` it continues where it
        stands (after ``load_state``, or a previous ``stream``). The token just yielded is fed to
        the model lazily, so a stream paused between yields has nothing half-done.
        """
        cfg = SamplingConfig(do_sample, temperature, top_k, top_p)
        if input_ids is not None:
            ids = _as_batch(input_ids)
            if ids.shape[1] == 0:
                raise ValueError("input_ids is empty: give at least one token")
            self.reset(ids.shape[0])
            self.feed(ids)
        elif self._logits is None and self._pending is None:
            raise ValueError("nothing to continue: pass input_ids or load_state() first")
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        eos = self.manifest.config.get("eos_token_id") if stop_at_eos else None
        done = np.zeros(self._batch, dtype=bool)
        for _ in range(max_new_tokens):
            self._flush_pending()
            tok = next_token(self._logits, cfg, self._rng)
            if eos is not None:
                tok = np.where(done, eos, tok)
                done |= tok == eos
            self._pending, self._logits = tok, None
            yield tok
            if eos is not None and done.all():
                return

    def generate(self, input_ids: Sequence[int] | np.ndarray | None = None,
                 max_new_tokens: int = 32, **kw: Any) -> np.ndarray:
        """New token ids: (n,) for a 1-D prompt, (b, n) for a batch."""
        toks = list(self.stream(input_ids, max_new_tokens, **kw))
        out = np.stack(toks, axis=1) if toks else np.zeros((self._batch, 0), dtype=np.int64)
        if input_ids is not None and np.asarray(input_ids).ndim == 1:
            return out[0]
        return out

    # -- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Prompt ids as the checkpoint's tokenizer gives them, its own special tokens included
        (``tokenizer(text).input_ids``; see ``edgeseq.tokenize``)."""
        if self.tokenizer is None:
            raise BundleError(f"{self.root}: bundle has no tokenizer; pass token ids instead")
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ids, special tokens skipped (as ``tokenizer.decode(ids,
        skip_special_tokens=True)``)."""
        if self.tokenizer is None:
            return " ".join(str(int(i)) for i in ids)
        return self.tokenizer.decode([int(i) for i in ids])


def _as_batch(input_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be 1-D or 2-D (batch, length), got shape {ids.shape}")
    return ids


# Graphs only speculative decoding calls: a plain session leaves them unloaded (memory).
SPECULATIVE_GRAPHS = ("verify", "decoder_chunk", "exit_step", "draft_loop")


def load(path: str | Path, backend: str = "ort", threads: int | None = None,
         graphs: set[str] | None = None, prepack: frozenset[str] = frozenset()) -> Any:
    """Open a bundle written by ``edgeseq convert`` on one backend (``ort``, ``executorch``,
    ``torch``). ``graphs``: which graphs to load (default: all but the speculative ones;
    ``edgeseq.runtime.speculative.load`` asks for those its memory plan affords). ``prepack``:
    graphs whose weights the backend may repack at load (a private copy; the plan's call)."""
    root = Path(path)
    manifest = read_manifest(root)
    be = get_backend(backend)
    why = be.available()
    if why:
        raise BundleError(f"backend {be.name} is unavailable: {why}")
    if graphs is None:
        graphs = {g for g in manifest.graphs if g not in SPECULATIVE_GRAPHS}
    entries = {}
    for name, g in manifest.graphs.items():
        if name not in graphs:
            continue
        if be.format not in g.files:
            have = ", ".join(sorted(g.files)) or "none"
            raise BundleError(f"{root}: graph {name} was not lowered for {be.name} "
                              f"(format {be.format}; bundle has: {have})")
        entries[name] = g
    if manifest.task not in ("seq2seq", "speech_seq2seq", "classification", "causal_lm"):
        raise BundleError(f"{root}: task {manifest.task!r} has no session type in this edgeseq")
    model = be.load(root, entries, threads, prepack)
    if manifest.task in ("seq2seq", "speech_seq2seq"):
        from edgeseq.runtime.seq2seq import Seq2SeqSession

        return Seq2SeqSession(root, manifest, be.name, model)
    if manifest.task == "classification":
        from edgeseq.runtime.classify import ClassifierSession

        return ClassifierSession(root, manifest, be.name, model)
    return Session(root, manifest, be.name, model)
