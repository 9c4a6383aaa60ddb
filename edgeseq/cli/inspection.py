"""``edgeseq inspect``: what a bundle holds, built whole before anything is printed."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from edgeseq.bundle import BundleError
from edgeseq.cli.common import _describe, _one_line


def _quant_parity_lines(info: dict[str, Any]) -> list[str]:
    """The quantization and parity lines of ``inspect``, built before anything is printed."""
    lines: list[str] = []
    q = info["quantization"]
    if q:
        if isinstance(q, dict) and "formats" in q:
            groups = ", ".join(f"{r['group_size']} ({fmt})" for fmt, r in q["formats"].items()
                               if r.get("group_size"))
            group = q.get("group_size") or groups
            lines.append(f"  quantization: {q['scheme']}" + (f", group {group}" if group else "")
                       + f"; state {q['state']}; kept in float: {', '.join(q['keep_float']) or 'nothing'}")
            for fmt, rec in q["formats"].items():
                for name, r in rec["graphs"].items():
                    lines.append(f"    {fmt} {name}: {r['how']}")
                    lines.append(f"      quantized ({len(r['quantized'])}): {', '.join(r['quantized'])}")
                    if r["kept_float"]:
                        lines.append(f"      float ({len(r['kept_float'])}): {', '.join(r['kept_float'])}")
        else:
            lines.append(f"  quantization: {q}")
    p = info["parity"]
    if p is None:
        lines.append("  parity: no parity.json")
    elif "gates" in p:
        for fmt, g in p["gates"].items():
            lines.append(f"  accuracy gate ({fmt}): {'passed' if g.get('passed') else 'FAILED'}: "
                       + ", ".join(f"{k} {v:.4f}" for k, v in g.items() if isinstance(v, float))
                       + f" on {g.get('data')}")
    else:
        lines.append(f"  parity: {'skipped' if p.get('skipped') else ('passed' if p.get('passed') else 'FAILED')}"
                   + "".join(f"; {c.get('format')}{' ' + str(c['graph']) if 'graph' in c else ''} "
                             f"{'ok' if c.get('passed') else 'FAILED'}"
                             for c in p.get("checks", []) + p.get("graph_checks", [])))
    return lines


def partition_lines(info: dict[str, Any]) -> list[str]:
    """Per format and graph, how many operators run on the target device and which fall back
    to the CPU (the manifest's ``partitions``, validated by ``read_manifest``)."""
    from edgeseq.bundle import Partition

    lines = []
    for fmt, rec in info["partitions"].items():
        p = Partition.from_record(rec)
        head = f"  partition ({fmt}): target device {p.device}"
        if p.checked_on != p.device:
            head += (f"; this machine has no {p.device} plugin, so the {p.checked_on} plugin "
                     f"placed the operators (the counts are the {p.checked_on}'s)")
        lines.append(head + (f"; inference precision {p.precision}" if p.precision else ""))
        for graph in p.graphs:
            counts = p.counts(graph)
            total = sum(counts.values())
            per = ", ".join(f"{d} {n}" for d, n in counts.items())
            lines.append(f"    {graph}: {total} operators: {per} "
                         f"({100 * p.share(graph):.0f}% on {p.device})")
            for d, types in p.graphs[graph].items():
                if d != p.device:
                    lines.append(f"      on {d}: " + ", ".join(f"{t} {n}" for t, n in types.items()))
    return lines


def _verify(bundle: str) -> None:
    """``inspect --verify``: every problem on its own ``edgeseq: error:`` line (a swapped file
    and an unlisted one are separate facts a user acts on separately)."""
    from edgeseq.bundle import read_manifest
    from edgeseq.trust import verify_bundle

    problems = verify_bundle(bundle)
    for msg in problems:
        click.echo(f"edgeseq: error: {_one_line(msg, 2000)}", err=True)
    if problems:
        sys.exit(1)
    man = read_manifest(bundle)
    click.echo(f"{bundle}: verified {len(man.files or {})} files")


def _parity_record(path: Path) -> dict[str, Any] | None:
    """``parity.json`` as ``inspect`` shows it, refusing one that is not the report convert
    writes (it comes with the bundle, so from anyone)."""
    if not path.is_file():
        return None
    from edgeseq.limits import LimitError, read_file_bytes

    try:
        rec = json.loads(read_file_bytes(path, "parity report", "input_bytes"))
    except LimitError as e:
        raise BundleError(str(e)) from None
    except ValueError as e:
        raise BundleError(f"{path}: not valid JSON ({_describe(e)})") from None
    ok = isinstance(rec, dict) and (
        isinstance(rec.get("gates"), dict) and all(isinstance(g, dict)
                                                   for g in rec["gates"].values())
        if "gates" in rec else
        all(isinstance(rec.get(k, []), list) and all(isinstance(c, dict) for c in rec.get(k, []))
            for k in ("checks", "graph_checks")))
    if not ok:
        raise BundleError(f"{path}: not a parity report (expected an object with checks, "
                          f"graph_checks or gates)")
    return rec


def _inspect(root: Path, man: Any) -> dict[str, Any]:
    from edgeseq.trust import size_problems
    from edgeseq.runtime.cost import (format_files, state_bytes, state_bytes_per_position,
                                      weight_bytes, weight_bytes_by_dtype)

    sizes = size_problems(root, man)
    if sizes:     # a truncated or swapped file: say so before any parser meets it
        raise BundleError(f"{root / 'manifest.json'}: " + "; ".join(sizes))
    graphs = {n: {"inputs": [t.to_json() for t in g.inputs], "outputs": [t.to_json() for t in g.outputs],
                  "files": g.files} for n, g in man.graphs.items()}
    b1 = {"batch": 1, "past": 0, "source": 0}
    tensors = [{**s.to_json(), "bytes_batch1": s.nbytes(b1)} for s in man.state_specs]
    weights: dict[str, dict[str, int]] = {}
    onnx_files = format_files(man, "onnx")
    if onnx_files:
        weights["onnx"] = weight_bytes_by_dtype(root, onnx_files)
    for fmt in ("pte", "pt2", "openvino"):
        fs = format_files(man, fmt)
        if fs:
            weights[fmt] = {"file bytes": weight_bytes(root, man, fmt)}
    parity = _parity_record(root / "parity.json")
    return {"family": man.family, "task": man.task, "dtype": man.dtype, "target": man.target,
            "graphs": graphs,
            "state": {"tensors": tensors, "bytes_batch1": state_bytes(man, b1),
                      "bytes_per_position": state_bytes_per_position(man)},
            "weights": weights, "quantization": man.quantization, "parity": parity,
            "partitions": {fmt: man.partition(fmt).to_record() for fmt in man.partitions},
            "backends": list(man.backends),
            "config": man.config}

