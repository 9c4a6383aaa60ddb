"""The measurement's child-process protocol: ``python -m edgeseq.runtime.profile --worker
measure|ops JSON`` prints progress lines and one result line, so that the peak RSS measured
belongs to the bundle alone."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgeseq.runtime.profile.errors import ProfileError
from edgeseq.runtime.profile.measure import measure_in_process
from edgeseq.runtime.profile.ops import ops_in_process


#: Decode steps of the operator-profiling run: enough for stable shares, few enough that the
#: profiler's event buffer keeps that child's peak RSS near the measurement's.
OPS_TOKENS = 16


# -- the child process ------------------------------------------------------------------------
def _worker_main(argv: list[str]) -> int:
    """``python -m edgeseq.runtime.profile --worker measure|ops JSON``: one line ``RESULT
    {...}`` on stdout, progress as ``PROGRESS text`` lines."""
    kind, args = argv[1], json.loads(argv[2])

    def emit(msg: str) -> None:
        print(f"PROGRESS {msg}", flush=True)

    fn = measure_in_process if kind == "measure" else ops_in_process
    res = fn(emit=emit, **args)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def _run_child(kind: str, args: dict[str, Any], progress: Callable[[str], None] | None
               ) -> dict[str, Any]:
    """Run ``_worker_main`` in a fresh interpreter; relay its progress lines; its result."""
    cmd = [sys.executable, "-m", "edgeseq.runtime.profile", "--worker", kind, json.dumps(args)]
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        result = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("PROGRESS ") and progress:
                progress(line[9:].rstrip())
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        rc = proc.wait()
        if rc or result is None:
            err.seek(0)
            tail = [ln for ln in err.read().splitlines() if ln.strip()][-12:]
            last = tail[-1] if tail else f"exit code {rc}"
            raise ProfileError(f"the {kind} run failed ({last})", "\n".join(tail))
    return result


def measure(bundle: str | Path, backend: str = "ort", tokens: int = 128, prompt_len: int = 16,
            threads: int | None = None, ops: bool = True,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``bundle`` on this host in fresh child processes (``measure_in_process``, then
    the operator profile unless ``ops`` is False; its failure is reported, not raised).

    Raises:
        ProfileError: the measurement failed.
    """
    args = {"bundle": str(bundle), "backend": backend, "tokens": tokens,
            "prompt_len": prompt_len, "threads": threads}
    res = _run_child("measure", args, progress)
    res["op_breakdown"], res["op_breakdown_note"] = None, "not asked (--no-ops)"
    if ops:
        if progress:
            progress("per-operator profile")
        try:
            res["op_breakdown"] = _run_child("ops", {**args, "tokens": min(tokens, OPS_TOKENS)},
                                             None)
            res["op_breakdown_note"] = None
        except ProfileError as e:
            res["op_breakdown_note"] = f"unavailable: {e}"
    return res
