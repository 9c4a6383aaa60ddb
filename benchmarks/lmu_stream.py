"""LMUFormer streaming: the O(1)-per-frame step graph against recomputing the prefix at each frame.

Without a streaming graph, a user who wants LMUFormer's prediction after every frame runs the
parallel model (FFT memory) over the growing prefix each time: frame t costs O(t log t). edgeseq's
step graph carries every causal quantity as state, so each frame costs the same. For each model
and each sequence length L (64, 256, 1024), on the same random input (batch 1, fp32, CPU):

    recompute prefix (PyTorch)   ``model(x[:, :t + 1])`` (the prediction after frame t) for each t
    edgeseq step (PyTorch)       ``LMUFormerStream(model, k=1)``, one call per frame
    edgeseq step (ORT)           the step graph lowered to ONNX (``step.onnx``), ONNX Runtime
    edgeseq step (ExecuTorch)    the step graph lowered to ExecuTorch/XNNPACK (``model.pte``)

Columns:

* per-frame latency: mean wall time of one call. The step graph runs the L frames plus its
  ``lookahead`` flush frames, each call timed; the recompute baseline costs O(t) at frame t, so
  at large L it is timed on a subset of frames evenly spread over the sequence (its mean estimates
  the mean over all L frames; the row's note says how many).
* MACs/frame: analytic multiply-accumulates of the matrix products (convolutions, linears, the
  LMU memory update, the FFT convolution), averaged over the L frames; elementwise work
  (activations, batch-norm affines, LIF updates) is left out: O(channels) per frame. A real FFT
  of length N is counted as N log2 N MACs. The baseline is counted with the filter's transform
  cached (as the official ``fft_H`` buffer), a lower bound: edgeseq's reference caches the
  impulse response but transforms it (in float64) at every call, which its latency includes.
* state bytes: the step graph's state (sum of its StateSpecs, batch 1); for the baseline, the
  prefix of input frames it must keep (L x features x 4 bytes at the last frame), activations
  not counted.
* max |dlogits|: the final prediction (after the flush frames) against the parallel model on
  the whole sequence. Spiking models may differ where a membrane sits on its threshold.

The step graph's prediction for frame t comes ``lookahead`` frames later (its centred kernel-3
convolutions look one frame ahead each); the baseline has no such delay but pays the prefix.

Bundles: only the step graph is lowered, through the same backends ``edgeseq convert`` uses
(``convert`` also lowers the chunk graph, which would double the build time here). The ONNX
Runtime session uses the options of edgeseq's ORT backend (no arena, denormals flushed).

    ./dev bench lmu_stream                # Speech Commands-like shapes, L in 64, 256, 1024
    ./dev bench lmu_stream --small        # tiny shapes, L in 16, 32: a quick check
    ./dev bench lmu_stream --engines torch --workdir /tmp/lmu   # PyTorch rows only
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ENGINES = ("torch", "ort", "executorch")
LABELS = {"recompute": "recompute prefix (PyTorch)", "torch": "edgeseq step (PyTorch)",
          "ort": "edgeseq step (ORT)", "executorch": "edgeseq step (ExecuTorch)"}

# Speech Commands as in the LMUFormer paper (40 mel features, 35 classes), scaled to a 1024-frame
# window; memory_size is left at its default (embed_dims; twice that for the spiking model)
FULL = dict(in_channels=40, embed_dims=128, depths=2, num_classes=35, mlp_ratio=4.0,
            theta=1024.0, seq_len=1024, input_frames=1024)
SMALL = dict(in_channels=8, embed_dims=16, depths=2, num_classes=5, mlp_ratio=2.0,
             theta=32.0, seq_len=32, input_frames=32)
# at most this many recompute frames per (model, L): the baseline's cost grows with L^2
RECOMPUTE_FRAMES = {False: 64, True: 6}


@dataclass
class Row:
    model: str
    engine: str
    length: int
    ms: float | None = None
    macs: float | None = None
    state_bytes: int | None = None
    diff: float | None = None
    note: str = ""


# -- analytic MAC counts -----------------------------------------------------------------------
def conv_macs(c: Any) -> int:
    """Per frame, the patch embedding: a chain of kernel-3 convolutions (the first from the input
    features, the others embed -> embed; the residual positional conv included)."""
    from edgeseq.families.lmu import lookahead

    n_conv = lookahead(c)  # one frame of lookahead per centred convolution
    return 3 * c.in_channels * c.embed_dims + (n_conv - 1) * 3 * c.embed_dims ** 2


def block_linear_macs(c: Any) -> int:
    """Per frame and block, everything but the memory: W_u (e -> 1), W_h ([m; x] -> e), the
    mixer's 1x1 projection, the FFN's two 1x1 convolutions."""
    e, d, h = c.embed_dims, c.memory, c.hidden
    return e + (d + e) * e + e * e + 2 * e * h


def fft_macs(n: int, d: int) -> float:
    """The parallel memory over n frames: rfft of u (1 channel) and irfft of d channels, both of
    length 2n, and the (n + 1) x d complex products (4 real MACs each)."""
    big = 2 * n
    fft = big * math.log2(big)
    return fft + d * fft + 4 * d * (n + 1)


def step_macs(c: Any) -> int:
    """One call of the k=1 step graph: convolution windows, then per block the linears and the
    memory update m <- A m + B u (d^2 + d), then the head on the running mean."""
    d = c.memory
    return (conv_macs(c) + c.depths * (block_linear_macs(c) + d * d + d)
            + c.embed_dims * c.num_classes)


def recompute_macs(c: Any, n: int) -> float:
    """The parallel model over an n-frame prefix, predicting after its last frame."""
    return (n * conv_macs(c) + c.depths * (n * block_linear_macs(c) + fft_macs(n, c.memory))
            + c.embed_dims * c.num_classes)


# -- engines -----------------------------------------------------------------------------------
def build_step(ckpt: Path, out: Path, engine: str) -> Path:
    """Lower the model's k=1 step graph for ``engine`` into ``out``; returns the file to load."""
    from edgeseq.families.lmu import LMUFormerFamily
    from edgeseq.registry import get_backend

    name = {"ort": "ort", "executorch": "executorch"}[engine]
    file = out / ("step.onnx" if engine == "ort" else "model.pte")
    if file.exists():
        return file
    backend = get_backend(name)
    why = backend.available()
    if why:
        raise RuntimeError(why)
    fam = LMUFormerFamily()
    graph = fam.graphs(fam.load(ckpt))["step"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    backend.lower({"step": graph}, tmp, "fp32")
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():  # a half-written export never looks built
        f.replace(out / f.name)
    tmp.rmdir()
    return file


def stepper(engine: str, model: Any, file: Path | None, threads: int
            ) -> tuple[Callable[..., tuple[Any, list]], list]:
    """A function (frame (1, 1, f) float32 numpy, valid (1, 1), state) -> (logits (classes,),
    new state) for one engine, and its zero initial state."""
    import numpy as np
    import torch

    from edgeseq.families.lmu import LMUFormerStream, state_specs

    specs = state_specs(model.config)
    zeros = [s.allocate({"batch": 1}) for s in specs]
    if engine == "torch":
        stream = LMUFormerStream(model, 1).eval()

        def run_torch(frame: np.ndarray, valid: np.ndarray, state: list) -> tuple[Any, list]:
            out = stream(torch.from_numpy(frame), torch.from_numpy(valid), *state)
            return out[0][0, 0], list(out[2:])

        return run_torch, [torch.from_numpy(z) for z in zeros]
    if engine == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # as edgeseq's ORT backend: no arena, and decaying memories never hit denormal slow paths
        opts.enable_cpu_mem_arena = False
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        sess = ort.InferenceSession(str(file), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
        in_names = [s.input_name for s in specs]
        out_names = ["logits", "ready"] + [s.output_name for s in specs]

        def run_ort(frame: np.ndarray, valid: np.ndarray, state: list) -> tuple[Any, list]:
            feeds = {"frames": frame, "valid": valid, **dict(zip(in_names, state))}
            out = sess.run(out_names, feeds)
            return out[0][0, 0], out[2:]

        return run_ort, zeros
    from executorch.runtime import Runtime

    try:  # XNNPACK's pool defaults to every core; hold it to --threads as the other engines
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)
    except (ImportError, RuntimeError):
        pass
    program = Runtime.get().load_program(file)
    try:  # XNNPACK's cpuinfo probe logs to fd 2 on first use; edgeseq's runtime holds it back
        from edgeseq.runtime.backends.executorch.run import captured_stderr as _captured_stderr
    except ImportError:
        from contextlib import nullcontext as _captured_stderr
    with _captured_stderr():
        method = program.load_method("step")

    def run_et(frame: np.ndarray, valid: np.ndarray, state: list) -> tuple[Any, list]:
        out = method.execute([torch.from_numpy(frame), torch.from_numpy(valid), *state])
        # outputs live in the method's planned memory, which the next call overwrites: copy
        return out[0][0, 0].clone(), [t.clone() for t in out[2:]]

    run_et.program = program  # type: ignore[attr-defined]  # the method reads the program's memory
    return run_et, [torch.from_numpy(z) for z in zeros]


def time_stream(run: Callable[..., tuple[Any, list]], state0: list, x: Any, lookahead: int
                ) -> tuple[float, float, Any]:
    """Stream x (1, L, f) then ``lookahead`` flush frames; mean and median ms per call, and the
    final logits."""
    import numpy as np

    frames = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    n, f = frames.shape[1], frames.shape[2]
    one, zero = np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32)
    flush = np.zeros((1, 1, f), np.float32)
    state = list(state0)
    # warm-up on a throwaway stream: first calls allocate and (ORT, XNNPACK) pack weights
    warm = list(state0)
    for i in range(min(n, 4)):
        _, warm = run(frames[:, i:i + 1], one, warm)
    times = []
    logits = None
    for i in range(n + lookahead):
        frame, valid = (frames[:, i:i + 1], one) if i < n else (flush, zero)
        t0 = time.perf_counter()
        logits, state = run(frame, valid, state)
        times.append(time.perf_counter() - t0)
    return (1e3 * sum(times) / len(times), 1e3 * statistics.median(times),
            np.asarray(logits, dtype=np.float64))


