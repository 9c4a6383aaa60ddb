"""Conversion cost, side by side: ``edgeseq convert`` (ONNX, parity included) against
``optimum-cli export onnx`` on the same checkpoints.

Checkpoints: Whisper-tiny and t5-small shapes with random weights, written to a temporary folder
with the published config.json, generation_config.json and tokenizer files
(tests/fixtures/published/whisper-tiny and t5-small). Each conversion runs in a fresh process, one
after the other; its wall time is measured from outside and its peak memory is the process's own
resident high-water mark (``wait4``'s ru_maxrss of that child; the parent never imports torch,
so a child cannot inherit a larger mark from it).

    edgeseq   edgeseq convert CKPT -o OUT --format onnx --force
              (parity against transformers' generate: greedy and 4-beam tokens and step logits
              on ONNX Runtime; --force so that a parity failure is reported, not fatal)
    optimum   optimum-cli export onnx --model CKPT --task <task>-with-past OUT
              (optimum's own validation: the exported graphs' outputs on one random input
              against PyTorch's, within atol)

    edgeseq-serial  the same with EDGESEQ_JOBS=1 (graphs exported one after another)

    ./dev bench convert                       # both models, all tools
    ./dev bench convert --models t5 --tools edgeseq

optimum is optional: ``pip install -e '.[bench]'`` (optimum-onnx 0.1.0; it leaves torch alone).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "tests" / "fixtures" / "published"
MODELS = {"whisper": "whisper-tiny", "t5": "t5-small"}
# edgeseq-serial: the graphs exported one after another in the converting process (EDGESEQ_JOBS=1)
TOOLS = ("edgeseq", "edgeseq-serial", "optimum")
OPTIMUM_TASK = {"whisper": "automatic-speech-recognition-with-past",
                "t5": "text2text-generation-with-past"}
# edgeseq's progress lines: "[1/5] loading", "onnx: ... in 12.3s", "[4/5] parity", "[5/5] wrote"
EXPORT_LINE = re.compile(r"^\s+onnx: .* in ([0-9.]+)s$")


def make_checkpoint(model: str, folder: Path) -> Path:
    """Random weights of the published shape, beside the published side files."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq

    src = PUBLISHED / MODELS[model]
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(src)
    auto = AutoModelForSpeechSeq2Seq if model == "whisper" else AutoModelForSeq2SeqLM
    net = auto.from_config(config)
    net.save_pretrained(folder, safe_serialization=True)
    for f in src.iterdir():  # the published files, not transformers' re-serialization
        if f.suffix in (".json", ".model") and f.name != "model.safetensors.index.json":
            shutil.copy(f, folder / f.name)
    return folder


def _used_memory() -> int:
    """Memory in use on the host (MemTotal - MemAvailable), bytes."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def timed(cmd: list[str], log: Path, env_extra: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` in a fresh process: wall seconds, its peak RSS, exit code, and each output
    line with the second it arrived (Python's stderr is line-buffered, so edgeseq's progress
    lines arrive as each phase starts).

    Peak RSS (``wait4``) is the largest single process of the tree; a tool that works in several
    processes at once (edgeseq's lowering workers) uses more than that. So the host's memory in
    use is also sampled every 50 ms: ``peak_added_bytes`` is its peak minus its level before the
    start, every process of the tree counted, pages they share counted once (other load on the
    host would add to it: run on an otherwise idle host)."""
    import threading

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    base = _used_memory()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _used_memory())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)
    for line in proc.stdout:
        lines.append((time.perf_counter() - t, line.rstrip("\n")))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    log.write_text("".join(f"{s:8.2f}  {line}\n" for s, line in lines))
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "peak_added_bytes": peak[0] - base,
            "rc": os.waitstatus_to_exitcode(status), "lines": lines}


def run_edgeseq(ckpt: Path, out: Path, log: Path, jobs: str | None = None) -> dict:
    res = timed([sys.executable, "-m", "edgeseq.cli", "convert", str(ckpt), "-o", str(out),
                 "--format", "onnx", "--force", "--overwrite"], log,
                {"EDGESEQ_JOBS": jobs} if jobs else None)
    lines = res.pop("lines")
    parity = out / "parity.json"
    if parity.is_file():
        p = json.loads(parity.read_text())
        res["parity_passed"] = p.get("passed")
        res["reported"] = p.get("cost")
    res["phases"] = phases(lines, res["wall_s"])
    return res


