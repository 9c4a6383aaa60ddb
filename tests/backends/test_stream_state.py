"""Every task's session is a ``BaseSession``: ``fork`` (a fresh stream on the same weights),
``state_dict`` -> ``load_state`` (resume where the stream stood) and ``reset`` (a fresh stream),
for causal LMs, text and speech encoder-decoders and classifiers alike."""
from __future__ import annotations

import numpy as np
import pytest

import edgeseq
from edgeseq.runtime.base_session import BaseSession, StateError

from ..conftest import CLASSIFIERS, FAMILIES, FIXED_LEN

ENCDEC = ["t5", "whisper"]


def _same(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    assert set(a) == set(b)
    for k in a:
        if k not in skip:
            assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


# -- causal LM -------------------------------------------------------------------------------------
def test_causal_reset_returns_to_a_fresh_stream(bundle_of):
    a = edgeseq.load(bundle_of(FAMILIES[0]), backend="ort", threads=1)
    assert isinstance(a, BaseSession)
    fresh = a.fork().state_dict()
    first = a.generate([1, 2, 3], 6, stop_at_eos=False).tolist()
    a.reset()
    _same(a.state_dict(), fresh, skip=("rng",))
    assert a.generate([1, 2, 3], 6, stop_at_eos=False).tolist() == first


# -- encoder-decoders ------------------------------------------------------------------------------
def _source(sess, seed: int = 0):
    rng = np.random.default_rng(seed)
    if sess.speech:
        audio = sess.config["audio"]
        return rng.standard_normal((audio["n_mels"], audio["window_frames"])).astype(np.float32)
    return rng.integers(8, 24, size=7).tolist() + [sess.config["eos_token_id"]]


def _greedy_steps(sess, n: int, last: int) -> tuple[list[int], list[np.ndarray]]:
    toks, logits = [], []
    for _ in range(n):
        out = sess.step(np.array([last]))
        logits.append(out)
        last = int(out[0].argmax())
        toks.append(last)
    return toks, logits


@pytest.mark.parametrize("family,layout", [("t5", None), ("t5", FIXED_LEN), ("whisper", None)],
                         ids=["t5-dynamic", "t5-fixed", "whisper-dynamic"])
def test_encdec_state_dict_round_trip_resumes_identically(bundle_of, family, layout):
    a = edgeseq.load(bundle_of(family, layout), backend="ort", threads=1)
    assert isinstance(a, BaseSession)
    src = _source(a)
    prompt = a.decoder_prompt
    a.encode(src)
    a.start(1)
    for t in prompt[:-1]:
        a.step(np.array([t]))
    head, _ = _greedy_steps(a, 3, prompt[-1])
    sd = {k: v.copy() for k, v in a.state_dict().items()}
    assert any(k.startswith("encoded.") for k in sd) and int(sd["position"][0]) == a.position
    b = a.fork()                 # another stream on the same weights, resumed from the file
    b.load_state(sd)
    assert b.position == a.position
    tail_a, logits_a = _greedy_steps(a, 4, head[-1])
    tail_b, logits_b = _greedy_steps(b, 4, head[-1])
    assert tail_a == tail_b
    for x, y in zip(logits_a, logits_b):
        assert np.array_equal(x, y)
    # and the same as one unbroken greedy decode
    unbroken = a.fork().generate(src, 7, num_beams=1, do_sample=False, ignore_eos=True)
    assert head + tail_a == list(unbroken)


@pytest.mark.parametrize("family", ENCDEC)
def test_encdec_fork_and_reset(bundle_of, family):
    a = edgeseq.load(bundle_of(family), backend="ort", threads=1)
    fresh = a.state_dict()
    b = a.fork()
    assert b.model is a.model and b is not a
    src, other = _source(a, 0), _source(a, 1)
    alone = list(b.generate(src, 6, num_beams=1, do_sample=False, ignore_eos=True))
    a.generate(other, 4, num_beams=1, do_sample=False, ignore_eos=True)  # the other stream
    assert list(b.generate(src, 6, num_beams=1, do_sample=False, ignore_eos=True)) == alone
    assert list(a.generate(src, 6, num_beams=1, do_sample=False, ignore_eos=True)) == alone
    a.reset()
    _same(a.state_dict(), fresh)
    with pytest.raises(ValueError, match="nothing encoded"):
        a.start(1)


@pytest.mark.parametrize("family", ENCDEC)
def test_encdec_resumed_state_is_checked(bundle_of, family):
    a = edgeseq.load(bundle_of(family), backend="ort", threads=1)
    a.encode(_source(a))
    a.start(1)
    a.step(np.array([a.decoder_prompt[0]]))
    sd = {k: v.copy() for k, v in a.state_dict().items()}
    enc = next(k for k in sd if k.startswith("encoded."))
    st = next(k for k in sd if k.startswith("state."))
    changes = [(enc, lambda d: d[enc].__setitem__((0,) * d[enc].ndim, np.nan)),
               (enc, lambda d: d.__setitem__(enc, d[enc][None])),
               (enc, lambda d: d.pop(enc)),
               (st, lambda d: d.__setitem__(st, d[st].astype(np.float64))),
               ("position", lambda d: d.__setitem__("position", np.array([-1])))]
    if "source" in sd:
        changes.append(("source", lambda d: d.__setitem__("source", np.array([1 << 40]))))
    t = a.fork()
    before = t.state_dict()
    for key, change in changes:
        bad = {k: v.copy() for k, v in sd.items()}
        change(bad)
        with pytest.raises(StateError, match=key.replace(".", r"\.")):
            t.load_state(bad)
        _same(t.state_dict(), before)  # a refused file leaves the stream as it was


# -- classifiers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", CLASSIFIERS)
def test_classifier_fork_state_dict_and_reset(bundle_of, family):
    a = edgeseq.load(bundle_of(family), backend="ort", threads=1)
    assert isinstance(a, BaseSession)
    x = np.random.default_rng(0).random((2, 3 * a.chunk + 5, a.features), dtype=np.float32)
    fresh = a.state_dict()
    # the unbroken stream
    b = a.fork()
    assert b.model is a.model
    b.reset(2)
    b.push(x)
    b.finish()
    whole = b.running()
    # paused half way, saved and resumed in another stream on the same weights
    a.reset(2)
    a.push(x[:, :a.chunk + 2])
    sd = {k: v.copy() for k, v in a.state_dict().items()}
    c = a.fork()
    c.load_state(sd)
    assert c.frames_in == a.frames_in and c.rows == 2
    c.push(x[:, a.chunk + 2:])
    c.finish()
    assert np.array_equal(c.running(), whole)
    a.push(x[:, a.chunk + 2:])         # the original goes on unchanged by the fork
    a.finish()
    assert np.array_equal(a.running(), whole)
    # a finished stream stays finished when resumed
    d = a.fork()
    d.load_state(a.state_dict())
    with pytest.raises(ValueError, match="finished"):
        d.push(x[:, :1])
    a.reset()
    _same(a.state_dict(), fresh)
    bad = dict(sd, running=np.full_like(sd["running"], np.nan))
    with pytest.raises(StateError, match="running"):
        c.load_state(bad)
