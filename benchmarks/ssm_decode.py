"""Greedy decode speed and peak memory of a Mamba with the 130M shape, side by side.

Engines, each in its own process (so peak RSS is its own), same prompt, same random weights:
transformers eager (``MambaForCausalLM.generate``), edgeseq ONNX Runtime fp32 / int8 / int4,
edgeseq ExecuTorch, and llama.cpp (``benchmarks/llamacpp.py``: built from source, the same
checkpoint converted to GGUF f32 and quantized to Q8_0 / Q4_0). Every engine runs at each thread
count; the rows alternate (edgeseq, llama.cpp, edgeseq, ...) and each round reverses the order,
so a slow spell of the shared host does not fall on one engine; tokens/s is the best of the
rounds (each round itself best of ``--reps`` runs), peak RSS the largest.
The table also shows the host's bandwidth limit: bytes read per token / measured read bandwidth.

    ./dev bench ssm_decode              # the 130M shape (d_model 768, 24 layers, vocab 50280)
    ./dev bench ssm_decode --small      # a quick run on a small shape
    ./dev bench ssm_decode --no-llamacpp --engines transformers,ort --threads 2
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


def rss_now() -> dict[str, int]:
    """This process's resident set now, in bytes: total, anonymous (heap, arenas, copies) and
    file-backed (mapped files: shared libraries, an mmapped weights file)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out


def worker(engine: str, ckpt: Path, bundle: Path, prompt: list[int], n: int, threads: int,
           reps: int = 1) -> dict:
    """Decode in this process; report tokens/s (after the first token; best of ``reps`` runs
    after a warm-up) and peak RSS, and for edgeseq the resident set after each stage."""
    if engine == "transformers":
        import torch
        from transformers import GenerationConfig, MambaForCausalLM

        torch.set_num_threads(threads)
        model = MambaForCausalLM.from_pretrained(ckpt).eval()
        ids = torch.tensor([prompt])
        gen = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
        best = None
        with torch.no_grad():
            model.generate(ids, generation_config=gen, max_new_tokens=4)  # warm-up
            for _ in range(reps):
                t0 = time.perf_counter()
                model.generate(ids, generation_config=gen, max_new_tokens=1)
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = model.generate(ids, generation_config=gen, max_new_tokens=n)
                total = time.perf_counter() - t0
                tps = (n - 1) / max(total - first, 1e-9)
                if best is None or tps > best[0]:
                    best = (tps, first, out[0, len(prompt):].tolist())
        return {"tokens_per_s": best[0], "first_token_ms": best[1] * 1e3, "tokens": best[2],
                "peak_rss": peak_rss_bytes()}
    # edgeseq: the worker does not import torch itself (ONNX Runtime does not need it, and its
    # libraries, ~300 MB resident, would count in the peak RSS the table compares)
    stages = {"python": rss_now()}
    import edgeseq
    from edgeseq.runtime.streaming import timed_stream

    # ``ort-one``: the bundle loaded without its step graph, whose calls the prefill's session
    # then serves (one session, one packed copy of the weights; docs/benchmarks.md)
    backend = "ort" if engine.startswith("ort") else engine
    if backend == "ort":
        import onnxruntime  # noqa: F401 (its import is a stage of its own)
    stages["imports"] = rss_now()
    sess = edgeseq.load(bundle, backend=backend, threads=threads,
                        graphs={"prefill"} if engine == "ort-one" else None)
    stages["load"] = rss_now()
    timed_stream(sess, prompt, 4)  # warm-up
    stages["warm-up"] = rss_now()
    runs = [timed_stream(sess, prompt, n, stop_at_eos=False) for _ in range(reps)]
    stages["decode"] = rss_now()
    res = max(runs, key=lambda r: r.tokens_per_s)
    graphs = sorted(getattr(getattr(sess, "model", None), "runners", {}) or [])
    return {"tokens_per_s": res.tokens_per_s, "first_token_ms": res.first_token_ms,
            "step_ms_p50": min((r.step_ms_p50 for r in runs if r.step_ms_p50 is not None),
                               default=None), "tokens": res.tokens,
            "peak_rss": peak_rss_bytes(), "stages": stages, "graphs": graphs}


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


