"""Smoke test of benchmarks/lmu_stream.py: tiny shapes, every row, MACs that behave as claimed."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lmu_stream.py"
RECOMPUTE = "recompute prefix (PyTorch)"
STEP = {"torch": "edgeseq step (PyTorch)", "ort": "edgeseq step (ORT)",
        "executorch": "edgeseq step (ExecuTorch)"}
MODULES = {"torch": "torch", "ort": "onnxruntime", "executorch": "executorch.runtime"}


def macs(cell: str) -> float:
    """'610.18 k' -> 610180.0 (the table's units)."""
    num, _, unit = cell.partition(" ")
    return float(num) * {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}[unit]


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.slow  # ~35-50 s: four small lowerings (ORT, ExecuTorch) and the measurements
def test_lmu_bench_small_prints_table(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--small", "--threads", "1",
                          "--workdir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = "| model | engine | L | per-frame latency ms | MACs/frame | state bytes |"
    assert any(ln.startswith(header) for ln in lines), out.stdout
    rows = {}
    for ln in lines:
        if ln.startswith("| lmuformer |") or ln.startswith("| spiking |"):
            cells = [c.strip() for c in ln.strip("|").split("|")]
            rows[(cells[0], cells[1], int(cells[2]))] = cells
    for model in ("lmuformer", "spiking"):
        for L in (16, 32):
            assert (model, RECOMPUTE, L) in rows, out.stdout
            float(rows[(model, RECOMPUTE, L)][3])  # measured, not "-"
            for eng, label in STEP.items():
                assert (model, label, L) in rows, out.stdout
                if installed(MODULES[eng]):
                    cells = rows[(model, label, L)]
                    float(cells[3]), int(cells[5])  # latency and state bytes measured
                    # the same random weights and input: the stream ends on the parallel answer
                    # (loosely: a spiking neuron on its threshold may flip)
                    assert float(cells[6]) < 1e-2, out.stdout
        # O(1) per frame: the step graph's MACs do not depend on L; the baseline's grow with it
        step = {macs(rows[(model, STEP["torch"], L)][4]) for L in (16, 32)}
        assert len(step) == 1, out.stdout
        base16, base32 = (macs(rows[(model, RECOMPUTE, L)][4]) for L in (16, 32))
        assert step.pop() < base16 < base32, out.stdout
        for L in (16, 32):
            assert f"- {model}, L={L}: latency vs torch" in out.stdout, out.stdout
