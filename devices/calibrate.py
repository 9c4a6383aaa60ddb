"""Host calibration: measure this machine once and describe it as the ``host`` DeviceProfile.

A few seconds of microbenchmarks (``seconds_budget`` is split between them):

- DRAM bandwidth: a large tensor copy (bytes read + bytes written, the STREAM "copy"
  convention) and a large sum (bytes read), on arrays far larger than the last-level cache;
  the best of several repeats, since interference only ever makes a run slower.
- matmul throughput per dtype (2 n^3 ops per product): fp32 with ``torch.mm``; fp16 with
  ``torch.mm`` where this torch build runs it, else left out (unsupported); int8 with
  ``torch._int_mm`` (int8 x int8 -> int32), else ONNX Runtime's ``MatMulInteger``.
- core counts and memory sizes from psutil (``app_bytes`` = memory available at calibration).

These are the best rates measured, not the hardware's theoretical peaks, so a roofline built on
them is a practical bound rather than a strict one. The result is cached in
``$XDG_CACHE_HOME/edgeseq/host.json`` (default ``~/.cache``), keyed by CPU model and core
counts, so a machine is measured once; ``force=True`` measures again.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from edgeseq.devices.profile import ComputeUnit, DeviceError, DeviceProfile, Memory
from edgeseq.paths import cache_root

CACHE_SCHEMA = 1
_MIN_ARRAY, _MAX_ARRAY = 64 * 2**20, 256 * 2**20  # bytes per array in the bandwidth test


def cache_path() -> Path:
    """``host.json`` in edgeseq's cache (``edgeseq.paths.cache_root``)."""
    return cache_root() / "host.json"


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], text=True,
                                  capture_output=True, timeout=5).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _cores() -> tuple[int, int]:
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    return psutil.cpu_count(logical=False) or logical, logical


def host_key() -> str:
    """What the cache is keyed by: CPU model and core counts."""
    phys, logical = _cores()
    return f"{cpu_model()} | {phys} cores | {logical} threads"


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA:
        return {}  # an older or foreign cache is measured again, not trusted
    return data.get("hosts") if isinstance(data.get("hosts"), dict) else {}


def cached_host() -> DeviceProfile | None:
    """This machine's cached calibration, or None (never measures)."""
    entry = _read_cache().get(host_key())
    if not isinstance(entry, dict):
        return None
    try:
        return DeviceProfile.from_dict(entry.get("profile", {}), cache_path())
    except DeviceError:
        return None  # a damaged entry: calibrate_host will measure and overwrite it


def _write_cache(prof: DeviceProfile) -> None:
    path = cache_path()
    hosts = _read_cache()
    hosts[host_key()] = {"profile": prof.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"schema": CACHE_SCHEMA, "hosts": hosts}, indent=1))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file


def _best_rate(work: float, fn: Callable[[], Any], seconds: float, min_reps: int = 2,
               warm_up: bool = True) -> float:
    """``work`` / the fastest of repeated calls of ``fn`` within ``seconds``."""
    if warm_up:
        fn()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < min_reps or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return work / best


