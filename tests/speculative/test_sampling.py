"""Speculative sampling draws from the target's distribution: a chi-square goodness-of-fit test of
the first three sampled tokens (top-k 4: 64 possible sequences) against the exact probabilities
the plain session computes, with drafts on (nearly) every round: the shallow head's (early exit)
and Token Recycling's (a tree, cut to its first path when sampling)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgeseq.runtime.decoding import SamplingConfig, probabilities

N = 1500
PROMPT = [5, 9, 5, 9, 5]


def _exact(plain, cfg: SamplingConfig) -> dict[tuple[int, ...], float]:
    def dist(prefix: list[int]) -> np.ndarray:
        plain.reset()
        plain.feed(PROMPT + prefix)
        return probabilities(plain._logits, cfg)[0]

    out = {}
    p1 = dist([])
    for a in np.flatnonzero(p1):
        p2 = dist([int(a)])
        for b in np.flatnonzero(p2):
            p3 = dist([int(a), int(b)])
            for c in np.flatnonzero(p3):
                out[(int(a), int(b), int(c))] = float(p1[a] * p2[b] * p3[c])
    return out


@pytest.mark.parametrize("spec", ["early-exit:1", "recycle"])
def test_speculative_sampling_matches_the_target(spec: str, bundle_of) -> None:
    from scipy.stats import chisquare

    from edgeseq.runtime.session import load as load_plain
    from edgeseq.runtime.speculative import load

    bundle = bundle_of("mamba")
    cfg = SamplingConfig(True, temperature=1.5, top_k=4)
    exact = _exact(load_plain(bundle), cfg)
    ss = load(bundle, speculate=spec, exit_threshold=0.0, k=3)
    counts = dict.fromkeys(exact, 0)
    for seed in range(N):
        seq = tuple(ss.generate(PROMPT, 3, do_sample=True, temperature=1.5, top_k=4, seed=seed,
                                stop_at_eos=False))
        assert seq in counts, f"{seq} has probability 0 under the target"
        counts[seq] += 1
    keys = sorted(exact)
    f_exp = np.array([exact[k] for k in keys]) * N
    f_obs = np.array([counts[k] for k in keys])
    # pool the rare sequences so every expected count is >= 5 (chi-square's validity)
    rare = f_exp < 5
    if rare.any():
        f_exp = np.append(f_exp[~rare], f_exp[rare].sum())
        f_obs = np.append(f_obs[~rare], f_obs[rare].sum())
    f_exp *= f_obs.sum() / f_exp.sum()
    p = chisquare(f_obs, f_exp).pvalue
    assert ss.stats.drafted > N, "the draft source must have drafted on (nearly) every round"
    assert 0 < ss.stats.accepted < ss.stats.drafted
    assert p > 1e-3, f"{spec}: chi-square p = {p:.2e}: the sampled distribution is not the target's"
