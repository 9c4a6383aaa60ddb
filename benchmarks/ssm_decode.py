"""Greedy decode speed and peak memory of a Mamba with the 130M shape, side by side.

Engines, each in its own process (so peak RSS is its own), same prompt, same random weights:
transformers eager (``MambaForCausalLM.generate``), edgeseq ONNX Runtime, edgeseq ExecuTorch.
The table also shows the host's bandwidth limit: bytes read per token / measured read bandwidth.

    ./dev bench ssm_decode              # the 130M shape (d_model 768, 24 layers, vocab 50280)
    ./dev bench ssm_decode --small      # a quick run on a small shape
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE_130M = dict(hidden_size=768, num_hidden_layers=24, vocab_size=50280, state_size=16,
                  expand=2, conv_kernel=4)
SHAPE_SMALL = dict(hidden_size=256, num_hidden_layers=4, vocab_size=4096, state_size=16,
                   expand=2, conv_kernel=4)


def peak_rss_bytes() -> int:
    """This process's peak RSS. (ru_maxrss survives exec, so a worker would report its parent's
    peak; VmHWM belongs to the process's own address space.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_checkpoint(folder: Path, shape: dict) -> None:
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**shape, eos_token_id=0, bos_token_id=0, pad_token_id=0))
    model.save_pretrained(folder, safe_serialization=True)


def worker(engine: str, ckpt: Path, bundle: Path, prompt: list[int], n: int, threads: int) -> dict:
    """Decode in this process; report tokens/s (after the first token) and peak RSS."""
    import torch

    torch.set_num_threads(threads)
    if engine == "transformers":
        from transformers import GenerationConfig, MambaForCausalLM

        model = MambaForCausalLM.from_pretrained(ckpt).eval()
        ids = torch.tensor([prompt])
        gen = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, generation_config=gen, max_new_tokens=4)  # warm-up
            t0 = time.perf_counter()
            model.generate(ids, generation_config=gen, max_new_tokens=1)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, generation_config=gen, max_new_tokens=n)
            total = time.perf_counter() - t0
        tokens = out[0, len(prompt):].tolist()
        tps = (n - 1) / max(total - first, 1e-9)
        return {"tokens_per_s": tps, "first_token_ms": first * 1e3, "tokens": tokens,
                "peak_rss": peak_rss_bytes()}
    import edgeseq
    from edgeseq.runtime.streaming import timed_stream

    sess = edgeseq.load(bundle, backend=engine, threads=threads)
    timed_stream(sess, prompt, 4)  # warm-up
    res = timed_stream(sess, prompt, n, stop_at_eos=False)
    return {"tokens_per_s": res.tokens_per_s, "first_token_ms": res.first_token_ms,
            "step_ms_p50": res.step_ms_p50, "tokens": res.tokens, "peak_rss": peak_rss_bytes()}


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Bytes/s of a streaming read (a sum over 1 GiB, as many threads as decoding uses)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def bytes_per_token(ckpt: Path, shape: dict) -> int:
    """Weights read once per token (the tied embedding is read by the LM head) plus state
    read and written."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        weights = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                      else _numel(f.get_slice(k).get_shape()) for k in f.keys()) * 4
    e = shape["expand"] * shape["hidden_size"]
    state = shape["num_hidden_layers"] * e * (shape["state_size"] + shape["conv_kernel"] - 1) * 4
    return weights + 2 * state


def _numel(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a small shape for a quick check")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--engines", default="transformers,ort,executorch")
    ap.add_argument("--workdir", type=Path, default=None, help="keep checkpoint and bundle here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kw = json.loads(a.args)
        res = worker(a.worker, Path(kw["ckpt"]), Path(kw["bundle"]), kw["prompt"], kw["n"],
                     kw["threads"])
        print("RESULT " + json.dumps(res))
        return

    from edgeseq.quiet import quiet_third_party

    quiet_third_party()
    shape = SHAPE_SMALL if a.small else SHAPE_130M
    work = a.workdir or Path(tempfile.mkdtemp(prefix="edgeseq-bench-"))
    ckpt, bundle = work / "ckpt", work / "bundle"
    engines = a.engines.split(",")
    if not (ckpt / "model.safetensors").exists():
        print(f"making a random Mamba {shape} in {ckpt}", file=sys.stderr)
        make_checkpoint(ckpt, shape)
    if not (bundle / "manifest.json").exists():
        from edgeseq.convert.pipeline import convert

        fmts = tuple(f for e, f in (("ort", "onnx"), ("executorch", "pte")) if e in engines)
        convert(ckpt, bundle, formats=fmts, parity_tokens=8,
                progress=lambda m: print(m, file=sys.stderr))
    prompt = list(range(1, 17))
    rows = {}
    for eng in engines:
        args = json.dumps({"ckpt": str(ckpt), "bundle": str(bundle), "prompt": prompt,
                           "n": a.tokens, "threads": a.threads})
        out = subprocess.run([sys.executable, __file__, "--worker", eng, "--args", args],
                             capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{eng} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[eng] = json.loads(line[0][7:])
    bw = read_bandwidth(a.threads)
    bpt = bytes_per_token(ckpt, shape)
    limit = bw / bpt
    base = rows.get("transformers", {}).get("tokens_per_s")
    ref_tokens = rows.get("transformers", {}).get("tokens")
    print(f"\nMamba {shape['hidden_size']}d x {shape['num_hidden_layers']} layers, vocab "
          f"{shape['vocab_size']}; {a.tokens} greedy tokens after a {len(prompt)}-token prompt; "
          f"{a.threads} threads")
    print(f"host read bandwidth {bw / 1e9:.1f} GB/s; bytes read per token {bpt / 1e6:.0f} MB; "
          f"bandwidth limit {limit:.1f} tokens/s\n")
    print("| engine | tokens/s | vs transformers | % of bandwidth limit | first token ms | "
          "peak RSS MB | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for eng, r in rows.items():
        speed = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        same = "ref" if eng == "transformers" else (str(r["tokens"] == ref_tokens) if ref_tokens else "-")
        print(f"| {eng} | {r['tokens_per_s']:.1f} | {speed} | {100 * r['tokens_per_s'] / limit:.0f}% "
              f"| {r['first_token_ms']:.1f} | {r['peak_rss'] / 1e6:.0f} | {same} |")


if __name__ == "__main__":
    main()
