"""Recipe ``draft`` through ``edgeseq convert --distill draft``: the target's bundle carries
its distilled draft (``draft/``, recorded in the manifest, covered by its files record), and
``--speculate draft`` finds it and decodes exactly the plain greedy tokens. The manifest's
draft record is checked as untrusted data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeseq.bundle import read_manifest
from edgeseq.errors import BundleError
from tests.cli.test_cli import edgeseq


@pytest.fixture(scope="module")
def with_draft(checkpoints, tmp_path_factory) -> Path:
    from edgeseq.convert.distill.chain import convert_distilled

    out = tmp_path_factory.mktemp("draft") / "bundle"
    return convert_distilled(str(checkpoints["s4d"]), out, "draft", steps=3, bar=False,
                             formats=("onnx",), parity_tokens=16)


def test_speculate_draft_finds_the_recorded_draft_and_keeps_greedy(with_draft) -> None:
    from edgeseq.runtime import session
    from edgeseq.runtime.speculative import session as spec

    man = read_manifest(with_draft)
    assert man.draft_record.path == "draft" and man.draft_root(with_draft).is_dir()
    assert "draft/manifest.json" in man.files      # the target's record covers the draft
    t_cfg = man.config
    d_cfg = read_manifest(man.draft_root(with_draft)).config
    assert d_cfg["vocab_size"] == t_cfg["vocab_size"] and d_cfg["d_model"] < t_cfg["d_model"]
    plain = session.load(with_draft, backend="ort", threads=1)
    s = spec.load(with_draft, backend="ort", speculate="draft", threads=1)
    assert s.plan.mode == "draft"
    rng = np.random.default_rng(0)
    for _ in range(3):
        prompt = rng.integers(1, t_cfg["vocab_size"], size=6).tolist()
        want = [int(t[0]) for t in plain.stream(np.array(prompt), 24, stop_at_eos=False)]
        plain.reset()
        assert s.generate(prompt, 24, stop_at_eos=False) == want
    assert s.stats.to_json()["emitted"] >= 72
    p = edgeseq("run", with_draft, "--prompt-ids", "3,4,5", "-n", "8", "--speculate", "draft",
                "--json")
    assert json.loads(p.stdout)["speculate"] == "draft"
    assert edgeseq("inspect", with_draft, "--verify").returncode == 0


def test_draft_record_is_checked(with_draft, tmp_path) -> None:
    from edgeseq.runtime.speculative import session as spec

    with pytest.raises(BundleError, match="no draft recorded"):
        spec.load(with_draft / "draft", speculate="draft")   # the draft has none of its own
    for record, msg in [({"path": "../elsewhere"}, "not a plain relative path"),
                        ({"path": "/tmp"}, "not a plain relative path"),
                        ({"path": "nowhere"}, "is missing"),
                        ({"path": 5}, '"draft" must be null or a record')]:
        b = tmp_path / "b"
        shutil.rmtree(b, ignore_errors=True)
        shutil.copytree(with_draft, b)
        m = json.loads((b / "manifest.json").read_text())
        m["draft"] = record
        (b / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match=msg):
            read_manifest(b)


@pytest.mark.parametrize("family", ["mamba"])
def test_draft_student_of_each_causal_family(family, checkpoints, tmp_path) -> None:
    from edgeseq.convert.distill import distill
    from edgeseq.registry import families

    out = distill(checkpoints[family], tmp_path / "s", steps=2, bar=False)
    fam = families()[family]()
    student, teacher = fam.load(out), fam.load(checkpoints[family])
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(student) < n(teacher) / 2
    assert student.config.vocab_size == teacher.config.vocab_size


def test_seq2seq_draft_keeps_the_encoder_and_greedy(checkpoints, tmp_path) -> None:
    """An encoder-decoder's draft: the teacher's encoder (unchanged) and one decoder layer, in
    the target's bundle; greedy speculative decoding with it is plain greedy decoding."""
    import torch

    from edgeseq.convert.distill.chain import convert_distilled
    from edgeseq.families.t5 import T5Family
    from edgeseq.runtime import session
    from edgeseq.runtime.speculative import session as spec

    out = convert_distilled(str(checkpoints["t5"]), tmp_path / "t5", "draft", steps=3, bar=False,
                            formats=("onnx",), parity_tokens=16)
    man = read_manifest(out)
    dman = read_manifest(man.draft_root(out))
    assert dman.family == "t5" and "decoder_step" in dman.graphs
    teacher = T5Family().load(checkpoints["t5"])
    assert len(teacher.decoder.block) == 2
    plain = session.load(out, backend="ort", threads=1)
    s = spec.load(out, backend="ort", speculate="draft", threads=1)
    assert s.plan.mode == "draft"
    rng = np.random.default_rng(1)
    for _ in range(3):
        src = rng.integers(8, 24, size=8).tolist() + [teacher.config.eos_token_id]
        want = [int(t) for t in plain.generate(src, 12, num_beams=1)]
        assert s.generate(src, 12) == want
    del torch
