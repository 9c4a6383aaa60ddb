"""Lowering graphs side by side in forked worker processes.

Exporting a graph (``torch.export``, then the ONNX translation) is single-threaded Python: the
three graphs of an encoder-decoder take ~33 s one after another on one core of the dev VM, and
the cores beside it sit idle. Each graph's export is independent, so each can run in its own
process. The workers are forked after the model is loaded: they see its weights through
copy-on-write pages instead of loading the checkpoint again, and nothing but a file path comes
back (a worker writes its result under the bundle's temporary folder).

How many run at once (``jobs``): ``EDGESEQ_JOBS`` if set (1: in this process, no fork), else
one per graph, at most the CPUs, and no more than the memory that is free holds: each worker
keeps a copy of the weights in its ONNX proto while it serializes (``bytes_per_job``).
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

# The job table a forked worker reads (set before the pool forks, so workers inherit it rather
# than receiving pickled modules).
_JOBS: dict[str, Callable[[], Any]] = {}


class WorkerError(RuntimeError):
    """A worker's failure, carried back as text (an exception object may not pickle)."""


def _run(name: str) -> Any:
    import torch

    # One thread per worker: the workers are the parallelism, and a forked child must not
    # enter an OpenMP pool its parent may have started.
    torch.set_num_threads(1)
    from edgeseq.bundle import BundleError

    try:
        return _JOBS[name]()
    except BundleError as e:     # bad input, reported in one line as in this process
        raise type(e)(str(e)) from None
    except ValueError as e:      # the pipeline reports a ValueError as "cannot lower"
        raise ValueError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - re-raised as text; the type is named in it
        raise WorkerError(f"{type(e).__name__}: {e}") from None


def job_count(n: int, bytes_per_job: int = 0) -> int:
    """Workers to run ``n`` jobs with: ``EDGESEQ_JOBS``, else bounded by CPUs and free memory."""
    env = os.environ.get("EDGESEQ_JOBS", "")
    if env.isdigit() and int(env) > 0:
        return min(n, int(env))
    if sys.platform == "win32" or n <= 1:   # no fork
        return 1
    # one per core: since the layers are traced once (onnxruntime/stamp.py) a graph's export
    # is seconds, and a worker more than the cores only adds a fork and contention (Whisper
    # tiny's three graphs on 2 cores: 5.1 s with 2 workers, 7.1 s with 3, 7.7 s in-process)
    jobs = min(n, os.cpu_count() or 1)
    free = _available_memory()
    if bytes_per_job and free:
        jobs = min(jobs, max(1, free // (2 * bytes_per_job)))
    return max(1, jobs)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_jobs(jobs: dict[str, Callable[[], Any]], workers: int,
             warm_up: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Each job's result by name; in forked workers when ``workers > 1``, in the order given
    (so put the longest first). ``warm_up`` runs here first, so that one-time set-up (the
    exporter's operator registry: ~3 s) happens once and the workers inherit it."""
    if workers <= 1:
        return {name: fn() for name, fn in jobs.items()}
    import multiprocessing

    if warm_up is not None:
        warm_up()
    _JOBS.clear()
    _JOBS.update(jobs)
    try:
        with ProcessPoolExecutor(max_workers=workers,
                                 mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {name: pool.submit(_run, name) for name in jobs}
            return {name: f.result() for name, f in futures.items()}
    finally:
        _JOBS.clear()


class Beside:
    """One job run in a forked process while this one goes on: the parity reference (the
    original model's ``generate``, on the weights already loaded) is computed while the graphs
    are lowered, instead of after them. On two cores the lowering leaves one idle while its
    longest graph finishes; the reference fills that time.

    In this process, at ``result()``, where workers are off (``EDGESEQ_JOBS=1``, no fork). At
    the same priority as everything else: at nice 10 it starved whenever another busy process
    shared the cores (two conversions at once, a test suite's other worker), and the conversion
    then waited on it after its lowering had finished; the gain measured at nice 10 on an
    otherwise idle machine was within noise (Whisper-tiny 25.2 against 26.5 s)."""

    def __init__(self, fn: Callable[[], Any]):
        self._fn: Callable[[], Any] | None = fn
        self._pool: Any = None
        self._async: Any = None
        if job_count(2) <= 1:
            return
        import multiprocessing

        _JOBS[_BESIDE] = fn
        try:
            self._pool = multiprocessing.get_context("fork").Pool(1)
            self._async = self._pool.apply_async(_run, (_BESIDE,))
        finally:
            _JOBS.pop(_BESIDE, None)   # the child has its copy; this process keeps none
        self._fn = None

    def result(self) -> Any:
        if self._fn is not None:
            fn, self._fn = self._fn, None
            return fn()
        if self._async is None:
            raise RuntimeError("Beside.result() called twice")
        try:
            return self._async.get()
        finally:
            self.close()

    def __enter__(self) -> "Beside":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the job if it still runs (a lowering failed: its result is not wanted)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        self._async = None
        self._fn = None


#: the job table's key for the job run beside (apart from ``run_jobs``' names)
_BESIDE = " beside"
