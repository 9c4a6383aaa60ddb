"""``manifest.json`` is read once per load and passed down (#24): the session, the integrity
check, the backend and a speculative plan ask the ``Manifest`` object, never the file."""
from __future__ import annotations

import builtins
import io
from pathlib import Path

import pytest

import edgeseq


@pytest.fixture
def count_reads(monkeypatch):
    reads: list[str] = []
    real = io.open

    def counting(file, *a, **kw):
        if str(file).endswith("manifest.json"):
            reads.append(str(file))
        return real(file, *a, **kw)

    monkeypatch.setattr(io, "open", counting)
    monkeypatch.setattr(builtins, "open", counting)
    return reads


@pytest.mark.parametrize("backend", ["ort", "executorch", "torch"])
def test_one_read_per_load(bundle_of, count_reads, backend):
    from edgeseq.trust import record_converted

    bundle = bundle_of("mamba")
    # this run converted it, but maybe under another cache folder (a module that moves
    # XDG_CACHE_HOME): --backend torch loads only what the trust record says was converted here
    record_converted(bundle)
    edgeseq.load(bundle, backend=backend)     # (a first load may also record the bundle)
    count_reads.clear()
    sess = edgeseq.load(bundle, backend=backend)
    assert sess.generate([1, 2, 3], max_new_tokens=2, stop_at_eos=False) is not None
    assert count_reads == [str(Path(bundle) / "manifest.json")], count_reads


def test_one_read_per_speculative_load(bundle_of, count_reads):
    from edgeseq.runtime.speculative.session import load

    bundle = bundle_of("mamba")
    load(bundle, backend="ort", speculate="early-exit:1")
    count_reads.clear()
    load(bundle, backend="ort", speculate="early-exit:1")
    assert count_reads == [str(Path(bundle) / "manifest.json")], count_reads
