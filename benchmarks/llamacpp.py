"""llama.cpp as a comparison engine for the decode benchmarks (issue #23).

Three steps, each usable on its own:

* ``build()``: llama.cpp's CPU tools (``llama-bench``, ``llama-quantize``) compiled with cmake from
  the copy vendored in the ``llama-cpp-python`` source distribution on the package index (the
  sdist pins one llama.cpp commit, so the numbers name a version). The build lives in a cache
  folder outside the repository, ``~/.cache/edgeseq-bench/llama.cpp-<version>`` (or
  ``$EDGESEQ_LLAMACPP_DIR``), and is skipped when the binaries are already there.
* ``convert()``: a transformers Mamba checkpoint folder to GGUF f32 with the vendored
  ``convert_hf_to_gguf.py``, then ``llama-quantize`` to Q8_0 and Q4_0.
* ``bench_decode()`` / ``peak_rss()``: tokens/s of greedy decode from ``llama-bench`` (its ``tg``
  test, best of the repetitions) and peak RSS of a separate decode run in a child process.

    python benchmarks/llamacpp.py build
    python benchmarks/llamacpp.py convert CKPT OUT
    python benchmarks/llamacpp.py bench OUT/model-Q4_0.gguf --threads 1
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

VERSION = "0.3.36"  # llama-cpp-python; its sdist vendors the llama.cpp this benchmark builds
# the sdist's sha256 (as the package index lists it): the build compiles and runs what is in it
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TARGETS = ("llama-bench", "llama-quantize")
QUANTS = ("Q8_0", "Q4_0")


@dataclass
class Tools:
    """Paths of a finished build."""

    root: Path          # the cache folder
    src: Path           # vendor/llama.cpp inside the unpacked sdist
    bench: Path
    quantize: Path
    build_seconds: float | None  # None when an earlier build was reused
    commit: str         # llama.cpp build number/commit as llama-bench reports it ("" if unknown)

    @property
    def converter(self) -> Path:
        return self.src / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.src / "gguf-py"


class LlamaCppError(RuntimeError):
    """A step failed; the message is one line fit for a table."""


def cache_dir() -> Path:
    env = os.environ.get("EDGESEQ_LLAMACPP_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "edgeseq-bench" / f"llama.cpp-{VERSION}"


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(cmd: list[str], log_file: Path, **kw) -> None:
    """Run a build step, its output into log_file; on failure raise with the log's last line."""
    with open(log_file, "ab") as f:
        f.write(("\n$ " + " ".join(map(str, cmd)) + "\n").encode())
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw).returncode
    if rc:
        tail = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
        raise LlamaCppError(f"{Path(cmd[0]).name} exited {rc}: {tail[-1][:200] if tail else ''} "
                            f"(log: {log_file})")


def _sdist(root: Path, log: Callable[[str], None]) -> Path:
    """The llama-cpp-python sdist: in the cache, or $EDGESEQ_LLAMACPP_SDIST, or pip download."""
    name = f"llama_cpp_python-{VERSION}.tar.gz"
    given = os.environ.get("EDGESEQ_LLAMACPP_SDIST")
    if given and Path(given).is_file():
        return Path(given)
    if (root / name).is_file():
        return root / name
    log(f"llama.cpp: downloading the llama-cpp-python {VERSION} sdist")
    # --no-binary: the wheel carries only a compiled libllama, not the tools nor the converter.
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          f"llama-cpp-python=={VERSION}", "-d", str(root)], root / "build.log")
    if not (root / name).is_file():
        raise LlamaCppError(f"pip download did not leave {name} in {root}")
    return root / name


def _unpack(sdist: Path, root: Path, log: Callable[[str], None]) -> None:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise LlamaCppError(f"{sdist}: sha256 {digest[:16]}..., expected {SDIST_SHA256[:16]}...")
    log(f"llama.cpp: unpacking {sdist.name}")
    top = root / f"llama_cpp_python-{VERSION}"
    # into a side folder first: a killed unpack must not pass for a finished one
    part = root / "unpack.part"
    shutil.rmtree(part, ignore_errors=True)
    with tarfile.open(sdist) as tf:
        # the "data" filter refuses links and paths leaving the folder (Python >= 3.10.12)
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(part, **kw)
    shutil.rmtree(top, ignore_errors=True)
    (part / top.name).rename(top)
    part.rmdir()


