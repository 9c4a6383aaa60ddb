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
    assert any(ln.startswith("| model | threads | engine | first token ms") for ln in lines), \
        out.stdout
    rows = _rows(lines, ("whisper", "t5"))
    for key in [("whisper", "transformers"), ("whisper", "edgeseq ort"),
                ("whisper", "edgeseq ort (5 s window)"), ("t5", "transformers"),
                ("t5", "edgeseq ort")]:
        assert key in rows, out.stdout
        cells = rows[key]
        assert cells[1] == "1"
        float(cells[3]), float(cells[4])  # first token ms, tokens/s: measured, not "-"
    # the same random weights and input, the same greedy tokens (EOS disabled on both engines)
    for model in ("whisper", "t5"):
        assert rows[(model, "edgeseq ort")][8] == "True", out.stdout
    assert "whisper, 1 thread(s), edgeseq-ort vs transformers" in out.stdout


def _rows(lines: list[str], models: tuple[str, ...]) -> dict[tuple[str, str], list[str]]:
    """Table rows by (model, engine): the cells, stripped."""
    out = {}
    for ln in lines:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.startswith("|") and cells[0] in models:
            out[(cells[0], cells[2])] = cells
    return out


@pytest.mark.slow  # ~1-2 min: the published t5-small config converted, two workers
def test_pipeline_mode_decodes_a_published_config(tmp_path: Path) -> None:
    """--pipeline: t5-small's published config, generation config and tokenizer with random
    weights; edgeseq decodes the same tokens as transformers."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--pipeline", "--models", "t5-small",
                          "--tokens", "4", "--threads", "1", "--engines",
                          "transformers,edgeseq-ort", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _rows(out.stdout.splitlines(), ("t5-small",))
    assert rows[("t5-small", "edgeseq ort")][8] == "True", out.stdout
    assert float(rows[("t5-small", "edgeseq ort")][4]) > 0
    assert "published configs, generation rules and tokenizers" in out.stdout
    # the checkpoint is the published config with the fixture's tokenizer beside it
    ckpt = tmp_path / "t5-small" / "ckpt"
    assert (ckpt / "spiece.model").is_file() and (ckpt / "generation_config.json").is_file()
