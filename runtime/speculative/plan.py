"""The memory plan of a (speculative) generating session, made before anything is loaded.

SpecMemo (2025) showed that modelling what speculation costs in memory lets a runtime keep most
of its speedup in a fraction of its footprint. The model here counts, in bytes above the
process's footprint before loading (what ``edgeseq profile`` calls the baseline):

- ``weights``: graph files as the backend holds them (ORT: the shared weights file and the
  protos of the graphs loaded; ExecuTorch: the program and XNNPACK's packed copy of it);
- ``runtime``: a backend's fixed cost plus a per-graph cost (sessions, kernels, thread pools);
- ``activations``: ExecuTorch's planned memory of every loaded method (recorded at conversion);
  for ONNX Runtime the sum of every intermediate tensor of the largest call (shape inference at
  the planned sizes), since freed buffers stay in the allocator;
- ``state``: recurrent state or KV cache at the planned length, twice (a graph's input and
  output buffers);
- ``speculation``: draft/verify buffers (chunk x width logits), rollback (per-position traces,
  a snapshot, or the cache copies of a commit), tree copies of the state, and the drafter (a
  recycling matrix, the early-exit graph, or a whole draft model);
- ``prepacked`` (ONNX Runtime): graphs' weights repacked into MLAS's GEMM layout, a private copy
  per session made at load when the plan affords it: every target graph, else the chunk graph
  alone, which gains most (``decoder_chunk`` of the typo fixer at 16 tokens: 527 -> 479 us);
  one-row graphs gain once the weights outgrow the caches (``mamba-bytes-x4``'s step 4.3 ->
  3.6 ms). Plain decoding shares the bundle's one copy.

The constants were measured on the zoo bundles (``tests/speculative/test_memory.py`` checks the
plan against the process's peak RSS over random budgets); they err on the safe side.

Given a budget the plan tries, in order, the requested source with the largest draft, a
smaller draft (down to 2), a chain instead of a tree, replay instead of traces, and finally no
speculation (plain decoding with a smaller prefill chunk); at each of these, every graph
packed first, then the chunk graph alone, then none. A budget below the plain footprint at
the smallest prefill chunk is refused: ``BundleError`` before loading.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeseq.bundle import BundleError, Manifest, read_manifest
from edgeseq.limits import max_source as max_source_tokens
from edgeseq.registry import get_task, runtime_memory
from edgeseq.runtime.cost import (MB, activation_bytes, file_bytes, prepack_bytes,
                                  resident_state_bytes, resident_weight_bytes, state_bytes)

SOURCES = ("auto", "off", "input", "ngram", "recycle", "draft", "early-exit")
PREFILL_CHUNKS = (128, 64, 32, 16, 8, 4, 1)
RECYCLE_BYTES = 2 * MB


def parse_speculate(spec: str) -> tuple[str, str | None]:
    """``auto|off|input|ngram|recycle|draft[:PATH]|early-exit:N`` -> (kind, argument)."""
    kind, _, arg = str(spec).partition(":")
    if kind not in SOURCES:
        raise BundleError(f"--speculate {spec!r}: unknown; give one of auto, off, input, ngram, "
                          f"recycle, draft, draft:PATH, early-exit:N")
    # "draft" alone: the draft bundle recorded in the target's manifest (convert --distill
    # draft); the session finds it, or says how to make one
    if kind == "early-exit" and arg and not arg.isdigit():
        raise BundleError(f"--speculate {spec!r}: N must be a number of layers")
    return kind, (arg or None)


def draft_folder(root: Path, man: Manifest, arg: str | None) -> Path:
    """The draft bundle of ``--speculate draft[:PATH]``: PATH, else the one recorded in the
    target's manifest (``convert --distill draft``)."""
    if arg:
        return Path(arg)
    inside = man.draft_root(root)
    if inside is None:
        raise BundleError(f"{root}: no draft recorded in its manifest; convert with "
                          f"--distill draft, or give --speculate draft:PATH")
    return inside