def phases(lines: list[tuple[float, str]], wall: float) -> dict[str, float]:
    """Where edgeseq's time goes, from the arrival of its progress lines: start-up and load
    (to "[2/5]"), lowering to ONNX (export, optimisation, save: to "[3/5]"), parity (from
    "[4/5]" to "[5/5]"), and the rest (process start-up is in the first, exit in the last)."""
    at = {}
    for s, line in lines:
        m = re.match(r"^\[(\d)/5\]", line)
        if m and m.group(1) not in at:
            at[m.group(1)] = s
    if not all(k in at for k in "2345"):
        return {}
    export = [float(m.group(1)) for _, line in lines if (m := EXPORT_LINE.match(line))]
    return {"startup_and_load_s": at["2"], "lower_onnx_s": at["3"] - at["2"],
            "torch_export_and_onnx_s": export[0] if export else None,
            "parity_s": at["5"] - at["4"], "rest_s": wall - at["5"] + (at["4"] - at["3"])}


def run_optimum(ckpt: Path, out: Path, model: str, log: Path) -> dict:
    cli = shutil.which("optimum-cli") or str(Path(sys.executable).with_name("optimum-cli"))
    res = timed([cli, "export", "onnx", "--model", str(ckpt), "--task", OPTIMUM_TASK[model],
                 str(out)], log)
    res.pop("lines")
    return res


def installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--workdir", type=Path, default=None, help="keep checkpoints and outputs here")
    a = ap.parse_args()
    models = [m for m in a.models.split(",") if m]
    tools = [t for t in a.tools.split(",") if t]
    if "optimum" in tools and not installed("optimum.exporters.onnx"):
        print("optimum-onnx is not installed (pip install -e '.[bench]'): edgeseq only",
              file=sys.stderr)
        tools = [t for t in tools if t != "optimum"]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="edgeseq-bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in models:
        ckpt = work / f"{MODELS[model]}-ckpt"
        if not (ckpt / "model.safetensors").is_file():
            subprocess.run([sys.executable, __file__, "--make", model, str(ckpt)], check=True)
        for tool in tools:
            out, log = work / f"{MODELS[model]}-{tool}", work / f"{MODELS[model]}-{tool}.log"
            shutil.rmtree(out, ignore_errors=True)
            print(f"{MODELS[model]}: {tool} ...", file=sys.stderr, flush=True)
            res = (run_edgeseq(ckpt, out, log) if tool == "edgeseq"
                   else run_edgeseq(ckpt, out, log, jobs="1") if tool == "edgeseq-serial"
                   else run_optimum(ckpt, out, model, log))
            rows.append({"model": MODELS[model], "tool": tool, **res, "log": str(log)})
    report(rows)
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nlogs and results: {work}")


def report(rows: list[dict]) -> None:
    print("| model | tool | wall s | peak RSS MiB (largest process) | host memory added MiB "
          "(all processes) | exit | parity |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        parity = {True: "passed", False: "FAILED", None: ""}[r.get("parity_passed")]
        print(f"| {r['model']} | {r['tool']} | {r['wall_s']:.1f} | "
              f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['peak_added_bytes'] / 2**20:.0f} | "
              f"{r['rc']} | {parity} |")
    print()
    for r in rows:
        if r.get("phases"):
            ph = r["phases"]
            print(f"{r['model']} {r['tool']} phases: " + ", ".join(
                f"{k[:-2]} {v:.1f}s" for k, v in ph.items() if v is not None))
        if r.get("reported"):
            print(f"{r['model']} {r['tool']}'s own report (parity.json cost): "
                  f"{r['reported']['wall_s']:.1f}s, peak "
                  f"{r['reported']['peak_rss_bytes'] / 2**20:.0f} MiB")
    print()
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["tool"]: r for r in rows if r["model"] == model}
        for tool in ("edgeseq", "edgeseq-serial"):
            if tool in by and "optimum" in by:
                e, o = by[tool], by["optimum"]
                print(f"{model}: {tool} / optimum wall time {e['wall_s'] / o['wall_s']:.2f}x, "
                      f"host memory added {e['peak_added_bytes'] / o['peak_added_bytes']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--make":
        make_checkpoint(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
