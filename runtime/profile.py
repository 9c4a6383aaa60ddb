"""Profile a bundle: measure it on this host, then project it onto target devices.

Three stages (``edgeseq profile``; docs/profile.md):

1. **Measure** on the host, in a fresh child process (``python -m edgeseq.runtime.profile``) so
   that its peak RSS belongs to this bundle alone: load time, prefill/encoder latency, first-token
   latency, per-step latencies (p50/p95), tokens/s or real-time factor, and peak RSS split into
   weights, state, runtime arena and the rest. A second child reruns the workload with ONNX
   Runtime's profiler or ExecuTorch's ETDump for the time per operator.
2. **Analyse** each graph's roofline cost per call from the ONNX graph (shape inference at the
   measured sizes): bytes moved (weights read once, each initializer in its stored dtype, plus
   every graph input and output: state read and written, cross-attention K/V, logits) and
   operations by dtype (2*M*K*N per matrix product; 1 per element for arithmetic element-wise
   ops). A ``.pte``-only bundle is costed from its file size and the manifest.
3. **Project** onto a device: the host's efficiency per graph, host roofline bound / measured
   time (at most 1), scales the device's bound. The projection never beats the device's bound:
   ``projected = max(bound_device, bound_device / efficiency)``. Memory is projected as weights
   + state + arena + a runtime constant, and checked against a budget (default: the device's app
   memory) and, optionally, a latency target.

The measurement is a plain dict (JSON-ready), so one measurement serves many projections.
"""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from edgeseq.bundle import DTYPES as BUNDLE_DTYPES, GraphEntry, Manifest, read_manifest
from edgeseq.registry import format_of, runtime_memory

SCHEMA = 1
#: the backends the profiler drives (their formats: ``edgeseq.registry.format_of``)
PROFILED_BACKENDS = ("ort", "executorch")
TASKS = ("causal_lm", "seq2seq", "speech_seq2seq", "classification")
#: Copies of the state a stream holds: the live one and the one being written (ONNX Runtime's
#: ping-pong buffers; ExecuTorch's planned outputs and the runner's clone; for encoder-decoders
#: the cross-attention K/V kept by the session and fed to every decoder step).
STATE_COPIES = 2
#: How much smaller quantized weights are than fp32 (measured at the Mamba-130M shape:
#: docs/quant.md, int8 3.54x; int4 with per-group scales ~6x).
QUANT_SHRINK = {"int8": 3.5, "int4": 6.0}
TOP_OPS = 10
#: Decode steps of the operator-profiling run: enough for stable shares, few enough that the
#: profiler's event buffer keeps that child's peak RSS near the measurement's.
OPS_TOKENS = 16
#: Bytes per parameter when a .pte-only bundle is costed from its file size.
_PARAM_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
_PROGRESS_EVERY_S = 1.0


