"""Stage 1b: the time per operator, from the backend's own profiler (its folder's ``ops.py``:
ONNX Runtime's profiler, ExecuTorch's ETDump), in a second child process."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from edgeseq.bundle import read_manifest
from edgeseq.registry import get_backend
from edgeseq.runtime.profile.errors import ProfileError
from edgeseq.runtime.profile.measure import _CallLog, _import_backend


TOP_OPS = 10


# -- per-operator time --------------------------------------------------------------------------
def ops_in_process(bundle: str | Path, backend: str = "ort", tokens: int = 64,
                   prompt_len: int = 16, threads: int | None = None,
                   emit: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run the workload again with the backend's profiler on (``Backend.ops_profiler``); time
    per operator type per graph."""
    import edgeseq
    from edgeseq.quiet import quiet_third_party

    quiet_third_party()
    profiler = get_backend(backend).ops_profiler()
    if profiler is None:
        raise ProfileError(f"backend {backend!r} has no operator profiler")
    _import_backend(backend)
    man = read_manifest(bundle)
    tmp = Path(tempfile.mkdtemp(prefix="edgeseq-ops-"))
    try:
        with profiler.profiling(tmp):
            sess = edgeseq.load(bundle, backend=backend, threads=threads)
        log = _CallLog(sess.model, man)
        # "light": no warm-up and no repeats, so that the profiler's event buffer (several MB
        # per prefill with ONNX Runtime) keeps this child's peak RSS below the measurement's.
        sess.task.part("profile_driver")(sess, log, {"tokens": tokens, "prompt_len": prompt_len,
                                                     "light": True}, emit)
        return {"source": profiler.SOURCE,
                "graphs": profiler.collect(sess.model, tmp, log.sequence)}
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def top_ops(times: Mapping[str, Mapping[Any, list[float]]], extra: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """The top operator types by time. ``times``: op type -> node -> its durations (ms), one per
    run. A node's time is its median over the runs times the runs: on a shared host a stalled
    thread lands on random nodes, and a sum would hand those stalls to whichever op they hit."""
    rows = []
    for op, nodes in times.items():
        ms = sum(float(np.median(v)) * len(v) for v in nodes.values() if v)
        rows.append((op, ms, sum(len(v) for v in nodes.values())))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return {"total_ms": total, "op_types": len(rows), **(extra or {}),
            "top": [{"op": op, "ms": ms, "calls": c, "share": ms / total if total else 0.0}
                    for op, ms, c in rows[:TOP_OPS]]}
