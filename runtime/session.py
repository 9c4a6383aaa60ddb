"""``load`` (a bundle on one backend, opened as its task's session) and the causal-LM
``Session``: ``generate``, ``stream``, and the stream's ``reset``, ``fork``,
``state_dict``/``load_state`` (``edgeseq.runtime.base_session``).

Memory is constant in the stream's length: state has a fixed size and prompts are prefilled in
chunks of at most the graph's ``max_chunk`` tokens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgeseq import tokenize
from edgeseq.bundle import BundleError, Manifest, read_manifest
from edgeseq.limits import check_finite_array
from edgeseq.registry import get_backend, get_task
from edgeseq.runtime.backends.base import LoadedModel
from edgeseq.runtime.base_session import STATE_PREFIX, BaseSession, StateError, read_int
from edgeseq.runtime.decoding import SamplingConfig, next_token

__all__ = ["Session", "StateError", "STATE_PREFIX", "load", "SPECULATIVE_GRAPHS"]


class Session(BaseSession):
    """One stream of a causal LM bundle."""

    def __init__(self, root: Path, manifest: Manifest, backend: str, model: LoadedModel):
        super().__init__(root, manifest, backend, model)
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

    def _stream_state(self) -> dict[str, np.ndarray]:
        out = {}
        if self._logits is not None:
            out["logits"] = self._logits.copy()
        if self._pending is not None:
            out["pending"] = self._pending.copy()
        out["position"] = np.array([self.position], dtype=np.int64)
        rng = json.dumps(self._rng.bit_generator.state).encode()
        out["rng"] = np.frombuffer(rng, dtype=np.uint8).copy()
        return out

    def _read_stream_state(self, sd: dict[str, np.ndarray], batch: int) -> dict[str, Any]:
        vocab = self._vocab_size()
        logits = pending = None
        if "logits" in sd:
            logits = np.asarray(sd["logits"])
            if logits.dtype.kind != "f" or logits.ndim != 2 or logits.shape[0] != batch \
                    or (vocab is not None and logits.shape[1] != vocab):
                raise StateError(f"state_dict logits: shape {logits.shape} dtype {logits.dtype}; "
                                 f"expected float ({batch}, {vocab if vocab else 'vocab'})")
            if not np.isfinite(logits).all():
                raise StateError("state_dict logits: holds NaN or inf")
            logits = logits.copy()
        if "pending" in sd:
            pending = np.asarray(sd["pending"])
            if pending.dtype.kind not in "iu" or pending.shape != (batch,):
                raise StateError(f"state_dict pending: shape {pending.shape} dtype "
                                 f"{pending.dtype}; expected integer token ids ({batch},)")
            if pending.size and (pending.min() < 0 or (vocab and pending.max() >= vocab)):
                raise StateError(f"state_dict pending: token ids {pending.tolist()} are outside "
                                 f"the vocabulary [0, {vocab})")
            pending = pending.astype(np.int64)
        position = read_int(sd, "position", 0)
        rng = np.random.default_rng()
        if "rng" in sd:
            raw = np.asarray(sd["rng"])
            try:
                if raw.dtype != np.uint8 or raw.ndim != 1:
                    raise ValueError(f"dtype {raw.dtype} shape {raw.shape}, expected uint8 bytes")
                rng.bit_generator.state = json.loads(bytes(raw).decode())
            except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as e:
                msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                raise StateError(f"state_dict rng: not a saved random generator state "
                                 f"({msg})") from None
        return {"logits": logits, "pending": pending, "position": position, "rng": rng}

    def _resume(self, batch: int, extra: dict[str, Any]) -> None:
        self._batch = batch
        self._logits, self._pending = extra["logits"], extra["pending"]
        self.position, self._rng = extra["position"], extra["rng"]

    # -- model calls ----------------------------------------------------------------------
    def prefill(self, input_ids: np.ndarray | Sequence[int], last_only: bool = False
                ) -> np.ndarray:
        """Feed (b, l) tokens (or one stream's list of ids) in chunks of at most ``max_chunk``;
        return (b, l, v) logits, or with ``last_only`` the last position's (b, v): a long
        prompt's logits would otherwise be held whole (a 1 MB prompt over a 256-token
        vocabulary: 1 GB)."""
        prompt = _Prompt(input_ids)
        logits = []
        # a speculative plan short of memory may load ``verify`` alone: it takes prompts too
        graph = "prefill" if "prefill" in self.model.runners else "verify"
        # ``max_chunk`` may be lowered, never raised past the graph's bound (a static-length
        # scan cannot take more)
        c = min(self.max_chunk, self.manifest.graphs[graph].max_chunk or self.max_chunk)
        n = prompt.length
        for i in range(0, n, c):
            out, self._state = self.model.run(graph, {"input_ids": prompt.chunk(i, i + c)},
                                              self._state)
            if not last_only:
                logits.append(out["logits"])
            elif i + c >= n:
                # a copy: a view would keep the whole chunk's logits alive
                logits.append(out["logits"][:, -1].copy())
            # before the next chunk: a NaN here would otherwise surface as token 0
            check_finite_array(logits[-1] if logits else out["logits"][:, -1],
                               f"graph {graph} (prompt tokens {self.position + i}.."
                               f"{self.position + min(i + c, n) - 1})")
        self.position += n
        return logits[0] if last_only else np.concatenate(logits, axis=1)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per stream (b,); return next-token logits (b, v)."""
        out, self._state = self.model.run("step", {"input_ids": tokens}, self._state)
        self.position += 1
        return check_finite_array(out["logits"], f"graph step (position {self.position - 1})")

    def feed(self, input_ids: Sequence[int] | np.ndarray) -> None:
        """Append tokens to the stream (after any pending token) without generating."""
        ids = _Prompt(input_ids)
        vocab = self._vocab_size()
        # an id past the embedding table is an out-of-bounds gather inside the backend
        if ids.length:
            lo, hi = ids.bounds()
            if lo < 0 or (vocab is not None and hi >= vocab):
                raise ValueError(f"input_ids: token id {lo if lo < 0 else hi} is outside the "
                                 f"vocabulary [0, {vocab})")
        self._flush_pending()
        if ids.length:
            if self.position == 0 and ids.batch != self._batch:
                self.reset(ids.batch)
            self._logits = self.prefill(ids, last_only=True)

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
            ids = _Prompt(input_ids)
            if ids.length == 0:
                raise ValueError("input_ids is empty: give at least one token")
            self.reset(ids.batch)
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
        # a list prompt stays a list (no int64 copy of a long prompt just to read its rank)
        if input_ids is not None and (_Prompt(input_ids).array is None
                                      or np.ndim(input_ids) == 1):
            return out[0]
        return out

    # -- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Prompt ids as the checkpoint's tokenizer gives them, its own special tokens included
        (``tokenizer(text).input_ids``; see ``edgeseq.tokenize``)."""
        return self._tokenizer().encode(text)

    def encode_array(self, text: str) -> np.ndarray:
        """``encode(text)`` as a compact 1-D id array (uint8/uint16/uint32): what a long
        prompt should be held as; ``prefill`` widens it a chunk at a time."""
        return tokenize.encode_array(self._tokenizer(), text)

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise BundleError(f"{self.root}: bundle has no tokenizer; pass token ids instead")
        return self.tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ids, special tokens skipped (as ``tokenizer.decode(ids,
        skip_special_tokens=True)``)."""
        if self.tokenizer is None:
            return " ".join(str(int(i)) for i in ids)
        return self.tokenizer.decode([int(i) for i in ids])


