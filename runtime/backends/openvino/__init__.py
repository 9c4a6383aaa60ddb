"""The OpenVINO backend: ``lower.py`` (the ONNX lowering's files -> OpenVINO IR, the build
side), ``run.py`` (compiled models as runners, and ``partition``: which device runs each
operator, the manifest's ``partitions`` record). No ``ops.py``: ``edgeseq profile`` does not
offer it yet, and no ``quantize.py`` (``quant_schemes`` is empty).

The bundle format is OpenVINO's own IR (``<graph>.xml`` and one shared ``weights.openvino.bin``),
converted from the files ONNX Runtime's lowering writes, so the graphs are exported from PyTorch
once whatever the formats, and the device carries what OpenVINO loads without its ONNX frontend.
The same IR compiles for Intel CPUs, GPUs and NPUs (``device``): this module holds only the
registered class, and importing it loads no ``openvino``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeseq.bundle import GraphEntry, Manifest, StreamingGraph
from edgeseq.registry import register_backend
from edgeseq.runtime.backends.base import MB, Backend, LoadedModel, RuntimeMemory

#: the one weights file every graph's IR reads its constants from (deduplicated by content)
WEIGHTS_FILE = "weights.openvino.bin"
#: OpenVINO's device names a target may ask for (``openvino:<DEVICE>`` in a device profile)
DEVICES = ("CPU", "GPU", "NPU")


@register_backend("openvino")
class OpenVinoBackend(Backend):
    format = "openvino"
    aliases = ("ov", "ir")
    # measured on this dev VM (openvino 2026.4.1, CPU): importing openvino and compiling a
    # first bundle adds 92-100 MiB before its weights (t5-typo-bytes, mamba-bytes); a second
    # load of the same bundle 18.5 MiB for t5's 2 graphs and 41 MiB for mamba's 3, less two
    # copies of the ~4 MiB weights (runtime/cost.py): 5-11 MiB per compiled graph
    memory = RuntimeMemory(base=100 * MB, per_graph=12 * MB, activation_factor=1.5)
    # quant_schemes stays empty: OpenVINO quantizes through NNCF, not wired here yet
    targets = tuple(f"openvino:{d}" for d in DEVICES)

    def available(self) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError as e:
            return f"openvino is not installed ({e})"
        return None

    def lower(self, graphs: dict[str, StreamingGraph], out: Path, dtype: str,
              quantized: bool = False) -> dict[str, str]:
        from edgeseq.runtime.backends.openvino.lower import lower

        return lower(graphs, out, dtype)

    def load(self, root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
             threads: int | None = None,
             prepack: frozenset[str] = frozenset()) -> LoadedModel:
        from edgeseq.runtime.backends.openvino.run import load

        return load(root, manifest, entries, threads)

    def target_device(self, entry: str) -> str | None:
        return entry.partition(":")[2] if entry in self.targets else None

    def partition(self, root: Path, files: dict[str, str], device: str | None,
                  task: Any = None, config: dict[str, Any] | None = None) -> dict[str, Any]:
        from edgeseq.runtime.backends.openvino.run import partition

        return partition(root, files, device or "CPU")

    def import_runtime(self) -> None:
        import openvino  # noqa: F401