class ProfileError(ValueError):
    """The bundle cannot be profiled as asked (wrong backend, a failed measurement, ...).

    ``detail`` holds the failed child's last stderr lines, when there is one."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


# =============================================================================================
# Small helpers
# =============================================================================================
def parse_size(text: str | int) -> int:
    """``512M``, ``2G``, ``1.5GiB``, ``300000000`` -> bytes (K/M/G/T are powers of 1024 with or
    without ``iB``; ``kB``/``MB``/``GB`` are powers of 1000).

    Raises:
        ValueError: not a size.
    """
    if isinstance(text, int):
        return text
    s = str(text).strip()
    units = {"": 1, "B": 1, "K": 2**10, "KIB": 2**10, "M": 2**20, "MIB": 2**20, "G": 2**30,
             "GIB": 2**30, "T": 2**40, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12}
    num = s.rstrip("BbIiKkMmGgTt")
    unit = s[len(num):].strip().upper()
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use bytes or 512M, 2G, 1.5GB)") from None
    if unit not in units or value <= 0 or not math.isfinite(value):
        raise ValueError(f"not a size: {text!r} (use bytes or 512M, 2G, 1.5GB)")
    return int(value * units[unit])


def _rss(field_name: str = "VmRSS") -> int:
    """This process's resident set (``VmRSS``) or its peak (``VmHWM``), in bytes.

    VmHWM belongs to the process's own address space (ru_maxrss survives exec, so a child would
    report its parent's size if that were larger): benchmarks/ssm_decode.py does the same.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux: ru_maxrss (bytes on macOS, kB elsewhere)

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _pct(xs: Iterable[float], q: float) -> float | None:
    a = np.asarray(list(xs), dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else None


def _stats(ms: list[float]) -> dict[str, Any]:
    return {"calls": len(ms), "ms_mean": float(np.mean(ms)) if ms else None,
            "ms_p50": _pct(ms, 50), "ms_p95": _pct(ms, 95), "ms_total": float(np.sum(ms))}


def synthetic_prompt(n: int, vocab: int | None, start: int = 1) -> list[int]:
    """Token ids start..start+n-1, wrapping below ``vocab``: with ``start=1`` the prompt
    benchmarks/ssm_decode.py uses."""
    v = int(vocab or 1 << 30)
    start = min(start, max(0, v - 1))
    return [start + i % max(1, v - start) for i in range(n)]


# =============================================================================================
# Stage 1: measurement (runs in a child process)
# =============================================================================================
class _CallLog:
    """Wraps ``LoadedModel.run`` to time every graph call and record the sizes it was fed.

    The wrapper sits inside the loop it measures, so it does as little as it can per call: the
    named dims of each graph's inputs are looked up once, and a call appends its time and those
    sizes (a tuple) to lists that ``summary`` reduces afterwards."""

    def __init__(self, model: Any, manifest: Manifest):
        # graph -> ((input name, axis, dim name), ...): the named dims to read off a call
        self._named = {g: tuple((spec.name, ax, d) for spec in e.inputs
                                for ax, d in enumerate(spec.shape) if isinstance(d, str))
                       for g, e in manifest.graphs.items()}
        self.sequence: list[str] = []  # every call since load, warm-up included, in order
        self.reset()
        orig = model.run

        def run(graph: str, inputs: dict[str, np.ndarray], state: Any) -> Any:
            t = time.perf_counter()
            out = orig(graph, inputs, state)
            self.ms.setdefault(graph, []).append((time.perf_counter() - t) * 1e3)
            self.sequence.append(graph)
            self._shapes.setdefault(graph, []).append(self._dims_of(graph, inputs))
            return out

        model.run = run  # the sessions call self.model.run

    def reset(self) -> None:
        """Forget the calls so far (the warm-up); ``sequence`` keeps them."""
        self.ms: dict[str, list[float]] = {}
        self._shapes: dict[str, list[tuple]] = {}

    def counts(self) -> dict[str, int]:
        return {g: len(v) for g, v in self.ms.items()}

    def _dims_of(self, graph: str, inputs: Mapping[str, np.ndarray]) -> tuple:
        dims = []
        for name, ax, d in self._named.get(graph, ()):
            a = inputs.get(name)
            if a is not None:
                shape = np.shape(a)
                if ax < len(shape):
                    dims.append((d, int(shape[ax])))
        if "cache_position" in inputs:
            # the self-attention cache holds this many positions
            dims.append(("past", int(np.asarray(inputs["cache_position"]).reshape(-1)[0])))
        return tuple(dims)

    def _dim_stats(self, graph: str) -> tuple[dict[str, float], dict[str, int]]:
        sums: dict[str, float] = {}
        mx: dict[str, int] = {}
        for call in self._shapes.get(graph, ()):
            for d, n in dict(call).items():  # a later entry of one name wins, as before
                sums[d] = sums.get(d, 0) + n
                mx[d] = max(mx.get(d, 0), n)
        return sums, mx

    def summary(self) -> dict[str, Any]:
        out = {}
        for g, ms in self.ms.items():
            n = len(ms)
            sums, mx = self._dim_stats(g)
            mean_dims = {d: max(0, int(round(s / n))) for d, s in sums.items()}
            out[g] = {**_stats(ms), "dims": mean_dims, "max_dims": mx}
        return out


class _Progress:
    def __init__(self, emit: Callable[[str], None], what: str, total: int):
        self.emit, self.what, self.total = emit, what, total
        self.last = time.perf_counter()

    def __call__(self, i: int) -> None:
        now = time.perf_counter()
        if now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            self.emit(f"{self.what} {i}/{self.total}")


def _state_bytes(manifest: Manifest, dims: Mapping[str, int]) -> int:
    """Per-stream state at ``dims`` (batch 1): every state spec, plus the encoder's outputs (the
    cross-attention K/V a decoder reads every step), times ``STATE_COPIES``."""
    d = {"batch": 1, "past": 0, "source": 0, "chunk": 1, **dims}
    specs = next((g.state for g in manifest.graphs.values() if g.state), [])
    total = sum(s.nbytes(d) for s in specs)
    enc = manifest.graphs.get("encoder")
    if enc is not None:
        total += sum(_spec_bytes(s, d) for s in enc.outputs)
    return STATE_COPIES * total


def _spec_bytes(spec: Any, dims: Mapping[str, int]) -> int:
    try:
        shape = spec.concrete_shape(dict(dims))
    except KeyError:
        return 0
    return int(np.prod(shape)) * np.dtype(BUNDLE_DTYPES.get(spec.dtype, np.float32)).itemsize


def _drive_causal_lm(sess: Any, log: _CallLog, a: dict, emit: Callable) -> dict[str, Any]:
    prompt = np.asarray(synthetic_prompt(a["prompt_len"], sess.manifest.config.get("vocab_size")))
    n = a["tokens"]
    if not a.get("light"):
        for _ in sess.stream(prompt, min(4, n), stop_at_eos=False):  # warm-up, as the benchmark
            pass
    log.reset()
    prog = _Progress(emit, "decode step", n)
    first_calls: dict[str, int] = {}
    stamps = []
    t0 = time.perf_counter()
    for i, _tok in enumerate(sess.stream(prompt, n, stop_at_eos=False)):
        stamps.append(time.perf_counter())
        if i == 0:
            first_calls = log.counts()
        prog(i + 1)
    steps = list(np.diff(stamps) * 1e3)
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    prefills = [sum(log.ms.get("prefill", []))]
    for _ in range(0 if a.get("light") else 2):  # one timing of a call is too noisy to project
        sess.reset()
        t = time.perf_counter()
        sess.feed(prompt)
        prefills.append((time.perf_counter() - t) * 1e3)
    return {"first_token_ms": (stamps[0] - t0) * 1e3,
            "prefill_ms": float(np.median(prefills)), "prefill_ms_runs": prefills,
            "prompt_tokens": int(prompt.size), "new_tokens": len(stamps),
            "steps_ms": steps, "step_unit": "token",
            "tokens_per_s": (len(stamps) - 1) / decode_s if decode_s > 0 else None,
            "first_calls": first_calls, "step_graph": "step",
            "state_dims": {"batch": 1}}


def _drive_seq2seq(sess: Any, log: _CallLog, a: dict, emit: Callable) -> dict[str, Any]:
    from edgeseq import audio as A

    cfg = sess.config
    if sess.speech:
        acfg = cfg.get("audio") or {}
        window_s = float(acfg.get("window_seconds", A.CHUNK_SECONDS))
        audio = _synthetic_audio(window_s)
        n_frames = A.frames_for(window_s)
        n_frames += n_frames % 2
        source = A.log_mel_spectrogram(audio, n_mels=int(acfg.get("n_mels", 80)),
                                       n_frames=n_frames)
        extra = {"audio_s": window_s, "mel_frames": int(n_frames)}
    else:
        eos = cfg.get("eos_token_id")
        add_eos = cfg.get("append_eos_to_source", True) and eos is not None
        n_src = max(1, a["prompt_len"] - (1 if add_eos else 0))
        ids = synthetic_prompt(n_src, cfg.get("vocab_size"), start=3)
        ids += [int(eos)] if add_eos else []
        limit = cfg.get("max_source_positions")
        source = np.asarray(ids[:int(limit)] if limit else ids, dtype=np.int64)
        extra = {"source_tokens": int(source.size)}
    n = max(1, min(a["tokens"], sess.max_new_tokens_cap()))
    if not a.get("light"):
        sess.encode(source)  # warm-up
        for _ in sess.stream(None, min(4, n), ignore_eos=True):
            pass
    log.reset()
    enc = []
    for _ in range(1 if a.get("light") else 3):
        t = time.perf_counter()
        sess.encode(source)
        enc.append((time.perf_counter() - t) * 1e3)
    encoder_calls = log.counts().get("encoder", 0)
    prog = _Progress(emit, "decoder step", n)
    stamps, first_calls = [], {}
    t0 = time.perf_counter()
    sess.encode(source)
    for i, _tok in enumerate(sess.stream(None, n, ignore_eos=True)):
        stamps.append(time.perf_counter())
        if i == 0:
            first_calls = {g: c - (encoder_calls if g == "encoder" else 0)
                           for g, c in log.counts().items()}
        prog(i + 1)
    end = time.perf_counter()
    steps = list(np.diff(stamps) * 1e3)
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    enc_ms = float(np.median(enc))
    dec_dims = log.summary().get("decoder_step", {}).get("max_dims", {})
    out = {"encoder_ms": enc_ms, "encoder_ms_runs": enc,
           "first_token_ms": (stamps[0] - t0) * 1e3, "new_tokens": len(stamps),
           "steps_ms": steps, "step_unit": "token",
           "tokens_per_s": (len(stamps) - 1) / decode_s if decode_s > 0 else None,
           "first_calls": first_calls, "step_graph": "decoder_step",
           "state_dims": {"batch": 1, "past": int(dec_dims.get("past", 0)) + 1,
                          "source": int(dec_dims.get("source", 0))}, **extra}
    if sess.speech:
        # one window: its encoder plus the decoder steps that followed it
        window_ms = (end - t0) * 1e3
        out.update(window_ms=window_ms, rtf=window_ms / (extra["audio_s"] * 1e3),
                   decoder_calls_per_window=len(stamps) + len(sess.decoder_prompt) - 1)
    return out


def _synthetic_audio(seconds: float) -> np.ndarray:
    """Deterministic, non-silent 16 kHz audio: two tones with a slow envelope, plus noise."""
    from edgeseq import audio as A

    t = np.arange(A.samples_for(seconds)) / A.SAMPLE_RATE
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t)
    x = 0.1 * env * (np.sin(2 * np.pi * 697 * t) + np.sin(2 * np.pi * 1209 * t))
    x += 0.01 * np.random.default_rng(0).standard_normal(t.size)
    return x.astype(np.float32)


