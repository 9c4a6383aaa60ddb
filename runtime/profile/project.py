"""Stage 3 of ``edgeseq profile``: a host measurement projected onto a device (roofline bound
scaled by the host's efficiency, never below the device's bound), memory against a budget,
and the advice."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from edgeseq.registry import get_task, runtime_memory
from edgeseq.runtime.cost import GraphCost


#: How much smaller quantized weights are than fp32 (measured at the Mamba-130M shape:
#: docs/quant.md, int8 3.54x; int4 with per-group scales ~6x).
QUANT_SHRINK = {"int8": 3.5, "int4": 6.0}


# =============================================================================================
# Stage 3: projection
# =============================================================================================
def device_roofline(cost: GraphCost, device: Any, unit: str = "cpu") -> Any:
    """``devices.roofline`` for one call; a dtype the unit has no figure for is counted at the
    unit's fastest known rate (optimistic, so the bound stays a lower bound)."""
    from edgeseq.devices import DeviceError, roofline

    u = device.unit(unit)
    flops: dict[str, float] = {}
    for d, f in cost.flops.items():
        if not f:
            continue
        try:
            device.peak_ops(d, unit)
            key = d
        except DeviceError:
            known = sorted(u.peak_gops, key=lambda k: -u.peak_gops[k]) or ["fp32"]
            key = known[0]
        flops[key] = flops.get(key, 0.0) + f
    return roofline(cost.bytes_moved, flops, device, unit)


def host_efficiency(costs: Mapping[str, GraphCost], measured: Mapping[str, Any],
                    host: Any) -> dict[str, dict[str, Any]]:
    """Per graph: the host's roofline bound per call, the measured median call, and the
    efficiency ``bound / measured`` clipped to at most 1 (a graph whose weights stay in cache can
    beat the host's DRAM bound; the clip keeps every projection at or above its device bound)."""
    out = {}
    for name, cost in costs.items():
        g = (measured.get("graphs") or {}).get(name) or {}
        ms = g.get("ms_p50")
        rec: dict[str, Any] = {"measured_ms_p50": ms, "calls": g.get("calls", 0)}
        try:
            r = device_roofline(cost, host)
            bound_ms = r.seconds * 1e3
            rec.update(host_bound_ms=bound_ms, host_bound=r.bound,
                       raw_efficiency=bound_ms / ms if ms else None,
                       efficiency=min(1.0, bound_ms / ms) if ms else None,
                       achieved_ops_per_s=sum(cost.flops.values()) / (ms / 1e3) if ms else None,
                       achieved_bytes_per_s=cost.bytes_moved / (ms / 1e3) if ms else None)
        except Exception as e:  # noqa: BLE001 - an uncalibrated host: no efficiency, say why
            rec.update(host_bound_ms=None, efficiency=None, note=str(e))
        out[name] = rec
    return out


def project(measured: Mapping[str, Any], costs: Mapping[str, GraphCost],
            efficiency: Mapping[str, Mapping[str, Any]], device: Any, task: str,
            backend: str = "ort", budget: int | None = None,
            target_ms: float | None = None, scheme: str = "fp32",
            known_devices: Iterable[Any] = ()) -> dict[str, Any]:
    """Project a host measurement onto ``device``.

    Per graph: ``max(bound, bound / efficiency)`` with the efficiency at most 1, so the result is
    never below the device's roofline bound (without a host efficiency, the bound itself).
    Memory: weights + state + arena (as measured on the host) + the backend's runtime memory
    for the graphs measured (``Backend.memory``: the constants the speculative plan uses).

    Returns:
        ``step_ms``, ``tokens_per_s``/``frames_per_s``/``rtf``, ``first_token_ms``,
        ``peak_bytes`` and its split, ``budget_bytes``, ``fits``, ``latency_ms`` (what the target
        is checked against), ``meets_latency``, ``graphs`` and ``advice``.
    """
    graphs: dict[str, Any] = {}
    for name, cost in costs.items():
        r = device_roofline(cost, device)
        bound = r.seconds * 1e3
        eff = (efficiency.get(name) or {}).get("efficiency")
        ms = max(bound, bound / eff) if eff and eff > 0 else bound
        graphs[name] = {"bound_ms": bound, "memory_ms": r.memory_s * 1e3,
                        "compute_ms": r.compute_s * 1e3, "bound": r.bound,
                        "efficiency": eff, "ms": ms}
    step_graph = measured.get("step_graph", "step")
    step = graphs.get(step_graph, {}).get("ms")
    first = sum(graphs[g]["ms"] * n for g, n in (measured.get("first_calls") or {}).items()
                if g in graphs)
    out: dict[str, Any] = {"device": device.id, "unit": "cpu", "step_ms": step,
                           "first_token_ms": first, "graphs": graphs}
    kind = get_task(task)
    if kind.generates:
        out["tokens_per_s"] = 1e3 / step if step else None
    latency = step
    if kind.latency_unit == "window":
        n_dec = measured.get("decoder_calls_per_window") or measured.get("new_tokens", 1)
        window = graphs["encoder"]["ms"] + n_dec * (step or 0.0)
        out.update(window_ms=window, rtf=window / (measured["audio_s"] * 1e3),
                   encoder_ms=graphs["encoder"]["ms"])
        latency = window
    elif kind.encoder:
        out["encoder_ms"] = graphs["encoder"]["ms"]
    elif kind.step_unit == "frame":
        rate = measured.get("frame_rate")
        out.update(frames_per_s=1e3 / step if step else None, ms_per_frame=step,
                   rtf=step / (1e3 / rate) if rate and step else None)
    if kind.decoder_only and "prefill" in graphs:
        out["prefill_ms"] = sum(graphs["prefill"]["ms"] * n for g, n in
                                (measured.get("first_calls") or {}).items() if g == "prefill")
    mem = measured["memory"]
    over = runtime_memory(backend).runtime_bytes(len(costs))
    split = {"weights": mem["weights"], "state": mem["state"], "arena": mem["arena"],
             "runtime": over}
    peak = sum(split.values())
    budget = int(budget) if budget else device.app_memory
    out.update(peak_bytes=peak, memory=split, budget_bytes=budget, fits=peak <= budget,
               latency_ms=latency, target_latency_ms=target_ms,
               meets_latency=None if target_ms is None or latency is None else latency <= target_ms)
    out["advice"] = advise(out, measured, costs, task, scheme, known_devices)
    return out