@dataclass
class MemoryPlan:
    mode: str                        # off | input | ngram | recycle | draft | early-exit
    requested: str
    backend: str
    budget: int | None
    k: int = 4                       # starting draft length
    k_max: int = 8                   # bound on the adaptive draft length
    width: int = 1                   # tree width (leaves)
    rollback: str = "none"           # trace | replay | crop | none
    adaptive: bool = True
    exit_threshold: float = 0.3
    prefill_chunk: int | None = None
    max_source: int | None = None    # encoder-decoders: the planned source and cache lengths
    max_length: int | None = None
    graphs: set[str] = field(default_factory=set)
    draft_graphs: set[str] | None = None
    draft_backend: str | None = None
    prepack: set[str] = field(default_factory=set)     # graphs whose weights the runtime packs
    footprint: dict[str, int] = field(default_factory=dict)
    plain_bytes: int = 0
    reason: str = ""

    @property
    def total(self) -> int:
        return int(sum(self.footprint.values()))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["graphs"] = sorted(self.graphs)
        d["draft_graphs"] = sorted(self.draft_graphs) if self.draft_graphs else None
        d["prepack"] = sorted(self.prepack)
        d["total_bytes"] = self.total
        return d


# -- what the pieces cost ------------------------------------------------------------------------


def _planned_len(man: Manifest) -> int:
    cfg = man.config
    caps = [int(c) for c in (cfg.get("max_target_len"), cfg.get("max_target_positions")) if c]
    return min(caps) if caps else 1024


class _Costs:
    """The footprint pieces of one bundle on one backend."""

    def __init__(self, root: Path, man: Manifest, backend: str, max_source: int | None = None,
                 max_length: int | None = None):
        self.root, self.man, self.backend = root, man, backend
        self.task = get_task(man.task)
        self.vocab = int(man.config["vocab_size"])
        cap = _planned_len(man)
        self.length = min(cap, max_length or cap) if self.task.encoder else 0
        table = max_source_tokens(man.config)
        self.source = min(table, max_source or table)

    def dims(self, chunk: int = 1) -> dict[str, int]:
        return {"batch": 1, "chunk": chunk, "past": self.length, "source": self.source,
                "frames": 2 * self.source}

    def base_graphs(self, lean: int = 0) -> set[str]:
        """The graphs plain decoding loads. ``lean`` (speculation, which loads a chunk graph as
        well): 1, without the one-token step graph (single tokens go through the chunk graph);
        2, a causal LM without prefill either (prompts go through ``verify``)."""
        if not self.task.encoder:
            return [{"prefill", "step"}, {"prefill"}, set()][lean]
        return {"encoder"} if lean else {"encoder", "decoder_step"}

    def plain(self, prefill_chunk: int | None, lean: int = 0, also: frozenset[str] = frozenset()
              ) -> dict[str, int]:
        """Plain decoding's footprint; ``also``: graphs loaded besides (a speculative chunk graph,
        a draft loop), whose weights count here when the base graphs alone load none (lean 2)."""
        graphs = self.base_graphs(lean)
        be = self.backend
        acts = [0]
        for g in graphs:
            chunk = prefill_chunk if g == "prefill" else 1
            acts.append(activation_bytes(self.root, self.man, be, g, self.dims(chunk or 1)))
        act = sum(acts) if be == "executorch" else max(acts)
        return {"weights": resident_weight_bytes(self.root, self.man, be, graphs or set(also)),
                "runtime": runtime_memory(be).runtime_bytes(len(graphs)),
                "activations": act,
                "state": resident_state_bytes(self.man, self.dims()),
                "bindings": self.kept_bindings(graphs)}

    def kept_bindings(self, graphs: set[str]) -> int:
        """ONNX Runtime: the activation blocks that the bindings kept across calls hold (two
        per one-token graph over a fixed-shape state, ``onnxruntime.keeps_bindings``)."""
        if self.backend != "ort":
            return 0
        from edgeseq.runtime.backends.onnxruntime.run import keeps_bindings

        return sum(2 * activation_bytes(self.root, self.man, "ort", g, self.dims())
                   for g in graphs if keeps_bindings(self.man.graphs[g]))

    def extra_graph(self, graph: str, chunk: int) -> dict[str, int]:
        be = self.backend
        # ORT: the graph's proto only (the shared weights file is counted with the base graphs)
        w = file_bytes(self.root, self.man.graphs[graph].files["onnx"]) if be == "ort" else 0
        return {"runtime": runtime_memory(be).per_graph + w,
                "activations": activation_bytes(self.root, self.man, be, graph,
                                                self.dims(chunk)),
                "bindings": self.kept_bindings({graph})}