def _frame_rate(cfg: Mapping[str, Any]) -> float | None:
    inp = cfg.get("input") or {}
    for d in (inp, cfg):
        for key in ("frame_rate", "frames_per_s", "frame_rate_hz"):
            v = d.get(key)
            if isinstance(v, (int, float)) and v > 0:
                return float(v)
    return None


def _drive_classification(sess: Any, log: _CallLog, a: dict, emit: Callable) -> dict[str, Any]:
    n = max(2, a["tokens"])
    x = np.random.default_rng(0).random((n, sess.features), dtype=np.float32)
    if not a.get("light"):
        sess.reset(1)  # warm-up: both graphs
        sess.push(x[:min(n, 2 * sess.chunk + 1)])
        sess.finish()
    log.reset()
    sess.reset(1)
    prog = _Progress(emit, "frame", n)
    steps, first_ms, first_calls = [], None, {}
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        ready = sess.push(x[i:i + 1])
        now = time.perf_counter()
        steps.append((now - t) * 1e3)
        if first_ms is None and ready.shape[1]:
            first_ms, first_calls = (now - t0) * 1e3, log.counts()
        prog(i + 1)
    if first_ms is None:  # a lookahead longer than the stream: the flush gives the first output
        t = time.perf_counter()
        sess.finish()
        first_ms, first_calls = (time.perf_counter() - t0) * 1e3, log.counts()
    sess.reset(1)
    t = time.perf_counter()
    sess.push(x)
    chunked_ms = (time.perf_counter() - t) * 1e3 / n
    rate = _frame_rate(sess.config)
    mean = float(np.mean(steps))
    return {"first_token_ms": first_ms, "new_tokens": n, "steps_ms": steps,
            "step_unit": "frame", "frames_per_s": 1e3 / mean if mean > 0 else None,
            "ms_per_frame": mean, "ms_per_frame_chunked": chunked_ms,
            "chunk": sess.chunk, "lookahead": sess.lookahead, "frame_rate": rate,
            "rtf": mean / (1e3 / rate) if rate else None,
            "first_calls": first_calls, "step_graph": "step", "state_dims": {"batch": 1}}


_DRIVERS = {"causal_lm": _drive_causal_lm, "seq2seq": _drive_seq2seq,
            "speech_seq2seq": _drive_seq2seq, "classification": _drive_classification}


def _import_backend(backend: str) -> None:
    """Import the backend's libraries before the baseline RSS is taken, so that they count as
    ``other`` rather than as arena."""
    from edgeseq.registry import backends

    backends()
    if backend == "ort":
        import onnx  # noqa: F401  (the ORT backend reads graph protos at load)
        import onnxruntime  # noqa: F401
    elif backend == "executorch":
        import torch  # noqa: F401  (the ExecuTorch runner passes torch tensors)
        from executorch.runtime import Runtime

        Runtime.get()


def _ort_threads(threads: int | None) -> int | None:
    if threads:
        return threads
    try:
        from edgeseq.runtime.backends.onnxruntime import _default_threads

        return _default_threads()
    except ImportError:
        return None


