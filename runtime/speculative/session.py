"""``edgeseq.runtime.speculative.load``: a bundle opened for speculative generation under a
memory budget.

The memory plan (``plan.py``) is made from the manifest and file sizes *before* anything is
loaded: it decides which graphs to load (a plain session never loads ``verify`` /
``decoder_chunk`` / ``exit_step``), the draft source, draft length, tree width and rollback. A
budget that cannot hold the model at all fails here, before allocating.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeseq.bundle import BundleError, Manifest, read_manifest
from edgeseq.registry import tasks
from edgeseq.runtime.decoding import SamplingConfig
from edgeseq.runtime.speculative.drafts import DraftSource, make_source
from edgeseq.runtime.speculative.engine import (DraftModelSource, EarlyExitSource,
                                                SpeculativeDecoder, SpecStats)
from edgeseq.runtime.speculative.plan import (MemoryPlan, draft_folder, make_plan,
                                              parse_speculate)
from edgeseq.runtime.speculative.targets import CausalTarget, Seq2SeqTarget


class SpeculativeSession:
    """A generating bundle plus, when the plan affords it, a draft source and a verifier."""

    def __init__(self, session: Any, plan: MemoryPlan, draft_session: Any = None):
        self.session = session
        self.plan = plan
        self.task = session.task
        self.stats = SpecStats()
        self.decoder: SpeculativeDecoder | None = None
        if plan.prefill_chunk and hasattr(session, "max_chunk"):
            session.max_chunk = plan.prefill_chunk
        if plan.mode == "off":
            return
        target: Any = (Seq2SeqTarget(session) if self.task.encoder
                       else CausalTarget(session, plan.rollback))
        self.target = target
        vocab = target.vocab
        kind = plan.mode
        source: DraftSource
        if kind == "draft":
            source = DraftModelSource(draft_session)
        elif kind == "early-exit":
            source = EarlyExitSource(target, plan.exit_threshold)
        else:
            source = make_source(kind, vocab)
        self.source = source
        self.decoder = SpeculativeDecoder(target, source, k=plan.k, k_max=plan.k_max,
                                          width=plan.width, adaptive=plan.adaptive)
        self.decoder.stats = self.stats

    # -- generation ----------------------------------------------------------------------------
    def generate(self, inputs: Sequence[int] | np.ndarray, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
                 ignore_eos: bool = False) -> list[int]:
        """New tokens for a prompt (causal LM) or a source (encoder-decoders: token ids, or
        log-mel features for speech) — the same tokens the plain session returns when greedy."""
        cfg = SamplingConfig(do_sample, temperature, top_k, top_p)
        if self.decoder is None:
            return self._plain(inputs, max_new_tokens, cfg, seed, stop_at_eos, ignore_eos)
        rng = np.random.default_rng(seed)
        s = self.session
        if not self.task.encoder:
            ids = [int(t) for t in np.asarray(inputs).reshape(-1)]
            if not ids:
                raise ValueError("input_ids is empty: give at least one token")
            eos_id = s.manifest.config.get("eos_token_id")
            eos = {int(eos_id)} if (stop_at_eos and eos_id is not None) else set()
            return list(self.decoder.stream(ids, max_new_tokens, cfg, rng, eos))
        max_new = min(max_new_tokens, s.max_new_tokens_cap())
        self._check_planned(inputs, max_new)
        procs = s._processors(max_new, ignore_eos)
        src_tokens = None if s.speech else [int(t) for t in np.asarray(inputs).reshape(-1)]
        return list(self.decoder.stream(s.decoder_prompt, max_new, cfg, rng, set(procs.eos),
                                        source=inputs, source_tokens=src_tokens,
                                        processors=procs))

    def _check_planned(self, inputs: Any, max_new: int) -> None:
        plan = self.plan
        n = np.asarray(inputs).shape[-1]
        if self.session.speech:
            n = (n + 1) // 2                      # encoder positions: the frames halved
        if plan.max_source is not None and n > plan.max_source:
            raise ValueError(f"the source is {n} long; memory was planned for "
                             f"{plan.max_source} (load with a larger max_source)")
        length = len(self.session.decoder_prompt) + max_new
        if plan.max_length is not None and length > plan.max_length:
            raise ValueError(f"{length} decoder positions (prompt + max_new_tokens); memory was "
                             f"planned for {plan.max_length} (load with a larger max_length)")

    def _plain(self, inputs: Any, max_new: int, cfg: SamplingConfig, seed: int | None,
               stop_at_eos: bool, ignore_eos: bool) -> list[int]:
        s = self.session
        kw = dict(do_sample=cfg.do_sample, temperature=cfg.temperature, top_k=cfg.top_k,
                  top_p=cfg.top_p, seed=seed)
        if not self.task.encoder:
            toks = list(s.stream(np.asarray(inputs).reshape(-1), max_new, stop_at_eos=stop_at_eos,
                                 **kw))
            self.stats.emitted += len(toks)
            self.stats.rounds += len(toks)
            return [int(t[0]) for t in toks]
        self._check_planned(inputs, min(max_new, s.max_new_tokens_cap()))
        toks = list(s.stream(inputs, max_new, ignore_eos=ignore_eos, **kw))
        self.stats.emitted += len(toks)
        self.stats.rounds += len(toks)
        return [int(t) for t in toks]

    def report(self) -> dict[str, Any]:
        """``acceptance_rate``, ``tokens_per_verify`` and ``memory_plan`` (for ``--json``)."""
        st = self.stats.to_json()
        return {"speculate": self.plan.mode, "acceptance_rate": st["acceptance_rate"],
                "tokens_per_verify": st["tokens_per_verify"], "speculation": st,
                "memory_plan": self.plan.to_json()}


def load(path: str | Path, backend: str | None = None, speculate: str = "auto",
         memory_budget: int | None = None, threads: int | None = None,
         k: int | None = None, width: int | None = None, max_source: int | None = None,
         max_length: int | None = None, exit_threshold: float = 0.3,
         manifest: Manifest | None = None) -> SpeculativeSession:
    """Open a bundle for speculative generation.

    Args:
        manifest: the bundle's manifest if the caller has read it already (it is read once).
        speculate: ``auto`` (the plan picks a model-free source that fits), ``off``, ``input``,
            ``ngram``, ``recycle``, ``draft:PATH`` (another bundle, same tokenizer), ``draft``
            (the draft bundle recorded in the manifest: ``convert --distill draft``) or
            ``early-exit:N`` (needs ``edgeseq convert --early-exit N``).
        memory_budget: bytes the process may grow by (weights, state, buffers, drafter);
            None = unconstrained.
        k, width: force the starting draft length / tree width (the plan still bounds them).
        exit_threshold: early-exit drafting stops at a token the shallow head gives less
            probability than this (Kangaroo's early stop; 0 drafts the full k).
        max_source, max_length: encoder-decoders: the longest source (tokens; speech: encoder
            positions, half the mel frames) and decoder length (prompt + new tokens) to plan
            memory for; default the model's limits. Longer ones are refused at ``generate``.
    Raises:
        BundleError: the bundle is not a generating model, the speculation asks for a graph the
            bundle lacks, or the budget cannot hold the model at all (before loading anything).
    """
    from edgeseq.runtime.session import default_backend, load as load_session

    root = Path(path)
    if memory_budget is not None:
        bound_allocator()
    man = manifest if manifest is not None else read_manifest(root)
    backend = backend or default_backend(man)
    kind = tasks().get(man.task)
    if kind is None or not kind.generates:
        generating = [name for name, t in tasks().items() if t.generates]
        raise BundleError(f"{root}: task {man.task!r} does not generate; speculation applies to "
                          f"{', '.join(generating)}")
    kind, arg = parse_speculate(speculate)
    draft_man = None
    draft_backend = None
    if kind == "draft":
        arg = str(draft_folder(root, man, arg))
        draft_man = read_manifest(Path(arg))
        check_draft(root, man, Path(arg), draft_man)
        draft_backend = _draft_backend(Path(arg), draft_man, backend)
    if kind == "early-exit":
        have = man.config.get("early_exit_layers")
        if "exit_step" not in man.graphs or (arg is not None and int(arg) != have):
            hint = f" (it has early-exit:{have})" if have else ""
            raise BundleError(f"{root}: no exit_step graph for early-exit:{arg}{hint}; convert "
                              f"with --early-exit {arg or 'N'}")
    plan = make_plan(root, man, backend, kind, memory_budget, draft_root=Path(arg) if
                     kind == "draft" else None, draft_manifest=draft_man, k=k, width=width,
                     max_source=max_source, max_length=max_length,
                     draft_backend=draft_backend)
    plan.exit_threshold = float(exit_threshold)
    session = load_session(root, backend=backend, threads=threads, graphs=plan.graphs,
                           prepack=frozenset(plan.prepack), manifest=man)
    draft_session = None
    if plan.mode == "draft":
        draft_session = load_session(Path(arg), backend=plan.draft_backend, threads=threads,
                                     graphs=plan.draft_graphs, manifest=draft_man)
    return SpeculativeSession(session, plan, draft_session)


def bound_allocator() -> bool:
    """Make freed buffers go back to the OS (glibc): a fixed mmap threshold of 64 KiB, a trim
    threshold of 128 KiB and a single arena. glibc's default raises the mmap threshold after
    each large free, so later tensors come from the heap and fragment it; the process then keeps growing with the
    variety of shapes it has seen (measured: +40% over 10 generations of a small model), which
    no plan of live tensors can bound. Returns False where there is no glibc ``mallopt``."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim, m_mmap, m_arena_max = -1, -3, -8
        # one arena: a worker thread's freed buffers are reused by every thread, instead of a
        # per-thread heap whose size depends on which thread the scheduler ran (seen: ~10 MiB
        # between runs of one small model with 2 threads)
        ok = (bool(libc.mallopt(m_mmap, 64 << 10)) and bool(libc.mallopt(m_trim, 128 << 10))
              and bool(libc.mallopt(m_arena_max, 1)))
        if ok:
            from edgeseq.runtime.backends import base

            base.ALLOCATOR_BOUNDED = True
        return ok
    except (OSError, AttributeError):
        return False


def _draft_backend(draft_root: Path, dman: Any, backend: str) -> str:
    """The target's backend if the draft was lowered for it, else one it was lowered for (a
    draft may run elsewhere than its target, e.g. on another accelerator)."""
    from edgeseq.registry import get_backend

    have = set.intersection(*(set(g.files) for g in dman.graphs.values()))
    if get_backend(backend).format in have:
        return backend
    for name in ("ort", "executorch", "torch"):
        if get_backend(name).format in have and not get_backend(name).available():
            return name
    raise BundleError(f"{draft_root}: the draft has no graphs any available backend runs "
                      f"(formats: {', '.join(sorted(have)) or 'none'})")


def check_draft(root: Path, man: Any, draft_root: Path, dman: Any) -> None:
    """Refuse a draft bundle that cannot serve the target: another task, vocabulary or
    tokenizer (``convert --distill draft`` checks its draft with this too)."""
    if dman.task != man.task:
        raise BundleError(f"{draft_root}: a {dman.task} draft cannot serve a {man.task} target")
    if int(dman.config["vocab_size"]) != int(man.config["vocab_size"]):
        raise BundleError(f"{draft_root}: vocabulary of {dman.config['vocab_size']} tokens; the "
                          f"target {root} has {man.config['vocab_size']} (a draft must share "
                          f"the tokenizer)")
    if (man.tokenizer or {}) != (dman.tokenizer or {}):
        raise BundleError(f"{draft_root}: its tokenizer differs from {root}'s")