def build(root: Path | None = None, jobs: int = 2,
          log: Callable[[str], None] = _log_default) -> Tools:
    """Build llama.cpp's CPU tools into ``root`` (default ``cache_dir()``), or reuse a finished
    build there. Raises ``LlamaCppError`` with a one-line reason."""
    root = root or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    src = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    bdir = root / "build"
    bins = {t: bdir / "bin" / t for t in TARGETS}
    done = root / "BUILD_OK"  # written last, so a killed build is not taken for a finished one
    if done.is_file() and all(b.is_file() for b in bins.values()) and src.is_dir():
        return Tools(root, src, bins["llama-bench"], bins["llama-quantize"], None,
                     done.read_text().strip())
    if not shutil.which("cmake"):
        raise LlamaCppError("cmake not found on PATH")
    t0 = time.perf_counter()
    if not src.is_dir():
        _unpack(_sdist(root, log), root, log)
    logf = root / "build.log"
    log(f"llama.cpp: building {', '.join(TARGETS)} in {bdir} with -j{jobs} (log: {logf})")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(src), "-B", str(bdir), *gen,
          "-DCMAKE_BUILD_TYPE=Release",
          # static: the binaries do not depend on finding libllama/libggml at run time
          "-DBUILD_SHARED_LIBS=OFF",
          # CPU only, tuned to this host (as a user building llama.cpp here would get by default)
          "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF",
          "-DGGML_BLAS=OFF",
          # nothing networked and nothing the benchmark does not run
          "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON"], logf)
    _run(["cmake", "--build", str(bdir), "--config", "Release", "-j", str(jobs),
          "--target", *TARGETS], logf)
    missing = [t for t, b in bins.items() if not b.is_file()]
    if missing:
        raise LlamaCppError(f"build finished without {', '.join(missing)} (log: {logf})")
    secs = time.perf_counter() - t0
    commit = _build_commit(bins["llama-bench"])
    done.write_text(commit + "\n")
    log(f"llama.cpp: built in {secs:.0f} s ({commit or 'commit unknown'})")
    return Tools(root, src, bins["llama-bench"], bins["llama-quantize"], secs, commit)


def _build_commit(bench: Path) -> str:
    out = subprocess.run([str(bench), "--version"], capture_output=True, text=True)
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].removeprefix("version: ") if text else ""


def convert(tools: Tools, ckpt: Path, out: Path, quants: tuple[str, ...] = QUANTS,
            log: Callable[[str], None] = _log_default) -> dict[str, Path]:
    """``ckpt`` (a transformers Mamba folder) to ``out/model-F32.gguf`` and one file per quant type.

    The checkpoint needs no tokenizer: without tokenizer files the converter's Mamba class takes
    the GPT-NeoX vocabulary (Mamba's published tokenizer) from the GGUF vocab file that ships in
    llama.cpp's ``models/`` folder, cut to the config's ``vocab_size`` (padded to
    ``pad_vocab_size_multiple``, 8: 50280 stays 50280). Existing files are reused.
    """
    out.mkdir(parents=True, exist_ok=True)
    files = {"F32": out / "model-F32.gguf", **{q: out / f"model-{q}.gguf" for q in quants}}
    logf = out / "convert.log"
    if not files["F32"].is_file():
        log(f"llama.cpp: converting {ckpt} to GGUF f32")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(tools.gguf_py), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        tmp = files["F32"].with_suffix(".part")
        # the converter imports torch and the vendored gguf-py; run with this interpreter, which
        # has torch/numpy/transformers/sentencepiece (the converter's requirements file pins
        # other versions, but only the ones used for Mamba matter and they work)
        _run([sys.executable, str(tools.converter), str(ckpt), "--outfile", str(tmp),
              "--outtype", "f32"], logf, env=env)
        tmp.rename(files["F32"])
    for q in quants:
        if not files[q].is_file():
            log(f"llama.cpp: llama-quantize {q}")
            tmp = files[q].with_suffix(".part")
            _run([str(tools.quantize), str(files["F32"]), str(tmp), q], logf)
            tmp.rename(files[q])
    return files


def gguf_info(tools: Tools, path: Path) -> dict[str, int]:
    """File bytes, tensor bytes and parameter count of a GGUF file (vendored gguf-py reader)."""
    if str(tools.gguf_py) not in sys.path:
        sys.path.insert(0, str(tools.gguf_py))
    import gguf  # noqa: PLC0415 (the vendored copy, matching the files the converter wrote)

    r = gguf.GGUFReader(str(path))
    return {"file_bytes": path.stat().st_size,
            "tensor_bytes": int(sum(int(t.n_bytes) for t in r.tensors)),
            "params": int(sum(int(t.n_elements) for t in r.tensors)),
            "types": sorted({t.tensor_type.name for t in r.tensors})}


