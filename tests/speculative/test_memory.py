"""The memory plan holds: over 200 generations (10 fresh processes x 20) with random budgets,
sources and prompts, the process's peak RSS above its pre-load baseline never exceeds the budget; a
budget too small for speculation decodes plainly; one too small for the model fails before
loading anything."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeseq.bundle import BundleError, read_manifest

WORKER = Path(__file__).with_name("memory_worker.py")
RUNS_PER_PROCESS = 20
PROCESSES = 10          # 200 generations
SOURCES = ("ngram", "input", "recycle", "early-exit:1", "auto")


def _child(bundle: Path, backend: str, spec: str, budget: int, seed: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(WORKER), str(bundle), backend, spec, str(budget),
                        str(RUNS_PER_PROCESS), str(seed)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_never_exceeds_the_budget(bundle_of) -> None:
    from edgeseq.runtime.speculative.plan import make_plan, parse_speculate, plain_minimum

    rng = np.random.default_rng(7)
    bundles = {"mamba": bundle_of("mamba"), "t5": bundle_of("t5")}
    results = []
    for i in range(PROCESSES):
        fam = ("mamba", "t5")[i % 2]
        backend = "ort" if i % 5 < 3 else "executorch"   # ExecuTorch children start slower
        bundle = bundles[fam]
        man = read_manifest(bundle)
        spec = SOURCES[int(rng.integers(len(SOURCES)))]
        kw = {} if fam == "mamba" else {"max_source": 24, "max_length": 25}
        lo = plain_minimum(bundle, man, backend, **kw)
        hi = make_plan(bundle, man, backend, parse_speculate(spec)[0], None, **kw).total
        budget = int(rng.uniform(0.7 * lo, 1.2 * hi))
        res = _child(bundle, backend, spec, budget, seed=i)
        results.append((fam, backend, spec, res))
        if res["refused"]:
            assert budget < lo, res
            assert res["peak"] < 4 << 20, f"a refused load allocated {res['peak']} bytes"
        else:
            assert res["peak"] <= budget, (
                f"{fam}/{backend}/{spec}: peak {res['peak'] / 2**20:.1f} MiB above baseline "
                f"exceeds the budget of {budget / 2**20:.1f} MiB (plan {res['mode']}, "
                f"{res['planned'] / 2**20:.1f} MiB planned; growth at the end "
                f"{ {k: round(v / 2**20, 1) for k, v in res['end'].items()} } MiB, "
                f"host {res['host']})")
    modes = {r[3].get("mode") for r in results}
    # the random budgets reached all three outcomes
    assert any(r[3]["refused"] for r in results), "no budget was refused"
    assert "off" in modes and modes - {"off", None}, modes


def test_a_budget_without_room_for_speculation_decodes_plainly(bundle_of) -> None:
    from edgeseq.runtime.session import load as load_plain
    from edgeseq.runtime.speculative import load
    from edgeseq.runtime.speculative.plan import make_plan, plain_minimum

    bundle = bundle_of("mamba")
    man = read_manifest(bundle)
    floor = plain_minimum(bundle, man, "ort")        # plain decoding, 1-token prefill
    assert make_plan(bundle, man, "ort", "ngram", None).total > floor
    # plain decoding fits; ngram's buffers and verify graph do not, at any prefill chunk
    ss = load(bundle, speculate="ngram", memory_budget=floor + 1)
    assert ss.plan.mode == "off" and "not ngram" in ss.plan.reason, ss.plan
    assert "verify" not in ss.session.model.runners      # not even loaded
    # Mamba's prefill scans its static bound whatever the chunk: the plan keeps the bound
    bound = man.graphs["prefill"].max_chunk
    assert man.config["prefill_static_chunk"]
    assert ss.plan.prefill_chunk == bound and ss.session.max_chunk == bound
    ids = [3, 4, 5, 3, 4]
    assert ss.generate(ids, 8) == load_plain(bundle).generate(ids, 8).tolist()
    assert ss.plan.total <= floor + 1
    with pytest.raises(BundleError, match="cannot hold this model.*nothing was loaded"):
        load(bundle, speculate="ngram", memory_budget=floor - 1)


def test_a_dynamic_prefill_gives_up_chunk_length_before_speculation(bundle_of) -> None:
    """Mamba-2's prefill grows with its chunk: with room for plain decoding at the full chunk
    and a little more, the plan speculates with a shorter prefill chunk."""
    from edgeseq.runtime.speculative.plan import make_plan

    bundle = bundle_of("mamba2")
    man = read_manifest(bundle)
    assert not man.config.get("prefill_static_chunk")
    full = make_plan(bundle, man, "ort", "off", None)
    roomy = make_plan(bundle, man, "ort", "ngram", full.total + 1)
    assert roomy.mode == "ngram" and roomy.prefill_chunk < full.prefill_chunk, roomy