class _Prompt:
    """Prompt ids as given: a (b, l) array, or one stream's ids (a list, or a 1-D array of any
    integer type) kept as given and widened to int64 a chunk at a time (a 1 MB prompt as int64
    is 8 MB; as ``encode_array`` gives it, 1-2)."""

    def __init__(self, input_ids: "Sequence[int] | np.ndarray | _Prompt"):
        if isinstance(input_ids, _Prompt):
            self.ids, self.array = input_ids.ids, input_ids.array
        elif isinstance(input_ids, (list, tuple)) and not any(
                isinstance(t, (list, tuple, np.ndarray)) for t in input_ids[:1]):
            self.ids, self.array = input_ids, None
        elif (isinstance(input_ids, np.ndarray) and input_ids.ndim == 1
              and input_ids.dtype.kind in "iu"):
            self.ids, self.array = input_ids, None
        else:
            self.ids, self.array = None, _as_batch(input_ids)

    @property
    def batch(self) -> int:
        return 1 if self.array is None else self.array.shape[0]

    @property
    def length(self) -> int:
        return len(self.ids) if self.array is None else self.array.shape[1]

    def bounds(self) -> tuple[int, int]:
        if self.array is not None:
            return int(self.array.min()), int(self.array.max())
        if isinstance(self.ids, np.ndarray):
            return (int(self.ids.min()), int(self.ids.max())) if self.ids.size else (0, 0)
        try:
            return int(min(self.ids)), int(max(self.ids))
        except (TypeError, ValueError):
            raise ValueError("input_ids must be integer token ids") from None

    def chunk(self, i: int, j: int) -> np.ndarray:
        if self.array is not None:
            return self.array[:, i:j]
        return np.asarray(self.ids[i:j], dtype=np.int64)[None]