def _numel(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def bundle_sizes(bundle: Path, fmt: str) -> tuple[int, int]:
    """(weight bytes, file bytes) of a bundle's graphs in one format. ONNX: the initializers,
    each shared tensor once (as benchmarks/quant.py counts them), and the graph files plus the
    shared weights file; pte: the program files, both numbers."""
    from edgeseq.bundle import read_manifest

    man = read_manifest(bundle)
    files = sorted({g.files[fmt] for g in man.graphs.values() if fmt in g.files})
    on_disk = sum((bundle / f).stat().st_size for f in files)
    if fmt == "pte":
        return on_disk, on_disk
    from edgeseq.runtime.cost import weight_bytes_by_dtype
    from edgeseq.runtime.backends.onnxruntime import WEIGHTS_FILE

    if (bundle / WEIGHTS_FILE).is_file():
        on_disk += (bundle / WEIGHTS_FILE).stat().st_size
    return sum(weight_bytes_by_dtype(bundle, files).values()), on_disk


def param_count(ckpt: Path) -> int:
    """Parameters of the checkpoint (the tied embedding once, as safetensors stores it)."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def state_bytes(shape: dict) -> int:
    e = shape["expand"] * shape["hidden_size"]
    return shape["num_hidden_layers"] * e * (shape["state_size"] + shape["conv_kernel"] - 1) * 4


def run_worker(eng: str, ckpt: Path, bundle: Path, prompt: list[int], n: int, threads: int,
               reps: int) -> dict | str:
    """One worker process; its result, or one line saying why it failed."""
    args = json.dumps({"ckpt": str(ckpt), "bundle": str(bundle), "prompt": prompt, "n": n,
                       "threads": threads, "reps": reps})
    out = subprocess.run([sys.executable, __file__, "--worker", eng, "--args", args],
                         capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        print(f"{eng} {bundle.name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        tail = [ln for ln in out.stderr.splitlines() if ln.strip()]
        return f"failed: {tail[-1][:150] if tail else 'exit ' + str(out.returncode)}"
    return json.loads(line[0][7:])


def setup_llamacpp(ckpt: Path, work: Path) -> tuple[object, dict[str, Path]] | str:
    """Build llama.cpp (cached), convert the checkpoint; the tools and GGUF files, or why not."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llamacpp

    try:
        tools = llamacpp.build()
        return tools, llamacpp.convert(tools, ckpt, work / "gguf")
    except Exception as e:  # the table says why in one line; the log has the rest
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a small shape for a quick check")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--engines", default="transformers,ort,executorch",
                    help="fp32 engines (edgeseq: ort, executorch)")
    ap.add_argument("--quant", default="int8,int4",
                    help="edgeseq weight quantization schemes measured on ONNX Runtime ('' none)")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp's rows")
    ap.add_argument("--one-session", action="store_true",
                    help="also each quantized bundle loaded without its step graph (the "
                         "prefill's session serves the steps: less memory, slower steps)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all engines (best of)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per process (best of)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep checkpoint and bundle here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kw = json.loads(a.args)
        res = worker(a.worker, Path(kw["ckpt"]), Path(kw["bundle"]), kw["prompt"], kw["n"],
                     kw["threads"], kw.get("reps", 1))
        print("RESULT " + json.dumps(res))
        return

    from edgeseq.quiet import quiet_third_party

    quiet_third_party()
    shape = SHAPE_SMALL if a.small else SHAPE_130M
    work = a.workdir or Path(tempfile.mkdtemp(prefix="edgeseq-bench-"))
    ckpt, bundle = work / "ckpt", work / "bundle"
    engines = [e for e in a.engines.split(",") if e]
    schemes = [q for q in a.quant.split(",") if q]
    threads = [int(t) for t in str(a.threads).split(",")]
    if not (ckpt / "model.safetensors").exists():
        print(f"making a random Mamba {shape} in {ckpt}", file=sys.stderr)
        make_checkpoint(ckpt, shape)
    from edgeseq.convert.pipeline import convert

    if not (bundle / "manifest.json").exists():
        fmts = tuple(f for e, f in (("ort", "onnx"), ("executorch", "pte")) if e in engines)
        convert(ckpt, bundle, formats=fmts, parity_tokens=8,
                progress=lambda m: print(m, file=sys.stderr))
    for q in schemes:
        if not (work / f"bundle-{q}" / "manifest.json").exists():
            print(f"converting {q} ...", file=sys.stderr)
            # random weights: the accuracy gate's agreement means nothing here (as in
            # benchmarks/quant.py); the zoo models measure accuracy
            convert(ckpt, work / f"bundle-{q}", formats=("onnx",), quant=q, skip_parity=True,
                    overwrite=True, progress=lambda m: print(m, file=sys.stderr))

    params = param_count(ckpt)
    ckpt_bytes = params * 4
    # rows: (name, kind, engine or file, weight bytes, file bytes); edgeseq and llama.cpp pairs
    # of the same precision side by side, so the run order alternates the two
    rows: list[tuple[str, str, object, int, int]] = []
    if "transformers" in engines:
        rows.append(("transformers fp32", "worker", ("transformers", bundle), ckpt_bytes,
                     (ckpt / "model.safetensors").stat().st_size))
    lc_note = "llama.cpp: skipped (--no-llamacpp)"
    ggufs: dict[str, Path] = {}
    if not a.no_llamacpp:
        got = setup_llamacpp(ckpt, work)
        if isinstance(got, str):
            lc_note = f"llama.cpp: not measured ({got})"
        else:
            import llamacpp

            tools, ggufs = got
            lc_note = (f"llama.cpp {tools.commit or '(commit unknown)'}, llama-cpp-python "
                       f"{llamacpp.VERSION} sdist, CPU build in {tools.root}"
                       + (f", built in {tools.build_seconds:.0f} s" if tools.build_seconds else ""))
    edge = [("edgeseq ort fp32", "ort", bundle)] if "ort" in engines else []
    edge += [(f"edgeseq ort {q}", "ort", work / f"bundle-{q}") for q in schemes]
    if a.one_session:
        edge += [(f"edgeseq ort {q} one session", "ort-one", work / f"bundle-{q}")
                 for q in schemes]
    pair = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}
    used = set()
    for name, eng, b in edge:
        fmt = "onnx"
        wb, fb = bundle_sizes(b, fmt)
        rows.append((name, "worker", (eng, b), wb, fb))
        q = pair.get(name.split()[-1])
        if q in ggufs:
            info = llamacpp.gguf_info(tools, ggufs[q])
            rows.append((f"llama.cpp {q}", "llamacpp", ggufs[q], info["tensor_bytes"],
                         info["file_bytes"]))
            used.add(q)
    for q, path in ggufs.items():  # llama.cpp formats without an edgeseq partner
        if q not in used:
            info = llamacpp.gguf_info(tools, path)
            rows.append((f"llama.cpp {q}", "llamacpp", path, info["tensor_bytes"],
                         info["file_bytes"]))
    if "executorch" in engines:
        wb, fb = bundle_sizes(bundle, "pte")
        rows.append(("edgeseq executorch fp32", "worker", ("executorch", bundle), wb, fb))

    prompt = list(range(1, 17))
    results: dict[tuple[str, int], dict] = {}
    failed: dict[tuple[str, int], str] = {}
    for r in range(a.rounds):
        order = rows if r % 2 == 0 else rows[::-1]
        for t in threads:
            for name, kind, what, _, _ in order:
                if (name, t) in failed:
                    continue
                print(f"round {r + 1}/{a.rounds}, {t} threads: {name}", file=sys.stderr)
                if kind == "worker":
                    eng, b = what
                    res = run_worker(eng, ckpt, b, prompt, a.tokens, t, a.reps)
                else:
                    try:
                        res = llamacpp.bench_decode(tools, what, t, a.tokens, a.reps)
                        res.update(llamacpp.peak_rss(tools, what, t, len(prompt), a.tokens))
                    except Exception as e:
                        res = f"failed: {e}"[:200]
                if isinstance(res, str):
                    failed[name, t] = res
                    continue
                old = results.get((name, t))
                if old is None:
                    results[name, t] = res
                else:  # best speed, largest peak
                    peak = max(old["peak_rss"], res["peak_rss"])
                    if res["tokens_per_s"] > old["tokens_per_s"]:
                        results[name, t] = res
                    results[name, t]["peak_rss"] = peak

    state = state_bytes(shape)
    print(f"\nMamba {shape['hidden_size']}d x {shape['num_hidden_layers']} layers, vocab "
          f"{shape['vocab_size']}, {params / 1e6:.1f} M parameters; {a.tokens} greedy tokens "
          f"after a {len(prompt)}-token prompt (llama.cpp: llama-bench tg{a.tokens}); best of "
          f"{a.rounds} rounds x {a.reps} runs; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(lc_note)
    print("weights: tensor bytes (ONNX initializers, a shared one counted once; GGUF tensor "
          "data; the checkpoint for transformers); bits/weight = weights x 8 / parameters; "
          "file: ONNX graphs + weights file, the GGUF file (with its vocabulary); peak RSS: "
          "edgeseq and transformers VmHWM of the worker process, llama.cpp ru_maxrss of a "
          "llama-bench run (prompt + decode) as a wrapper's only child; first token ms for "
          "llama.cpp: its pp16 time; % of own bandwidth limit: bytes read per token = that "
          "row's weights + state")
    for t in threads:
        bw = read_bandwidth(t)
        limit = bw / (ckpt_bytes + 2 * state)
        base = results.get(("transformers fp32", t), {}).get("tokens_per_s")
        ref_tokens = results.get(("transformers fp32", t), {}).get("tokens")
        print(f"\n{t} thread{'s' if t > 1 else ''}: host read bandwidth {bw / 1e9:.1f} GB/s; "
              f"fp32 bytes read per token {(ckpt_bytes + 2 * state) / 1e6:.0f} MB; fp32 "
              f"bandwidth limit {limit:.1f} tokens/s"
              + (" (the weights fit in the caches: the limit does not bind)"
                 if ckpt_bytes < 64 << 20 else "") + "\n")
        print("| engine | tokens/s | vs transformers | % of fp32 bandwidth limit | % of own "
              "bandwidth limit | first token ms | peak RSS MB | weights MB | peak RSS - "
              "weights MB | bits/weight | file MB | file bits/weight | same tokens |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, kind, _, wb, fb in rows:
            if (name, t) in failed:
                print(f"| {name} | {failed[name, t]} |" + " |" * 11)
                continue
            r = results[name, t]
            tps = r["tokens_per_s"]
            own = bw / (wb + 2 * state)
            speed = f"{tps / base:.2f}x" if base else "-"
            if name.startswith("transformers"):
                same = "ref"
            elif name.endswith("fp32") and ref_tokens and "tokens" in r:
                same = str(r["tokens"] == ref_tokens)
            else:
                same = "-"  # quantized: other tokens are expected; llama-bench shows none
            first = f"{r['first_token_ms']:.1f}" if "first_token_ms" in r else "-"
            print(f"| {name} | {tps:.1f} | {speed} | {100 * tps / limit:.0f}% | "
                  f"{100 * tps / own:.0f}% | {first} | {r['peak_rss'] / 1e6:.0f} | "
                  f"{wb / 1e6:.1f} | {(r['peak_rss'] - wb) / 1e6:.0f} | {wb * 8 / params:.2f} | "
                  f"{fb / 1e6:.1f} | {fb * 8 / params:.2f} | {same} |")
    staged = [(name, t, results[name, t]) for name, _, _, _, _ in rows for t in threads[-1:]
              if "stages" in results.get((name, t), {})]
    if staged:
        nt = threads[-1]
        print(f"\nedgeseq worker's resident set after each stage, MB ({nt} thread"
              f"{'s' if nt > 1 else ''}; anon = heap and copies, file = mapped files incl. the "
              f"weights file):\n")
        print("| engine | python | + imports | + load (sessions) | + warm-up | + decode | peak | "
              "anon / file at the end | graphs |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, t, r in staged:
            st = r["stages"]
            cells = [f"{st[k]['VmRSS'] / 1e6:.0f}" for k in
                     ("python", "imports", "load", "warm-up", "decode")]
            end = st["decode"]
            print(f"| {name} | " + " | ".join(cells) + f" | {r['peak_rss'] / 1e6:.0f} | "
                  f"{end.get('RssAnon', 0) / 1e6:.0f} / {end.get('RssFile', 0) / 1e6:.0f} | "
                  f"{', '.join(r.get('graphs', []))} |")


if __name__ == "__main__":
    main()
