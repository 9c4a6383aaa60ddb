"""ExecuTorch's operator profiler: ``load_program(enable_etdump=True)`` and the ETDump the
runtime writes (portable kernels as ``native_call_<op>``, XNNPACK-delegated ops by their XNNPACK
names)."""
from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from edgeseq.runtime.backends.base import LoadedModel
from edgeseq.runtime.profile.errors import ProfileError
from edgeseq.runtime.profile.ops import top_ops

SOURCE = "ExecuTorch ETDump (Runtime.load_program(enable_etdump=True))"


@contextmanager
def profiling(tmp: Path) -> Iterator[None]:
    """Programs loaded inside the block record an ETDump (``run.load`` loads through
    ``Runtime.load_program``, wrapped here)."""
    from executorch.runtime import Runtime

    rt = Runtime.get()
    orig_load = rt.load_program
    rt.load_program = functools.partial(orig_load, enable_etdump=True, debug_buffer_size=0)
    try:
        yield
    finally:
        rt.load_program = orig_load


def collect(model: LoadedModel, tmp: Path, sequence: list[str]) -> dict[str, Any]:
    """Operator times from the ETDump the runtime wrote: one run record per method execution,
    in execution order, so the records pair with the graph calls made (``sequence``)."""
    per_graph: dict[str, dict[str, dict[int, list[float]]]] = {}
    runs: dict[str, list[float]] = {}
    for i, prog in enumerate(model.programs.values()):
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
    return {g: top_ops(t, {"runs": len(runs.get(g, [])), "run_ms_total": sum(runs.get(g, []))})
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
