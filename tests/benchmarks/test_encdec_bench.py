"""Smoke test of benchmarks/encdec_decode.py: tiny shapes, the two engines edgeseq always has."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "encdec_decode.py"


@pytest.mark.slow  # ~1-2 min: two small conversions plus five worker processes
def test_encdec_bench_small_prints_table(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    # one thread: two threads on a busy 2-core host stall PyTorch's thread pool
    out = subprocess.run([sys.executable, str(SCRIPT), "--small", "--tokens", "4",
                          "--threads", "1", "--engines", "transformers,edgeseq-ort",
                          "--workdir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(ln.startswith("| model | engine | first token ms") for ln in lines), out.stdout
    rows = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): ln
            for ln in lines if ln.startswith("| whisper |") or ln.startswith("| t5 |")}
    for key in [("whisper", "transformers"), ("whisper", "edgeseq ort"),
                ("whisper", "edgeseq ort (5 s window)"), ("t5", "transformers"),
                ("t5", "edgeseq ort")]:
        assert key in rows, out.stdout
        cells = [c.strip() for c in rows[key].strip("|").split("|")]
        float(cells[2]), float(cells[3])  # first token ms, tokens/s: measured, not "-"
    # the same random weights and input, the same greedy tokens (EOS disabled on both engines)
    for model in ("whisper", "t5"):
        assert rows[(model, "edgeseq ort")].split("|")[7].strip() == "True", out.stdout
    assert "edgeseq ort vs transformers" in out.stdout
