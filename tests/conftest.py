"""Shared fixtures: a tiny checkpoint and a converted bundle per registered family.

Models are built from configs (no hub, no network), with a wide init so their outputs depend on
their state (default-init tiny models repeat one token, which would hide a wrong state).
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

if not __import__("torch").cuda.is_available():
    # before anything imports triton (torch's compiler stack may): its kernels then run under
    # the interpreter on the CPU (edgeseq/kernels/triton_env.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from edgeseq.quiet import quiet_third_party

quiet_third_party()

from edgeseq.registry import backends, families  # noqa: E402

from .backends import example  # noqa: E402,F401  (registers the example backend, docs/architecture.md)

#: causal-LM families (prefill + step graphs) and encoder-decoder families (encoder + decoder_step)
FAMILIES = sorted(n for n, c in families().items() if c.task == "causal_lm")
SEQ2SEQ = sorted(n for n, c in families().items() if c.task in ("seq2seq", "speech_seq2seq"))
#: sequence classifiers (step + chunk graphs, running predictions)
CLASSIFIERS = sorted(n for n, c in families().items() if c.task == "classification")
BACKENDS = sorted(backends())
#: formats whose backend is an optional install (a shipped backend whose package may be absent):
#: the shared bundles carry them where the package is here, and their tests skip where not
OPTIONAL_FORMATS = tuple(f for f in ("openvino",) if backends()[f]().available() is None)


def backend_cases(names: list[str]) -> list:
    """(family, backend) pairs for a shared suite over the families ``names``: every backend on
    every family, but a backend that names its ``suite_families`` (the slow example backend)
    only on those; a backend whose package is not installed is skipped, saying why. Backends
    that compute in their own precision (``exact`` False) run the accelerators' suite instead
    (``accelerator_cases``)."""
    cases = []
    for f in names:
        for b in BACKENDS:
            if f not in getattr(backends()[b], "suite_families", (f,)) or not backends()[b].exact:
                continue
            why = backends()[b]().available()
            cases.append(pytest.param(f, b, marks=pytest.mark.skipif(why is not None,
                                                                     reason=str(why))))
    return cases


def accelerator_cases(names: list[str]) -> list[tuple[str, str]]:
    """(family, backend) pairs for the accelerators' suite (``tests/backends/
    test_accelerators.py``): the backends that compute in their own precision (``exact`` False),
    held to the accuracy gate, on the families they name."""
    return [(f, b) for f in names for b in BACKENDS if not backends()[b].exact
            and f in getattr(backends()[b], "suite_families", (f,))]
# the fixed-capacity cache used by the encoder-decoder tests
FIXED_LEN = 40


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every xdist worker of this run sees: the parent of the workers' own base
    temporary folders (pytest-N/popen-gwK), or the base folder itself without xdist."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shared_build(root: Path, key: str, build: Callable[[Path], Path]) -> Path:
    """``build(folder)`` once per test run, whichever worker asks first; the others wait for it
    and reuse its result. Converting the same tiny checkpoint, or the same zoo model, in both
    workers and in several modules was a third of the suite's time. What is built here is
    read-only to the tests (a test that changes a bundle copies it first)."""
    done = root / f"{key}.done"
    with _exclusive(root / f"{key}.lock"):
        if done.is_file():
            return Path(json.loads(done.read_text())["path"])
        path = Path(build(root / key))
        done.write_text(json.dumps({"path": str(path), "worker":
                                    os.environ.get("PYTEST_XDIST_WORKER", "main")}))
        return path


class _LazyCheckpoints(dict):
    """Tiny checkpoints, built on first use (the encoder-decoder ones are briefly trained),
    once per run for all workers."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        self[name] = shared_build(self.root, f"ckpt-{name}",
                                  families()[name]().make_test_checkpoint)
        return self[name]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _LazyCheckpoints(_shared_root(tmp_path_factory))


