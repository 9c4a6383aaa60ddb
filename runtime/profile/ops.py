"""Stage 1b: the time per operator, from ONNX Runtime's profiler or ExecuTorch's ETDump, in a
second child process."""
from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from edgeseq.bundle import read_manifest
from edgeseq.runtime.profile.errors import ProfileError
from edgeseq.runtime.profile.measure import _CallLog, _import_backend


TOP_OPS = 10


# -- per-operator time --------------------------------------------------------------------------
def ops_in_process(bundle: str | Path, backend: str = "ort", tokens: int = 64,
                   prompt_len: int = 16, threads: int | None = None,
                   emit: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run the workload again with the backend's profiler on; time per operator type per graph.

    ONNX Runtime: ``SessionOptions.enable_profiling`` and ``end_profiling()``'s JSON trace (node
    kernel times, by ``op_name``). ExecuTorch: ``load_program(enable_etdump=True)``, the ETDump
    written by the runtime (``read_etdump``; portable kernels as ``native_call_<op>``,
    XNNPACK-delegated ops by their XNNPACK names).
    """
    import edgeseq
    from edgeseq.quiet import quiet_third_party

    quiet_third_party()
    _import_backend(backend)
    man = read_manifest(bundle)
    tmp = Path(tempfile.mkdtemp(prefix="edgeseq-ops-"))
    try:
        with _profiling_enabled(backend, tmp):
            sess = edgeseq.load(bundle, backend=backend, threads=threads)
        log = _CallLog(sess.model, man)
        # "light": no warm-up and no repeats, so that the profiler's event buffer (several MB
        # per prefill with ONNX Runtime) keeps this child's peak RSS below the measurement's.
        sess.task.part("profile_driver")(sess, log, {"tokens": tokens, "prompt_len": prompt_len,
                                                     "light": True}, emit)
        if backend == "ort":
            graphs = _ort_ops(sess, tmp)
            source = "onnxruntime profiler (SessionOptions.enable_profiling)"
        else:
            graphs = _etdump_ops(sess, tmp, log.sequence)
            source = "ExecuTorch ETDump (Runtime.load_program(enable_etdump=True))"
        return {"source": source, "graphs": graphs}
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


class _profiling_enabled:
    """Turn on the backend's profiler for the sessions created inside the block.

    The backends build their session options internally, so this wraps the one place each
    passes through: the ORT backend's ``_clone_options`` and ExecuTorch's
    ``Runtime.load_program``."""

    def __init__(self, backend: str, tmp: Path):
        self.backend, self.tmp = backend, tmp
        self.undo: Callable[[], None] = lambda: None

    def __enter__(self) -> None:
        if self.backend == "ort":
            import edgeseq.runtime.backends.onnxruntime as ob

            orig = ob._clone_options
            n = [0]

            def clone(base: Any, prepack: bool = False) -> Any:
                opts = orig(base, prepack)
                n[0] += 1
                opts.enable_profiling = True  # one prefix per session: file names are per second
                opts.profile_file_prefix = str(self.tmp / f"ort{n[0]}")
                return opts

            ob._clone_options = clone
            self.undo = lambda: setattr(ob, "_clone_options", orig)
        else:
            from executorch.runtime import Runtime

            rt = Runtime.get()
            orig_load = rt.load_program
            rt.load_program = functools.partial(orig_load, enable_etdump=True,
                                                debug_buffer_size=0)
            self.undo = lambda: setattr(rt, "load_program", orig_load)

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def _top(times: Mapping[str, Mapping[Any, list[float]]], extra: dict[str, Any] | None = None
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


def _ort_ops(sess: Any, tmp: Path) -> dict[str, Any]:
    out = {}
    for name, runner in sess.model.runners.items():
        path = Path(runner.sess.end_profiling())
        times: dict[str, dict[str, list[float]]] = {}
        runs = []
        for e in _trace_events(path):
            if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
                op = (e.get("args") or {}).get("op_name") or "?"
                times.setdefault(op, {}).setdefault(e["name"], []).append(e.get("dur", 0) / 1e3)
            elif e.get("cat") == "Session" and e.get("name") == "model_run":
                runs.append(e.get("dur", 0) / 1e3)
        out[name] = _top(times, {"runs": len(runs), "run_ms_total": sum(runs)})
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


def _etdump_ops(sess: Any, tmp: Path, sequence: list[str]) -> dict[str, Any]:
    """Operator times from the ETDump the runtime wrote: one run record per method execution,
    in execution order, so the records pair with the graph calls made (``sequence``)."""
    per_graph: dict[str, dict[str, dict[int, list[float]]]] = {}
    runs: dict[str, list[float]] = {}
    for i, prog in enumerate(sess.model.programs.values()):
        etdp, dbg = tmp / f"et{i}.etdp", tmp / f"et{i}.bin"
        prog.write_etdump_result_to_file(str(etdp), str(dbg))
        executions = [r for r in read_etdump(etdp.read_bytes())
                      if any(name == "Method::execute" for name, _ in r)]
        if len(executions) != len(sequence):
            raise ProfileError(f"ETDump holds {len(executions)} executions but "
                               f"{len(sequence)} graph calls were made")
        for graph, events in zip(sequence, executions):
            times = per_graph.setdefault(graph, {})
            for k, (name, ns) in enumerate(events):  # a method's runs list the same events
                if name == "Method::execute":
                    runs.setdefault(graph, []).append(ns / 1e6)
                elif (op := _et_op_name(name)) is not None:
                    times.setdefault(op, {}).setdefault(k, []).append(ns / 1e6)
    return {g: _top(t, {"runs": len(runs.get(g, [])), "run_ms_total": sum(runs.get(g, []))})
            for g, t in per_graph.items()}


def read_etdump(data: bytes) -> list[list[tuple[str, int]]]:
    """The profile events of an ETDump file: per run record, ``(name, duration in ticks)``.

    ETDump is a size-prefixed FlatBuffer (executorch/devtools/etdump/etdump_schema_flatcc.fbs:
    ETDump{version, run_data:[RunData{name, bundled_input_index, allocators, events:[Event{
    profile_event:ProfileEvent{name, chain_index, instruction_id, delegate_debug_id_int,
    delegate_debug_id_str, delegate_debug_metadata, start_time, end_time}}]}]}). Read here
    directly: ExecuTorch's own reader imports ``executorch.exir`` (~30 MB of RSS), which would
    lift the operator-profiling child above the measurement's peak. Delegate events (XNNPACK
    ops) carry their name in ``delegate_debug_id_str``.
    """
    import struct

    b = memoryview(data)[4:]  # size prefix

    def u32(p: int) -> int:
        return struct.unpack_from("<I", b, p)[0]

    def field(t: int, i: int) -> int | None:
        vt = t - struct.unpack_from("<i", b, t)[0]
        if 4 + 2 * i >= struct.unpack_from("<H", b, vt)[0]:
            return None
        off = struct.unpack_from("<H", b, vt + 4 + 2 * i)[0]
        return t + off if off else None

    def ref(p: int | None) -> int | None:
        return None if p is None else p + u32(p)

    def string(p: int | None) -> str | None:
        s = ref(p)
        return None if s is None else bytes(b[s + 4:s + 4 + u32(s)]).decode("utf-8", "replace")

    def tables(p: int | None) -> list[int]:
        v = ref(p)
        return [] if v is None else [v + 4 + 4 * k + u32(v + 4 + 4 * k) for k in range(u32(v))]

    def u64(p: int | None) -> int:
        return 0 if p is None else struct.unpack_from("<Q", b, p)[0]

    out = []
    for run in tables(field(ref(0), 1)):
        events = []
        for ev in tables(field(run, 3)):
            pe = ref(field(ev, 0))
            if pe is None:
                continue
            name = string(field(pe, 0)) or string(field(pe, 4)) or ""
            events.append((name, u64(field(pe, 7)) - u64(field(pe, 6))))
        out.append(events)
    return out


def _et_op_name(name: str) -> str | None:
    """``native_call_mm.out`` -> ``mm``; ``Fully Connected (NC, F32) GEMM #3`` -> without the
    number; wrappers (``OPERATOR_CALL``, ``DELEGATE_CALL``) and load events -> None."""
    if name in ("OPERATOR_CALL", "DELEGATE_CALL") or "::" in name:
        return None
    if name.startswith("native_call_"):
        return name[len("native_call_"):].split(".")[0]
    return name.split(" #")[0]
