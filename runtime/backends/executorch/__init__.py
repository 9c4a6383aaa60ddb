"""The ExecuTorch backend (XNNPACK): ``lower.py`` (torch -> one ``.pte`` program, the build
side), ``run.py`` (the program's methods as runners), ``quantize.py`` (torchao schemes on the
torch graphs, before lowering), ``ops.py`` (time per operator from the ETDump).

This module holds only the registered class; each method imports its module when called, the
one deliberate lazy import per concern, so running a bundle never imports ``executorch.exir``
and listing the backends imports no ExecuTorch at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeseq.bundle import GraphEntry, Manifest, StreamingGraph
from edgeseq.registry import register_backend
from edgeseq.runtime.backends.base import MB, Backend, LoadedModel, OpsProfiler, RuntimeMemory

@register_backend("executorch")
class ExecuTorchBackend(Backend):
    format = "pte"
    aliases = ("et",)
    memory = RuntimeMemory(base=24 * MB, per_graph=3 * MB, activation_factor=1.0)
    quant_schemes = ("int8", "int4")
    # XNNPACK's 8da4w kernels take groups of 32; larger ones leave more layers in float on
    # models whose widths are not multiples of them
    int4_group = 32
    #: the device-profile entry its bundles serve (its one execution delegate)
    targets = ("executorch:xnnpack",)
    #: planned activation memory per method, written at lowering: the runtime's pybindings do
    #: not expose it, and speculative decoding's memory plan needs it before loading anything
    side_files = {"planned_memory": "pte_planned_memory.json"}

    def available(self) -> str | None:
        try:
            import executorch.runtime  # noqa: F401
        except ImportError as e:
            return f"executorch is not installed ({e})"
        return None

    def lower(self, graphs: dict[str, StreamingGraph], out: Path, dtype: str,
              quantized: bool = False) -> dict[str, str]:
        from edgeseq.runtime.backends.executorch.lower import lower

        return lower(graphs, out, dtype, quantized)

    def load(self, root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
             threads: int | None = None,
             prepack: frozenset[str] = frozenset()) -> LoadedModel:
        from edgeseq.runtime.backends.executorch.run import load

        return load(root, manifest, entries, threads, prepack)

    def quantize_graphs(self, graphs: dict[str, StreamingGraph], scheme: str, keep: list[str],
                        group_size: int, sensitive: list[str]
                        ) -> tuple[dict[str, StreamingGraph], dict[str, Any]]:
        from edgeseq.runtime.backends.executorch.quantize import quantize_graphs

        return quantize_graphs(graphs, scheme, keep, group_size, sensitive)

    def ops_profiler(self) -> OpsProfiler:
        from edgeseq.runtime.backends.executorch import ops

        return ops

    def import_runtime(self) -> None:
        import torch  # noqa: F401  (the ExecuTorch runner passes torch tensors)
        from executorch.runtime import Runtime

        Runtime.get()
