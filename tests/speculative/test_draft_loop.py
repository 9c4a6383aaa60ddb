"""``draft_loop`` (``convert --draft-loop K``): a draft model's K greedy steps in one call.

It must draft exactly what the step graph drafts, roll back through its traces to any accepted
prefix, never change the target's greedy output, and its conversion check must be able to fail.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeseq.bundle import BundleError, read_manifest

K = 4


@pytest.fixture(scope="module")
def draft(draft_loop_bundle: Path) -> Path:
    assert read_manifest(draft_loop_bundle).config["draft_loop_tokens"] == K
    return draft_loop_bundle


def test_conversion_checks_it_against_the_reference(draft: Path) -> None:
    import json

    man = read_manifest(draft)
    assert man.config["draft_loop_tokens"] == K
    loop = man.graphs["draft_loop"]
    assert [o.name for o in loop.outputs][0] == "tokens" and loop.outputs[0].shape[1] == K
    checks = json.loads((draft / "parity.json").read_text())["graph_checks"]
    assert [c["graph"] for c in checks] == ["draft_loop"]
    assert checks[0]["tokens_identical"] and checks[0]["passed"]


def test_the_check_fails_on_other_tokens(draft: Path) -> None:
    from edgeseq.convert.parity import ParityInputs, check_draft_loop

    man = read_manifest(draft)
    vocab = int(man.config["vocab_size"])
    prompt = [3, 5, 7, 9]
    from edgeseq.runtime.session import load

    good = load(draft).generate(prompt, K, stop_at_eos=False).tolist()
    bad = [(t + 1) % vocab for t in good]
    empty = np.zeros((0, vocab), dtype=np.float32)
    assert check_draft_loop(draft, "ort", ParityInputs(prompt, good, empty))["passed"]
    rec = check_draft_loop(draft, "ort", ParityInputs(prompt, bad, empty))
    assert not rec["tokens_identical"] and not rec["passed"]


def test_same_drafts_and_rollbacks_as_the_step_loop(draft: Path) -> None:
    from edgeseq.runtime.session import load
    from edgeseq.runtime.speculative.engine import DraftModelSource

    looped = DraftModelSource(load(draft, graphs={"prefill", "step", "draft_loop"}))
    stepped = DraftModelSource(load(draft, graphs={"prefill", "step"}))
    assert looped.loop and not stepped.loop
    rng = np.random.default_rng(0)
    ctx = [int(t) for t in rng.integers(1, 50, 12)]   # long enough to catch up by prefill
    for src in (looped, stepped):
        src.start(ctx)
    for _ in range(12):
        a = looped.propose(ctx, K).tokens.tolist()
        b = stepped.propose(ctx, K).tokens.tolist()
        assert a == b
        # accept a random prefix plus one other token: the next round rolls back to it
        m = int(rng.integers(0, K + 1))
        ctx += a[:m] + [int(rng.integers(1, 50))]


def test_a_window_drafts_from_the_prompt_tail(draft: Path) -> None:
    """``window`` W: the drafter reads the prompt's last W tokens only, exactly as if they were
    its whole prompt, and then follows the context as usual."""
    from edgeseq.runtime.session import load
    from edgeseq.runtime.speculative.engine import DraftModelSource

    rng = np.random.default_rng(2)
    ctx = [int(t) for t in rng.integers(1, 50, 40)]
    tail = DraftModelSource(load(draft), window=8)
    ref = DraftModelSource(load(draft), window=0)
    whole = DraftModelSource(load(draft))
    assert whole.window == read_manifest(draft).graphs["prefill"].max_chunk  # the default
    skip = len(ctx) - 1 - 8
    tail.start(ctx)
    ref.start(ctx[skip:])
    for _ in range(6):
        a = tail.propose(ctx, K).tokens.tolist()
        assert a == ref.propose(ctx[skip:], K).tokens.tolist()
        assert len(tail.fed) < len(ctx)
        m = int(rng.integers(0, K + 1))
        ctx += a[:m] + [int(rng.integers(1, 50))]


def test_greedy_output_unchanged_through_the_loop(bundle_of, draft: Path) -> None:
    from edgeseq.runtime.session import load as load_plain
    from edgeseq.runtime.speculative import load

    target = bundle_of("mamba")
    plain = load_plain(target)
    ss = load(target, speculate=f"draft:{draft}")
    assert "draft_loop" in ss.plan.draft_graphs and not ss.plan.adaptive, ss.plan
    rng = np.random.default_rng(1)
    for _ in range(10):
        base = rng.integers(1, 20, int(rng.integers(2, 9)))
        ids = np.concatenate([base, base])
        assert ss.generate(ids, 16) == plain.generate(ids, 16).tolist()
    assert ss.stats.drafted > 0


def test_refused_for_an_encoder_decoder(checkpoints, tmp_path: Path) -> None:
    from edgeseq.convert.pipeline import convert

    with pytest.raises(BundleError, match="--draft-loop applies to causal language models"):
        convert(checkpoints["t5"], tmp_path / "out", formats=("onnx",), draft_loop=4)
    assert not (tmp_path / "out").exists()
