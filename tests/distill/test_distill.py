"""``edgeseq distill``: seeded and reproducible, resumable without pickles, the same loss curve
under ``torchrun`` (2 processes, gloo) as in one process, and one-line errors for a teacher the
recipe does not apply to and data of another task, with no student folder left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeseq.convert.distill import REPORT_FILE, distill, resume_folder
from edgeseq.convert.distill.loop import STATE_FILE, Interrupted
from edgeseq.errors import BundleError
from tests.cli.test_cli import edgeseq, error_line

#: how far the 2-process loss curve may stray from the 1-process one (relative): the same
#: global batch, but each rank's forward over half the rows and the gradients summed by
#: all-reduce, so float sums round differently (measured: ~1e-7)
DDP_RTOL = 1e-4


def losses(folder: Path) -> list[float]:
    return json.loads((folder / REPORT_FILE).read_text())["losses"]


@pytest.fixture(scope="module")
def teacher(checkpoints) -> Path:
    return checkpoints["s4d"]


@pytest.fixture(scope="module")
def four_steps(teacher, tmp_path_factory) -> Path:
    """The reference run: 4 steps, seed 0, one process."""
    return distill(teacher, tmp_path_factory.mktemp("ref") / "student", steps=4, bar=False)


def test_student_folder_and_same_seed_same_curve(teacher, four_steps, tmp_path) -> None:
    from edgeseq.families.s4d import S4DFamily

    # a checkpoint folder convert reads: config + safetensors, no pickles, the run's record
    names = {p.name for p in four_steps.iterdir()}
    assert {"config.json", "model.safetensors", REPORT_FILE} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    student = S4DFamily().load(four_steps)
    t = S4DFamily().load(teacher)
    assert student.config.n_layers < t.config.n_layers or student.config.d_model < t.config.d_model
    rep = json.loads((four_steps / REPORT_FILE).read_text())
    assert rep["steps"] == 4 and len(rep["losses"]) == 4 and 0 <= rep["metrics"]["agreement"] <= 1
    again = distill(teacher, tmp_path / "again", steps=4, bar=False)
    assert losses(again) == losses(four_steps)
    other = distill(teacher, tmp_path / "seed1", steps=4, seed=1, bar=False)
    assert losses(other) != losses(four_steps)


def test_interrupted_run_resumes_to_the_same_curve(teacher, four_steps, tmp_path) -> None:
    out = tmp_path / "student"
    with pytest.raises(Interrupted):
        distill(teacher, out, steps=4, bar=False, stop_after=2)
    assert not out.exists()                 # no half-written student
    ckpt = resume_folder(out)
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["step"] == 2 and (ckpt / state["tensors"]).is_file()
    assert {p.suffix for p in ckpt.iterdir()} <= {".json", ".safetensors"}
    # another configuration refuses the checkpoint, naming what differs
    with pytest.raises(BundleError, match="seed differs"):
        distill(teacher, out, steps=4, seed=3, bar=False, resume=True)
    with pytest.raises(BundleError, match="steps differs"):
        distill(teacher, out, steps=5, bar=False, resume=True)
    distill(teacher, out, steps=4, bar=False, resume=True)
    assert losses(out) == pytest.approx(losses(four_steps), rel=1e-6)
    assert json.loads((out / REPORT_FILE).read_text())["resumed_from"] == 2
    assert not ckpt.exists()                # a finished run removes its checkpoint
    p = edgeseq("distill", teacher, "-o", tmp_path / "none", "--resume", check=False)
    assert p.returncode == 2 and "no checkpoint to resume" in error_line(p)


def test_torchrun_two_processes_reproduce_the_curve(teacher, four_steps, tmp_path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "edgeseq.cli", "distill", str(teacher),
                        "-o", str(out), "--steps", "4", "-q"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((out / REPORT_FILE).read_text())
    assert rep["processes"] == 2
    assert rep["losses"] == pytest.approx(losses(four_steps), rel=DDP_RTOL)


def test_bad_teacher_and_data_are_one_line_errors(teacher, tmp_path) -> None:
    import numpy as np

    from edgeseq.audio import write_wav

    wav = write_wav(tmp_path / "a.wav", np.zeros(1600, dtype=np.float32))
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((2, 3, 4), dtype=np.float32))
    out = tmp_path / "student"
    for args, msg in [
            (("zoo:lmuformer-digits",), "does not generate tokens"),
            ((teacher, "--recipe", "bogus"), "unknown; known: draft"),
            ((teacher, "--data", wav), "a WAV file; "),
            ((teacher, "--data", npy), "an .npy array; "),
            ((teacher, "--data", tmp_path / "missing.txt"), "missing.txt")]:
        p = edgeseq("distill", *args, "-o", out, "--steps", "1", check=False)
        assert p.returncode == 2 and msg in error_line(p), (args, p.stderr[-800:])
        assert not out.exists() and not resume_folder(out).exists()
