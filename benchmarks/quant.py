"""Quantization: what each scheme saves and what it costs, per family, measured side by side.

Three parts, all on ONNX Runtime (the backend the int schemes target so far), 1 process:

1. Zoo models (``mamba-bytes``, ``lmuformer-digits``, ``slmuformer-digits``) x schemes (fp32,
   fp16, int8, int4): weight bytes vs fp32, speed vs fp32 (greedy tokens/s after a 16-token
   prompt; ms per frame for the classifiers), and the accuracy-gate metrics against the fp32
   PyTorch model (next-token agreement and KL over 1024 tokens of the Zen of Python for the
   language model; accuracy on the 360 held-out digits for the classifiers). The deliberately
   damaging ``int4-tensor`` (one scale per matrix) is converted too: the gate should refuse it.
2. The Mamba-130M shape (random weights): fp32 vs int8 vs int4 weight bytes and decode tokens/s
   (the issue's speed target: int8 >= 2x fp32).
3. Long stream: ``mamba-bytes`` teacher-forced over 20,000 bytes of the standard library's
   sources; next-token agreement and KL of each quantized bundle against the fp32 bundle in the
   first and the last 1,000 tokens (state drift shows as a worse last window).

    ./dev bench quant            # all three parts (~5 min on 2 cores)
    ./dev bench quant --small    # part 1 on the LM only, small part 2, 2,000-token stream
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMES = ("fp32", "fp16", "int8", "int4")
SHAPE_130M = dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24,
                  expand=2, conv_kernel=4)
SHAPE_SMALL = dict(vocab_size=4096, hidden_size=256, state_size=16, num_hidden_layers=4,
                   expand=2, conv_kernel=4)


def convert_scheme(src: str | Path, out: Path, scheme: str, **kw: Any) -> tuple[Path | None, str]:
    from edgeseq.bundle import BundleError
    from edgeseq.convert.pipeline import convert

    args: dict[str, Any] = {"formats": ("onnx",), "overwrite": True}
    if scheme == "fp16":
        args["dtype"] = "fp16"
    elif scheme != "fp32":
        args["quant"] = scheme
    args.update(kw)
    try:
        return convert(src, out, **args), ""
    except BundleError as e:
        return None, str(e).split(": --quant")[-1][:160]


def weight_bytes(bundle: Path) -> int:
    from edgeseq.bundle import read_manifest
    from edgeseq.quant.onnx import weight_bytes_by_dtype

    man = read_manifest(bundle)
    files = sorted({g.files["onnx"] for g in man.graphs.values()})
    return sum(weight_bytes_by_dtype(bundle, files).values())


def lm_speed(bundle: Path, n: int = 64) -> float:
    import edgeseq
    from edgeseq.runtime.streaming import timed_stream

    sess = edgeseq.load(bundle, backend="ort", threads=1)
    prompt = list(range(40, 56))
    timed_stream(sess, prompt, 4)
    return max(timed_stream(sess, prompt, n, stop_at_eos=False).tokens_per_s for _ in range(3))


def classifier_ms(bundle: Path, x: np.ndarray) -> float:
    import edgeseq

    sess = edgeseq.load(bundle, backend="ort", threads=1)
    sess.classify(x[0])
    t = time.perf_counter()
    for seq in x[:50]:
        sess.classify(seq)
    return (time.perf_counter() - t) * 1e3 / (50 * x.shape[1])


def part_zoo(small: bool, work: Path) -> list[str]:
    from edgeseq import zoo
    from edgeseq.quant import gates
    from edgeseq.registry import get_family
    from edgeseq.tokenize import detect, load as load_tok
    from edgeseq.zoo.train_lmuformer_digits import load_data

    _, _, x_test, y_test = load_data()
    np.savez(work / "digits_test.npz", x=x_test.numpy(), y=y_test.numpy())
    rows = ["| model | scheme | weights KB | vs fp32 | speed | vs fp32 | gate metrics | gate |",
            "|---|---|---|---|---|---|---|---|"]
    models = ["mamba-bytes"] if small else ["mamba-bytes", "lmuformer-digits", "slmuformer-digits"]
    for name in models:
        path = zoo.resolve(f"zoo:{name}")
        fam = get_family("mamba" if name == "mamba-bytes" else "lmuformer")
        model = fam.load(path)
        base_b = base_s = None
        for scheme in (*SCHEMES, "int4-tensor"):
            print(f"{name}: {scheme} ...", file=sys.stderr)
            kw: dict[str, Any] = {}
            if fam.task == "classification" and scheme not in ("fp32", "fp16"):
                kw["eval_file"] = work / "digits_test.npz"
            b, why = convert_scheme(f"zoo:{name}", work / f"{name}-{scheme}", scheme, **kw)
            if b is None:
                rows.append(f"| {name} | {scheme} | - | - | - | - | {why} | **refused** |")
                continue
            wb = weight_bytes(b)
            if fam.task == "classification":
                speed = classifier_ms(b, x_test.numpy())
                res = gates.classifier_gate(fam, model, b, "ort", work / "digits_test.npz")
                metrics = f"accuracy {res['accuracy']:.4f} (fp32 {res['accuracy_fp32']:.4f})"
                unit = "ms/frame"
            else:
                speed = lm_speed(b)
                tok = load_tok(path, detect(path))
                res = gates.lm_gate(fam, model, b, "ort", tok, 256)
                metrics = f"agreement {res['agreement']:.4f}, KL {res['kl_mean']:.4f}"
                unit = "tok/s"
            if scheme == "fp32":
                base_b, base_s = wb, speed
            ratio_s = (base_s / speed) if fam.task == "classification" else (speed / base_s)
            rows.append(f"| {name} | {scheme} | {wb / 1e3:.0f} | {base_b / wb:.2f}x smaller | "
                        f"{speed:.3f} {unit} | {ratio_s:.2f}x | {metrics} | "
                        f"{'passed' if res['passed'] else 'failed'} |")
    return rows


def part_130m(small: bool, work: Path) -> list[str]:
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    shape = SHAPE_SMALL if small else SHAPE_130M
    ckpt = work / "mamba-shape"
    if not (ckpt / "model.safetensors").exists():
        torch.manual_seed(0)
        MambaForCausalLM(MambaConfig(**shape, eos_token_id=0, bos_token_id=0, pad_token_id=0)
                         ).save_pretrained(ckpt, safe_serialization=True)
    rows = [f"Mamba shape {shape} (random weights), ORT, 1 thread, 64 greedy tokens:", "",
            "| scheme | weights MB | vs fp32 | tokens/s | vs fp32 |", "|---|---|---|---|---|"]
    base_b = base_s = None
    for scheme in ("fp32", "int8", "int4"):
        print(f"mamba shape: {scheme} ...", file=sys.stderr)
        # random weights: the gate's agreement means little here; part 1 measures accuracy
        b, why = convert_scheme(ckpt, work / f"shape-{scheme}", scheme, skip_parity=True)
        wb, sp = weight_bytes(b), lm_speed(b, 32)
        if scheme == "fp32":
            base_b, base_s = wb, sp
        rows.append(f"| {scheme} | {wb / 1e6:.1f} | {base_b / wb:.2f}x smaller | {sp:.1f} | "
                    f"{sp / base_s:.2f}x |")
    return rows


def stdlib_bytes(n: int) -> list[int]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[int] = []
    for f in sorted(root.glob("*.py")):
        out += list(f.read_bytes())
        if len(out) >= n:
            break
    return out[:n]


def part_stream(small: bool, work: Path) -> list[str]:
    import edgeseq

    n = 2000 if small else 20000
    win = min(1000, n // 4)
    ids = stdlib_bytes(n)
    outs = {}
    for scheme in ("fp32", "int8", "int4"):
        print(f"long stream: {scheme} ({n} tokens) ...", file=sys.stderr)
        b = work / f"mamba-bytes-{scheme}"
        if not (b / "manifest.json").exists():
            convert_scheme("zoo:mamba-bytes", b, scheme)
        sess = edgeseq.load(b, backend="ort", threads=1)
        first = sess.prefill(np.array([ids[:16]], dtype=np.int64))[0][-1:]
        logits = [first]
        for t in ids[16:]:
            logits.append(sess.step(np.array([t], dtype=np.int64)))
        outs[scheme] = np.concatenate(logits)
    ref = outs["fp32"]
    rows = [f"mamba-bytes, teacher-forced over {n} bytes of stdlib sources, against the fp32 bundle:",
            "", "| scheme | agreement first {0} | KL first {0} | agreement last {0} | KL last {0} |"
            .format(win), "|---|---|---|---|---|"]

    def ls(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    for scheme in ("int8", "int4"):
        q = outs[scheme]
        cells = []
        for sl in (slice(0, win), slice(len(ref) - win, len(ref))):
            lp, lq = ls(ref[sl]), ls(q[sl])
            agree = float((ref[sl].argmax(-1) == q[sl].argmax(-1)).mean())
            kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
            cells += [f"{agree:.4f}", f"{kl:.5f}"]
        rows.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--parts", default="zoo,shape,stream")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from edgeseq.quiet import quiet_third_party

    quiet_third_party()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="edgeseq-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    out = []
    parts = a.parts.split(",")
    if "zoo" in parts:
        out += ["### Zoo models", ""] + part_zoo(a.small, work) + [""]
    if "shape" in parts:
        out += ["### Decode speed at the Mamba-130M shape", ""] + part_130m(a.small, work) + [""]
    if "stream" in parts:
        out += ["### Long stream: state drift", ""] + part_stream(a.small, work) + [""]
    load = os.getloadavg()[0]
    out.append(f"ONNX Runtime, 1 thread; {os.cpu_count()} CPUs, load average {load:.2f}; "
               f"total {time.time() - t0:.0f} s")
    print("\n".join(out))


if __name__ == "__main__":
    main()
