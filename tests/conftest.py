"""Shared fixtures: a tiny checkpoint and a converted bundle per registered family.

Models are built from configs (no hub, no network), with a wide init so their outputs depend on
their state (default-init tiny models repeat one token, which would hide a wrong state).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeseq.quiet import quiet_third_party

quiet_third_party()

from edgeseq.registry import backends, families  # noqa: E402

#: causal-LM families (prefill + step graphs) and encoder-decoder families (encoder + decoder_step)
FAMILIES = sorted(n for n, c in families().items() if c.task == "causal_lm")
SEQ2SEQ = sorted(n for n, c in families().items() if c.task in ("seq2seq", "speech_seq2seq"))
#: sequence classifiers (step + chunk graphs, running predictions)
CLASSIFIERS = sorted(n for n, c in families().items() if c.task == "classification")
BACKENDS = sorted(backends())
# the fixed-capacity cache used by the encoder-decoder tests
FIXED_LEN = 40


class _LazyCheckpoints(dict):
    """Tiny checkpoints, built on first use (the encoder-decoder ones are briefly trained)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        self[name] = families()[name]().make_test_checkpoint(self.root / name)
        return self[name]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _LazyCheckpoints(tmp_path_factory.mktemp("ckpt"))


_BUNDLES: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def bundle_of(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Convert (once per session) a family's tiny checkpoint, parity included: every format, or
    for an encoder-decoder with a fixed-capacity cache (``max_target_len``) ONNX and ExecuTorch.
    Generating families carry ``exit_step`` (``early_exit=1``) for the speculative tests."""
    from edgeseq.convert.pipeline import convert

    def get(family: str, max_target_len: int | None = None) -> Path:
        key = (family, max_target_len)
        if key not in _BUNDLES:
            out = tmp_path_factory.mktemp("bundle") / f"{family}-{max_target_len or 'dyn'}"
            formats = ("onnx", "pte", "pt2") if max_target_len is None else ("onnx", "pte")
            # generating families also get the self-speculative drafter (the first layer)
            early = 1 if families()[family].task != "classification" else None
            _BUNDLES[key] = convert(checkpoints[family], out, formats=formats, parity_tokens=64,
                                    max_target_len=max_target_len, early_exit=early)
        return _BUNDLES[key]
    return get


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # parallel workers share the cores: one thread each, or the thread pools spin on
        # each other (ONNX Runtime's most of all)
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["EDGESEQ_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
