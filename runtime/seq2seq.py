"""A loaded encoder-decoder bundle: encode once, then decode with explicit caches.

``Seq2SeqSession.encode`` runs the ``encoder`` graph once per input and keeps the cross-attention
K/V; ``generate`` then drives ``decoder_step`` — greedy, sampling (temperature, top-k, top-p,
seeded), beam search or diverse beam search — with the checkpoint's generation config (decoder
prompt, EOS, forced and suppressed tokens). For a fixed-capacity cache the session stops at the
capacity; a growing cache stops at the model's position table.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from edgeseq import generation, tokenize
from edgeseq.bundle import BundleError, Manifest
from edgeseq.limits import check_finite, check_finite_array, check_source
from edgeseq.runtime.backends.base import LoadedModel
from edgeseq.runtime.base_session import BaseSession, StateError, read_float, read_int
from edgeseq.runtime.beam import Hypothesis, beam_search
from edgeseq.runtime.decoding import SamplingConfig, next_token
from edgeseq.runtime.processors import Processors


class Seq2SeqSession(BaseSession):
    """One decoding stream (a source and its rows: beams or a batch) of a seq2seq bundle.

    The stream is the encoded source (its cross-attention K/V, mask and ids) and the decoder's
    self-attention caches at ``position``: ``state_dict`` saves both, so a decode paused between
    ``step`` calls resumes in another session (or process) where it stood."""

    def __init__(self, root: Path, manifest: Manifest, backend: str, model: LoadedModel):
        super().__init__(root, manifest, backend, model)
        self.gen = dict(self.config.get("generation") or {})
        self.speech = self.task.audio
        enc = manifest.graphs["encoder"]
        self.encoder_inputs = [s.name for s in enc.inputs]
        self.cross_names = [s.name for s in enc.outputs]
        self._cross_specs = {s.name: s for s in enc.outputs}
        self.capacity = int(self.config.get("max_target_len") or 1 << 30)
        self.task_prefix = ""                   # a declared task's source prefix (use_task)
        self.reset()

    # -- the stream ------------------------------------------------------------------------
    def reset(self, batch: int = 1) -> None:
        """Start a fresh stream: nothing encoded, empty caches for ``batch`` rows. The settings
        ``use_task`` chose stay (they belong to the session, not to one source)."""
        self._cross: dict[str, np.ndarray] = {}
        self._mask: np.ndarray | None = None
        self._source: list[int] | None = None   # encoder input ids (encoder n-gram rule)
        self._rows = batch
        self._feeds: dict[str, np.ndarray] = {}
        self._state = self.model.init_state(batch)
        self.position = 0

    def _stream_state(self) -> dict[str, np.ndarray]:
        out = {f"encoded.{k}": v.copy() for k, v in self._cross.items()}
        if self._mask is not None:
            out["encoder_attention_mask"] = self._mask.copy()
        if self._source is not None:
            out["source"] = np.asarray(self._source, dtype=np.int64)
        out["position"] = np.array([self.position], dtype=np.int64)
        return out

    def _read_stream_state(self, sd: dict[str, np.ndarray], batch: int) -> dict[str, Any]:
        cross = {}
        length: int | None = None
        for name in self.cross_names if any(k.startswith("encoded.") for k in sd) else ():
            key = f"encoded.{name}"
            if key not in sd:
                raise StateError(f"state_dict lacks {key}")
            a = read_float(sd, key, (1, *(None if isinstance(d, str) else d
                                          for d in self._cross_specs[name].shape[1:])))
            # the source length is the one dimension the specs leave open
            open_dims = [n for n, d in zip(a.shape[1:], self._cross_specs[name].shape[1:])
                         if isinstance(d, str)]
            for n in open_dims:
                if length is None:
                    length = n
                elif n != length:
                    raise StateError(f"state_dict {key}: source length {n}, the other encoded "
                                     f"entries have {length}")
            cross[name] = a
        mask = source = None
        if "encoder_attention_mask" in sd:
            mask = np.asarray(sd["encoder_attention_mask"])
            if mask.dtype.kind not in "iu" or mask.ndim != 2 or mask.shape[0] != 1 \
                    or (length is not None and mask.shape[1] != length) or not cross:
                raise StateError(f"state_dict encoder_attention_mask: shape {mask.shape} dtype "
                                 f"{mask.dtype}; expected integer (1, {length or 'source'}) "
                                 f"beside the encoded source")
            mask = mask.astype(np.int64)
        if "source" in sd:
            ids = np.asarray(sd["source"])
            vocab = self._vocab_size()
            if ids.dtype.kind not in "iu" or ids.ndim != 1 or not cross:
                raise StateError(f"state_dict source: shape {ids.shape} dtype {ids.dtype}; "
                                 f"expected integer token ids (n,) beside the encoded source")
            if ids.size and (ids.min() < 0 or (vocab and ids.max() >= vocab)):
                raise StateError(f"state_dict source: token ids outside the vocabulary "
                                 f"[0, {vocab})")
            source = [int(t) for t in ids]
        position = read_int(sd, "position", 0, self.capacity)
        return {"cross": cross, "mask": mask, "source": source, "position": position}

    def _resume(self, batch: int, extra: dict[str, Any]) -> None:
        self._cross, self._mask, self._source = extra["cross"], extra["mask"], extra["source"]
        self.position = extra["position"]
        self._bind(batch)

    # -- encoder ---------------------------------------------------------------------------
    def encode(self, source: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Run the encoder on one source: token ids (s,), or log-mel features (m, f) for speech.

        Returns the cross-attention K/V (batch 1) and keeps them for ``generate``.
        """
        if self.speech:
            feats = np.asarray(source, dtype=np.float32)
            if feats.ndim != 2:
                raise ValueError(f"input_features must be (mel bins, frames), got {feats.shape}")
            limit = self.config.get("audio", {}).get("window_frames")
            if limit and feats.shape[1] > limit:
                raise ValueError(f"{feats.shape[1]} mel frames exceed the encoder's window of "
                                 f"{limit}; split long audio into windows (edgeseq.runtime.speech)")
            inputs = {"input_features": feats[None]}
            self._mask = None
            self._source = None
        else:
            ids = np.asarray(source, dtype=np.int64)
            if ids.ndim != 1 or ids.size == 0:
                raise ValueError("the source must be a non-empty 1-D list of token ids")
            vocab = self.config["vocab_size"]
            if ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(f"source token ids must be in [0, {vocab})")
            check_source(ids.size, self.config)
            mask = np.ones((1, ids.size), dtype=np.int64)
            inputs = {"input_ids": ids[None], "attention_mask": mask}
            self._mask = mask
            self._source = ids.tolist()
        out, _ = self.model.run("encoder", inputs, [])
        self._cross = {k: check_finite_array(out[k], f"graph encoder output {k}")
                       for k in self.cross_names}
        return self._cross

    # -- decoder ---------------------------------------------------------------------------
    def start(self, rows: int = 1) -> None:
        """Empty self-attention caches for ``rows`` decoding rows over the encoded source."""
        if not self._cross:
            raise ValueError("nothing encoded: call encode() first")
        self._bind(rows)
        self._state = None  # the old caches go before the new ones are allocated (peak memory)
        self._state = self.model.init_state(rows)
        self.position = 0

    def _bind(self, rows: int) -> None:
        """The encoded source as the decoder's feeds, repeated for ``rows`` rows."""
        self._rows = rows
        self._feeds = {k: np.repeat(v, rows, axis=0) for k, v in self._cross.items()}
        if self._mask is not None:
            self._feeds["encoder_attention_mask"] = np.repeat(self._mask, rows, axis=0)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row at the current position; return logits (rows, v)."""
        if self.position >= self.capacity:
            raise ValueError(f"the decoder cache is full ({self.capacity} positions)")
        if "decoder_step" not in self.model.runners and "decoder_chunk" in self.model.runners:
            # a speculative plan short of memory loads one decoder graph: a chunk of one token
            logits = self.run_chunk(np.asarray(tokens, dtype=np.int64).reshape(-1, 1),
                                    np.zeros(1, dtype=np.int64), np.ones((1, 1), dtype=np.int64))
            self.position += 1
            return logits[:, 0]
        inputs = dict(self._feeds)
        inputs["cache_position"] = np.array([self.position], dtype=np.int64)
        inputs["input_ids"] = np.asarray(tokens, dtype=np.int64)
        out, self._state = self.model.run("decoder_step", inputs, self._state)
        self.position += 1
        return check_finite_array(out["logits"],
                                  f"graph decoder_step (position {self.position - 1})")

    def run_chunk(self, ids: np.ndarray, depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Feed ``ids`` (rows, c) through ``decoder_chunk`` from the current position, node i at
        position ``position + depth[i]`` attending to the nodes ``mask[i]`` marks (a chain's mask
        is lower-triangular, a tree's marks each node's ancestors); return logits (rows, c, v).
        The cache holds all c afterwards and ``position`` is not moved: the caller commits."""
        inputs = dict(self._feeds)
        inputs["input_ids"] = ids
        inputs["cache_position"] = np.array([self.position], dtype=np.int64)
        inputs["positions"] = (self.position + depth).astype(np.int64)
        inputs["tree_mask"] = mask
        out, self._state = self.model.run("decoder_chunk", inputs, self._state)
        return check_finite_array(out["logits"], f"graph decoder_chunk (position {self.position})")

    def reorder(self, index: np.ndarray) -> None:
        self._state = self.model.reorder(self._state, np.asarray(index))

    # -- generation ------------------------------------------------------------------------
    @property
    def decoder_prompt(self) -> list[int]:
        return [int(t) for t in self.config["decoder_prompt"]]

    def max_new_tokens_cap(self, prompt_len: int | None = None) -> int:
        cap = self.capacity
        table = self.config.get("max_target_positions")
        if table:
            cap = min(cap, int(table))
        return cap - (prompt_len if prompt_len is not None else len(self.decoder_prompt))

    def default_max_new_tokens(self, prompt_len: int | None = None) -> int:
        """New tokens when the caller gives no limit: the checkpoint's generation config
        (``max_new_tokens``, else ``max_length``), as transformers' ``generate``."""
        n = len(self.decoder_prompt) if prompt_len is None else prompt_len
        return generation.default_max_new_tokens(self.gen, n)

    def sampling(self, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None) -> SamplingConfig:
        """The sampling settings: the arguments given, else the checkpoint's generation config
        (which samples by default when it sets ``do_sample``, with transformers' top-k of 50;
        fields a family's ``generate`` overrides were left out of it at convert)."""
        return SamplingConfig.from_generation(self.gen, do_sample, temperature, top_k, top_p)

    def _processors(self, max_new: int, ignore_eos: bool, prompt_len: int | None = None,
                    extra: Sequence[Callable[[np.ndarray, np.ndarray], np.ndarray]] = ()
                    ) -> Processors:
        procs = Processors.from_config(self.gen, prompt_len or len(self.decoder_prompt), max_new,
                                       ignore_eos, speech=self.speech, source=self._source)
        procs.extra = list(extra)
        return procs

    def stream(self, source: Sequence[int] | np.ndarray | None = None,
               max_new_tokens: int | None = None, do_sample: bool | None = None,
               temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, ignore_eos: bool = False,
               prompt: Sequence[int] | None = None,
               processors: Sequence[Callable[[np.ndarray, np.ndarray], np.ndarray]] = ()
               ) -> Iterator[int]:
        """Yield new tokens one by one (greedy or sampling), EOS included, as they are chosen.

        ``prompt`` replaces the bundle's decoder prompt for this call (Whisper's language, task
        and timestamp tokens); ``processors`` run after the generation config's own.
        ``max_new_tokens`` and the sampling settings left ``None`` are the checkpoint's
        generation config's (``edgeseq.generation``).
        """
        cfg = self.sampling(do_sample, temperature, top_k, top_p)
        if source is not None:
            self.encode(source)
        prompt = [int(t) for t in prompt] if prompt is not None else self.decoder_prompt
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens(len(prompt))
        max_new = min(max_new_tokens, self.max_new_tokens_cap(len(prompt)))
        procs = self._processors(max_new, ignore_eos, len(prompt), processors)
        rng = np.random.default_rng(seed)
        self.start(1)
        for tok in prompt[:-1]:
            self.step(np.array([tok]))
        seq = list(prompt)
        last = prompt[-1]
        for _ in range(max_new):
            logits = self.step(np.array([last]))
            scores = procs(np.array([seq]), logits.astype(np.float32))
            last = int(next_token(scores, cfg, rng)[0])
            seq.append(last)
            yield last
            if last in procs.eos:
                return

    def generate(self, source: Sequence[int] | np.ndarray | None = None,
                 max_new_tokens: int | None = None, num_beams: int | None = None,
                 num_beam_groups: int | None = None, diversity_penalty: float | None = None,
                 length_penalty: float | None = None, early_stopping: bool | str | None = None,
                 num_return_sequences: int = 1, ignore_eos: bool = False,
                 prompt: Sequence[int] | None = None,
                 processors: Sequence[Callable[[np.ndarray, np.ndarray], np.ndarray]] = (),
                 **sampling: Any) -> list[int] | list[Hypothesis]:
        """New tokens for one source (EOS included when reached).

        Beam settings, the length limit and sampling default to the checkpoint's generation
        config. With ``num_return_sequences > 1`` the best hypotheses are returned (tokens and
        score).
        """
        beams = num_beams if num_beams is not None else int(generation.field(self.gen, "num_beams"))
        if beams <= 1:
            return list(self.stream(source, max_new_tokens, ignore_eos=ignore_eos, prompt=prompt,
                                    processors=processors, **sampling))
        if self.sampling(*(sampling.get(k) for k in ("do_sample", "temperature", "top_k",
                                                     "top_p"))).do_sample:
            raise ValueError("sampling with beams (beam sampling) is not supported; decode "
                             "greedily (do_sample=False, --greedy) or with one beam")
        if source is not None:
            self.encode(source)
        groups = num_beam_groups or int(self.gen.get("num_beam_groups") or 1)
        div = diversity_penalty if diversity_penalty is not None else float(
            self.gen.get("diversity_penalty") or 0.0)
        lp = length_penalty if length_penalty is not None else float(
            generation.field(self.gen, "length_penalty"))
        div = check_finite("diversity_penalty", div)
        lp = check_finite("length_penalty", lp)
        es = early_stopping if early_stopping is not None else generation.field(
            self.gen, "early_stopping")
        prompt = [int(t) for t in prompt] if prompt is not None else self.decoder_prompt
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens(len(prompt))
        max_new = min(max_new_tokens, self.max_new_tokens_cap(len(prompt)))
        self.start(beams)

        def step(tokens: np.ndarray, pos: int) -> np.ndarray:
            assert pos == self.position
            return self.step(tokens)

        hyps = beam_search(step, self.reorder, prompt, beams, max_new,
                           self._processors(max_new, ignore_eos, len(prompt), processors), lp, es,
                           groups, div, num_return_sequences)
        if num_return_sequences == 1:
            return hyps[0].tokens
        return hyps

    # -- text ------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Source token ids for ``text``: the checkpoint's tokenizer with its own special tokens
        (``tokenize.source_ids``), after the task prefix chosen by ``use_task``."""
        if self.tokenizer is None:
            raise BundleError(f"{self.root}: bundle has no tokenizer; pass token ids instead")
        return tokenize.source_ids(self.tokenizer, self.task_prefix + text,
                                   self.config)

    def decode(self, ids: Sequence[int]) -> str:
        """Text for output ids, as the checkpoint's tokenizer decodes them with
        ``skip_special_tokens=True``."""
        if self.tokenizer is not None and getattr(self.tokenizer, "adds_special_tokens", False):
            return self.tokenizer.decode([int(i) for i in ids])  # it knows its special tokens
        specials = {self.config.get("eos_token_id"), self.config.get("pad_token_id"),
                    self.config.get("decoder_start_token_id")}
        keep = [int(i) for i in ids if int(i) not in specials]
        if self.tokenizer is None:
            return " ".join(str(i) for i in keep)
        return self.tokenizer.decode(keep)

    def tasks(self) -> dict[str, dict[str, Any]]:
        """The tasks the checkpoint declares (``task_specific_params``: T5's translation and
        summarization prefixes and their generation settings)."""
        return dict(self.config.get("task_specific_params") or {})

    def use_task(self, name: str) -> None:
        """Apply a declared task as transformers' pipelines do: its ``prefix`` is put before
        every source text and its generation settings replace the checkpoint's."""
        tasks = self.tasks()
        if name not in tasks:
            known = ", ".join(sorted(tasks)) or "none"
            raise BundleError(f"--task {name}: unknown task; this bundle declares: {known}")
        params = dict(tasks[name])
        self.task_prefix = str(params.pop("prefix", None) or "")
        self.gen.update({k: v for k, v in params.items() if k in generation.GENERATION_FIELDS})