def measure_in_process(bundle: str | Path, backend: str = "ort", tokens: int = 128,
                       prompt_len: int = 16, threads: int | None = None,
                       emit: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Measure a bundle in this process (``measure`` runs this in a fresh child).

    Returns:
        The raw measurement: ``load_ms``, ``baseline_rss_bytes``, ``peak_rss_bytes``, per-graph
        call statistics (``graphs``), the task's latencies and rates.
    """
    import edgeseq
    from edgeseq.quiet import quiet_third_party

    quiet_third_party()
    _import_backend(backend)
    man = read_manifest(bundle)
    baseline = _rss()
    t = time.perf_counter()
    sess = edgeseq.load(bundle, backend=backend, threads=threads)
    load_ms = (time.perf_counter() - t) * 1e3
    after_load = _rss()
    log = _CallLog(sess.model, man)
    emit(f"loaded in {load_ms:.0f} ms; measuring")
    res = _DRIVERS[man.task](sess, log, {"tokens": tokens, "prompt_len": prompt_len}, emit)
    peak = _rss("VmHWM")
    res.update(load_ms=load_ms, baseline_rss_bytes=baseline, after_load_rss_bytes=after_load,
               peak_rss_bytes=peak, end_rss_bytes=_rss(), graphs=log.summary(),
               state_bytes=_state_bytes(man, res.pop("state_dims")), backend=backend,
               threads=_ort_threads(threads) if backend == "ort" else threads,
               pid=os.getpid())
    return res


# -- per-operator time --------------------------------------------------------------------------
def ops_in_process(bundle: str | Path, backend: str = "ort", tokens: int = 64,
                   prompt_len: int = 16, threads: int | None = None,
                   emit: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run the workload again with the backend's profiler on; time per operator type per graph.

    ONNX Runtime: ``SessionOptions.enable_profiling`` and ``end_profiling()``'s JSON trace (node
    kernel times, by ``op_name``). ExecuTorch: ``load_program(enable_etdump=True)``, the ETDump
    written by the runtime (``read_etdump``; portable kernels as ``native_call_<op>``,
    XNNPACK-delegated ops by their XNNPACK names).
    """
    import edgeseq
    from edgeseq.quiet import quiet_third_party

    quiet_third_party()
    _import_backend(backend)
    man = read_manifest(bundle)
    tmp = Path(tempfile.mkdtemp(prefix="edgeseq-ops-"))
    try:
        with _profiling_enabled(backend, tmp):
            sess = edgeseq.load(bundle, backend=backend, threads=threads)
        log = _CallLog(sess.model, man)
        # "light": no warm-up and no repeats, so that the profiler's event buffer (several MB
        # per prefill with ONNX Runtime) keeps this child's peak RSS below the measurement's.
        _DRIVERS[man.task](sess, log, {"tokens": tokens, "prompt_len": prompt_len,
                                       "light": True}, emit)
        if backend == "ort":
            graphs = _ort_ops(sess, tmp)
            source = "onnxruntime profiler (SessionOptions.enable_profiling)"
        else:
            graphs = _etdump_ops(sess, tmp, log.sequence)
            source = "ExecuTorch ETDump (Runtime.load_program(enable_etdump=True))"
        return {"source": source, "graphs": graphs}
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


class _profiling_enabled:
    """Turn on the backend's profiler for the sessions created inside the block.

    The backends build their session options internally, so this wraps the one place each
    passes through: the ORT backend's ``_clone_options`` and ExecuTorch's
    ``Runtime.load_program``."""

    def __init__(self, backend: str, tmp: Path):
        self.backend, self.tmp = backend, tmp
        self.undo: Callable[[], None] = lambda: None

    def __enter__(self) -> None:
        if self.backend == "ort":
            import edgeseq.runtime.backends.onnxruntime as ob

            orig = ob._clone_options
            n = [0]

            def clone(base: Any, prepack: bool = False) -> Any:
                opts = orig(base, prepack)
                n[0] += 1
                opts.enable_profiling = True  # one prefix per session: file names are per second
                opts.profile_file_prefix = str(self.tmp / f"ort{n[0]}")
                return opts

            ob._clone_options = clone
            self.undo = lambda: setattr(ob, "_clone_options", orig)
        else:
            from executorch.runtime import Runtime

            rt = Runtime.get()
            orig_load = rt.load_program
            rt.load_program = functools.partial(orig_load, enable_etdump=True,
                                                debug_buffer_size=0)
            self.undo = lambda: setattr(rt, "load_program", orig_load)

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def _top(times: Mapping[str, Mapping[Any, list[float]]], extra: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """The top operator types by time. ``times``: op type -> node -> its durations (ms), one per
    run. A node's time is its median over the runs times the runs: on a shared host a stalled
    thread lands on random nodes, and a sum would hand those stalls to whichever op they hit."""
    rows = []
    for op, nodes in times.items():
        ms = sum(float(np.median(v)) * len(v) for v in nodes.values() if v)
        rows.append((op, ms, sum(len(v) for v in nodes.values())))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return {"total_ms": total, "op_types": len(rows), **(extra or {}),
            "top": [{"op": op, "ms": ms, "calls": c, "share": ms / total if total else 0.0}
                    for op, ms, c in rows[:TOP_OPS]]}


def _ort_ops(sess: Any, tmp: Path) -> dict[str, Any]:
    out = {}
    for name, runner in sess.model.runners.items():
        path = Path(runner.sess.end_profiling())
        times: dict[str, dict[str, list[float]]] = {}
        runs = []
        for e in _trace_events(path):
            if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
                op = (e.get("args") or {}).get("op_name") or "?"
                times.setdefault(op, {}).setdefault(e["name"], []).append(e.get("dur", 0) / 1e3)
            elif e.get("cat") == "Session" and e.get("name") == "model_run":
                runs.append(e.get("dur", 0) / 1e3)
        out[name] = _top(times, {"runs": len(runs), "run_ms_total": sum(runs)})
        path.unlink(missing_ok=True)
    return out


def _trace_events(path: Path) -> Iterable[dict[str, Any]]:
    """The events of ONNX Runtime's profile (a JSON array, one event per line), read line by
    line: parsing the whole array at once would raise this process's peak RSS by several times
    the file's size, and the profile's peak should stay close to the measurement's."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip().rstrip(",")
            if not line.startswith("{"):
                continue
            try:
                yield json.loads(line)
            except ValueError:
                continue


def _etdump_ops(sess: Any, tmp: Path, sequence: list[str]) -> dict[str, Any]:
    """Operator times from the ETDump the runtime wrote: one run record per method execution,
    in execution order, so the records pair with the graph calls made (``sequence``)."""
    per_graph: dict[str, dict[str, dict[int, list[float]]]] = {}
    runs: dict[str, list[float]] = {}
    for i, prog in enumerate(sess.model.programs.values()):
        etdp, dbg = tmp / f"et{i}.etdp", tmp / f"et{i}.bin"
        prog.write_etdump_result_to_file(str(etdp), str(dbg))
        executions = [r for r in read_etdump(etdp.read_bytes())
                      if any(name == "Method::execute" for name, _ in r)]
        if len(executions) != len(sequence):
            raise ProfileError(f"ETDump holds {len(executions)} executions but "
                               f"{len(sequence)} graph calls were made")
        for graph, events in zip(sequence, executions):
            times = per_graph.setdefault(graph, {})
            for k, (name, ns) in enumerate(events):  # a method's runs list the same events
                if name == "Method::execute":
                    runs.setdefault(graph, []).append(ns / 1e6)
                elif (op := _et_op_name(name)) is not None:
                    times.setdefault(op, {}).setdefault(k, []).append(ns / 1e6)
    return {g: _top(t, {"runs": len(runs.get(g, [])), "run_ms_total": sum(runs.get(g, []))})
            for g, t in per_graph.items()}


def read_etdump(data: bytes) -> list[list[tuple[str, int]]]:
    """The profile events of an ETDump file: per run record, ``(name, duration in ticks)``.

    ETDump is a size-prefixed FlatBuffer (executorch/devtools/etdump/etdump_schema_flatcc.fbs:
    ETDump{version, run_data:[RunData{name, bundled_input_index, allocators, events:[Event{
    profile_event:ProfileEvent{name, chain_index, instruction_id, delegate_debug_id_int,
    delegate_debug_id_str, delegate_debug_metadata, start_time, end_time}}]}]}). Read here
    directly: ExecuTorch's own reader imports ``executorch.exir`` (~30 MB of RSS), which would
    lift the operator-profiling child above the measurement's peak. Delegate events (XNNPACK
    ops) carry their name in ``delegate_debug_id_str``.
    """
    import struct

    b = memoryview(data)[4:]  # size prefix

    def u32(p: int) -> int:
        return struct.unpack_from("<I", b, p)[0]

    def field(t: int, i: int) -> int | None:
        vt = t - struct.unpack_from("<i", b, t)[0]
        if 4 + 2 * i >= struct.unpack_from("<H", b, vt)[0]:
            return None
        off = struct.unpack_from("<H", b, vt + 4 + 2 * i)[0]
        return t + off if off else None

    def ref(p: int | None) -> int | None:
        return None if p is None else p + u32(p)

    def string(p: int | None) -> str | None:
        s = ref(p)
        return None if s is None else bytes(b[s + 4:s + 4 + u32(s)]).decode("utf-8", "replace")

    def tables(p: int | None) -> list[int]:
        v = ref(p)
        return [] if v is None else [v + 4 + 4 * k + u32(v + 4 + 4 * k) for k in range(u32(v))]

    def u64(p: int | None) -> int:
        return 0 if p is None else struct.unpack_from("<Q", b, p)[0]

    out = []
    for run in tables(field(ref(0), 1)):
        events = []
        for ev in tables(field(run, 3)):
            pe = ref(field(ev, 0))
            if pe is None:
                continue
            name = string(field(pe, 0)) or string(field(pe, 4)) or ""
            events.append((name, u64(field(pe, 7)) - u64(field(pe, 6))))
        out.append(events)
    return out


def _et_op_name(name: str) -> str | None:
    """``native_call_mm.out`` -> ``mm``; ``Fully Connected (NC, F32) GEMM #3`` -> without the
    number; wrappers (``OPERATOR_CALL``, ``DELEGATE_CALL``) and load events -> None."""
    if name in ("OPERATOR_CALL", "DELEGATE_CALL") or "::" in name:
        return None
    if name.startswith("native_call_"):
        return name[len("native_call_"):].split(".")[0]
    return name.split(" #")[0]


# -- the child process ------------------------------------------------------------------------
def _worker_main(argv: list[str]) -> int:
    """``python -m edgeseq.runtime.profile --worker measure|ops JSON``: one line ``RESULT
    {...}`` on stdout, progress as ``PROGRESS text`` lines."""
    kind, args = argv[1], json.loads(argv[2])

    def emit(msg: str) -> None:
        print(f"PROGRESS {msg}", flush=True)

    fn = measure_in_process if kind == "measure" else ops_in_process
    res = fn(emit=emit, **args)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def _run_child(kind: str, args: dict[str, Any], progress: Callable[[str], None] | None
               ) -> dict[str, Any]:
    """Run ``_worker_main`` in a fresh interpreter; relay its progress lines; its result."""
    cmd = [sys.executable, "-m", "edgeseq.runtime.profile", "--worker", kind, json.dumps(args)]
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        result = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("PROGRESS ") and progress:
                progress(line[9:].rstrip())
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        rc = proc.wait()
        if rc or result is None:
            err.seek(0)
            tail = [ln for ln in err.read().splitlines() if ln.strip()][-12:]
            last = tail[-1] if tail else f"exit code {rc}"
            raise ProfileError(f"the {kind} run failed ({last})", "\n".join(tail))
    return result


def measure(bundle: str | Path, backend: str = "ort", tokens: int = 128, prompt_len: int = 16,
            threads: int | None = None, ops: bool = True,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``bundle`` on this host in fresh child processes (``measure_in_process``, then
    the operator profile unless ``ops`` is False; its failure is reported, not raised).

    Raises:
        ProfileError: the measurement failed.
    """
    args = {"bundle": str(bundle), "backend": backend, "tokens": tokens,
            "prompt_len": prompt_len, "threads": threads}
    res = _run_child("measure", args, progress)
    res["op_breakdown"], res["op_breakdown_note"] = None, "not asked (--no-ops)"
    if ops:
        if progress:
            progress("per-operator profile")
        try:
            res["op_breakdown"] = _run_child("ops", {**args, "tokens": min(tokens, OPS_TOKENS)},
                                             None)
            res["op_breakdown_note"] = None
        except ProfileError as e:
            res["op_breakdown_note"] = f"unavailable: {e}"
    return res


# =============================================================================================
# Stage 2: the roofline cost of each graph
# =============================================================================================
@dataclass
class GraphCost:
    """What one call of a graph moves and computes (a lower bound on its DRAM traffic)."""

    graph: str
    dims: dict[str, int]
    weight_bytes: int            # weights read by one call (each initializer once)
    io_bytes: int                # graph inputs and outputs: state read and written, K/V, logits
    flops: dict[str, float]      # operations by compute dtype (an FMA counts 2)
    tokens: int = 1              # tokens (frames) per call
    source: str = "onnx graph"
    unresolved: int = 0          # matrix products whose shapes could not be inferred

    @property
    def bytes_moved(self) -> int:
        return self.weight_bytes + self.io_bytes

    @property
    def intensity(self) -> float:
        """Operations per byte moved."""
        return sum(self.flops.values()) / max(1, self.bytes_moved)

    def to_json(self) -> dict[str, Any]:
        return {"dims": self.dims, "tokens_per_call": self.tokens,
                "bytes_per_call": self.bytes_moved,
                "bytes_by_kind": {"weights": self.weight_bytes, "io": self.io_bytes},
                "flops_by_dtype": {k: float(v) for k, v in self.flops.items()},
                "intensity_ops_per_byte": self.intensity, "source": self.source,
                "unresolved_matmuls": self.unresolved}


_MATMUL_INT8 = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul",
                "MatMulNBits", "MatMulBnb4", "QGemm"}
