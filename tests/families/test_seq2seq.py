"""Encoder-decoder family (T5, BART, Marian, Whisper) on every backend and both cache layouts.

The tiny models are briefly trained (``fit_reversal``) so their tokens depend on the source and
on the cache; parity (run by ``convert``) compares 32 greedy tokens and 4-beam search against
transformers' ``generate``, and every decoder-step logit along the reference path.
"""
from __future__ import annotations

import numpy as np
import pytest

import edgeseq

from ..conftest import FIXED_LEN, OPTIONAL_FORMATS, SEQ2SEQ

LAYOUTS = [None, FIXED_LEN]


def _source(sess, n: int = 7, seed: int = 0):
    if sess.speech:
        from edgeseq.families.whisper import WhisperFamily  # noqa: F401 - registers

        rng = np.random.default_rng(seed)
        frames = sess.config["audio"]["window_frames"]
        return rng.standard_normal((sess.config["audio"]["n_mels"], frames)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return rng.integers(8, 24, size=n).tolist() + [sess.config["eos_token_id"]]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["dynamic", "fixed"])
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_parity_greedy_and_beams(bundle_of, family, layout):
    import json

    rep = json.loads((bundle_of(family, layout) / "parity.json").read_text())
    assert rep["passed"]
    want = {"onnx", "pte", "pt2"} if layout is None else {"onnx", "pte"}
    want |= set(OPTIONAL_FORMATS)
    assert {c["format"] for c in rep["checks"]} == want
    for c in rep["checks"]:
        assert c["tokens_identical"] and c["beam_tokens_identical"], c
        assert c["tokens_compared"] == 32
        assert c["step_logits_max_abs_err"] <= c["tolerance"]
    # the reference is not degenerate: tokens vary, so a wrong cache could not pass
    assert len(set(rep["reference_tokens"])) >= 4


@pytest.mark.parametrize("layout", LAYOUTS, ids=["dynamic", "fixed"])
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_onnx_graphs_are_stamped_from_one_traced_layer(bundle_of, family, layout):
    """The ONNX lowering traced each stack's layer once and stamped it per layer
    (runtime/backends/onnxruntime/stamp.py): every graph's nodes carry their stage's prefix
    ``s<k>/``, one stage per layer plus the prologue and epilogue. A silent fallback to the
    whole-module export would leave the exporter's own names."""
    import onnx

    files = sorted(bundle_of(family, layout).rglob("*.onnx"))
    assert {f.stem for f in files} >= {"encoder", "decoder_step"}
    for f in files:
        nodes = onnx.load(str(f), load_external_data=False).graph.node
        prefixes = {n.name.split("/", 1)[0] for n in nodes}
        assert all(p.startswith("s") and p[1:].isdigit() for p in prefixes), (f, prefixes - {
            p for p in prefixes if p.startswith("s") and p[1:].isdigit()})
        assert len(prefixes) >= 3, (f, prefixes)


_REFERENCE_MODELS: dict = {}


def _without_final(tokens, eos) -> list[int]:
    tokens = list(tokens)
    return tokens[:-1] if tokens and tokens[-1] == eos else tokens


@pytest.mark.parametrize("layout", LAYOUTS, ids=["dynamic", "fixed"])
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_every_backend_decodes_new_sources_as_transformers(bundle_of, checkpoints, family,
                                                          layout):
    """Not the converter's own report: sources it never saw, decoded by each backend of the
    bundle, against transformers' ``generate`` on the checkpoint (greedy and 4 beams)."""
    from edgeseq.bundle import read_manifest
    from edgeseq.registry import backend_name, families

    fam = families()[family]()
    if family not in _REFERENCE_MODELS:
        _REFERENCE_MODELS[family] = fam.load(checkpoints[family])
    model = _REFERENCE_MODELS[family]
    bundle = bundle_of(family, layout)
    formats = {f for g in read_manifest(bundle).graphs.values() for f in g.files}
    assert formats >= {"onnx", "pte"}
    for fmt in sorted(formats):
        sess = edgeseq.load(bundle, backend=backend_name(fmt))
        for seed in (11, 12):
            src = _source(sess, n=9, seed=seed)
            want = fam.reference_generate(model, src, 16, ignore_eos=True)
            assert sess.generate(src, 16, ignore_eos=True) == want, (fmt, seed)
            # transformers' Whisper generate drops the final EOS the others keep (as parity)
            eos = sess.config["eos_token_id"]
            want = _without_final(fam.reference_generate(model, src, 16, num_beams=4), eos)
            assert _without_final(sess.generate(src, 16, num_beams=4), eos) == want, (fmt, seed)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_fixed_cache_equals_dynamic(bundle_of, family):
    dyn = edgeseq.load(bundle_of(family), backend="ort")
    fix = edgeseq.load(bundle_of(family, FIXED_LEN), backend="ort")
    assert dyn.config["cache_layout"] == "dynamic" and fix.config["cache_layout"] == "fixed"
    spec = fix.model.specs[0]
    assert spec.shape[2] == FIXED_LEN and dyn.model.specs[0].shape[2] == "past"
    for seed in range(3):
        src = _source(dyn, seed=seed)
        assert dyn.generate(src, 30, ignore_eos=True) == fix.generate(src, 30, ignore_eos=True)
        assert dyn.generate(src, 30, num_beams=3) == fix.generate(src, 30, num_beams=3)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_logits_depend_on_the_cache(bundle_of, family):
    """A wrong cache must show: wiping it changes the next logits far beyond the tolerance."""
    sess = edgeseq.load(bundle_of(family), backend="ort")
    sess.encode(_source(sess))
    sess.start(1)
    prompt = sess.decoder_prompt
    toks = list(prompt) + [9, 12, 15, 10]
    for t in toks[:-1]:
        sess.step(np.array([t]))
    state = sess.model.to_numpy(sess._state)
    good = sess.step(np.array([toks[-1]]))
    sess._state = sess.model.from_numpy([np.zeros_like(a) for a in state])
    sess.position -= 1
    wiped = sess.step(np.array([toks[-1]]))
    assert np.abs(good - wiped).max() > 1e-2


