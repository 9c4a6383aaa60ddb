"""Step and chunked prefill graphs are the same function as the family's reference model.

Runs in PyTorch only (no backend): these are the graphs every backend lowers.
"""
import pytest
import torch

from edgeseq.registry import families

from ..conftest import FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def fam_model(request, checkpoints):
    fam = families()[request.param]()
    model = fam.load(checkpoints[request.param])
    return fam, model, fam.graphs(model)


def _zeros(graph, batch):
    return [torch.from_numpy(s.allocate({"batch": batch})) for s in graph.state]


def _ids(n, vocab, batch=2, seed=1):
    return torch.randint(1, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_has_two_layers_and_prefill_step(fam_model):
    fam, model, graphs = fam_model
    # Mamba adds ``verify`` (speculative decoding: prefill with per-position states)
    assert {"prefill", "step"} <= set(graphs) <= {"prefill", "step", "verify"}
    assert fam.model_config(model)["n_layers"] >= 2
    names = [s.name for s in graphs["step"].state]
    assert names == [s.name for s in graphs["prefill"].state] and len(set(names)) == len(names)


@torch.no_grad()
def test_prefill_and_step_match_reference(fam_model):
    fam, model, g = fam_model
    vocab = fam.model_config(model)["vocab_size"]
    ids = _ids(12, vocab)
    ref = fam.reference_logits(model, ids)
    out = g["prefill"].module(ids, *_zeros(g["prefill"], 2))
    assert (out[0] - ref).abs().max() <= 1e-4
    state = _zeros(g["step"], 2)
    for t in range(ids.shape[1]):
        o = g["step"].module(ids[:, t], *state)
        assert (o[0] - ref[:, t]).abs().max() <= 1e-4, f"step {t}"
        state = o[1:]
    for a, b in zip(state, out[1:]):
        assert (a - b).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_ends_in_same_state(fam_model, chunk):
    fam, model, g = fam_model
    ids = _ids(70, fam.model_config(model)["vocab_size"], seed=2)
    whole = g["prefill"].module(ids, *_zeros(g["prefill"], 2))
    state = _zeros(g["prefill"], 2)
    for i in range(0, 70, chunk):
        o = g["prefill"].module(ids[:, i:i + chunk], *state)
        state = o[1:]
    assert (o[0][:, -1] - whole[0][:, -1]).abs().max() <= 1e-4
    for spec, a, b in zip(g["prefill"].state, state, whole[1:]):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()), spec.name


@torch.no_grad()
def test_greedy_through_graphs_equals_reference_generate(fam_model):
    fam, model, g = fam_model
    prompt = _ids(8, fam.model_config(model)["vocab_size"], batch=1, seed=3)
    ref = fam.reference_greedy(model, prompt, 64)[0].tolist()
    o = g["prefill"].module(prompt, *_zeros(g["prefill"], 1))
    logits, state, got = o[0][:, -1], o[1:], []
    for _ in range(64):
        tok = logits.argmax(-1)
        got.append(int(tok))
        o = g["step"].module(tok, *state)
        logits, state = o[0], o[1:]
    assert got == ref
    # a collapsed model (one repeated token) would hide a wrong state; greedy decoding of a
    # random model may still settle into a cycle of a few tokens
    assert len(set(ref)) >= 5