_BUNDLES: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def bundle_of(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Convert (once per session) a family's tiny checkpoint, parity included: every format, or
    for an encoder-decoder with a fixed-capacity cache (``max_target_len``) ONNX and ExecuTorch,
    and the ``OPTIONAL_FORMATS`` installed here (OpenVINO).
    Generating families carry ``exit_step`` (``early_exit=1``) for the speculative tests."""
    from edgeseq.convert.pipeline import convert

    root = _shared_root(tmp_path_factory)

    def get(family: str, max_target_len: int | None = None) -> Path:
        key = (family, max_target_len)
        if key not in _BUNDLES:
            formats = ("onnx", "pte", "pt2") if max_target_len is None else ("onnx", "pte")
            formats += OPTIONAL_FORMATS
            # generating families also get the self-speculative drafter (the first layer)
            early = 1 if families()[family].task != "classification" else None
            ckpt = checkpoints[family]
            _BUNDLES[key] = shared_build(
                root, f"bundle-{family}-{max_target_len or 'dyn'}",
                lambda out: convert(ckpt, out, formats=formats, parity_tokens=64,
                                    max_target_len=max_target_len, early_exit=early))
        return _BUNDLES[key]
    return get


@pytest.fixture(scope="session")
def draft_loop_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mamba (another seed than the targets') converted with a 4-token ``draft_loop``
    graph, once per run for every module that drafts with it."""
    from edgeseq.convert.pipeline import convert

    def build(out: Path) -> Path:
        ckpt = families()["mamba"]().make_test_checkpoint(out.with_name(out.name + "-ckpt"),
                                                          seed=1)
        return convert(ckpt, out, formats=("onnx",), parity_tokens=16, draft_loop=4)
    return shared_build(_shared_root(tmp_path_factory), "draft-loop-mamba", build)


@pytest.fixture(scope="session")
def mamba_bytes_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """zoo:mamba-bytes converted once per run for every module that only reads it (the
    profiler's tests, the quantization tests' fp32 baseline): ONNX and ExecuTorch, with parity."""
    from edgeseq.convert.pipeline import convert

    return shared_build(_shared_root(tmp_path_factory), "zoo-mamba-bytes",
                        lambda out: convert("zoo:mamba-bytes", out, formats=("onnx", "pte")))


#: The modules that take longest, longest first (CPU seconds on a 2-core host, from
#: ``--durations``: the published-layout conversions at published widths ~600 and ~400,
#: quantization ~800, the encoder-decoder parity bundles ~680, the profiler
#: ~330, LMU ~300, the lossless speculative suite ~300, the backends ~300). They are handed
#: out first (``./dev test`` runs xdist with ``--no-loadscope-reorder``), so the two workers
#: finish together: ordered by test count, as xdist does by default, the quantization module
#: came last and ran alone for its last ten minutes.
_LONGEST_FIRST = ("tests/families/test_published_text.py", "tests/families/test_published_ssm.py",
                  "tests/quant/test_quant.py", "tests/families/test_seq2seq.py",
                  "tests/families/test_whisper_published.py",
                  "tests/families/test_whisper_timestamps.py",
                  "tests/families/test_lmu_upstream.py",
                  "tests/profile/test_profile.py", "tests/families/test_lmu.py",
                  "tests/speculative/test_lossless.py", "tests/backends/test_backends.py",
                  "tests/families/test_lmu_zoo.py", "tests/security/test_memory.py",
                  "tests/security/test_fuzz.py", "tests/security/test_bundle_trust.py",
                  "tests/security/test_limits.py", "tests/security/test_cli_errors.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {m: i for i, m in enumerate(_LONGEST_FIRST)}
    # a stable sort: each module keeps its own order, the others keep theirs
    items.sort(key=lambda it: rank.get(it.nodeid.split("::")[0], len(rank)))


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # parallel workers share the cores: one thread each, or the thread pools spin on
        # each other (ONNX Runtime's most of all)
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["EDGESEQ_THREADS"] = "1"
        # and conversions lower their graphs in this process (the workers are the parallelism;
        # tests of the forked lowering set EDGESEQ_JOBS themselves)
        os.environ.setdefault("EDGESEQ_JOBS", "1")
        import torch

        torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
