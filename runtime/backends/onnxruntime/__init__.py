"""The ONNX Runtime backend: ``lower.py`` (torch -> ONNX, the build side), ``run.py`` (the
runners), ``records.py`` (the graph files' initializer records, read without ``onnx``),
``quantize.py`` (int8/int4 weights), ``ops.py`` (time per operator from ONNX Runtime's profiler).

This module holds only the registered class: importing it (every ``registry.backends()`` does)
loads neither ``onnxruntime`` nor ``onnx``. Each method imports its module when called, the one
deliberate lazy import per concern, so running a bundle never pays for the exporters and
lowering never pays for a runtime session.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from edgeseq.bundle import GraphEntry, Manifest, StreamingGraph
from edgeseq.registry import register_backend
from edgeseq.runtime.backends.base import MB, Backend, LoadedModel, OpsProfiler, RuntimeMemory

#: the one file every graph of a bundle reads its large initializers from
WEIGHTS_FILE = "weights.onnx.data"
#: metadata keys of a graph lowered from its control-flow variant (``StreamingGraph.
#: control_flow``): that it holds control flow (``Scan``), and the one-position graph whose
#: calls it can serve (``StreamingGraph.serves``)
CONTROL_FLOW_KEY = "edgeseq.control_flow"
SERVES_KEY = "edgeseq.serves"


@register_backend("ort")
class OrtBackend(Backend):
    format = "onnx"
    aliases = ("onnxruntime",)
    memory = RuntimeMemory(base=20 * MB, per_graph=4 * MB, activation_factor=1.5)
    #: ``int8-static`` calibrates on the user's data (``edgeseq.quant.static``), then rewrites
    #: the files through ``rewrite_files``; the others are ``quantize.quantize_model``'s
    quant_schemes = ("int8", "int4", "int4-tensor", "int8-static")
    # MatMulNBits' one-row kernel (accuracy level 4) runs 1.8x faster at 128 than at 32 on AVX2
    # (a Mamba-130M-shaped stack, 1 thread: 3.9 vs 8.0 ms) and the packed copy is smaller;
    # the zoo's gates pass at both (docs/benchmarks.md)
    int4_group = 128
    #: the device-profile entry its bundles serve (its one execution provider)
    targets = ("ort:CPUExecutionProvider",)
    #: what each call of each graph allocates, tabled at lowering (``edgeseq.runtime.cost``), so
    #: memory plans need no ``onnx`` at run time
    side_files = {"activation_table": "onnx_activation_table.json"}

    def available(self) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return f"onnxruntime is not installed ({e})"
        return None

    def lower(self, graphs: dict[str, StreamingGraph], out: Path, dtype: str,
              quantized: bool = False, fused: bool = True) -> dict[str, str]:
        from edgeseq.runtime.backends.onnxruntime.lower import lower

        return lower(graphs, out, dtype, fused)

    def load(self, root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
             threads: int | None = None,
             prepack: frozenset[str] = frozenset()) -> LoadedModel:
        from edgeseq.runtime.backends.onnxruntime.run import load

        return load(root, manifest, entries, threads, prepack)

    def quantize_files(self, folder: Path, files: dict[str, str], scheme: str, keep: list[str],
                       group_size: int, sensitive: list[str]) -> dict[str, Any]:
        from edgeseq.runtime.backends.onnxruntime.quantize import quantize_bundle_graphs

        return quantize_bundle_graphs(folder, files, scheme, keep, group_size, sensitive)

    def rewrite_files(self, folder: Path, files: dict[str, str],
                      rewrite: Callable[[str, Any], tuple[Any, Any]]) -> dict[str, Any]:
        """Load each ONNX graph of a bundle folder, ``rewrite(name, model) -> (model, report)``
        it, and save them back with their weights shared once (a quantizer outside this folder
        uses it: ``edgeseq.quant.static``); returns the reports by graph."""
        from edgeseq.runtime.backends.onnxruntime.quantize import rewrite_bundle_graphs

        return rewrite_bundle_graphs(folder, files, rewrite)

    def ops_profiler(self) -> OpsProfiler:
        from edgeseq.runtime.backends.onnxruntime import ops

        return ops

    def import_runtime(self) -> None:
        import onnxruntime  # noqa: F401

    def threads(self, threads: int | None) -> int | None:
        from edgeseq.runtime.backends.onnxruntime.run import default_threads

        return threads or default_threads()
