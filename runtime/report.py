"""Render a profile report (``edgeseq.runtime.profile.profile``): terminal tables and a
self-contained HTML page whose plots are inline SVG drawn here (no plotting library needed):
the step-latency distribution, the memory breakdown and the roofline chart."""
from __future__ import annotations

import html
import math
from typing import Any, Iterable, Mapping, Sequence

from edgeseq.registry import get_task

COLORS = {"weights": "#4e79a7", "state": "#f28e2b", "arena": "#59a14f", "other": "#bab0ac",
          "runtime": "#b07aa1"}


# -- numbers -----------------------------------------------------------------------------------
def _f(v: Any, fmt: str = ".3g", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, fmt)


def _mb(n: Any) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def _rate_key(task: str) -> tuple[str, str]:
    unit = get_task(task).step_unit
    return f"{unit}s_per_s", f"{unit}s/s"


# -- text --------------------------------------------------------------------------------------
def _table(rows: Sequence[Sequence[str]], indent: str = "  ", left: int = 1) -> list[str]:
    """Aligned columns: the first ``left`` left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        cells = [str(c).ljust(w) if i < left else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        out.append(indent + "  ".join(cells).rstrip())
        if j == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return out


def text(rep: Mapping[str, Any]) -> str:
    """The report as terminal tables."""
    m, task = rep["measured"], rep["task"]
    unit = m.get("step_unit", "token")
    rk, rl = _rate_key(task)
    s = rep["settings"]
    lines = [f"{rep['bundle']}: {rep['family']} ({task}, {rep['scheme']}) on {rep['backend']}, "
             f"{s['threads'] or 'default'} threads"]
    host = rep["host"]
    lines += ["", f"measured on this host ({host['name']})"]
    rows = [["what", "measured"], ["load", f"{_f(m.get('load_ms'), '.1f')} ms"]]
    if m.get("prefill_ms") is not None:
        rows.append(["prefill", f"{_f(m['prefill_ms'], '.2f')} ms ({m.get('prompt_tokens')} "
                                "tokens)"])
    if m.get("encoder_ms") is not None:
        what = (f"{m['audio_s']:g} s window" if m.get("audio_s")
                else f"{m.get('source_tokens')} source tokens")
        rows.append(["encoder", f"{_f(m['encoder_ms'], '.2f')} ms ({what})"])
    first = "first output" if unit == "frame" else "first token"
    rows.append([first, f"{_f(m.get('first_token_ms'), '.2f')} ms"])
    rows.append([f"per {unit}", f"p50 {_f(m.get('step_ms_p50'), '.3f')} ms, p95 "
                 f"{_f(m.get('step_ms_p95'), '.3f')} ms, mean {_f(m.get('step_ms_mean'), '.3f')}"
                 f" ms ({m.get('new_tokens')} {unit}s)"])
    if m.get(rk) is not None:
        rows.append([rl, _f(m[rk], ".1f")])
    if m.get("ms_per_frame_chunked") is not None:
        rows.append(["chunked", f"{_f(m['ms_per_frame_chunked'], '.3f')} ms/frame "
                                f"(chunks of {m.get('chunk')})"])
    if m.get("rtf") is not None:
        rows.append(["real-time factor", _f(m["rtf"], ".4f")])
    mem = m["memory"]
    rows.append(["peak RSS", f"{_mb(m['peak_rss_bytes'])} MB = weights {_mb(mem['weights'])} + "
                 f"state {_mb(mem['state'])} + arena {_mb(mem['arena'])} + other "
                 f"{_mb(mem['other'])} MB"])
    lines += _table(rows, left=2)

    lines += ["", "roofline per call (bytes and operations read from the graph)"]
    rows = [["graph", f"{unit}s/call", "MB moved", "MOP", "op/B", "host bound ms",
             "measured p50 ms", "efficiency"]]
    for g, r in rep["roofline"].items():
        ops = sum(r["flops_by_dtype"].values())
        dt = "+".join(sorted(k for k, v in r["flops_by_dtype"].items() if v)) or "-"
        rows.append([g, str(r["tokens_per_call"]), _mb(r["bytes_per_call"]),
                     f"{ops / 1e6:.3g} {dt}", _f(r["intensity_ops_per_byte"], ".2f"),
                     _f(r.get("host_bound_ms"), ".4f"), _f(r.get("measured_ms_p50"), ".4f"),
                     _f(r.get("efficiency"), ".0%")])
    lines += _table(rows)

    ops = rep.get("op_breakdown")
    if ops:
        lines += ["", f"top operators ({ops['source']})"]
        for g, b in ops["graphs"].items():
            lines.append(f"  {g} ({b['runs']} run{'' if b['runs'] == 1 else 's'}, "
                         f"{b['total_ms']:.1f} ms in operators):")
            rows = [["op", "ms", "calls", "share"]]
            rows += [[o["op"], f"{o['ms']:.2f}", str(o["calls"]), f"{o['share']:.1%}"]
                     for o in b["top"]]
            lines += _table(rows, "    ")
    else:
        lines += ["", f"top operators: {rep.get('op_breakdown_note') or 'none'}"]

    lines += ["", "projected (never below the device's roofline bound)"]
    windowed = get_task(task).latency_unit == "window"
    rows = [["device", f"ms/{unit}", rl] + (["rtf"] if windowed else [])
            + [f"{first} ms", "peak MB", "budget MB", "fits", "latency"]]
    for p in rep["projections"]:
        lat = "-" if p.get("meets_latency") is None else ("ok" if p["meets_latency"] else "MISS")
        rows.append([p["device"], _f(p.get("step_ms"), ".4g"), _f(p.get(rk), ".1f")]
                    + ([_f(p.get("rtf"), ".4f")] if windowed else [])
                    + [_f(p.get("first_token_ms"), ".4g"), _mb(p["peak_bytes"]),
                       _mb(p["budget_bytes"]), "yes" if p["fits"] else "NO", lat])
    lines += _table(rows)
    for p in rep["projections"]:
        lines += ["", verdict(p, task)] + [f"  {t}" for t in p.get("advice") or []]
    return "\n".join(lines)


def verdict(p: Mapping[str, Any], task: str) -> str:
    """One line: does it fit, does it meet the target."""
    fit = (f"fits ({_mb(p['peak_bytes'])} of {_mb(p['budget_bytes'])} MB)" if p["fits"]
           else f"does NOT fit ({_mb(p['peak_bytes'])} MB > budget {_mb(p['budget_bytes'])} MB)")
    what = get_task(task).latency_unit
    lat = f"{what} {_f(p.get('latency_ms'), '.4g')} ms"
    if p.get("target_latency_ms") is not None:
        lat += (" meets" if p["meets_latency"] else " MISSES") + \
               f" the {p['target_latency_ms']:g} ms target"
    return f"verdict {p['device']}: {fit}; {lat}"


# -- SVG ---------------------------------------------------------------------------------------
def _svg(w: int, h: int, body: Iterable[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(title)}" '
            'font-family="sans-serif" font-size="11">'
            f"<title>{html.escape(title)}</title>" + "".join(body) + "</svg>")


def _text(x: float, y: float, s: str, anchor: str = "start", **kw: Any) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in kw.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{html.escape(s)}</text>'


def latency_histogram(steps_ms: Sequence[float], unit: str = "token", width: int = 640,
                      height: int = 260) -> str:
    """Histogram of per-step latencies on log-spaced bins (a busy host's rare slow steps stay
    visible without squashing the body of the distribution), with p50 and p95 marked."""
    title = f"Latency per {unit} (ms), measured on this host"
    xs = sorted(float(v) for v in steps_ms if v is not None and v > 0)
    left, right, top, bottom = 50, 20, 30, 40
    body = [_text(width / 2, 18, title, "middle", font_weight="bold")]
    if not xs:
        return _svg(width, height, body + [_text(width / 2, height / 2, "no steps", "middle")],
                    title)
    lo, hi = math.log10(xs[0]), math.log10(xs[-1])
    if hi - lo < 0.05:  # all alike: a window of +-6 % around them
        lo, hi = lo - 0.025, hi + 0.025
    nb = max(8, min(48, int(math.sqrt(len(xs))) * 3))
    counts = [0] * nb
    for v in xs:
        counts[min(nb - 1, max(0, int((math.log10(v) - lo) / (hi - lo) * nb)))] += 1
    cmax = max(counts)
    pw, ph = width - left - right, height - top - bottom

    def px(v: float) -> float:
        return left + pw * (math.log10(v) - lo) / (hi - lo)

    bw = pw / nb
    for i, c in enumerate(counts):
        bh = ph * c / cmax
        body.append(f'<rect x="{left + i * bw:.1f}" y="{top + ph - bh:.1f}" '
                    f'width="{max(bw - 1, 1):.1f}" height="{bh:.1f}" fill="#4e79a7">'
                    f"<title>{c} steps</title></rect>")
    body.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" '
                'stroke="#333"/>')
    for k in range(6):
        v = 10 ** (lo + (hi - lo) * k / 5)
        body.append(_text(left + pw * k / 5, top + ph + 14, f"{v:.3g}", "middle"))
    body.append(_text(left + pw / 2, height - 6, f"ms per {unit} (log scale), {len(xs)} steps",
                      "middle"))
    body.append(_text(14, top + ph / 2, "count", "middle",
                      transform=f"rotate(-90 14 {top + ph / 2})"))
    for j, (q, color) in enumerate(((50, "#e15759"), (95, "#59a14f"))):
        v = xs[min(len(xs) - 1, int(q / 100 * (len(xs) - 1) + 0.5))]
        x = px(v)
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" '
                    f'stroke="{color}" stroke-dasharray="4 3"/>')
        anchor = "end" if x > left + pw * 0.8 else "start"
        body.append(_text(x + (-3 if anchor == "end" else 3), top + 10 + 13 * j,
                          f"p{q} {v:.3g} ms", anchor, fill=color))
    return _svg(width, height, body, title)


def memory_bars(rows: Sequence[tuple[str, Mapping[str, int], int | None]], width: int = 640,
                ) -> str:
    """Stacked horizontal bars: (label, {part: bytes}, budget or None) per row."""
    title = "Memory: measured peak RSS on this host and projected peak per device"
    left, right, top, bar, gap = 170, 90, 34, 18, 10
    height = top + len(rows) * (bar + gap) + 40
    body = [_text(width / 2, 18, title, "middle", font_weight="bold")]
    total_max = max((sum(parts.values()) for _, parts, _ in rows), default=1) or 1
    pw = width - left - right
    for i, (label, parts, budget) in enumerate(rows):
        y = top + i * (bar + gap)
        body.append(_text(left - 6, y + bar - 5, label, "end"))
        x = left
        for k, v in parts.items():
            w = pw * v / total_max
            if w > 0:
                body.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" '
                            f'fill="{COLORS.get(k, "#999")}"><title>{k}: {v / 1e6:.2f} MB'
                            "</title></rect>")
            x += w
        tot = sum(parts.values())
        note = f"{tot / 1e6:.1f} MB"
        if budget:
            note += f" ({tot / budget:.1%} of budget)" if tot <= budget else " > budget"
        body.append(_text(x + 4, y + bar - 5, note))
    y = top + len(rows) * (bar + gap) + 8
    x = left
    for k in ("weights", "state", "arena", "runtime", "other"):
        body.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{COLORS[k]}"/>')
        body.append(_text(x + 16, y + 10, k))
        x += 80
    return _svg(width, height, body, title)


def roofline_chart(rep: Mapping[str, Any], width: int = 640, height: int = 400) -> str:
    """Log-log roofline: attainable ops/s against operations per byte, with the ceilings
    (bandwidth slope, peak per dtype) of the host and of up to two projected devices, and each
    graph's points: achieved on the host (filled), projected on each device (hollow)."""
    title = "Roofline: operations/s against operations per byte moved"
    left, right, top, bottom = 70, 20, 30, 50
    pw, ph = width - left - right, height - top - bottom
    body = [_text(width / 2, 18, title, "middle", font_weight="bold")]
    by_id = {d["id"]: d for d in rep.get("devices") or [rep["device"]]}
    palette = ["#4e79a7", "#59a14f", "#b07aa1"]
    devs = [(rep["host"], "#e15759", None)]
    for proj in rep["projections"]:
        d = by_id.get(proj["device"])
        if d is not None and d["id"] != rep["host"]["id"] and len(devs) < 3:
            devs.append((d, palette[len(devs) - 1], proj))
    devs = [x for x in devs if x[0].get("calibrated") and x[0].get("dram_bandwidth_bytes_per_s")]
    points = []  # (intensity, ops/s, label, color, filled)
    for g, r in rep["roofline"].items():
        ops = sum(r["flops_by_dtype"].values())
        inten = r["intensity_ops_per_byte"]
        if ops <= 0 or inten <= 0:
            continue
        if r.get("measured_ms_p50"):
            points.append((inten, ops / (r["measured_ms_p50"] / 1e3), f"{g} (host)", "#e15759",
                           True))
        for d, color, proj in devs[1:]:
            pg = proj["graphs"].get(g) or {}
            if pg.get("ms"):
                points.append((inten, ops / (pg["ms"] / 1e3), f"{g} ({d['id']})", color, False))
    devs = [(d, color) for d, color, _ in devs]
    dtypes = sorted({k for r in rep["roofline"].values() for k, v in r["flops_by_dtype"].items()
                     if v}) or ["fp32"]
    xs = [p[0] for p in points] or [1.0]
    peaks = [pk for d, _ in devs for _, pk in _ceilings(d, dtypes)]
    ys = [p[1] for p in points] + peaks or [1e9]
    x0, x1 = math.floor(math.log10(min(xs) / 10)), math.ceil(math.log10(max(xs) * 100))
    y0 = math.floor(math.log10(min(ys) / 10))
    y1 = math.ceil(math.log10(max(ys) * 2))
    x1, y1 = max(x1, x0 + 2), max(y1, y0 + 2)

    def px(v: float) -> float:
        return left + pw * (math.log10(v) - x0) / (x1 - x0)

    def py(v: float) -> float:
        return top + ph - ph * (math.log10(max(v, 10 ** y0)) - y0) / (y1 - y0)

    for e in range(x0, x1 + 1):
        body.append(f'<line x1="{px(10 ** e):.1f}" y1="{top}" x2="{px(10 ** e):.1f}" '
                    f'y2="{top + ph}" stroke="#eee"/>')
        body.append(_text(px(10 ** e), top + ph + 14, f"1e{e}", "middle"))
    for e in range(y0, y1 + 1):
        body.append(f'<line x1="{left}" y1="{py(10 ** e):.1f}" x2="{left + pw}" '
                    f'y2="{py(10 ** e):.1f}" stroke="#eee"/>')
        body.append(_text(left - 4, py(10 ** e) + 4, f"1e{e}", "end"))
    body.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
                'stroke="#333"/>')
    body.append(_text(left + pw / 2, height - 22, "operations per byte moved (log)", "middle"))
    body.append(_text(16, top + ph / 2, "operations/s (log)", "middle",
                      transform=f"rotate(-90 16 {top + ph / 2})"))
    for i, (d, color) in enumerate(devs):
        bw = d["dram_bandwidth_bytes_per_s"]
        for k, (dt, peak) in enumerate(_ceilings(d, dtypes)):
            knee = peak / bw
            xa, xb = 10 ** x0, 10 ** x1
            pts = [(xa, bw * xa), (min(max(knee, xa), xb), min(bw * max(knee, xa), peak)),
                   (xb, peak)]
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            body.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                        f'stroke-width="{1.8 if k == 0 else 1}" '
                        f'stroke-dasharray="{"" if k == 0 else "5 3"}"><title>{d["id"]} {dt}: '
                        f'{bw / 1e9:.3g} GB/s, {peak / 1e9:.4g} GOP/s</title></polyline>')
        # legend, top left: one line per device
        ly = top + 14 + 14 * i
        peaks = ", ".join(f"{dt} {pk / 1e9:.3g} GOP/s" for dt, pk in _ceilings(d, dtypes))
        body.append(f'<line x1="{left + 8}" y1="{ly - 4}" x2="{left + 26}" y2="{ly - 4}" '
                    f'stroke="{color}" stroke-width="2"/>')
        body.append(_text(left + 30, ly, f"{d['id']}: {bw / 1e9:.3g} GB/s; {peaks}"
                          + (" (measured)" if d["id"] == rep["host"]["id"] else ""), fill=color))
    ly = top + 14 + 14 * len(devs)
    body.append(_text(left + 8, ly, "filled: measured on the host; hollow: projected",
                      fill="#555"))
    for inten, ops, label, color, filled in points:
        body.append(f'<circle cx="{px(inten):.1f}" cy="{py(ops):.1f}" r="5" '
                    f'fill="{color if filled else "white"}" stroke="{color}" stroke-width="2">'
                    f"<title>{html.escape(label)}: {ops / 1e9:.3g} GOP/s at {inten:.3g} op/B"
                    "</title></circle>")
        if filled:
            body.append(_text(px(inten) + 8, py(ops) + 4, label.split(" (")[0], fill=color))
    return _svg(width, height, body, title)