def time_recompute(model: Any, x: Any, max_frames: int) -> tuple[float, float, list[int]]:
    """Mean ms of ``model(x[:, :t + 1])`` over up to ``max_frames`` frames t spread evenly (the
    centre of each of ``max_frames`` equal slices, so the mean prefix is L / 2 as over all)."""
    n = x.shape[1]
    k = min(n, max_frames)
    ts = [int((i + 0.5) * n / k) for i in range(k)]
    model(x[:, :2])  # warm-up
    times = []
    for t in ts:
        t0 = time.perf_counter()
        model(x[:, :t + 1])
        times.append(time.perf_counter() - t0)
    return 1e3 * sum(times) / len(times), 1e3 * statistics.median(times), ts


# -- the run -----------------------------------------------------------------------------------
def measure(name: str, ckpt: Path, build: Path, lengths: list[int], engines: list[str],
            x_all: Any, small: bool, threads: int, say: Callable[[str], None]) -> list[Row]:
    import numpy as np
    import torch

    from edgeseq.families.lmu import LMUFormerFamily, lookahead, state_specs

    model = LMUFormerFamily().load(ckpt)
    c = model.config
    la = lookahead(c)
    state_bytes = sum(s.nbytes({"batch": 1}) for s in state_specs(c))
    runners: dict[str, tuple[Callable[..., tuple[Any, list]], list] | str] = {}
    for eng in engines:
        try:
            file = None
            if eng != "torch":
                t0 = time.perf_counter()
                say(f"{name}: lowering the step graph for {eng} ...")
                file = build_step(ckpt, build / eng, eng)
                say(f"  ({time.perf_counter() - t0:.0f} s)")
            runners[eng] = stepper(eng, model, file, threads)
        except Exception as e:  # a backend that cannot lower or load: report it in the table
            first = str(e).splitlines()[0][:120] if str(e) else ""
            runners[eng] = f"n/a ({type(e).__name__}: {first})"
    rows = []
    for L in lengths:
        x = x_all[:, :L]
        with torch.inference_mode():
            ref = model(x)[0].double().numpy()
            say(f"{name}: L={L}, recompute prefix ...")
            ms, med, ts = time_recompute(model, x, RECOMPUTE_FRAMES[small])
        macs = sum(recompute_macs(c, t + 1) for t in range(L)) / L
        # its median is not comparable across L (cost grows with t): only the step rows show one
        note = "all frames" if len(ts) == L else f"{len(ts)} of {L} frames, evenly spread"
        rows.append(Row(name, LABELS["recompute"], L, ms, macs, L * c.in_channels * 4, 0.0, note))
        for eng in engines:
            r = runners[eng]
            if isinstance(r, str):
                rows.append(Row(name, LABELS[eng], L, note=r))
                continue
            say(f"{name}: L={L}, {LABELS[eng]} ...")
            with torch.inference_mode():
                ms, med, logits = time_stream(r[0], r[1], x, la)
            # the median beside the mean: on a shared host, preempted calls inflate the mean
            rows.append(Row(name, LABELS[eng], L, ms, float(step_macs(c)), state_bytes,
                            float(np.abs(logits - ref).max()),
                            f"{L + la} calls ({la} flush), median {med:.3f} ms"))
    return rows