def advise(p: Mapping[str, Any], measured: Mapping[str, Any], costs: Mapping[str, GraphCost],
           task: str, scheme: str, known_devices: Iterable[Any] = ()) -> list[str]:
    """What to change when a projection misses its memory budget or latency target."""
    tips: list[str] = []
    kind = get_task(task)
    mem = p["memory"]
    if not p["fits"]:
        over = p["peak_bytes"] - p["budget_bytes"]
        tips.append(f"memory: {_mb(p['peak_bytes'])} exceeds the budget of "
                    f"{_mb(p['budget_bytes'])} by {_mb(over)}")
        for q, k in _smaller_schemes(scheme).items():
            new = p["peak_bytes"] - mem["weights"] + mem["weights"] / k
            tips.append(f"  quantize: `edgeseq convert ... --quant {q}` (weights ~{k:.3g}x "
                        f"smaller than {scheme}): peak ~{_mb(new)}"
                        + (" - fits" if new <= p["budget_bytes"] else " - still too large"))
        per_pos = measured.get("state_bytes_per_position") or 0
        if kind.encoder and per_pos:
            room = p["budget_bytes"] - (p["peak_bytes"] - mem["state"])
            n = int(room // per_pos) if room > 0 else 0
            tips.append(f"  cache capacity: `--max-target-len N` bounds the self-attention "
                        f"cache ({_mb(per_pos)} per position); N <= {n} fits the budget"
                        if n > 1 else "  cache capacity: even a 1-position cache does not fit")
        if mem["arena"] > 0.25 * p["peak_bytes"]:
            tips.append(f"  arena {_mb(mem['arena'])}: {kind.arena_advice}")
    if p.get("meets_latency") is False:
        tgt, lat = p["target_latency_ms"], p["latency_ms"]
        tips.append(f"latency: {lat:.3g} ms exceeds the target of {tgt:.3g} ms "
                    f"({lat / tgt:.2f}x)")
        g = p["graphs"].get(measured.get("step_graph", "step")) or {}
        cost = costs.get(measured.get("step_graph", "step"))
        eff = g.get("efficiency") or 1.0
        if cost is not None and g.get("bound") == "memory":
            for q, k in _smaller_schemes(scheme).items():
                # a memory-bound step scales with its bytes: the weights shrink, the state not
                new = lat * (cost.weight_bytes / k + cost.io_bytes) / max(1, cost.bytes_moved)
                tips.append(f"  quantize: `--quant {q}` reads ~{k:.3g}x fewer weight bytes per "
                            f"step: ~{new:.3g} ms" + (" - meets it" if new <= tgt else ""))
        if g.get("efficiency") is not None and g["efficiency"] < 0.5:
            tips.append(f"  the host ran at {g['efficiency']:.0%} of its roofline bound: per-call "
                        "overhead or thread contention dominates; try --threads (fewer threads "
                        "contend less) or larger chunks")
        # a window's latency is not one memory-bound call: no bandwidth figure for it
        if cost is not None and g.get("bound") == "memory" and kind.latency_unit == "step":
            need = cost.bytes_moved / (tgt / 1e3 * eff) if tgt > 0 else float("inf")
            faster = [d.id for d in known_devices if not d.placeholder
                      and d.memory.bandwidth_bytes_per_s >= need]
            tips.append(f"  a device with >= {need / 1e9:.3g} GB/s of DRAM bandwidth at this "
                        "efficiency" + (f" (known: {', '.join(faster)})" if faster else ""))
    return tips


def _smaller_schemes(scheme: str) -> dict[str, float]:
    """Quantization schemes smaller than ``scheme`` and how many times smaller its weights get."""
    if scheme == "fp32":
        return dict(QUANT_SHRINK)
    if scheme == "fp16":
        return {q: k / 2 for q, k in QUANT_SHRINK.items()}
    if scheme == "int8":
        return {"int4": QUANT_SHRINK["int4"] / QUANT_SHRINK["int8"]}
    return {}


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def memory_split(measured: Mapping[str, Any], weights: int) -> dict[str, int]:
    """Peak RSS as weights (the bundle's weight bytes), state (``STATE_COPIES`` x the state at the
    length reached), arena (what the runtime allocated beyond these: peak - baseline - weights -
    state, at least 0) and other (the rest: interpreter, libraries, the baseline)."""
    peak = int(measured["peak_rss_bytes"])
    base = int(measured["baseline_rss_bytes"])
    state = int(measured["state_bytes"])
    arena = max(0, peak - base - weights - state)
    return {"weights": int(weights), "state": state, "arena": arena,
            "other": max(0, peak - weights - state - arena)}
