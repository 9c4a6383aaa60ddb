"""The PyTorch reference backend: the graphs as ``torch.export`` programs (``.pt2``):
``lower.py`` (the build side), ``run.py`` (the runners). It neither quantizes nor profiles
operators (``quant_schemes`` empty, no ``ops_profiler``): it is the baseline the other backends
are checked against and the way to debug a bundle in Python.

It needs no family code at load time (the exported program carries the graph and weights), so a
bundle is self-contained on every backend. This module holds only the registered class; each
method imports its module when called (the one deliberate lazy import per concern).
"""
from __future__ import annotations

from pathlib import Path

from edgeseq.bundle import GraphEntry, Manifest, StreamingGraph
from edgeseq.registry import register_backend
from edgeseq.runtime.backends.base import MB, Backend, LoadedModel, RuntimeMemory


@register_backend("torch")
class TorchBackend(Backend):
    format = "pt2"
    aliases = ("reference", "pytorch")
    memory = RuntimeMemory(base=40 * MB, per_graph=8 * MB, activation_factor=2.0)

    def lower(self, graphs: dict[str, StreamingGraph], out: Path, dtype: str,
              quantized: bool = False) -> dict[str, str]:
        from edgeseq.runtime.backends.reference.lower import lower

        return lower(graphs, out, dtype)

    def load(self, root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
             threads: int | None = None,
             prepack: frozenset[str] = frozenset()) -> LoadedModel:
        from edgeseq.runtime.backends.reference.run import load

        return load(root, manifest, entries, threads, prepack)
