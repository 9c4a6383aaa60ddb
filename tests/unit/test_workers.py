"""``edgeseq.convert.workers.Beside``: the parity reference computed in a forked process while
the graphs are lowered."""
from __future__ import annotations

import os
import time

import pytest

from edgeseq.bundle import BundleError
from edgeseq.convert.workers import Beside


def test_runs_in_another_process_and_returns_its_result(monkeypatch):
    monkeypatch.delenv("EDGESEQ_JOBS", raising=False)
    here = os.getpid()
    with Beside(lambda: (os.getpid(), [1, 2, 3])) as job:
        pid, value = job.result()
    assert value == [1, 2, 3]
    if hasattr(os, "fork"):
        assert pid != here


def test_inline_when_workers_are_off(monkeypatch):
    monkeypatch.setenv("EDGESEQ_JOBS", "1")
    calls = []
    job = Beside(lambda: calls.append(os.getpid()) or "done")
    assert calls == []                  # nothing runs before the result is asked for
    assert job.result() == "done"
    assert calls == [os.getpid()]


def test_bad_input_comes_back_as_a_one_line_error(monkeypatch):
    monkeypatch.delenv("EDGESEQ_JOBS", raising=False)

    def refuse():
        raise BundleError("ckpt/config.json: no decoder")

    with Beside(refuse) as job, pytest.raises(BundleError, match="ckpt/config.json: no decoder"):
        job.result()


def test_close_stops_a_running_job(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGESEQ_JOBS", raising=False)
    mark = tmp_path / "finished"

    def slow():
        time.sleep(3)
        mark.write_text("x")

    job = Beside(slow)
    time.sleep(0.3)
    t = time.perf_counter()
    job.close()
    assert time.perf_counter() - t < 2
    time.sleep(3.5)
    assert not mark.exists()
