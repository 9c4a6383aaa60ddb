"""ONNX Runtime's operator profiler: ``SessionOptions.enable_profiling`` on every session of a
load, and the node kernel times of ``end_profiling()``'s JSON trace, by ``op_name``."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from edgeseq.runtime.backends.base import LoadedModel
from edgeseq.runtime.backends.onnxruntime import run
from edgeseq.runtime.profile.ops import top_ops

SOURCE = "onnxruntime profiler (SessionOptions.enable_profiling)"


@contextmanager
def profiling(tmp: Path) -> Iterator[None]:
    """Profile the sessions loaded inside the block. ``run.load`` builds each session's options
    with ``run.session_options``, which is wrapped here."""
    orig = run.session_options
    n = [0]

    def options(threads: int, packs: bool) -> Any:
        opts = orig(threads, packs)
        n[0] += 1
        opts.enable_profiling = True  # one prefix per session: file names are per second
        opts.profile_file_prefix = str(tmp / f"ort{n[0]}")
        return opts

    run.session_options = options
    try:
        yield
    finally:
        run.session_options = orig


def collect(model: LoadedModel, tmp: Path, sequence: list[str]) -> dict[str, Any]:
    """Per graph, the top operator types of its session's trace (``sequence`` is not
    needed: each graph has a session, and so a trace, of its own)."""
    out = {}
    seen: set[int] = set()
    for name, runner in model.runners.items():
        if id(runner.sess) in seen:  # a step served by the prefill's session: in its trace
            continue
        seen.add(id(runner.sess))
        path = Path(runner.sess.end_profiling())
        times: dict[str, dict[str, list[float]]] = {}
        runs = []
        for e in _trace_events(path):
            if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
                op = (e.get("args") or {}).get("op_name") or "?"
                times.setdefault(op, {}).setdefault(e["name"], []).append(e.get("dur", 0) / 1e3)
            elif e.get("cat") == "Session" and e.get("name") == "model_run":
                runs.append(e.get("dur", 0) / 1e3)
        out[name] = top_ops(times, {"runs": len(runs), "run_ms_total": sum(runs)})
        path.unlink(missing_ok=True)
    return out


def _trace_events(path: Path) -> Iterable[dict[str, Any]]:
    """The events of ONNX Runtime's profile (a JSON array, one event per line), read line by
    line: parsing the whole array at once would raise this process's peak RSS by several times
    the file's size, and the profile's peak should stay close to the measurement's."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip().rstrip(",")
            if not line.startswith("{"):
                continue
            try:
                yield json.loads(line)
            except ValueError:
                continue