_CONV_INT8 = {"ConvInteger", "QLinearConv"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Sigmoid", "Tanh",
                "Softplus", "Relu", "Erf", "Reciprocal", "Neg", "Abs", "Gelu", "Where", "Max",
                "Min", "Clip", "HardSigmoid", "LeakyRelu", "Cos", "Sin", "Softmax",
                "LayerNormalization", "SimplifiedLayerNormalization", "ReduceSum", "ReduceMean",
                "ReduceMax", "CumSum"}
_ONNX_FLOAT = {1: "fp32", 10: "fp16", 16: "bf16", 11: "fp64"}


def _dtype_name(elem: int | None) -> str:
    return _ONNX_FLOAT.get(elem or 1, "int8" if elem in (2, 3) else "fp32")


def _concrete(model: Any, dims: Mapping[str, int]) -> Any:
    """The graph with its named input/output dims set to ``dims`` and old value_info dropped,
    ready for shape inference at those sizes."""
    g = model.graph
    for vi in [*g.input, *g.output]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param and d.dim_param in dims:
                d.dim_value = int(dims[d.dim_param])
    del g.value_info[:]
    return model


def _onnx_cost(path: Path, entry: GraphEntry, dims: Mapping[str, int], seen: set | None = None
               ) -> GraphCost:
    import onnx

    model = _concrete(onnx.load(str(path), load_external_data=False), dims)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; unresolved nodes fall back
        pass
    g = model.graph
    shapes: dict[str, tuple[list[int | None], int]] = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        tt = vi.type.tensor_type
        shapes[vi.name] = ([d.dim_value if d.HasField("dim_value") else None
                            for d in tt.shape.dim], tt.elem_type)
    inits = {i.name: i for i in g.initializer}
    for i in g.initializer:
        shapes[i.name] = (list(i.dims), i.data_type)
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)

    def shape(name: str) -> list[int] | None:
        s = shapes.get(name, (None, 0))[0]
        return s if s is not None and all(isinstance(v, int) and v >= 0 for v in s) else None

    tokens = _items_per_call(entry, dims)
    flops: dict[str, float] = {}
    unresolved = 0

    def add(dtype: str, n: float) -> None:
        flops[dtype] = flops.get(dtype, 0.0) + float(n)

    for node in g.node:
        op = node.op_type
        out = shape(node.output[0]) if node.output else None
        if op in ("MatMul", "Gemm", "FusedMatMul") or op in _MATMUL_INT8:
            a = shape(node.input[0])
            k = None
            attrs = {at.name: at.i for at in node.attribute}
            if op == "MatMulNBits":  # its weight is packed: the sizes are attributes
                k = attrs.get("K")
            elif a:
                k = a[0] if (op == "Gemm" and attrs.get("transA")) else a[-1]
            if out is not None and k:
                n = 2.0 * float(np.prod(out)) * k
            else:  # fall back on the weight: 2 x tokens x K x N
                unresolved += 1
                w = next((inits[x] for x in node.input[1:] if x in inits), None)
                kn = (attrs["K"] * attrs["N"] if op == "MatMulNBits" and "N" in attrs
                      else float(np.prod(w.dims)) if w is not None else 0.0)
                n = 2.0 * tokens * kn
            add("int8" if op in _MATMUL_INT8 else _dtype_name(shapes.get(node.input[0],
                                                                             ([], 1))[1]), n)
        elif op in ("Conv", "ConvTranspose") or op in _CONV_INT8:
            w = shape(node.input[1 if op in ("Conv", "ConvTranspose", "ConvInteger") else 3])
            if out is not None and w:
                add("int8" if op in _CONV_INT8 else _dtype_name(shapes.get(node.input[0],
                                                                            ([], 1))[1]),
                    2.0 * float(np.prod(out)) * float(np.prod(w[1:])))
            else:
                unresolved += 1
        elif op in _ELEMENTWISE:
            src = shape(node.input[0]) if op.startswith("Reduce") else out
            if src is not None:
                add(_dtype_name(shapes.get(node.output[0], ([], 1))[1]), float(np.prod(src)))

    # Weights read by one call: each initializer once, in its stored dtype; a table read only by
    # Gather (an embedding) costs the rows gathered, not the whole table.
    seen = set() if seen is None else seen
    wbytes = 0
    for init in g.initializer:
        key, nbytes = _initializer_bytes(init, path.name)
        users = consumers.get(init.name, [])
        if users and all(u.op_type == "Gather" and u.input[0] == init.name for u in users) \
                and len(init.dims) >= 2:
            rows = 0
            for u in users:
                idx = shape(u.input[1])
                rows += int(np.prod(idx)) if idx is not None else tokens
            nbytes = min(nbytes, rows * nbytes // max(1, init.dims[0]))
        seen.add(key)
        wbytes += nbytes
    io = sum(_spec_bytes(s, dims) for s in [*entry.inputs, *entry.outputs])
    io += sum(_spec_bytes(s, dims) for s in entry.state) + sum(
        _spec_bytes(s, {**dims, "past": dims.get("past", 0) + 1}) for s in entry.state)
    return GraphCost(entry.name, dict(dims), wbytes, io, flops, tokens, "onnx graph",
                     unresolved)


def _items_per_call(entry: GraphEntry, dims: Mapping[str, int]) -> int:
    """Tokens (or frames) one call processes: the first input's sequence axis (``chunk``,
    ``source``, ``frames``, or a fixed chunk such as a classifier's ``(batch, 8, features)``);
    1 for a step."""
    first = entry.inputs[0].shape if entry.inputs else ()
    for d in first[1:]:
        if d in ("chunk", "source", "frames"):
            return max(1, int(dims.get(d, 1)))
    if entry.name != "step" and len(first) == 3 and isinstance(first[1], int):
        return first[1]  # (batch, k frames, features)
    return 1


def _pte_cost(root: Path, man: Manifest, entry: GraphEntry, dims: Mapping[str, int]) -> GraphCost:
    """A .pte-only bundle: the program file's size as the weights read per call (an upper
    estimate: a method may read only part of the program), 2 ops per parameter per token."""
    size = (root / entry.files["pte"]).stat().st_size
    scheme = _scheme(man)
    compute = "int8" if scheme in ("int8", "int4") else ("fp16" if scheme == "fp16" else "fp32")
    tokens = _items_per_call(entry, dims)
    params = size / _PARAM_BYTES.get(scheme, 4.0)
    io = sum(_spec_bytes(s, dims) for s in [*entry.inputs, *entry.outputs]) + 2 * sum(
        _spec_bytes(s, dims) for s in entry.state)
    return GraphCost(entry.name, dict(dims), size, io, {compute: 2.0 * params * tokens},
                     tokens, "pte file size + manifest")


def _scheme(man: Manifest) -> str:
    q = man.quantization
    if isinstance(q, dict) and q.get("scheme"):
        s = str(q["scheme"]).lower()
        return "int4" if s.startswith("int4") else ("int8" if s.startswith("int8") else s)
    return "fp16" if str(man.dtype) in ("fp16", "float16") else "fp32"


def analyze(bundle: str | Path, measured: Mapping[str, Any] | None = None,
            dims: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, GraphCost]:
    """The roofline cost of each graph per call, at the sizes it was measured with (``measured``'s
    per-graph mean dims) or at ``dims`` (graph -> {dim: size}); batch 1 otherwise.

    ONNX graphs are read when the bundle has them (whatever the backend: the computation is the
    same); a .pte-only bundle is costed from its file size.
    """
    root = Path(bundle)
    man = read_manifest(root)
    out = {}
    seen: set = set()
    for name, e in man.graphs.items():
        d = {"batch": 1, "chunk": 1, "past": 0, "source": 1}
        if measured is not None:
            d.update((measured.get("graphs") or {}).get(name, {}).get("dims") or {})
        if dims and name in dims:
            d.update(dims[name])
        d["batch"] = 1
        if "onnx" in e.files:
            out[name] = _onnx_cost(root / e.files["onnx"], e, d, seen)
        else:
            out[name] = _pte_cost(root, man, e, d)
    return out


def weight_bytes(bundle: str | Path, backend: str) -> int:
    """Bytes of the bundle's weights for ``backend`` (as ``edgeseq inspect`` counts them): ONNX
    initializers, each shared tensor once; the ``.pte`` file size for ExecuTorch."""
    import onnx

    root = Path(bundle)
    man = read_manifest(root)
    fmt = format_of(backend)
    files = sorted({g.files[fmt] for g in man.graphs.values() if fmt in g.files})
    if fmt == "pte":
        return sum((root / f).stat().st_size for f in files)
    seen, total = set(), 0
    for f in files:
        for init in onnx.load(str(root / f), load_external_data=False).graph.initializer:
            key, nbytes = _initializer_bytes(init, f)
            if key not in seen:
                seen.add(key)
                total += nbytes
    return total


def _initializer_bytes(init: Any, file: str) -> tuple[tuple, int]:
    """An initializer's identity (its place in the shared weights file, so a tensor two graphs
    share counts once) and its stored size in bytes."""
    from onnx.helper import tensor_dtype_to_np_dtype

    ext = {e.key: e.value for e in init.external_data}
    if ext:
        return (ext.get("location"), ext.get("offset")), int(ext["length"])
    n = int(np.prod(init.dims)) if init.dims else 1
    return (file, init.name), len(init.raw_data) or n * np.dtype(
        tensor_dtype_to_np_dtype(init.data_type)).itemsize


# =============================================================================================
# Stage 3: projection
# =============================================================================================
def device_roofline(cost: GraphCost, device: Any, unit: str = "cpu") -> Any:
    """``devices.roofline`` for one call; a dtype the unit has no figure for is counted at the
    unit's fastest known rate (optimistic, so the bound stays a lower bound)."""
    from edgeseq.devices import DeviceError, roofline

    u = device.unit(unit)
    flops: dict[str, float] = {}
    for d, f in cost.flops.items():
        if not f:
            continue
        try:
            device.peak_ops(d, unit)
            key = d
        except DeviceError:
            known = sorted(u.peak_gops, key=lambda k: -u.peak_gops[k]) or ["fp32"]
            key = known[0]
        flops[key] = flops.get(key, 0.0) + f
    return roofline(cost.bytes_moved, flops, device, unit)


def host_efficiency(costs: Mapping[str, GraphCost], measured: Mapping[str, Any],
                    host: Any) -> dict[str, dict[str, Any]]:
    """Per graph: the host's roofline bound per call, the measured median call, and the
    efficiency ``bound / measured`` clipped to at most 1 (a graph whose weights stay in cache can
    beat the host's DRAM bound; the clip keeps every projection at or above its device bound)."""
    out = {}
    for name, cost in costs.items():
        g = (measured.get("graphs") or {}).get(name) or {}
        ms = g.get("ms_p50")
        rec: dict[str, Any] = {"measured_ms_p50": ms, "calls": g.get("calls", 0)}
        try:
            r = device_roofline(cost, host)
            bound_ms = r.seconds * 1e3
            rec.update(host_bound_ms=bound_ms, host_bound=r.bound,
                       raw_efficiency=bound_ms / ms if ms else None,
                       efficiency=min(1.0, bound_ms / ms) if ms else None,
                       achieved_ops_per_s=sum(cost.flops.values()) / (ms / 1e3) if ms else None,
                       achieved_bytes_per_s=cost.bytes_moved / (ms / 1e3) if ms else None)
        except Exception as e:  # noqa: BLE001 - an uncalibrated host: no efficiency, say why
            rec.update(host_bound_ms=None, efficiency=None, note=str(e))
        out[name] = rec
    return out


def project(measured: Mapping[str, Any], costs: Mapping[str, GraphCost],
            efficiency: Mapping[str, Mapping[str, Any]], device: Any, task: str,
            backend: str = "ort", budget: int | None = None,
            target_ms: float | None = None, scheme: str = "fp32",
            known_devices: Iterable[Any] = ()) -> dict[str, Any]:
    """Project a host measurement onto ``device``.

    Per graph: ``max(bound, bound / efficiency)`` with the efficiency at most 1, so the result is
    never below the device's roofline bound (without a host efficiency, the bound itself).
    Memory: weights + state + arena (as measured on the host) + the backend's runtime memory
    for the graphs measured (``Backend.memory``: the constants the speculative plan uses).

    Returns:
        ``step_ms``, ``tokens_per_s``/``frames_per_s``/``rtf``, ``first_token_ms``,
        ``peak_bytes`` and its split, ``budget_bytes``, ``fits``, ``latency_ms`` (what the target
        is checked against), ``meets_latency``, ``graphs`` and ``advice``.
    """
    graphs: dict[str, Any] = {}
    for name, cost in costs.items():
        r = device_roofline(cost, device)
        bound = r.seconds * 1e3
        eff = (efficiency.get(name) or {}).get("efficiency")
        ms = max(bound, bound / eff) if eff and eff > 0 else bound
        graphs[name] = {"bound_ms": bound, "memory_ms": r.memory_s * 1e3,
                        "compute_ms": r.compute_s * 1e3, "bound": r.bound,
                        "efficiency": eff, "ms": ms}
    step_graph = measured.get("step_graph", "step")
    step = graphs.get(step_graph, {}).get("ms")
    first = sum(graphs[g]["ms"] * n for g, n in (measured.get("first_calls") or {}).items()
                if g in graphs)
    out: dict[str, Any] = {"device": device.id, "unit": "cpu", "step_ms": step,
                           "first_token_ms": first, "graphs": graphs}
    if task in ("causal_lm", "seq2seq", "speech_seq2seq"):
        out["tokens_per_s"] = 1e3 / step if step else None
    latency = step
    if task == "speech_seq2seq":
        n_dec = measured.get("decoder_calls_per_window") or measured.get("new_tokens", 1)
        window = graphs["encoder"]["ms"] + n_dec * (step or 0.0)
        out.update(window_ms=window, rtf=window / (measured["audio_s"] * 1e3),
                   encoder_ms=graphs["encoder"]["ms"])
        latency = window
    elif task == "seq2seq":
        out["encoder_ms"] = graphs["encoder"]["ms"]
    elif task == "classification":
        rate = measured.get("frame_rate")
        out.update(frames_per_s=1e3 / step if step else None, ms_per_frame=step,
                   rtf=step / (1e3 / rate) if rate and step else None)
    if task == "causal_lm" and "prefill" in graphs:
        out["prefill_ms"] = sum(graphs["prefill"]["ms"] * n for g, n in
                                (measured.get("first_calls") or {}).items() if g == "prefill")
    mem = measured["memory"]
    over = runtime_memory(backend).runtime_bytes(len(costs))
    split = {"weights": mem["weights"], "state": mem["state"], "arena": mem["arena"],
             "runtime": over}
    peak = sum(split.values())
    budget = int(budget) if budget else device.app_memory
    out.update(peak_bytes=peak, memory=split, budget_bytes=budget, fits=peak <= budget,
               latency_ms=latency, target_latency_ms=target_ms,
               meets_latency=None if target_ms is None or latency is None else latency <= target_ms)
    out["advice"] = advise(out, measured, costs, task, scheme, known_devices)
    return out


def advise(p: Mapping[str, Any], measured: Mapping[str, Any], costs: Mapping[str, GraphCost],
           task: str, scheme: str, known_devices: Iterable[Any] = ()) -> list[str]:
    """What to change when a projection misses its memory budget or latency target."""
    tips: list[str] = []
    mem = p["memory"]
    if not p["fits"]:
        over = p["peak_bytes"] - p["budget_bytes"]
        tips.append(f"memory: {_mb(p['peak_bytes'])} exceeds the budget of "
                    f"{_mb(p['budget_bytes'])} by {_mb(over)}")
        for q, k in _smaller_schemes(scheme).items():
            new = p["peak_bytes"] - mem["weights"] + mem["weights"] / k
            tips.append(f"  quantize: `edgeseq convert ... --quant {q}` (weights ~{k:.3g}x "
                        f"smaller than {scheme}): peak ~{_mb(new)}"
                        + (" - fits" if new <= p["budget_bytes"] else " - still too large"))
        per_pos = measured.get("state_bytes_per_position") or 0
        if task in ("seq2seq", "speech_seq2seq") and per_pos:
            room = p["budget_bytes"] - (p["peak_bytes"] - mem["state"])
            n = int(room // per_pos) if room > 0 else 0
            tips.append(f"  cache capacity: `--max-target-len N` bounds the self-attention "
                        f"cache ({_mb(per_pos)} per position); N <= {n} fits the budget"
                        if n > 1 else "  cache capacity: even a 1-position cache does not fit")
        if mem["arena"] > 0.25 * p["peak_bytes"]:
            what = {"causal_lm": "prefill in smaller chunks (Session.max_chunk, the manifest's "
                                 "max_chunk by default: prefill activations grow with it)",
                    "classification": "frame-by-frame steps instead of chunks (the chunk graph's "
                                      "activations are larger)",
                    "speech_seq2seq": "a shorter encoder window (`--window`, activations grow "
                                      "with it)",
                    "seq2seq": "shorter sources (encoder activations grow with the source)"}
            tips.append(f"  arena {_mb(mem['arena'])}: {what.get(task, 'smaller inputs')}")
    if p.get("meets_latency") is False:
        tgt, lat = p["target_latency_ms"], p["latency_ms"]
        tips.append(f"latency: {lat:.3g} ms exceeds the target of {tgt:.3g} ms "
                    f"({lat / tgt:.2f}x)")
        g = p["graphs"].get(measured.get("step_graph", "step")) or {}
        cost = costs.get(measured.get("step_graph", "step"))
        eff = g.get("efficiency") or 1.0
        if cost is not None and g.get("bound") == "memory":
            for q, k in _smaller_schemes(scheme).items():
                # a memory-bound step scales with its bytes: the weights shrink, the state not
                new = lat * (cost.weight_bytes / k + cost.io_bytes) / max(1, cost.bytes_moved)
                tips.append(f"  quantize: `--quant {q}` reads ~{k:.3g}x fewer weight bytes per "
                            f"step: ~{new:.3g} ms" + (" - meets it" if new <= tgt else ""))
        if g.get("efficiency") is not None and g["efficiency"] < 0.5:
            tips.append(f"  the host ran at {g['efficiency']:.0%} of its roofline bound: per-call "
                        "overhead or thread contention dominates; try --threads (fewer threads "
                        "contend less) or larger chunks")
        if cost is not None and g.get("bound") == "memory" and task != "speech_seq2seq":
            need = cost.bytes_moved / (tgt / 1e3 * eff) if tgt > 0 else float("inf")
            faster = [d.id for d in known_devices if not d.placeholder
                      and d.memory.bandwidth_bytes_per_s >= need]
            tips.append(f"  a device with >= {need / 1e9:.3g} GB/s of DRAM bandwidth at this "
                        "efficiency" + (f" (known: {', '.join(faster)})" if faster else ""))
    return tips


def _smaller_schemes(scheme: str) -> dict[str, float]:
    """Quantization schemes smaller than ``scheme`` and how many times smaller its weights get."""
    if scheme == "fp32":
        return dict(QUANT_SHRINK)
    if scheme == "fp16":
        return {q: k / 2 for q, k in QUANT_SHRINK.items()}
    if scheme == "int8":
        return {"int4": QUANT_SHRINK["int4"] / QUANT_SHRINK["int8"]}
    return {}


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def memory_split(measured: Mapping[str, Any], weights: int) -> dict[str, int]:
    """Peak RSS as weights (the bundle's weight bytes), state (``STATE_COPIES`` x the state at the
    length reached), arena (what the runtime allocated beyond these: peak - baseline - weights -
    state, at least 0) and other (the rest: interpreter, libraries, the baseline)."""
    peak = int(measured["peak_rss_bytes"])
    base = int(measured["baseline_rss_bytes"])
    state = int(measured["state_bytes"])
    arena = max(0, peak - base - weights - state)
    return {"weights": int(weights), "state": state, "arena": arena,
            "other": max(0, peak - weights - state - arena)}


# =============================================================================================
# The whole command
# =============================================================================================
@dataclass
class ProfileOptions:
    backend: str = "ort"
    tokens: int = 128
    prompt_len: int = 16
    threads: int | None = None
    ops: bool = True
    memory_budget: int | None = None
    target_latency_ms: float | None = None
    devices: list[str] = field(default_factory=lambda: ["host"])
    device_paths: list[Path] = field(default_factory=list)


def check_bundle(bundle: str | Path, backend: str) -> Manifest:
    """Fail early, before any child runs: a readable bundle, lowered for ``backend``, with a task
    the profiler drives.

    Raises:
        BundleError: a missing or malformed bundle. ProfileError: wrong backend or task.
    """
    man = read_manifest(bundle)
    if backend not in PROFILED_BACKENDS:
        raise ProfileError(f"unknown backend {backend!r}; known: {', '.join(PROFILED_BACKENDS)}")
    fmt = format_of(backend)
    missing = [n for n, g in man.graphs.items() if fmt not in g.files]
    if missing:
        have = sorted({f for g in man.graphs.values() for f in g.files})
        raise ProfileError(f"{bundle}: graph {missing[0]} was not lowered for {backend} (format "
                           f"{fmt}; bundle has: {', '.join(have) or 'none'})")
    if man.task not in TASKS:
        raise ProfileError(f"{bundle}: task {man.task!r} cannot be profiled; known: "
                           f"{', '.join(TASKS)}")
    return man


def resolve_devices(names: Iterable[str], paths: Iterable[Path] = (),
                    progress: Callable[[str], None] | None = None) -> list[Any]:
    """Device profiles by id or file (``all`` = every known device). An uncalibrated ``host`` is
    calibrated now (1 s of microbenchmarks, cached for later runs).

    Raises:
        DeviceError: an unknown device or a bad file.
    """
    from edgeseq.devices import calibrate_host, get_profile, load_profiles

    extra = list(paths)
    known = load_profiles(extra)
    out = []
    for n in names:
        profs = list(known.values()) if n == "all" else [get_profile(n, extra)]
        for p in profs:
            if p.id == "host" and p.placeholder:
                if progress:
                    progress("calibrating this host (about 1 s; cached, refine with "
                             "`edgeseq devices --calibrate`)")
                p = calibrate_host(seconds_budget=1.0)
            if all(q.id != p.id for q in out):
                out.append(p)
    return out


def host_profile(progress: Callable[[str], None] | None = None) -> Any:
    return resolve_devices(["host"], progress=progress)[0]


def profile(bundle: str | Path, opts: ProfileOptions | None = None,
            progress: Callable[[str], None] | None = None,
            measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure ``bundle`` on this host (unless ``measured`` is given: a previous report's
    ``measured``) and project it onto every device of ``opts.devices``.

    Returns:
        The report (see docs/profile.md): ``device`` and ``projected`` (the first device),
        ``projections`` (all), ``measured``, ``roofline``, ``op_breakdown``.

    Raises:
        BundleError, ProfileError, DeviceError (edgeseq.devices).
    """
    opts = opts or ProfileOptions()
    root = Path(bundle)
    man = check_bundle(root, opts.backend)
    devices = resolve_devices(opts.devices, opts.device_paths, progress)
    host = next((d for d in devices if d.id == "host"), None) or host_profile(progress)
    if measured is None:
        if progress:
            progress(f"measuring {root} on this host ({opts.backend})")
        raw = measure(root, opts.backend, opts.tokens, opts.prompt_len, opts.threads, opts.ops,
                      progress)
    else:
        raw = dict(measured)
        if raw.get("backend", opts.backend) != opts.backend or "graphs" not in raw or \
                set(raw["graphs"]) - set(man.graphs):
            raise ProfileError(f"the given measurement is not of {root} on {opts.backend} "
                               f"(it ran on {raw.get('backend')}, graphs "
                               f"{', '.join(raw.get('graphs') or []) or 'none'})")
    costs = analyze(root, raw)
    weights = weight_bytes(root, opts.backend)
    raw["memory"] = memory_split(raw, weights)
    specs = next((g.state for g in man.graphs.values() if g.state), [])
    raw["state_bytes_per_position"] = STATE_COPIES * sum(
        s.nbytes({"batch": 1, "past": 1, "source": 0}) - s.nbytes({"batch": 1, "past": 0,
                                                                     "source": 0})
        for s in specs)
    eff = host_efficiency(costs, raw, host)
    scheme = _scheme(man)
    from edgeseq.devices import load_profiles

    known = list(load_profiles(opts.device_paths).values())
    projections = [project(raw, costs, eff, d, man.task, opts.backend, opts.memory_budget,
                           opts.target_latency_ms, scheme, known) for d in devices]
    ops = raw.pop("op_breakdown", None)
    note = raw.pop("op_breakdown_note", None)
    return {"schema": SCHEMA, "bundle": str(root), "family": man.family, "task": man.task,
            "backend": opts.backend, "scheme": scheme,
            "settings": {"tokens": opts.tokens, "prompt_len": opts.prompt_len,
                         "threads": raw.get("threads"), "ops": opts.ops},
            "device": devices[0].summary(), "host": host.summary(),
            "measured": _measured_view(raw),
            "projected": projections[0], "projections": projections,
            "devices": [d.summary() for d in devices],
            "roofline": {n: {**c.to_json(), **eff[n]} for n, c in costs.items()},
            "op_breakdown": ops, "op_breakdown_note": note}


def _measured_view(raw: dict[str, Any]) -> dict[str, Any]:
    """The report's ``measured``: the raw measurement plus the step-latency percentiles."""
    steps = raw.get("steps_ms") or []
    view = {k: v for k, v in raw.items() if k not in ("steps_ms", "pid")}
    view.update(step_ms_p50=_pct(steps, 50), step_ms_p95=_pct(steps, 95),
                step_ms_mean=float(np.mean(steps)) if steps else None, steps_ms=steps)
    return view


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) >= 4 and argv[1] == "--worker":
        return _worker_main(argv[1:])
    print("usage: edgeseq profile BUNDLE (this module's command line is internal)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