def _ceilings(d: Mapping[str, Any], dtypes: Sequence[str]) -> list[tuple[str, float]]:
    """The compute ceilings of a device summary for the dtypes the graphs use (a dtype without
    a figure gets the fastest one, as the projection does)."""
    peaks = (d.get("cpu") or {}).get("peak_ops_per_s") or {}
    if not peaks:
        return []
    best = max(peaks.values())
    return [(dt, peaks.get(dt, best)) for dt in dtypes]


# -- HTML --------------------------------------------------------------------------------------
def _html_table(rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(rep: Mapping[str, Any]) -> str:
    """A self-contained HTML page: the text report's tables and three inline SVG plots."""
    m = rep["measured"]
    mem_rows: list[tuple[str, Mapping[str, int], int | None]] = [
        ("host (measured peak RSS)", {k: m["memory"][k] for k in ("weights", "state", "arena",
                                                                   "other")}, None)]
    for p in rep["projections"]:
        mem_rows.append((f"{p['device']} (projected)", p["memory"], p["budget_bytes"]))
    plots = [latency_histogram(m.get("steps_ms") or [], m.get("step_unit", "token")),
             memory_bars(mem_rows), roofline_chart(rep)]
    rl = rep["roofline"]
    roof = [["graph", "dims", "bytes/call", "ops/call by dtype", "host bound ms",
             "measured p50 ms", "efficiency", "source"]]
    for g, r in rl.items():
        roof.append([g, ", ".join(f"{k}={v}" for k, v in r["dims"].items()),
                     f"{r['bytes_per_call']:,}",
                     ", ".join(f"{k} {v:.3g}" for k, v in r["flops_by_dtype"].items()),
                     _f(r.get("host_bound_ms"), ".4g"), _f(r.get("measured_ms_p50"), ".4g"),
                     _f(r.get("efficiency"), ".1%"), r["source"]])
    ops_html = ""
    if rep.get("op_breakdown"):
        ob = rep["op_breakdown"]
        ops_html = f"<h2>Top operators</h2><p>{html.escape(ob['source'])}</p>"
        for g, b in ob["graphs"].items():
            ops_html += f"<h3>{html.escape(g)} ({b['runs']} runs)</h3>" + _html_table(
                [["op", "ms", "calls", "share"]]
                + [[o["op"], f"{o['ms']:.3f}", o["calls"], f"{o['share']:.1%}"]
                   for o in b["top"]])
    else:
        ops_html = (f"<h2>Top operators</h2><p>{html.escape(str(rep.get('op_breakdown_note')))}"
                    "</p>")
    verdicts = "".join(
        f"<li>{html.escape(verdict(p, rep['task']))}"
        + ("<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in p["advice"]) + "</ul>"
           if p.get("advice") else "") + "</li>" for p in rep["projections"])
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
             "padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
             "pre{background:#f6f6f6;padding:1em;overflow-x:auto}figure{margin:1em 0}")
    title = f"edgeseq profile: {rep['bundle']}"
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(rep['family'])} ({html.escape(rep['task'])}, "
            f"{html.escape(rep['scheme'])}) on {html.escape(rep['backend'])}</p>"
            "<h2>Verdicts</h2><ul>" + verdicts + "</ul>"
            + "".join(f"<figure>{p}</figure>" for p in plots)
            + "<h2>Roofline per graph</h2>" + _html_table(roof) + ops_html
            + f"<h2>Report</h2><pre>{html.escape(text(rep))}</pre></body></html>")
