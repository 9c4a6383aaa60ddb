"""One shared suite, run for every family x backend on a converted bundle."""
import json

import numpy as np
import pytest
import torch

import edgeseq
from edgeseq.registry import families, format_of

from ..conftest import FAMILIES, backend_cases

CASES = backend_cases(FAMILIES)


@pytest.fixture(scope="module")
def refs(checkpoints):
    """Reference model, a prompt and transformers'/the reference's greedy tokens per family."""
    out = {}
    for name in FAMILIES:
        fam = families()[name]()
        model = fam.load(checkpoints[name])
        vocab = fam.model_config(model)["vocab_size"]
        prompt = torch.randint(1, vocab, (1, 9), generator=torch.Generator().manual_seed(5))
        toks = fam.reference_greedy(model, prompt, 64)[0].tolist()
        full = torch.cat([prompt, torch.tensor([toks[:-1]])], 1)
        out[name] = (fam, model, prompt[0].tolist(), toks, fam.reference_logits(model, full)[0])
    return out


@pytest.mark.parametrize("family,backend", CASES)
def test_parity_report(bundle_of, family, backend):
    parity = json.loads((bundle_of(family) / "parity.json").read_text())
    rec = next(c for c in parity["checks"] if c["format"] == format_of(backend))
    assert rec["passed"] and rec["tokens_identical"] and rec["tokens_compared"] == 64
    assert rec["last_step_logits_max_abs_err"] <= 1e-4


@pytest.mark.parametrize("family,backend", CASES)
def test_greedy_64_identical_and_last_logits(bundle_of, refs, family, backend):
    fam, model, prompt, ref_toks, ref_logits = refs[family]
    sess = edgeseq.load(bundle_of(family), backend=backend)
    assert sess.generate(prompt, 64, stop_at_eos=False).tolist() == ref_toks
    sess.reset()
    sess.prefill(np.array([prompt]))
    for tok in ref_toks[:-1]:
        logits = sess.step(np.array([tok]))
    assert np.abs(logits[0] - ref_logits[-1].numpy()).max() <= 1e-4


@pytest.mark.parametrize("family,backend", CASES)
def test_chunked_prefill_same_state(bundle_of, refs, family, backend):
    fam, model, *_ = refs[family]
    ids = np.random.default_rng(0).integers(1, fam.model_config(model)["vocab_size"], (1, 70))
    g = fam.graphs(model)["prefill"]
    with torch.no_grad():
        whole = g.module(torch.from_numpy(ids),
                         *[torch.from_numpy(s.allocate({"batch": 1})) for s in g.state])
    sess = edgeseq.load(bundle_of(family), backend=backend)
    for chunk in (1, 7, 64):
        sess.reset()
        sess.max_chunk = chunk
        sess.feed(ids)
        sd = sess.state_dict()
        for spec, ref in zip(g.state, whole[1:]):
            got = sd[f"state.{spec.name}"]
            assert np.abs(got - ref.numpy()).max() <= 1e-5 * max(1, np.abs(ref.numpy()).max()), \
                (chunk, spec.name)


@pytest.mark.parametrize("family,backend", CASES)
def test_pause_and_resume_in_process(bundle_of, refs, family, backend):
    _, _, prompt, *_ = refs[family]
    root = bundle_of(family)
    kw = dict(do_sample=True, temperature=0.8, top_k=20, seed=11, stop_at_eos=False)
    unbroken = edgeseq.load(root, backend=backend).generate(prompt, 24, **kw).tolist()
    a = edgeseq.load(root, backend=backend)
    it = a.stream(prompt, 24, **kw)
    first = [int(next(it)[0]) for _ in range(10)]
    sd = a.state_dict()
    b = edgeseq.load(root, backend=backend)
    b.load_state(sd)
    rest = b.generate(None, 14, do_sample=True, temperature=0.8, top_k=20, stop_at_eos=False)
    assert first + rest[0].tolist() == unbroken


@pytest.mark.parametrize("family", FAMILIES)
def test_ort_batch_matches_single_streams(bundle_of, family):
    sess = edgeseq.load(bundle_of(family), backend="ort")
    prompts = np.random.default_rng(1).integers(1, sess.manifest.config["vocab_size"], (3, 6))
    batched = sess.generate(prompts, 16, stop_at_eos=False)
    for row, p in zip(batched, prompts):
        assert row.tolist() == sess.generate(p, 16, stop_at_eos=False).tolist()


def test_executorch_runs_batches_row_by_row(bundle_of):
    # The .pte is memory-planned for batch 1, so the backend splits a batch into rows.
    sess = edgeseq.load(bundle_of(FAMILIES[0]), backend="executorch")
    prompts = np.random.default_rng(2).integers(1, sess.manifest.config["vocab_size"], (2, 5))
    batched = sess.generate(prompts, 6, stop_at_eos=False)
    for row, p in zip(batched, prompts):
        assert row.tolist() == sess.generate(p, 6, stop_at_eos=False).tolist()


def test_load_errors(tmp_path, bundle_of):
    with pytest.raises(edgeseq.bundle.BundleError, match="no such bundle"):
        edgeseq.load(tmp_path / "missing")
    with pytest.raises(KeyError, match="unknown backend 'tflite'; known: example, executorch, openvino, ort, qnn, torch$"):
        edgeseq.load(bundle_of(FAMILIES[0]), backend="tflite")


def test_fork_shares_weights_not_state(bundle_of):
    a = edgeseq.load(bundle_of(FAMILIES[0]), backend="ort")
    b = a.fork()
    assert b.model is a.model
    alone = b.generate([1, 2, 3], 8, stop_at_eos=False).tolist()
    a.generate([7, 7, 7, 7], 5, stop_at_eos=False)  # another stream on the same weights
    assert b.generate([1, 2, 3], 8, stop_at_eos=False).tolist() == alone


def test_executorch_plans_derived_dims_at_their_bound(tmp_path):
    """Whisper's encoder takes any even number of mel frames up to its window: the ExecuTorch
    program must accept the largest. (Lowering the zoo model's encoder once planned only 256 of
    its 1000 frames: to_edge loses the range of a derived dim and falls back to the traced size.)"""
    pytest.importorskip("executorch.runtime")
    from executorch.runtime import Runtime

    from edgeseq import zoo
    from edgeseq.registry import get_backend, get_family

    fam = get_family("whisper")
    model = fam.load(zoo.resolve("zoo:whisper-tonespeech"))
    enc = fam.graphs(model)["encoder"]
    get_backend("executorch").lower({"encoder": enc}, tmp_path, "fp32")
    meta = Runtime.get().load_program(tmp_path / "model.pte").metadata("encoder")
    window = 2 * model.config.max_source_positions
    assert tuple(meta.input_tensor_meta(0).sizes()) == (1, model.config.num_mel_bins, window)
