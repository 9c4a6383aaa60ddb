"""ONNX Runtime keeps the bindings of one-token graphs over a fixed-shape state across calls
(``_run_bound``): results must be those of binding everything anew on every call, with chunk
calls in between and through rollbacks."""
import numpy as np
import pytest

from edgeseq.bundle import read_manifest
from edgeseq.runtime.session import load

GRAPHS = {"prefill", "step", "verify"}


@pytest.fixture(scope="module")
def pair(bundle_of):
    root = bundle_of("mamba")
    kept = load(root, backend="ort", threads=1, graphs=GRAPHS)
    fresh = load(root, backend="ort", threads=1, graphs=GRAPHS)
    for r in fresh.model.runners.values():
        r.reuse = False                      # the path that binds every call
    # one-token graphs keep theirs; chunk graphs bind anew (a kept binding holds its call's
    # activation block), and the two must agree on whose buffers hold the live state
    assert {g for g in GRAPHS if kept.model.runners[g].reuse} == {"step"}
    vocab = int(read_manifest(root).config["vocab_size"])
    return kept, fresh, vocab


def _calls(vocab: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        if i % 3 == 2:
            yield "verify", {"input_ids": rng.integers(0, vocab, (1, int(rng.integers(1, 17))))}
        else:
            yield "step", {"input_ids": rng.integers(0, vocab, (1,))}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_same_outputs_and_states_as_binding_every_call(pair) -> None:
    kept, fresh, vocab = pair
    prompt = np.arange(1, 20)[None] % vocab
    states = []
    for s in (kept, fresh):
        s.reset(1)
        s.prefill(prompt)
        states.append(s.model.from_numpy(s.model.to_numpy(s._state)))
    sk, sf = states
    for graph, ids in _calls(vocab, 40, 0):
        ok, sk = kept.model.run(graph, ids, sk)
        of, sf = fresh.model.run(graph, ids, sf)
        _same(ok, of)
        for a, b in zip(kept.model.to_numpy(sk), fresh.model.to_numpy(sf)):
            np.testing.assert_array_equal(a, b)


def test_logits_survive_the_next_call(pair) -> None:
    kept, _, vocab = pair
    kept.reset(1)
    st = kept._state
    first, st = kept.model.run("step", {"input_ids": np.array([3])}, st)
    before = {k: v.copy() for k, v in first.items() if not k.startswith("trace.")}
    kept.model.run("step", {"input_ids": np.array([7])}, st)
    for k, v in before.items():
        np.testing.assert_array_equal(first[k], v, err_msg=k)


def test_a_rollback_is_read_by_the_kept_bindings(pair) -> None:
    """``assign`` writes a snapshot into the live buffers (the speculative rollback): the next
    call must start from it, as a state made from the snapshot does."""
    kept, fresh, vocab = pair
    kept.reset(1)
    st = kept._state
    for graph, ids in _calls(vocab, 6, 1):
        _, st = kept.model.run(graph, ids, st)
    snap = kept.model.to_numpy(st)
    for graph, ids in _calls(vocab, 5, 2):             # move on, both buffer sets bound
        _, st = kept.model.run(graph, ids, st)
    st = kept.model.assign(st, snap)
    ref = fresh.model.from_numpy(snap)
    for graph, ids in _calls(vocab, 6, 3):
        ok, st = kept.model.run(graph, ids, st)
        of, ref = fresh.model.run(graph, ids, ref)
        _same(ok, of)