# -- the plan ------------------------------------------------------------------------------------
def make_plan(root: Path, man: Manifest, backend: str, kind: str, budget: int | None,
              **kw: Any) -> MemoryPlan:
    """``_plan``, with the planned encoder-decoder lengths recorded on the plan."""
    plan = _plan(root, man, backend, kind, budget, **kw)
    if get_task(man.task).encoder:
        costs = _Costs(root, man, backend, kw.get("max_source"), kw.get("max_length"))
        plan.max_source, plan.max_length = costs.source, costs.length
    return plan


def _plan(root: Path, man: Manifest, backend: str, kind: str, budget: int | None,
              draft_root: Path | None = None, draft_manifest: Manifest | None = None,
              k: int | None = None, width: int | None = None, max_source: int | None = None,
              max_length: int | None = None, draft_backend: str | None = None) -> MemoryPlan:
    """The largest speculation of ``kind`` that fits ``budget`` (bytes), else plain decoding.

    Encoder-decoders are planned for sources of ``max_source`` tokens (speech: encoder
    positions) and caches of ``max_length`` positions (default: the model's limits); the
    session refuses longer ones.

    Raises:
        BundleError: the budget cannot hold plain decoding at the smallest prefill chunk.
    """
    costs = _Costs(root, man, backend, max_source, max_length)
    seq2seq = costs.task.encoder
    chunk_graph = "decoder_chunk" if seq2seq else ("verify" if "verify" in man.graphs
                                                  else "prefill")
    max_chunk = int(man.graphs[chunk_graph].max_chunk or 16) if chunk_graph in man.graphs else 1
    requested = kind
    if kind == "auto":
        kind = costs.task.speculate_auto
    fits = lambda fp: budget is None or sum(fp.values()) <= budget  # noqa: E731

    # plain decoding at the largest prefill chunk that fits
    plain = None
    chunks = _prefill_chunks(man)
    for c in chunks:
        fp = costs.plain(c)
        if fits(fp):
            plain = (c, fp)
            break
    if plain is None:
        need = sum(costs.plain(chunks[-1]).values())
        raise BundleError(f"{root}: memory budget of {_mb(budget)} cannot hold this model on "
                          f"{backend} (it needs about {_mb(need)}: weights, runtime, state and "
                          f"one call's activations); nothing was loaded")
    p_chunk, p_fp = plain
    off = MemoryPlan("off", requested, backend, budget, k=0, k_max=0, rollback="none",
                     prefill_chunk=p_chunk, graphs=costs.base_graphs(), footprint=p_fp,
                     plain_bytes=sum(p_fp.values()))
    if kind == "off":
        off.reason = "speculation off"
        return off
    if chunk_graph not in man.graphs:
        off.reason = f"the bundle has no {chunk_graph} graph"
        return off

    # Trees: Token Recycling's candidates. Input-guided drafts can also draft a tree of the
    # likely re-alignments after a correction (width=3), but chains are faster end to end: on
    # the typo workload (ORT, 1 thread, 60 items) 296 rounds of 474 us against 279 of 529 us,
    # 245-252 ms against 264-268; trees with short alternative branches were no better.
    widths = [width] if width else {"recycle": [4, 2, 1]}.get(kind, [1])
    # Model-free drafts cost nothing to propose: let them use the whole verify chunk (Aggressive
    # Decoding drafts the rest of the input at once). Model drafts cost a step per token.
    free = kind in ("input", "ngram", "recycle")
    k_top = max(2, min(max_chunk - 1, k or (max_chunk - 1 if free and kind != "recycle" else 8)))
    if kind == "draft":
        dman = draft_manifest or read_manifest(draft_root)
        if "draft_loop" in dman.graphs:
            # a draft_loop drafts its K tokens in one call, whatever k: like a free draft, it
            # starts (and stays) at the bound, which is K at most
            free = True
            loop_k = int(dman.config.get("draft_loop_tokens") or k_top)
            k_top = max(2, min(max_chunk - 1, k or loop_k, loop_k))
    ks = sorted({kk for kk in (k_top, 24, 16, 12, 8, 6, 4, 3, 2) if kk <= k_top}, reverse=True)
    # One decoder graph instead of two: single tokens go through the chunk graph, and a draft
    # model with a draft_loop loads no step graph either. That saves a graph's session and
    # activations (measured on the zoo's typo fixer: 1.2 MiB on ORT, 2.8 on ExecuTorch) at no
    # cost where a chunk of one costs a step: an encoder-decoder's dynamic decoder_chunk, or a
    # causal target whose drafts are never empty (a draft model). A state-space verify graph is
    # static in length, so a one-token call costs a whole chunk: sources that often draft
    # nothing (n-grams, recycling, early exit) keep the step graph.
    leans = [0, 1] if (seq2seq or kind == "draft") else [0]
    if kind == "draft" and chunk_graph == "verify":
        leans.append(2)     # and prompts through verify: one target graph in all
    rollbacks = ["crop"] if seq2seq else (["trace", "replay"] if chunk_graph == "verify"
                                         else ["replay"])
    st = state_bytes(man, costs.dims())
    # every target graph packed, the chunk graph alone, or none (below): packing pays for the
    # one-row graphs too once the weights outgrow the caches (mamba-bytes-x4's step, ORT:
    # 4.3 -> 3.6 ms), and the plain peer the benchmark measures packs them when that is faster
    pack_bytes = {g: prepack_bytes(root, man, backend, g) for g in man.graphs}
    packs = [2, 1, 0] if chunk_graph != "prefill" and pack_bytes.get(chunk_graph) else [0]
    if kind == "draft":
        dcosts = _Costs(draft_root, dman, draft_backend or backend)
        d_st = state_bytes(dman, dcosts.dims())

    @functools.lru_cache(maxsize=None)
    def drafter(lean: int) -> tuple[int, set[str], bool]:
        """The draft model's footprint, its graphs and whether it drafts in one call."""
        dlean = min(lean, 1) if "draft_loop" in dman.graphs else 0
        dfp = dcosts.plain(min(16, int(dman.graphs["prefill"].max_chunk or 16))
                           if "prefill" in dman.graphs else None, dlean)
        if (draft_backend or backend) == backend:
            # the target's runtime is loaded: a drafter on it adds its own graphs (per-graph
            # costs, weights, activations), not a second runtime (measured on
            # mamba-bytes-draft after the target: 1.6-3.5 MiB for its prefill and draft_loop,
            # ORT and ExecuTorch)
            dfp["runtime"] -= runtime_memory(backend).base
        graphs = dcosts.base_graphs(dlean)
        loop = "draft_loop" in dman.graphs
        if loop:                                    # one call; traces as snapshots
            graphs = graphs | {"draft_loop"}
            ex = dcosts.extra_graph("draft_loop", 1)
            dfp["runtime"] += ex["runtime"]
            dfp["activations"] += ex["activations"]
            dfp["bindings"] += ex["bindings"]
        return sum(dfp.values()), graphs, loop

    @functools.lru_cache(maxsize=None)
    def target(c: int | None, lean: int, chunk: int, w: int) -> tuple[tuple[tuple[str, int], ...],
                                                                      frozenset[str]]:
        """The target's footprint without speculation's buffers, and its graphs."""
        fp = costs.plain(c, lean, frozenset({chunk_graph}))
        if chunk_graph != "prefill":
            ex = costs.extra_graph(chunk_graph, chunk if backend == "ort" else max_chunk)
            fp["runtime"] += ex["runtime"]
            fp["bindings"] += ex["bindings"]
            fp["activations"] = (fp["activations"] + ex["activations"]
                                 if backend == "executorch"
                                 else max(fp["activations"], ex["activations"] * w))
        return tuple(fp.items()), frozenset(costs.base_graphs(lean) | {chunk_graph})

    # the plain plan's prefill chunk is kept when it fits; else smaller ones are tried
    for c in chunks:
        if c is not None and p_chunk is not None and c > p_chunk:
            continue
        for w in widths:
            for kk, lean, rb, pack in ((kk, lean, rb, pack) for kk in ks for lean in leans
                                       for rb in rollbacks for pack in packs):
                chunk = kk + 1
                items, tgraphs = target(c, lean, chunk, w)
                fp, graphs = dict(items), set(tgraphs)
                draft_graphs = None
                spec = 2 * w * chunk * costs.vocab * 4              # logits in and out
                if rb == "trace":
                    # a commit copies one position's state out of the traces; ORT writes them
                    # straight into buffers the runner keeps, which its activation table counts
                    # as the call's outputs; ExecuTorch's pybindings return a clone of them
                    # (the graph's bound) beside its planned memory
                    spec += st + (w * max_chunk * st if backend == "executorch" else 0)
                elif rb == "replay":
                    spec += 2 * st
                elif rb == "crop":
                    spec += 3 * st
                if w > 1:
                    spec += 2 * w * st
                if kind == "recycle":
                    spec += RECYCLE_BYTES
                elif kind == "early-exit":
                    graphs.add("exit_step")
                    ex = costs.extra_graph("exit_step", 1)
                    fp["runtime"] += ex["runtime"]
                    fp["activations"] += ex["activations"] if backend == "executorch" else 0
                    fp["bindings"] += ex["bindings"]
                    spec += 2 * st
                elif kind == "draft":
                    d_bytes, draft_graphs, loop = drafter(lean)
                    # a snapshot before each drafted token; with a draft_loop, one before the
                    # call, and its traces (the state after each of its K steps) as the rest.
                    # ORT binds the traces as the call's outputs, which its activation table
                    # counts already; ExecuTorch's pybindings return clones of its planned
                    # memory (counted there): K more.
                    loop_k = int(dman.config.get("draft_loop_tokens") or kk)
                    snaps = (1 + (loop_k if (draft_backend or backend) == "executorch" else 0)
                             if loop else kk + 1)
                    spec += d_bytes + snaps * d_st
                fp["speculation"] = spec
                packing = ({g for g in tgraphs if pack_bytes.get(g)} if pack == 2
                           else {chunk_graph} if pack == 1 else set())
                if pack == 2 and packing <= {chunk_graph}:
                    continue                # nothing more to pack than the chunk graph
                fp["prepacked"] = sum(pack_bytes[g] for g in packing)
                if fits(fp):
                    # free drafts start (and stay) at the bound: a long wrong draft
                    # costs little more verify time; model drafts adapt from 4
                    start = kk if (k or free) else min(kk, 4)
                    return MemoryPlan(kind, requested, backend, budget, k=start, k_max=kk,
                                      adaptive=not free, width=w, rollback=rb,
                                      prefill_chunk=c, graphs=graphs,
                                      draft_graphs=draft_graphs, footprint=fp,
                                      prepack=packing,
                                      draft_backend=draft_backend if kind == "draft"
                                      else None,
                                      plain_bytes=off.plain_bytes,
                                      reason=("fits" if budget else "no budget") + (
                                          "", f", no step graph ({chunk_graph} takes single "
                                          f"tokens)", f", {chunk_graph} only (it takes the "
                                          f"prompt and single tokens)")[lean])
    off.reason = (f"the budget of {_mb(budget)} holds plain decoding "
                  f"({_mb(off.plain_bytes)}) but not {kind} speculation")
    return off


def plain_minimum(root: Path, man: Manifest, backend: str, max_source: int | None = None,
                  max_length: int | None = None) -> int:
    """The smallest budget that loads the model at all (plain decoding, smallest prefill)."""
    costs = _Costs(root, man, backend, max_source, max_length)
    return int(sum(costs.plain(_prefill_chunks(man)[-1]).values()))


def _prefill_chunks(man: Manifest) -> list[int | None]:
    """The prefill chunks a plan may use, largest first (None: an encoder-decoder has none)."""
    if get_task(man.task).encoder:
        return [None]
    bound = int(man.graphs["prefill"].max_chunk or 64)
    if man.config.get("prefill_static_chunk"):
        return [bound]            # a static-length scan: a shorter chunk saves nothing
    return [c for c in PREFILL_CHUNKS if c <= bound] or [1]


def _mb(n: int | None) -> str:
    return "unlimited" if n is None else f"{n / MB:.1f} MiB"
