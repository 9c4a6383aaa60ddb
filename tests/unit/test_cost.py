"""``runtime/cost.py``: the one cost model that inspect, profile, the memory plan and
quantization read. Each rule is checked against an independent count (hand arithmetic on the
specs, or ``onnx``'s own parse of the graph files)."""
from __future__ import annotations

import pytest

from edgeseq.bundle import GraphEntry, Manifest, StateSpec, TensorSpec, read_manifest
from edgeseq.runtime import cost

onnx = pytest.importorskip("onnx")


def _spec(name: str, shape: tuple, kind: str = "kv_cache") -> StateSpec:
    return StateSpec(name, shape, "float32", kind)


def _seq2seq_manifest(draft_first: bool = True) -> Manifest:
    full = [_spec("l0.k", ("batch", 2, "past", 4)), _spec("l0.v", ("batch", 2, "past", 4)),
            _spec("l1.k", ("batch", 2, "past", 4)), _spec("l1.v", ("batch", 2, "past", 4))]
    ids = [TensorSpec("input_ids", ("batch", 1), "int64")]
    logits = [TensorSpec("logits", ("batch", 1, 10))]
    enc = GraphEntry("encoder", [TensorSpec("src", ("batch", "source"), "int64")],
                     [TensorSpec("cross", ("batch", "source", 8))], [], {"onnx": "e.onnx"})
    # an early-exit drafter carries the first layer's cache only: a prefix of the list
    draft = GraphEntry("draft_step", ids, logits, full[:2], {"onnx": "d.onnx"})
    step = GraphEntry("decoder_step", ids, logits, full, {"onnx": "s.onnx"})
    order = [enc, draft, step] if draft_first else [enc, step, draft]
    return Manifest(family="t5", task="seq2seq", source={"path": "x"},
                    graphs={g.name: g for g in order}, tokenizer=None)


@pytest.mark.parametrize("draft_first", [True, False])
def test_state_is_the_longest_list_whatever_the_graph_order(draft_first):
    man = _seq2seq_manifest(draft_first)
    assert [s.name for s in man.state_specs] == ["l0.k", "l0.v", "l1.k", "l1.v"]
    # 4 tensors of 2 x past x 4 floats: 32 bytes a tensor per position
    assert cost.state_bytes_per_position(man) == 4 * 2 * 4 * 4
    assert cost.state_bytes(man, {"batch": 1, "past": 10}) == 4 * 2 * 10 * 4 * 4
    assert cost.state_bytes(man, {"batch": 1, "past": 10}, prefix=2) == 2 * 2 * 10 * 4 * 4
    # resident: two copies of the cache and of the encoder's outputs (source x 8 floats)
    at = {"past": 10, "source": 6}
    assert cost.resident_state_bytes(man, at) == cost.STATE_COPIES * (
        4 * 2 * 10 * 4 * 4 + 6 * 8 * 4)


def test_a_state_list_that_is_not_a_prefix_is_a_manifest_problem():
    man = _seq2seq_manifest()
    man.graphs["draft_step"].state = [_spec("l1.k", ("batch", 2, "past", 4))]
    assert any("not a prefix" in p for p in man.validate())


def _onnx_count(root, files):
    """Stored initializer bytes as ``onnx`` parses them, each external tensor once."""
    seen, total = set(), 0
    for f in files:
        for init in onnx.load(str(root / f), load_external_data=False).graph.initializer:
            ext = {e.key: e.value for e in init.external_data}
            key = (ext["location"], ext["offset"]) if ext else (f, init.name)
            if key not in seen:
                seen.add(key)
                total += (int(ext["length"]) if ext
                          else int(onnx.numpy_helper.to_array(init).nbytes))
    return total


def test_weight_bytes_match_onnx_and_count_shared_tensors_once(bundle_of):
    root = bundle_of("mamba")
    man = read_manifest(root)
    files = cost.format_files(man, "onnx")
    assert len(files) >= 2
    by_dtype = cost.weight_bytes_by_dtype(root, files)
    assert sum(by_dtype.values()) == _onnx_count(root, files) > 0
    assert cost.weight_bytes(root, man, "ort") == sum(by_dtype.values())
    # the graphs share one weights file: together they cost less than apart
    apart = sum(sum(cost.weight_bytes_by_dtype(root, [f]).values()) for f in files)
    assert sum(by_dtype.values()) < apart


def test_a_converted_bundle_declares_its_side_files(bundle_of):
    """Each backend's side files are in the manifest (and in its files record): the cost
    module reads them from there."""
    from edgeseq.registry import get_backend

    root = bundle_of("mamba")
    man = read_manifest(root)
    for fmt in ("onnx", "pte"):
        want = get_backend(fmt).side_files
        assert want and man.side_files[fmt] == want
        for f in want.values():
            assert f in man.files and (root / f).is_file()
