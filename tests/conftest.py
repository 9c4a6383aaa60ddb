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

FAMILIES = sorted(families())
BACKENDS = sorted(backends())


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name in FAMILIES:
        fam = families()[name]()
        out[name] = fam.make_test_checkpoint(root / name)
    return out


_BUNDLES: dict[str, Path] = {}


@pytest.fixture(scope="session")
def bundle_of(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Convert (once per session) a family's tiny checkpoint to every format, parity included."""
    from edgeseq.convert.pipeline import convert

    def get(family: str) -> Path:
        if family not in _BUNDLES:
            out = tmp_path_factory.mktemp("bundle") / family
            _BUNDLES[family] = convert(checkpoints[family], out, parity_tokens=64)
        return _BUNDLES[family]
    return get


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "2")