def _last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports (0 where unknown)."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            txt = f.read_text().strip().upper()
            best = max(best, int(txt.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(
                txt[-1:], 1))
        except (OSError, ValueError):
            continue
    return best


def bandwidth_array_bytes() -> int:
    """Array size for the bandwidth test: twice the last-level cache, so that the copy streams
    from DRAM, within [64, 256] MiB and at most 1/8 of the available memory."""
    want = min(max(_MIN_ARRAY, 2 * _last_level_cache_bytes()), _MAX_ARRAY)
    return max(16 * 2**20, min(want, psutil.virtual_memory().available // 8))


def measure_bandwidth(seconds: float = 1.0, nbytes: int | None = None) -> float:
    """Best DRAM bandwidth in bytes/s from a multi-threaded tensor copy and sum of ``nbytes``
    arrays (default ``bandwidth_array_bytes()``)."""
    import torch

    n = (nbytes or bandwidth_array_bytes()) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy = _best_rate(2 * src.nbytes, lambda: dst.copy_(src), seconds / 2)
    read = _best_rate(src.nbytes, lambda: src.sum(), seconds / 2)
    return max(copy, read)


def _torch_mm(dtype: str, n: int) -> Callable[[], Any]:
    import torch

    if dtype == "int8":
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8)
        return lambda: torch._int_mm(a, b)
    t = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    a, b = torch.randn(n, n).to(t), torch.randn(n, n).to(t)
    return lambda: torch.mm(a, b)


def _ort_int8_mm(n: int) -> Callable[[], Any]:
    """int8 x int8 -> int32 through ONNX Runtime's MatMulInteger (when torch has no CPU
    ``_int_mm``)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8),
            "b": rng.integers(-128, 127, (n, n), dtype=np.int8)}
    return lambda: sess.run(None, feed)


def measure_matmul(dtype: str, seconds: float = 0.5) -> tuple[float, str] | None:
    """Best matmul rate in ops/s for ``fp32``, ``fp16`` or ``int8`` and how it was measured,
    or None when this host cannot run that dtype (or runs it far too slowly to time).

    Sizes double from n=256 while the next size still fits in the time left: small products
    often take a slower kernel (oneDNN picks AMX/VNNI paths by shape), so the best rate over
    the sweep is taken, not the rate of one guessed size.
    """
    makers: list[tuple[str, Callable[[int], Callable[[], Any]]]] = [
        (f"torch.{'_int_mm' if dtype == 'int8' else 'mm'}", lambda n: _torch_mm(dtype, n))]
    if dtype == "int8":
        makers.append(("onnxruntime MatMulInteger", _ort_int8_mm))
    for how, make in makers:
        try:
            deadline = time.perf_counter() + seconds
            best, best_n, n = 0.0, 0, 256
            while True:
                fn = make(n)
                t0 = time.perf_counter()
                fn()  # warm-up: first-call dispatch and packing
                if n == 256 and time.perf_counter() - t0 > seconds:
                    return None  # an emulated dtype: not worth timing (nor using)
                rate = _best_rate(2 * n**3, fn, (deadline - time.perf_counter()) / 3,
                                  warm_up=False)
                if rate > best:
                    best, best_n = rate, n
                # the next size costs 8x per product; it needs a warm-up and two timed runs
                if n >= 2048 or 24 * 2 * n**3 / rate > deadline - time.perf_counter():
                    return best, f"{how}, best at n={best_n}"
                n *= 2
        except (RuntimeError, ImportError, ValueError, NotImplementedError, AttributeError,
                TypeError, KeyError, OSError):
            continue  # this way does not work here: try the next; None when none does
    return None


def calibrate_host(seconds_budget: float = 3.0, force: bool = False,
                   cache: bool = True) -> DeviceProfile:
    """This machine as the ``host`` DeviceProfile, measured once and cached.

    Args:
        seconds_budget: time for the microbenchmarks (plus a warm-up each; importing torch is
            not counted). 3 s gives stable numbers; tests use ~0.3 s.
        force: measure again even when a cached calibration exists (``--calibrate``).
        cache: read and write the cache file (``cache_path()``).
    """
    if cache and not force:
        prof = cached_host()
        if prof is not None:
            return prof
    import torch

    budget = max(0.05, float(seconds_budget))
    array = bandwidth_array_bytes()
    bandwidth = measure_bandwidth(0.35 * budget, array)
    peaks, hows = {}, []
    for dtype, share in (("fp32", 0.25), ("fp16", 0.15), ("int8", 0.25)):
        r = measure_matmul(dtype, share * budget)
        if r is None:
            hows.append(f"{dtype}: unsupported")
        else:
            peaks[dtype] = round(r[0] / 1e9, 3)
            hows.append(f"{dtype}: {r[1]}")
    phys, logical = _cores()
    vm = psutil.virtual_memory()
    model = cpu_model()
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    src = f"measured on this host by edgeseq.devices.calibrate at {when}"
    prof = DeviceProfile(
        id="host", name=f"This host ({model})", kind="host", revision=1,
        backends=("ort:CPUExecutionProvider", "executorch:xnnpack"),
        notes=f"calibrated with torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"budget {budget:g} s",
        memory=Memory(
            type="measured", total_bytes=int(vm.total), app_bytes=int(vm.available),
            bandwidth_bytes_per_s=round(bandwidth),
            sources=(src,),
            field_sources={
                "total_bytes": f"{src} (psutil.virtual_memory().total)",
                "app_bytes": f"{src} (psutil.virtual_memory().available at that moment)",
                "bandwidth_bytes_per_s": f"{src} (best of a {array >> 20} "
                                         "MiB tensor copy, 2 bytes moved per byte copied, and "
                                         "a sum)"}),
        cpu=ComputeUnit(
            name=model, cores=phys, threads=logical, peak_gops=peaks, sources=(src,),
            field_sources={"peak_gops": f"{src}: best matmul rate, 2 n^3 ops per product; "
                                        + "; ".join(hows),
                           "cores": f"{src} (psutil.cpu_count(logical=False))",
                           "threads": f"{src} (psutil.cpu_count())"}))
    problems = prof.validate()
    if problems:  # e.g. fp32 could not be measured at all
        raise DeviceError("calibration failed: " + "; ".join(problems), problems=problems)
    if cache:
        _write_cache(prof)
        prof = DeviceProfile.from_dict(prof.to_dict(), cache_path())
    return prof