def fmt_macs(m: float | None) -> str:
    if m is None:
        return "-"
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if m >= k:
            return f"{m / k:.2f} {unit}"
    return f"{m:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true",
                    help="tiny shapes, L in 16 and 32, a few recompute frames: a quick check")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of every engine (default 1: one stream on one core)")
    ap.add_argument("--lengths", default=None, help="comma-separated L (64,256,1024; 16,32 small)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="step-graph engines (the recompute baseline always runs)")
    ap.add_argument("--models", default="lmuformer,spiking")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep checkpoints and lowered graphs here (reused when present)")
    a = ap.parse_args()
    engines = [e for e in a.engines.split(",") if e]
    for e in engines:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r}; known: {', '.join(ENGINES)}")
    models = [m for m in a.models.split(",") if m]
    for m in models:
        if m not in ("lmuformer", "spiking"):
            ap.error(f"unknown model {m!r}; known: lmuformer, spiking")
    lengths = [int(v) for v in (a.lengths or ("16,32" if a.small else "64,256,1024")).split(",")]

    from edgeseq.quiet import quiet_third_party

    quiet_third_party()
    import torch

    torch.set_num_threads(a.threads)
    # LMU memories and membranes decay: flush denormals in PyTorch too, as the ORT session does
    torch.set_flush_denormal(True)
    from edgeseq.families.lmu import LMUFormerFamily

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="edgeseq-lmu-"))
    shape = SMALL if a.small else FULL
    g = torch.Generator().manual_seed(0)
    # one input for every model, engine and L (each L reads its first L frames); [0, 1) as the
    # family's parity inputs, a range where the spiking model's neurons fire
    x_all = torch.rand(1, max(lengths), shape["in_channels"], generator=g)
    rows: list[Row] = []
    configs = {}
    try:
        for name in models:
            spiking = name == "spiking"
            base = work / f"{name}-{'small' if a.small else 'full'}"
            ckpt = base / "ckpt"
            if not (ckpt / "model.safetensors").exists():
                say(f"making a random {name} LMUFormer in {ckpt}")
                LMUFormerFamily().make_test_checkpoint(ckpt, seed=0, spiking=spiking, **shape)
            rows += measure(name, ckpt, base, lengths, engines, x_all, a.small, a.threads, say)
            configs[name] = LMUFormerFamily().load(ckpt).config
    finally:
        if a.workdir is None:  # nothing to keep: checkpoints and graphs are rebuilt each time
            shutil.rmtree(work, ignore_errors=True)

    print("\nLMUFormer streaming, per frame: edgeseq step graph vs recomputing the prefix "
          "(batch 1, fp32, CPU, random weights and input). The recompute baseline runs "
          "model(x[:, :t+1]) at frame t, timed on at most "
          f"{RECOMPUTE_FRAMES[a.small]} frames evenly spread over each sequence; the step graph "
          "runs every frame plus its lookahead flush frames (its prediction for frame t comes "
          "lookahead frames later).")
    for name, c in configs.items():
        print(f"- {name}: in_channels={c.in_channels} embed_dims={c.embed_dims} depths={c.depths} "
              f"memory={c.memory} hidden={c.hidden} theta={c.theta:g} "
              f"num_classes={c.num_classes} spiking={c.spiking}")
    print(f"- host: {platform.machine()}, {os.cpu_count()} CPUs, {a.threads} thread(s) per engine; "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at the start, "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end; "
          f"total wall time {time.perf_counter() - t_start:.0f} s; torch {torch.__version__}"
          + "".join(f", {m} {v}" for m, v in versions().items()))
    print("- MACs: matrix products only (convs, linears, LMU memory update, FFT as N log2 N per "
          "real transform, with the filter's transform cached); state: step-graph state, or the "
          "baseline's buffered input prefix.\n")
    print("| model | engine | L | per-frame latency ms | MACs/frame | state bytes | "
          "max abs dlogits | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = f"{r.ms:.3f}" if r.ms is not None else "-"
        sb = str(r.state_bytes) if r.state_bytes is not None else "-"
        diff = "ref" if r.engine == LABELS["recompute"] else (f"{r.diff:.1e}" if r.diff is not None
                                                               else "-")
        print(f"| {r.model} | {r.engine} | {r.length} | {ms} | {fmt_macs(r.macs)} | {sb} | "
              f"{diff} | {r.note} |")

    print("\nRatios, recompute prefix / step graph (> 1: streaming is cheaper):")
    for name in configs:
        for L in lengths:
            by = {r.engine: r for r in rows if r.model == name and r.length == L}
            base = by[LABELS["recompute"]]
            parts = []
            for eng in engines:
                r = by[LABELS[eng]]
                if r.ms:
                    parts.append(f"latency vs {eng} {base.ms / r.ms:.1f}x")
            parts.append(f"MACs {base.macs / step_macs(configs[name]):.1f}x")
            print(f"- {name}, L={L}: " + ", ".join(parts))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for m in ("onnxruntime", "executorch"):
        try:
            out[m] = version(m)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    main()
