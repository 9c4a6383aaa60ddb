"""Fused attention in the ONNX lowering (runtime/backends/onnxruntime/fuse.py): the exporter's
unmasked ``Softmax(Q K^T) V`` becomes ONNX Runtime's ``MultiHeadAttention`` with the same
outputs; masked attention and small heads are left as they are."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeseq.runtime.backends.onnxruntime.fuse import MIN_HEAD, fuse_attention  # noqa: E402

N = 2


def _attention(head: int, masked: bool = False, scaled: str = "bsd") -> onnx.ModelProto:
    """x (b, s, N*head) -> q, k, v projections -> attention as the dynamo exporter writes it
    (BSNH tensors transposed into the two MatMuls) -> (b, s, N*head). ``scaled``: where the
    1/sqrt(head) goes: on the projected query (as Whisper's exported encoder has it), on the
    transposed query, or on the scores."""
    hidden = N * head
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32)
                                     * 0.3, f"w{k}") for k in "qkv"]
    inits += [numpy_helper.from_array(np.array([0, 0, N, head], dtype=np.int64), "bsnh"),
              numpy_helper.from_array(np.array([0, 0, hidden], dtype=np.int64), "bsd"),
              numpy_helper.from_array(np.array(head ** -0.5, dtype=np.float32), "c")]
    nodes = []
    for k in "qkv":
        nodes.append(helper.make_node("MatMul", ["x", f"w{k}"], [f"{k}2"]))
        if k == "q" and scaled == "bsd":
            nodes.append(helper.make_node("Mul", ["q2", "c"], ["q2s"]))
        nodes.append(helper.make_node("Reshape", [f"{k}2s" if k == "q" and scaled == "bsd"
                                                  else f"{k}2", "bsnh"], [f"{k}4"]))
    nodes += [helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3])]
    q = "qt"
    if scaled == "bnsh":
        nodes.append(helper.make_node("Mul", ["qt", "c"], ["qs"]))
        q = "qs"
    nodes.append(helper.make_node("MatMul", [q, "kt"], ["s"], name="qk"))
    scores = "s"
    if scaled == "scores":
        nodes.append(helper.make_node("Mul", ["s", "c"], ["s1"]))
        scores = "s1"
    if masked:
        nodes.append(helper.make_node("Add", [scores, "mask"], ["sm_in"]))
        scores = "sm_in"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["p", "vt"], ["o"]),
              helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "bsd"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", hidden])]
    if masked:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT,
                                                    ["b", 1, "s", "s"]))
    g = helper.make_graph(nodes, "attn", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return onnx.shape_inference.infer_shapes(m)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("scaled", ["bsd", "bnsh", "scores"])
def test_unmasked_attention_becomes_one_kernel(scaled: str) -> None:
    head = MIN_HEAD
    model = _attention(head, scaled=scaled)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 50, N * head)).astype(np.float32)}
    want = _run(model, feeds)
    assert fuse_attention(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops
    # the transposes that fed the old MatMuls are gone; one restores the layout downstream
    assert ops.count("Transpose") == 2
    mha = next(n for n in model.graph.node if n.op_type == "MultiHeadAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
    assert attrs["num_heads"] == N
    # a query scaled before the attention stays so; a later scale moves into the kernel
    assert attrs["scale"] == pytest.approx(1.0 if scaled == "bsd" else head ** -0.5)
    np.testing.assert_allclose(_run(model, feeds), want, rtol=1e-4, atol=1e-5)


def test_masked_attention_and_small_heads_stay_as_exported() -> None:
    model = _attention(MIN_HEAD, masked=True)
    assert fuse_attention(model) == 0
    assert "MultiHeadAttention" not in [n.op_type for n in model.graph.node]
    model = _attention(MIN_HEAD // 2)
    assert fuse_attention(model) == 0
