import numpy as np
import pytest

from edgeseq.runtime.decoding import SamplingConfig, next_token, probabilities


def test_greedy_is_argmax():
    logits = np.array([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]], dtype=np.float32)
    assert next_token(logits, SamplingConfig(), np.random.default_rng(0)).tolist() == [1, 0]


def test_top_k_and_top_p_filter():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    p = probabilities(logits, SamplingConfig(True, top_k=2))
    assert np.allclose(p, [[0.625, 0.375, 0, 0]])
    p = probabilities(logits, SamplingConfig(True, top_p=0.7))  # 0.5 + 0.3 reaches 0.7
    assert np.allclose(p, [[0.625, 0.375, 0, 0]])
    p = probabilities(logits, SamplingConfig(True, top_p=0.4))  # the top token always stays
    assert np.allclose(p, [[1, 0, 0, 0]])
    p = probabilities(logits, SamplingConfig(True, temperature=0.5))
    assert p[0, 0] > 0.5 and np.isclose(p.sum(), 1)


def test_sampling_is_seeded_and_follows_the_distribution():
    logits = np.log(np.array([[0.7, 0.2, 0.1]] * 4000))
    cfg = SamplingConfig(True)
    a = next_token(logits, cfg, np.random.default_rng(7))
    b = next_token(logits, cfg, np.random.default_rng(7))
    assert (a == b).all()
    freq = np.bincount(a, minlength=3) / len(a)
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5)])
def test_bad_sampling_config(kw):
    with pytest.raises(ValueError):
        SamplingConfig(True, **kw)