@pytest.mark.parametrize("backend", ["ort", "executorch"])
def test_fixed_cache_capacity_is_a_clear_limit(bundle_of, backend):
    sess = edgeseq.load(bundle_of("t5", FIXED_LEN), backend=backend)
    toks = sess.generate(_source(sess), 500, ignore_eos=True)
    assert len(toks) == FIXED_LEN - len(sess.decoder_prompt)


def test_sampling_is_seeded(bundle_of):
    sess = edgeseq.load(bundle_of("bart"), backend="ort")
    src = _source(sess)
    a = sess.generate(src, 20, do_sample=True, temperature=1.5, seed=1, ignore_eos=True)
    b = sess.generate(src, 20, do_sample=True, temperature=1.5, seed=1, ignore_eos=True)
    c = sess.generate(src, 20, do_sample=True, temperature=1.5, seed=2, ignore_eos=True)
    assert a == b and a != c


def test_diverse_beam_search(bundle_of):
    sess = edgeseq.load(bundle_of("t5"), backend="ort")
    src = _source(sess)
    plain = sess.generate(src, 20, num_beams=4)
    # one group and no penalty is plain beam search
    assert sess.generate(src, 20, num_beams=4, num_beam_groups=1, diversity_penalty=0.0) == plain
    hyps = sess.generate(src, 20, num_beams=4, num_beam_groups=4, diversity_penalty=50.0,
                         num_return_sequences=4)
    firsts = [h.tokens[0] for h in hyps]
    assert len(set(firsts)) == 4, "a large penalty makes every group start differently"
    assert all(hyps[i].score >= hyps[i + 1].score for i in range(3))
    with pytest.raises(ValueError, match="divisible"):
        sess.generate(src, 5, num_beams=4, num_beam_groups=3)


def test_executorch_runs_beams_row_by_row(bundle_of):
    ort = edgeseq.load(bundle_of("marian"), backend="ort")
    et = edgeseq.load(bundle_of("marian"), backend="executorch")
    src = _source(ort, seed=4)
    assert ort.generate(src, 25, num_beams=4) == et.generate(src, 25, num_beams=4)


def test_generation_config_is_honoured(bundle_of):
    """BART's test config forces BOS first and EOS at the last position; Marian bans its pad."""
    bart = edgeseq.load(bundle_of("bart"), backend="ort")
    toks = bart.generate(_source(bart), 6, ignore_eos=True)
    assert toks[0] == 0 and toks[-1] == 2 and len(toks) == 6
    marian = edgeseq.load(bundle_of("marian"), backend="ort")
    assert marian.config["generation"]["bad_words_ids"] == [[95]]
    assert 95 not in marian.generate(_source(marian), 30, ignore_eos=True)


def test_bad_sources(bundle_of):
    sess = edgeseq.load(bundle_of("bart"), backend="ort")
    with pytest.raises(ValueError, match="non-empty"):
        sess.encode([])
    with pytest.raises(ValueError, match="over this encoder's limit of"):
        sess.encode([9] * 129)
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        sess.encode([9, 300])
    speech = edgeseq.load(bundle_of("whisper"), backend="ort")
    with pytest.raises(ValueError, match="window"):
        speech.encode(np.zeros((80, 102), dtype=np.float32))


def test_whisper_shorter_window_runs(bundle_of):
    """The encoder graph takes any even number of frames up to the model's window: two
    runtimes of it (ExecuTorch, ONNX Runtime) agree on a 40-frame window, whose encoding is not
    the full window's."""
    et = edgeseq.load(bundle_of("whisper"), backend="executorch")
    ort = edgeseq.load(bundle_of("whisper"), backend="ort")
    full = _source(et)
    feats = full[:, :40]
    toks = et.generate(feats, 10, ignore_eos=True)
    assert len(toks) == 10 and toks == ort.generate(feats, 10, ignore_eos=True)
    short, whole = et.encode(feats), et.encode(full)
    assert short.keys() == whole.keys()
    assert all(short[k].shape != whole[k].shape for k in short)   # encoded at its own length
