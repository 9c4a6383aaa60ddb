"""What one call of each graph of a bundle costs, in microseconds and in units of one ``step``.

Speculative decoding pays off when verifying k tokens costs fewer than k steps, and prefill when
a chunk costs fewer steps than its tokens; this table says how many steps each call is worth on
this host, side by side with the step it is measured against (same process, same state).

    ./dev bench graph_calls                                  # zoo:mamba-bytes, ORT and ExecuTorch
    ./dev bench graph_calls --model zoo:mamba-bytes-draft --draft-loop 16
    ./dev bench graph_calls --bundle out/some-bundle --backends ort

Each number is the best of ``--repeats`` runs of ``--calls`` calls from the same state (a
prompt of 40 tokens consumed first), 1 thread unless ``--threads``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_us(fn, calls: int, repeats: int) -> float:
    for _ in range(max(3, calls // 10)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def lengths(bound: int) -> list[int]:
    out = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= bound]
    return out if bound in out else out + [bound]


def measure(bundle: Path, backend: str, threads: int, calls: int, repeats: int) -> list[dict]:
    from edgeseq.bundle import read_manifest
    from edgeseq.runtime.session import load

    man = read_manifest(bundle)
    s = load(bundle, backend=backend, threads=threads, graphs=set(man.graphs))
    m = s.model
    s.reset(1)
    s.prefill(np.arange(1, 41, dtype=np.int64)[None] % int(man.config.get("vocab_size", 256)))
    st = s._state
    one = {"input_ids": np.array([5])}
    step = best_us(lambda: m.run("step", one, st), calls, repeats)
    rows = [{"graph": "step", "tokens": 1, "us": step}]
    for g in ("verify", "prefill"):
        if g not in m.runners:
            continue
        for n in lengths(int(man.graphs[g].max_chunk or 16)):
            ids = {"input_ids": np.full((1, n), 5, dtype=np.int64)}
            rows.append({"graph": g, "tokens": n, "us": best_us(lambda: m.run(g, ids, st),
                                                                 calls, repeats)})
    for g in ("draft_loop", "exit_step"):
        if g in m.runners:
            k = int(man.config.get("draft_loop_tokens") or 1) if g == "draft_loop" else 1
            # an early exit reads the first layers' state only
            sub = m.from_numpy(m.to_numpy(st)[:len(m.runners[g].entry.state)])
            rows.append({"graph": g, "tokens": k, "us": best_us(lambda: m.run(g, one, sub),
                                                                 calls, repeats)})
    for r in rows:
        r["steps"] = r["us"] / step
        r["us_per_token"] = r["us"] / r["tokens"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:mamba-bytes", help="checkpoint or zoo:NAME to convert")
    ap.add_argument("--bundle", help="an existing bundle instead of converting --model")
    ap.add_argument("--backends", default="ort,executorch")
    ap.add_argument("--draft-loop", type=int, default=None, help="convert with --draft-loop K")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from edgeseq.quiet import quiet_third_party

    quiet_third_party()
    backends = [b for b in args.backends.split(",") if b]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else Path(tmp) / "bundle"
        if not args.bundle:
            from edgeseq.convert.pipeline import convert

            from edgeseq.registry import format_of

            fmts = tuple(format_of(b) for b in backends)
            print(f"converting {args.model} ...", file=sys.stderr, flush=True)
            convert(args.model, bundle, formats=fmts, overwrite=True, skip_parity=True,
                    draft_loop=args.draft_loop)
        print(f"\n{args.bundle or args.model}, {args.threads} thread(s), best of {args.repeats} x "
              f"{args.calls} calls\n")
        print("| backend | graph | tokens | us per call | us per token | steps per call |")
        print("|---|---|---|---|---|---|")
        for b in backends:
            for r in measure(bundle, b, args.threads, args.calls, args.repeats):
                print(f"| {b} | {r['graph']} | {r['tokens']} | {r['us']:.0f} | "
                      f"{r['us_per_token']:.0f} | {r['steps']:.2f} |")


if __name__ == "__main__":
    main()
