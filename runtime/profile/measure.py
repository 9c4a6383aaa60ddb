"""Stage 1 of ``edgeseq profile``: the workload drivers run in a child process (load time,
prefill/encoder latency, per-step latencies, tokens/s or real-time factor, peak RSS)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from edgeseq.bundle import Manifest, read_manifest
from edgeseq.runtime.cost import resident_state_bytes


_PROGRESS_EVERY_S = 1.0


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


def drive_causal_lm(sess: Any, log: _CallLog, a: dict, emit: Callable) -> dict[str, Any]:
    """The causal-LM workload (a profile driver, ``edgeseq/tasks/``): a synthetic prompt of
    ``a["prompt_len"]`` tokens, then ``a["tokens"]`` decode steps; ``a["light"]``: no warm-up
    and no repeats (the per-operator run)."""
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


def drive_seq2seq(sess: Any, log: _CallLog, a: dict, emit: Callable) -> dict[str, Any]:
    """The encoder-decoder workload: one source (synthetic ids, or a window of synthetic audio
    for speech) encoded, then ``a["tokens"]`` decoder steps."""
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


def drive_classification(sess: Any, log: _CallLog, a: dict, emit: Callable) -> dict[str, Any]:
    """The classifier workload: ``a["tokens"]`` random frames pushed one by one, then the same
    frames in chunks."""
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


def _import_backend(backend: str) -> None:
    """Import the backend's libraries before the baseline RSS is taken, so that they count as
    ``other`` rather than as arena."""
    from edgeseq.registry import get_backend

    get_backend(backend).import_runtime()


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
    from edgeseq.registry import get_backend

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
    res = sess.task.part("profile_driver")(sess, log, {"tokens": tokens,
                                                       "prompt_len": prompt_len}, emit)
    peak = _rss("VmHWM")
    res.update(load_ms=load_ms, baseline_rss_bytes=baseline, after_load_rss_bytes=after_load,
               peak_rss_bytes=peak, end_rss_bytes=_rss(), graphs=log.summary(),
               state_bytes=resident_state_bytes(man, res.pop("state_dims")), backend=backend,
               threads=get_backend(backend).threads(threads),
               pid=os.getpid())
    return res
