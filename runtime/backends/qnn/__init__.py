"""Qualcomm's NPU (the Hexagon Tensor Processor, HTP) through ONNX Runtime's QNN execution
provider: ``run.py`` (the provider's set-up per target SoC, the runners, the partition report).

It runs the bundle's ONNX files, as lowered (and int8-static quantized: the QDQ form the HTP
executes) for ONNX Runtime, so it lowers nothing of its own. The ``onnxruntime-qnn`` package is
a plug-in provider for the stock ``onnxruntime``; its Linux x86-64 build carries the HTP
*simulator*, which runs the same QNN graphs as the NPU would, on this machine's CPU (slowly):
that is how the tests execute this backend. On a phone or a Snapdragon laptop the same set-up
runs on the NPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeseq.bundle import GraphEntry, Manifest, StreamingGraph
from edgeseq.registry import get_backend, register_backend
from edgeseq.runtime.backends.base import MB, Backend, LoadedModel, RuntimeMemory


@register_backend("qnn")
class QnnBackend(Backend):
    # the ONNX files ONNX Runtime's lowering writes (which lowers ``--format onnx``)
    format = "onnx"
    aliases = ("qnn-htp",)
    #: the device profiles' entry it serves (``convert --target``: the ONNX files, placed)
    targets = ("ort:QNNExecutionProvider",)
    # not measured on a device; on the simulator the QNN libraries map ~250 MB of code
    memory = RuntimeMemory(base=64 * MB, per_graph=8 * MB, activation_factor=1.5)
    # it quantizes nothing itself: ``--quant int8-static`` (ONNX Runtime's QDQ) is what the
    # HTP runs in integer; float graphs run on the HTP in fp16
    #: the HTP graphs are compiled for one sequence (``run.QnnHtp.configure``)
    max_batch = 1
    onnx_contrib_ops = False
    exact = False
    #: the shared backend suite runs it on these families (the simulator is slow)
    suite_families = ("mamba", "mamba2", "s4d", "lmuformer", "whisper")

    def available(self) -> str | None:
        from edgeseq.runtime.backends.qnn.run import missing

        return missing()

    def lower(self, graphs: dict[str, StreamingGraph], out: Path, dtype: str,
              quantized: bool = False) -> dict[str, str]:
        return get_backend("ort").lower(graphs, out, dtype, quantized, fused=False)

    def load(self, root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
             threads: int | None = None,
             prepack: frozenset[str] = frozenset()) -> LoadedModel:
        from edgeseq.runtime.backends.qnn.run import load

        return load(root, manifest, entries, threads)

    def partition(self, root: Path, files: dict[str, str], device: str | None,
                  task: Any = None, config: dict[str, Any] | None = None
                  ) -> dict[str, Any] | None:
        from edgeseq.runtime.backends.qnn.run import placement

        return placement(root, files, task, config or {}, device)

    def import_runtime(self) -> None:
        import onnxruntime  # noqa: F401
        import onnxruntime_qnn  # noqa: F401