def _as_batch(input_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be 1-D or 2-D (batch, length), got shape {ids.shape}")
    return ids


# Graphs only speculative decoding calls: a plain session leaves them unloaded (memory).
SPECULATIVE_GRAPHS = ("verify", "decoder_chunk", "exit_step", "draft_loop")
def default_backend(manifest: Manifest) -> str:
    """The backend a load runs when none is named: the first of the bundle's target backends
    (``convert --target``: ``Manifest.backends``, the device's order) usable here, else ONNX
    Runtime."""
    for name in manifest.backends:
        try:
            be = get_backend(name)
        except KeyError:        # a backend of a newer edgeseq: the next one
            continue
        if be.available() is None:
            return be.name
    return "ort"


def load(path: str | Path, backend: str | None = None, threads: int | None = None,
         graphs: set[str] | None = None, prepack: frozenset[str] = frozenset(),
         manifest: Manifest | None = None) -> Any:
    """Open a bundle written by ``edgeseq convert`` on one backend (``ort``, ``executorch``,
    ``openvino``, ``torch``; None: ``default_backend``, the bundle's target's first). ``graphs``: which graphs to load (default: all but the speculative ones;
    ``edgeseq.runtime.speculative.load`` asks for those its memory plan affords). ``prepack``:
    graphs whose weights the backend may repack at load (a private copy; the plan's call).
    ``manifest``: the bundle's, where the caller has read it already; ``manifest.json`` is read
    once per load and passed down, never re-read."""
    from edgeseq.trust import check_integrity

    root = Path(path)
    if manifest is None:
        manifest = read_manifest(root)
    # sizes were checked by read_manifest; hashes on this machine's first sight of the bundle
    check_integrity(root, manifest)
    be = get_backend(backend or default_backend(manifest))
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
    try:
        task = get_task(manifest.task)
    except KeyError:
        raise BundleError(f"{root}: task {manifest.task!r} has no session type in this "
                          f"edgeseq") from None
    # each group: the session runs one of these graphs (a speculative plan may load either)
    missing = [" or ".join(group) for group in task.graphs
               if not any(g in manifest.graphs for g in group)]
    if missing:
        raise BundleError(f"{root / 'manifest.json'}: task {manifest.task} needs graph "
                          f"{', '.join(missing)}; the bundle has {', '.join(manifest.graphs)}")
    model = be.load(root, manifest, entries, threads, prepack)
    return task.part("session")(root, manifest, be.name, model)
