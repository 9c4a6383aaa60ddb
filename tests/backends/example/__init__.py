"""The example backend that ``docs/architecture.md`` ("How to add a backend") walks through: a
second runtime for a format that exists, running a bundle's ONNX graphs with ``onnx``'s own
reference interpreter (``onnx.reference.ReferenceEvaluator``, pure numpy).

It lives under ``tests/``, not ``runtime/backends/``, because it should not ship: it is slow by
design, checks nothing a user's graph files may do wrong (the ONNX Runtime backend does), and
``--backend`` would offer it to users. ``tests/conftest.py`` registers it with one line, as
``_BACKEND_MODULES`` in ``edgeseq/registry.py`` does for the shipped ones, and the shared suites
pick it up from the registry (``tests/test_completeness.py`` checks that they do).
"""
from __future__ import annotations

from pathlib import Path

from edgeseq.bundle import GraphEntry, Manifest, StreamingGraph
from edgeseq.registry import get_backend, register_backend
from edgeseq.runtime.backends.base import MB, Backend, LoadedModel, RuntimeMemory


@register_backend("example")
class ExampleBackend(Backend):
    # It runs the files ONNX Runtime's lowering writes. A format is lowered (and ``convert
    # --format onnx`` offered) by the first backend registered for it: the ORT one.
    format = "onnx"
    aliases = ("onnx-reference",)
    # not measured, unlike the shipped backends' (a test backend plans no memory)
    memory = RuntimeMemory(base=16 * MB, per_graph=4 * MB)
    # quant_schemes stays empty and ops_profiler None: it neither quantizes nor profiles.
    #: the shared suite runs it on this family only (one graph call takes milliseconds)
    suite_families = ("s4d",)

    def available(self) -> str | None:
        try:
            from onnx.reference import ReferenceEvaluator  # noqa: F401
        except ImportError as e:
            return f"onnx is not installed ({e})"
        return None

    def lower(self, graphs: dict[str, StreamingGraph], out: Path, dtype: str,
              quantized: bool = False) -> dict[str, str]:
        return get_backend("ort").lower(graphs, out, dtype, quantized)

    def load(self, root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
             threads: int | None = None,
             prepack: frozenset[str] = frozenset()) -> LoadedModel:
        # the one lazy import: listing backends must not import onnx
        from tests.backends.example.run import load

        return load(root, entries, self.format)