def bench_decode(tools: Tools, model: Path, threads: int, n_gen: int = 64, reps: int = 5
                 ) -> dict[str, float]:
    """Greedy decode tokens/s from ``llama-bench``'s ``tg`` test: ``n_gen`` single-token steps,
    ``reps`` repetitions after its own warm-up run; best and mean of the repetitions.

    ``-p 0``: no prompt test. A Mamba's decode step does not depend on how many tokens came
    before (its state has a fixed size), so starting from an empty context times the same work
    as edgeseq's steps after a 16-token prompt.
    """
    cmd = [str(tools.bench), "-m", str(model), "-p", "0", "-n", str(n_gen), "-t", str(threads),
           "-r", str(reps), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        tail = [ln for ln in out.stderr.splitlines() if ln.strip()]
        last = tail[-1][:200] if tail else ""
        raise LlamaCppError(f"llama-bench exited {out.returncode}: {last}")
    res = json.loads(out.stdout)
    tg = [r for r in res if r["n_gen"] > 0][0]
    return {"tokens_per_s": max(tg["samples_ts"]), "mean_tokens_per_s": tg["avg_ts"],
            "stddev_tokens_per_s": tg["stddev_ts"], "model_size": tg["model_size"],
            "model_n_params": tg["model_n_params"], "build_commit": tg.get("build_commit", ""),
            "cpu_info": tg.get("cpu_info", "")}


# A fresh, minimal interpreter is the child's parent: on Linux a child's ru_maxrss also holds its
# parent's peak at fork/exec time (the old address space's high-water mark is carried over by
# exec), so the benchmark driver, with torch loaded, must not be the direct parent. This wrapper
# peaks at ~10 MB and reports its own peak too, so the floor is visible.
_RSS_WRAPPER = r"""
import json, resource, subprocess, sys
r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
print(json.dumps({"rc": r.returncode, "err": r.stderr[-300:], "out": r.stdout,
                  "child_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def peak_rss(tools: Tools, model: Path, threads: int, n_prompt: int = 16, n_gen: int = 64
             ) -> dict[str, float]:
    """Peak RSS (bytes) of a llama.cpp process that loads ``model``, runs an ``n_prompt``-token
    prompt and decodes ``n_gen`` tokens (``llama-bench -r 1``, its default context settings:
    n_batch 2048, n_ubatch 512, mmap on, so file-backed weight pages count once touched), and
    the prompt's time (``first_token_ms``: the prompt's one batch yields the first token).

    Measured as ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` in a small wrapper process (the kernel's
    high-water mark of the child's resident set, sampled by the kernel, not polled).
    """
    cmd = [str(tools.bench), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen),
           "-t", str(threads), "-r", "1", "--no-warmup", "-o", "json"]
    out = subprocess.run([sys.executable, "-S", "-c", _RSS_WRAPPER, *cmd],
                         capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"]:
        raise LlamaCppError(f"llama-bench exited {res['rc']}: {res['err'].strip()[-200:]}")
    pp = [r for r in json.loads(res["out"]) if r["n_prompt"] > 0 and r["n_gen"] == 0]
    out = {"peak_rss": res["child_kb"] * 1024, "wrapper_rss": res["self_kb"] * 1024}
    if pp:
        out["first_token_ms"] = pp[0]["avg_ns"] / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    c = sub.add_parser("convert")
    c.add_argument("ckpt", type=Path)
    c.add_argument("out", type=Path)
    b = sub.add_parser("bench")
    b.add_argument("model", type=Path)
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    tools = build()
    if a.cmd == "build":
        print(json.dumps({"root": str(tools.root), "commit": tools.commit,
                          "build_seconds": tools.build_seconds}))
    elif a.cmd == "convert":
        for k, p in convert(tools, a.ckpt, a.out).items():
            print(k, p, json.dumps(gguf_info(tools, p)))
    else:
        res = bench_decode(tools, a.model, a.threads, a.tokens)
        res.update(peak_rss(tools, a.model, a.threads, n_gen=a.tokens))
        print(json.dumps(res))


if __name__ == "__main__":
    main()
