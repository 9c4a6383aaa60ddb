"""Tokens/s of ``edgeseq run``'s printed stream against the library's ``Session.stream``.

The CLI prints each token's text as it comes; that must cost next to nothing beside the model.
Before issue #22 it re-decoded every token so far on each new one, and a 20,000-token stream
slowed from 945 to 138 tokens/s within 30 s while the library streamed a steady 2,800.

    ./dev bench cli_stream                       # zoo:mamba-bytes, 20,000 tokens, ORT, 1 thread
    ./dev bench cli_stream --bundle out/mb --tokens 5000 --repeat 3

Both sides decode the same greedy tokens from the same prompt on the same bundle, backend and
thread count, each in a fresh process: the library through ``timed_stream`` with no callback,
the CLI's ``main()`` as ``edgeseq run`` calls it, stdout to /dev/null, timed by the same
``timed_stream`` its summary line reports (decode rate after the first token). Each side gives
its mean rate and the rate of its median step; on a shared host the median is the one a
preempted run does not move. Target: the CLI keeps >= 90% of the library.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def "
TARGET = 0.90

LIBRARY = """
import json, os, sys
import edgeseq
from edgeseq.runtime.streaming import timed_stream
bundle, backend, threads, n, prompt, mode = sys.argv[1:7]
s = edgeseq.load(bundle, backend=backend, threads=int(threads))
on_token = None
if mode == "redecode":  # what edgeseq run did before issue #22, printing to /dev/null
    null, toks, printed = open(os.devnull, "w"), [], ""

    def on_token(tok):
        global printed
        toks.append(tok)
        text = s.decode(toks)
        if text.startswith(printed):
            null.write(text[len(printed):])
            null.flush()
            printed = text
res = timed_stream(s, s.encode(prompt), int(n), on_token=on_token)
print(json.dumps({"tokens": len(res.tokens), "tokens_per_s": res.tokens_per_s,
                  "median_tokens_per_s": 1e3 / res.step_ms_p50}))
"""

# ``edgeseq run`` itself (its main(), stdout to /dev/null), with the StreamResult it times kept:
# the median step is what a quiet host would see (a preempted step loses whole slices)
CLI = """
import json, os, sys
from edgeseq import cli
from edgeseq.runtime import streaming
seen = {}
timed = streaming.timed_stream

def keep(*a, **k):
    seen["res"] = timed(*a, **k)
    return seen["res"]

streaming.timed_stream = keep
real, sys.stdout = sys.stdout, open(os.devnull, "w")
try:
    cli.main(sys.argv[1:], standalone_mode=False)
finally:
    sys.stdout = real
res = seen["res"]
print(json.dumps({"tokens": len(res.tokens), "tokens_per_s": res.tokens_per_s,
                  "median_tokens_per_s": 1e3 / res.step_ms_p50}))
"""

_SUMMARY = re.compile(r"-- (\d+) tokens on \w+: .* ([\d.]+) tokens/s")


def library(bundle: Path, backend: str, threads: int, n: int, env: dict,
            mode: str = "plain") -> dict:
    p = subprocess.run([sys.executable, "-c", LIBRARY, str(bundle), backend, str(threads), str(n),
                        PROMPT, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def cli(bundle: Path, backend: str, threads: int, n: int, env: dict) -> dict:
    p = subprocess.run([sys.executable, "-c", CLI, "run", str(bundle), "--prompt", PROMPT, "-n",
                        str(n), "--backend", backend, "--threads", str(threads)],
                       capture_output=True, text=True, env=env, check=True)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    m = _SUMMARY.search(p.stderr)  # and the rate it told the user: the same measurement
    if m is None or int(m.group(1)) != out["tokens"]:
        raise SystemExit(f"no summary line from edgeseq run:\n{p.stderr[-2000:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=None,
                    help="a converted causal-LM bundle (default: zoo:mamba-bytes, converted)")
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--backend", default="ort", choices=["ort", "executorch"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side; the best counts")
    ap.add_argument("--redecode", action="store_true",
                    help="also time the old printing (every token re-decodes the whole stream)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            bundle = Path(tmp) / "mamba-bytes"
            from edgeseq.registry import format_of

            fmt = format_of(args.backend)
            print(f"converting zoo:mamba-bytes ({fmt}) ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "edgeseq.cli", "convert", "zoo:mamba-bytes",
                            "-o", str(bundle), "--format", fmt, "-q"], env=env, check=True)
        runs: dict[str, list[dict]] = {"library": [], "cli": []}
        for i in range(args.repeat):  # alternated, so a disturbance hits both sides alike
            runs["library"].append(library(bundle, args.backend, args.threads, args.tokens, env))
            runs["cli"].append(cli(bundle, args.backend, args.threads, args.tokens, env))
            print(f"run {i + 1}: library {runs['library'][-1]['tokens_per_s']:.0f}, "
                  f"cli {runs['cli'][-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
        if args.redecode:  # once: it is slow, and only there for comparison
            runs["redecode"] = [library(bundle, args.backend, args.threads, args.tokens, env,
                                        "redecode")]
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in runs.items()}
    if best["library"]["tokens"] != best["cli"]["tokens"]:
        raise SystemExit(f"the two sides streamed different lengths: {best}")
    ratio = best["cli"]["tokens_per_s"] / best["library"]["tokens_per_s"]
    med = {k: max(r["median_tokens_per_s"] for r in v) for k, v in runs.items()}
    median_ratio = med["cli"] / med["library"]
    row = {"bundle": str(args.bundle or "zoo:mamba-bytes"), "backend": args.backend,
           "threads": args.threads, "tokens": best["cli"]["tokens"],
           "library_tokens_per_s": round(best["library"]["tokens_per_s"], 1),
           "cli_tokens_per_s": round(best["cli"]["tokens_per_s"], 1),
           "ratio": round(ratio, 3), "library_median_tokens_per_s": round(med["library"], 1),
           "cli_median_tokens_per_s": round(med["cli"], 1),
           "median_ratio": round(median_ratio, 3), "target": TARGET,
           "met": max(ratio, median_ratio) >= TARGET, "runs": runs}
    if args.redecode:
        row["redecode_tokens_per_s"] = round(best["redecode"]["tokens_per_s"], 1)
    if args.json:
        print(json.dumps(row, indent=1))
        return
    print(f"{row['tokens']} tokens, {args.backend}, {args.threads} thread(s), best of "
          f"{args.repeat}:")
    print(f"  library Session.stream  {row['library_tokens_per_s']:8.1f} tokens/s "
          f"(median step: {row['library_median_tokens_per_s']:.1f})")
    print(f"  edgeseq run (printed)   {row['cli_tokens_per_s']:8.1f} tokens/s "
          f"(median step: {row['cli_median_tokens_per_s']:.1f})")
    if args.redecode:
        print(f"  re-decoding every token {row['redecode_tokens_per_s']:8.1f} tokens/s "
              f"(edgeseq run before issue #22)")
    print(f"  ratio {ratio:.3f}, of median steps {median_ratio:.3f} (target >= {TARGET}: "
          f"{'met' if row['met'] else 'MISSED'})")


if __name__ == "__main__":
    main()
