"""Plans short of memory load one decoder graph: an encoder-decoder's ``decoder_chunk`` takes
single tokens (no ``decoder_step``); a state-space target drafted by a model loads ``verify``
alone (it takes the prompt and single tokens) and its drafter no ``step``. Greedy output must not
change, and the measured peak must stay within the budget that chose the plan."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeseq.bundle import read_manifest

MB = 1 << 20
WORKER = Path(__file__).with_name("memory_worker.py")


@pytest.fixture(scope="module")
def draft(draft_loop_bundle: Path) -> Path:
    return draft_loop_bundle


def _budget_for(bundle: Path, kind: str, want, **kw) -> tuple[int, object]:
    """The largest budget (in quarter MiB below the unconstrained plan) whose plan ``want``s."""
    from edgeseq.runtime.speculative.plan import make_plan

    man = read_manifest(bundle)
    budget = make_plan(bundle, man, "ort", kind, None, **kw).total
    while budget > 0:
        plan = make_plan(bundle, man, "ort", kind, budget, **kw)
        if want(plan):
            return budget, plan
        budget -= MB // 4
    raise AssertionError(f"no budget gives the plan wanted for {kind}")


def test_a_draft_plan_short_of_memory_loads_verify_alone(bundle_of, draft: Path) -> None:
    from edgeseq.runtime.session import load as load_plain
    from edgeseq.runtime.speculative import load

    target = bundle_of("mamba")
    plain = load_plain(target)
    kw = {"draft_root": draft}
    no_step, plan1 = _budget_for(target, "draft", lambda p: p.mode == "draft"
                                 and "step" not in p.graphs and "prefill" in p.graphs, **kw)
    alone, plan2 = _budget_for(target, "draft", lambda p: p.mode == "draft"
                               and p.graphs == {"verify"}, **kw)
    assert alone < no_step and plan2.total < plan1.total
    assert "step" not in plan1.draft_graphs and "draft_loop" in plan1.draft_graphs
    rng = np.random.default_rng(3)
    for budget in (no_step, alone):
        ss = load(target, speculate=f"draft:{draft}", memory_budget=budget)
        assert set(ss.session.model.runners) == ss.plan.graphs          # nothing more loaded
        assert "step" not in ss.source.s.model.runners
        for _ in range(6):
            base = rng.integers(1, 20, int(rng.integers(1, 20)))
            ids = np.concatenate([base, base])         # a repeat the drafter can learn from
            assert ss.generate(ids, 20) == plain.generate(ids, 20).tolist(), (budget, ids)
        assert ss.stats.drafted > 0


def test_an_encoder_decoder_short_of_memory_loads_decoder_chunk_alone(bundle_of) -> None:
    from edgeseq.runtime.session import load as load_plain
    from edgeseq.runtime.speculative import load

    bundle = bundle_of("t5")
    kw = {"max_source": 24, "max_length": 25}
    budget, plan = _budget_for(bundle, "ngram", lambda p: p.mode == "ngram"
                               and "decoder_step" not in p.graphs, **kw)
    assert "no step graph" in plan.reason, plan.reason
    ss = load(bundle, speculate="ngram", memory_budget=budget, **kw)
    assert set(ss.session.model.runners) == {"encoder", "decoder_chunk"}
    plain = load_plain(bundle)
    rng = np.random.default_rng(4)
    vocab = int(read_manifest(bundle).config["vocab_size"])
    for _ in range(8):
        src = rng.integers(3, vocab, int(rng.integers(2, 24))).tolist()
        assert ss.generate(src, 24) == plain.generate(src, 24, num_beams=1), src


@pytest.mark.slow
def test_the_lean_draft_plan_stays_within_its_budget(bundle_of, draft: Path) -> None:
    """The plan that loads verify alone, measured in a fresh process over 20 generations."""
    target = bundle_of("mamba")
    budget, _ = _budget_for(target, "draft", lambda p: p.mode == "draft"
                            and p.graphs == {"verify"}, draft_root=draft)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(WORKER), str(target), "ort", f"draft:{draft}",
                        str(budget), "20", "5"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["mode"] == "draft" and not res["refused"], res
    assert res["peak"] <= budget, (res["peak"] / MB, budget / MB, res)
