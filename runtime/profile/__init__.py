"""Profile a bundle: measure it on this host, then project it onto target devices.

Three stages (``edgeseq profile``; docs/profile.md):

1. **Measure** on the host, in a fresh child process (``python -m edgeseq.runtime.profile``) so
   that its peak RSS belongs to this bundle alone: load time, prefill/encoder latency, first-token
   latency, per-step latencies (p50/p95), tokens/s or real-time factor, and peak RSS split into
   weights, state, runtime arena and the rest. A second child reruns the workload with ONNX
   Runtime's profiler or ExecuTorch's ETDump for the time per operator.
2. **Analyse** each graph's roofline cost per call from the ONNX graph (shape inference at the
   measured sizes): bytes moved (weights read once, each initializer in its stored dtype, plus
   every graph input and output: state read and written, cross-attention K/V, logits) and
   operations by dtype (2*M*K*N per matrix product; 1 per element for arithmetic element-wise
   ops). A ``.pte``-only bundle is costed from its file size and the manifest.
3. **Project** onto a device: the host's efficiency per graph, host roofline bound / measured
   time (at most 1), scales the device's bound. The projection never beats the device's bound:
   ``projected = max(bound_device, bound_device / efficiency)``. Memory is projected as weights
   + state + arena + a runtime constant, and checked against a budget (default: the device's app
   memory) and, optionally, a latency target.

The measurement is a plain dict (JSON-ready), so one measurement serves many projections.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from edgeseq.bundle import Manifest, read_manifest
from edgeseq.registry import backends, format_of, tasks
from edgeseq.runtime.profile.child import _worker_main, measure
from edgeseq.runtime.cost import (STATE_COPIES, GraphCost, _scheme, analyze,
                                  state_bytes_per_position, weight_bytes)
from edgeseq.runtime.profile.errors import ProfileError
from edgeseq.runtime.profile.measure import (_import_backend, _pct, _rss, measure_in_process,
                                             synthetic_prompt)
from edgeseq.runtime.profile.ops import TOP_OPS, ops_in_process
from edgeseq.runtime.profile.project import (advise, device_roofline, host_efficiency,
                                             memory_split, project)

#: what ``from edgeseq.runtime.profile import ...`` offers: the command's pieces, and the helpers
#: other modules measure with (``_rss``, ``_import_backend``: the speculative memory tests and
#: benchmark)
__all__ = ["ProfileError", "ProfileOptions", "profile", "parse_size", "measure", "analyze",
           "project", "host_efficiency", "device_roofline", "advise", "memory_split",
           "weight_bytes", "GraphCost", "STATE_COPIES", "TOP_OPS", "measure_in_process",
           "ops_in_process", "synthetic_prompt", "_rss", "_import_backend",
           "check_bundle", "resolve_devices", "host_profile", "main"]

SCHEMA = 1


# =============================================================================================
# Small helpers
# =============================================================================================
def parse_size(text: str | int) -> int:
    """``512M``, ``2G``, ``1.5GiB``, ``300000000`` -> bytes (K/M/G/T are powers of 1024 with or
    without ``iB``; ``kB``/``MB``/``GB`` are powers of 1000).

    Raises:
        ValueError: not a size.
    """
    if isinstance(text, int):
        return text
    s = str(text).strip()
    units = {"": 1, "B": 1, "K": 2**10, "KIB": 2**10, "M": 2**20, "MIB": 2**20, "G": 2**30,
             "GIB": 2**30, "T": 2**40, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12}
    num = s.rstrip("BbIiKkMmGgTt")
    unit = s[len(num):].strip().upper()
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use bytes or 512M, 2G, 1.5GB)") from None
    if unit not in units or value <= 0 or not math.isfinite(value):
        raise ValueError(f"not a size: {text!r} (use bytes or 512M, 2G, 1.5GB)")
    return int(value * units[unit])


# =============================================================================================
# The whole command
# =============================================================================================
@dataclass
class ProfileOptions:
    backend: str = "ort"
    tokens: int = 128
    prompt_len: int = 16
    threads: int | None = None
    ops: bool = True
    memory_budget: int | None = None
    target_latency_ms: float | None = None
    devices: list[str] = field(default_factory=lambda: ["host"])
    device_paths: list[Path] = field(default_factory=list)


def profiled_backends() -> tuple[str, ...]:
    """The backends the profiler drives: those with an operator profiler
    (``Backend.ops_profiler``), in registration order."""
    return tuple(name for name, cls in backends().items() if cls().ops_profiler() is not None)


def check_bundle(bundle: str | Path, backend: str) -> Manifest:
    """Fail early, before any child runs: a readable bundle, lowered for ``backend``, with a task
    the profiler drives.

    Raises:
        BundleError: a missing or malformed bundle. ProfileError: wrong backend or task.
    """
    man = read_manifest(bundle)
    known = profiled_backends()
    if backend not in known:
        raise ProfileError(f"unknown backend {backend!r}; known: {', '.join(known)}")
    fmt = format_of(backend)
    missing = [n for n, g in man.graphs.items() if fmt not in g.files]
    if missing:
        have = sorted({f for g in man.graphs.values() for f in g.files})
        raise ProfileError(f"{bundle}: graph {missing[0]} was not lowered for {backend} (format "
                           f"{fmt}; bundle has: {', '.join(have) or 'none'})")
    profiled = [name for name, t in tasks().items() if getattr(t, "profile_driver", None)]
    if man.task not in profiled:
        raise ProfileError(f"{bundle}: task {man.task!r} cannot be profiled; known: "
                           f"{', '.join(profiled)}")
    return man


def resolve_devices(names: Iterable[str], paths: Iterable[Path] = (),
                    progress: Callable[[str], None] | None = None) -> list[Any]:
    """Device profiles by id or file (``all`` = every known device). An uncalibrated ``host`` is
    calibrated now (1 s of microbenchmarks, cached for later runs).

    Raises:
        DeviceError: an unknown device or a bad file.
    """
    from edgeseq.devices import calibrate_host, get_profile, load_profiles

    extra = list(paths)
    known = load_profiles(extra)
    out = []
    for n in names:
        profs = list(known.values()) if n == "all" else [get_profile(n, extra)]
        for p in profs:
            if p.id == "host" and p.placeholder:
                if progress:
                    progress("calibrating this host (about 1 s; cached, refine with "
                             "`edgeseq devices --calibrate`)")
                p = calibrate_host(seconds_budget=1.0)
            if all(q.id != p.id for q in out):
                out.append(p)
    return out


def host_profile(progress: Callable[[str], None] | None = None) -> Any:
    return resolve_devices(["host"], progress=progress)[0]


def profile(bundle: str | Path, opts: ProfileOptions | None = None,
            progress: Callable[[str], None] | None = None,
            measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure ``bundle`` on this host (unless ``measured`` is given: a previous report's
    ``measured``) and project it onto every device of ``opts.devices``.

    Returns:
        The report (see docs/profile.md): ``device`` and ``projected`` (the first device),
        ``projections`` (all), ``measured``, ``roofline``, ``op_breakdown``.

    Raises:
        BundleError, ProfileError, DeviceError (edgeseq.devices).
    """
    opts = opts or ProfileOptions()
    root = Path(bundle)
    man = check_bundle(root, opts.backend)
    devices = resolve_devices(opts.devices, opts.device_paths, progress)
    host = next((d for d in devices if d.id == "host"), None) or host_profile(progress)
    if measured is None:
        if progress:
            progress(f"measuring {root} on this host ({opts.backend})")
        raw = measure(root, opts.backend, opts.tokens, opts.prompt_len, opts.threads, opts.ops,
                      progress)
    else:
        raw = dict(measured)
        if raw.get("backend", opts.backend) != opts.backend or "graphs" not in raw or \
                set(raw["graphs"]) - set(man.graphs):
            raise ProfileError(f"the given measurement is not of {root} on {opts.backend} "
                               f"(it ran on {raw.get('backend')}, graphs "
                               f"{', '.join(raw.get('graphs') or []) or 'none'})")
    costs = analyze(root, man, raw)
    weights = weight_bytes(root, man, opts.backend)
    raw["memory"] = memory_split(raw, weights)
    raw["state_bytes_per_position"] = STATE_COPIES * state_bytes_per_position(man)
    eff = host_efficiency(costs, raw, host)
    scheme = _scheme(man)
    from edgeseq.devices import load_profiles

    known = list(load_profiles(opts.device_paths).values())
    projections = [project(raw, costs, eff, d, man.task, opts.backend, opts.memory_budget,
                           opts.target_latency_ms, scheme, known) for d in devices]
    ops = raw.pop("op_breakdown", None)
    note = raw.pop("op_breakdown_note", None)
    return {"schema": SCHEMA, "bundle": str(root), "family": man.family, "task": man.task,
            "backend": opts.backend, "scheme": scheme,
            "settings": {"tokens": opts.tokens, "prompt_len": opts.prompt_len,
                         "threads": raw.get("threads"), "ops": opts.ops},
            "device": devices[0].summary(), "host": host.summary(),
            "measured": _measured_view(raw),
            "projected": projections[0], "projections": projections,
            "devices": [d.summary() for d in devices],
            "roofline": {n: {**c.to_json(), **eff[n]} for n, c in costs.items()},
            "op_breakdown": ops, "op_breakdown_note": note}


def _measured_view(raw: dict[str, Any]) -> dict[str, Any]:
    """The report's ``measured``: the raw measurement plus the step-latency percentiles."""
    steps = raw.get("steps_ms") or []
    view = {k: v for k, v in raw.items() if k not in ("steps_ms", "pid")}
    view.update(step_ms_p50=_pct(steps, 50), step_ms_p95=_pct(steps, 95),
                step_ms_mean=float(np.mean(steps)) if steps else None, steps_ms=steps)
    return view


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) >= 4 and argv[1] == "--worker":
        return _worker_main(argv[1:])
    print("usage: edgeseq profile BUNDLE (this module's command line is internal)",
          file=sys.stderr)
    return 2
