"""Seeded mutation fuzzing of a small bundle through the CLI.

Each case copies the zoo's mamba-bytes bundle, applies one or two mutations (a manifest field
replaced by a hostile value or deleted, or a graph/weights file truncated, bit-flipped, its header
overwritten or padded) and runs ``edgeseq run`` on it in a fresh process under a timeout. Whatever
the mutation, the outcome must be one of two: exit 0 with valid JSON (strict: no NaN), or a
non-zero exit whose stderr ends in one ``edgeseq: error:`` line. Never a traceback, a signal
(native crash), or a hang. The seed and the case's mutations are in the assertion message, so a
failing case can be replayed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SEED = 20261206
CASES = 30
TIMEOUT_S = 120
HOSTILE: list[Any] = [
    "../../../etc/passwd", "/etc/passwd", "/dev/zero", "/dev/stdin", "", ".", "..", "x" * 4096,
    "\u202e\u0000", -1, 0, 1, 2**62, -(2**62), 1e308, -1e308, float("nan"), float("inf"), None,
    True, [], {}, [[]], {"": None}, ["batch", "batch"], "float64", "kv", "step.onnx",
]
BYTE_FILES = ("step.onnx", "prefill.onnx", "weights.onnx.data", "model.pte", "manifest.json")
# what a run reads: the manifest, the ONNX graphs and their weights, the ExecuTorch program


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _mutate_manifest(data: dict, rng: random.Random) -> str:
    paths = _paths(data)
    # a third of the time, a field that names a file (graph files, the tokenizer's): the
    # fields an escape from the bundle would go through
    files = [p for p in paths if "files" in p[:-1] or p[:1] == ("tokenizer",)]
    path = rng.choice(files if files and rng.random() < 0.35 else paths)
    parent = data
    for k in path[:-1]:
        parent = parent[k]
    if rng.random() < 0.2:
        del parent[path[-1]]
        return f"manifest: deleted {list(path)}"
    value = rng.choice(HOSTILE)
    parent[path[-1]] = value
    return f"manifest: {list(path)} = {value!r:.60}"


def _mutate_bytes(f: Path, rng: random.Random) -> str:
    data = bytearray(f.read_bytes())
    how = rng.choice(("truncate", "flip", "header", "pad"))
    if how == "truncate":
        data = data[:rng.randrange(0, max(1, len(data)))]
    elif how == "flip":
        for _ in range(16):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "header":
        data[:64] = bytes(rng.randrange(256) for _ in range(64))
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096)))
    f.write_bytes(bytes(data))
    return f"{f.name}: {how} (now {len(data)} bytes)"


def _case(i: int, src: Path, work: Path) -> tuple[Path, list[str], str]:
    rng = random.Random(SEED * 1000 + i)
    root = work / f"case{i}"
    shutil.copytree(src, root)
    what = []
    for _ in range(rng.choice((1, 1, 2))):
        target = rng.choice(BYTE_FILES + ("manifest",) * 3)
        if target == "manifest":
            man = root / "manifest.json"
            try:
                data = json.loads(man.read_text())
            except ValueError:
                continue
            what.append(_mutate_manifest(data, rng))
            man.write_text(json.dumps(data))
        else:
            what.append(_mutate_bytes(root / target, rng))
    backend = "executorch" if any("model.pte" in w for w in what) else rng.choice(
        ("ort", "ort", "executorch"))
    return root, what, backend


def _reject_constant(name: str) -> None:
    raise ValueError(f"not JSON: {name}")


@pytest.mark.parametrize("i", range(CASES))
def test_mutated_bundle_is_refused_or_runs(mamba_bytes_bundle, tmp_path, i):
    root, what, backend = _case(i, mamba_bytes_bundle, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "EDGESEQ_DEBUG"}
    cmd = [sys.executable, "-m", "edgeseq.cli", "run", str(root), "--prompt", "def ", "-n", "8",
           "--json", "--backend", backend]
    label = f"seed {SEED} case {i} ({backend}): {'; '.join(what)}"
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{label}: no answer within {TIMEOUT_S} s")
    assert r.returncode >= 0, f"{label}: killed by signal {-r.returncode}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, f"{label}: traceback\n{r.stderr[-3000:]}"
    if r.returncode == 0:
        out = json.loads(r.stdout.strip().splitlines()[-1], parse_constant=_reject_constant)
        assert isinstance(out.get("tokens"), list), f"{label}: {r.stdout[-500:]}"
    else:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("edgeseq: error:"), \
            f"{label}: exit {r.returncode} without a one-line error\n{r.stderr[-2000:]}"
        assert sum(ln.startswith("edgeseq: error:") for ln in lines) == 1, label
