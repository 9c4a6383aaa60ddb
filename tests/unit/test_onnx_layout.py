"""The ONNX lowering's weight layout (runtime/backends/onnxruntime/layout.py): linear weights
stored (in, out) for the one-row kernels, a tied embedding read by column from the LM head's
matrix, and the row form the quantizers take restored exactly."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeseq.runtime.backends.onnxruntime.layout import gemv_layout, row_gathers  # noqa: E402

V, D, H = 40, 16, 24


def _model(ids_rank: int) -> onnx.ModelProto:
    """ids -> embedding (tied with the head) -> linear with bias -> ReLU -> linear -> head."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((V, D)).astype(np.float32)
    w1 = rng.standard_normal((H, D)).astype(np.float32)
    b1 = rng.standard_normal(H).astype(np.float32)
    w2 = rng.standard_normal((D, H)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((emb, "emb"), (w1, "w1"), (b1, "b1"), (w2, "w2"))]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"], name="embed")]
    x = "x"
    if ids_rank == 2:  # Gemm wants 2-D rows
        inits.append(numpy_helper.from_array(np.array([-1, D], dtype=np.int64), "flat"))
        nodes.append(helper.make_node("Reshape", ["x", "flat"], ["x2"]))
        x = "x2"
    nodes += [helper.make_node("Gemm", [x, "w1", "b1"], ["h"], transB=1, name="fc1"),
              helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1, name="fc2"),
              helper.make_node("Gemm", ["y", "emb"], ["logits"], transB=1, name="head")]
    shape = ["b"] if ids_rank == 1 else ["b", "l"]
    g = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("ids", TensorProto.INT64, shape)],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"ids": ids})[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("rank", [1, 2])
def test_gemv_layout_keeps_outputs_and_stores_a_tied_table_once(rank: int) -> None:
    ids = np.array([3, 0, 39, 7], dtype=np.int64).reshape((4,) if rank == 1 else (2, 2))
    model = _model(rank)
    want = _run(model, ids)
    assert gemv_layout(model) == 3
    assert "Gemm" not in _ops(model)
    names = {i.name: tuple(i.dims) for i in model.graph.initializer}
    # every linear weight transposed once; the table only as the head's (in, out) matrix
    assert names["w1.T"] == (D, H) and names["w2.T"] == (H, D) and names["emb.T"] == (D, V)
    assert not {"emb", "w1", "w2"} & set(names)
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    assert [(n.input[0], n.attribute[0].i) for n in gathers] == [("emb.T", 1)]
    np.testing.assert_allclose(_run(model, ids), want, rtol=1e-5, atol=1e-5)

    # the quantizers' form: the embedding a row Gather again, outputs unchanged
    assert row_gathers(model) == 1
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    assert [n.input[0] for n in gathers] == ["emb"] and "Transpose" not in _ops(model)
    np.testing.assert_allclose(_run(model, ids), want, rtol=1e-5, atol=1e-5)


def test_an_untied_table_keeps_its_rows() -> None:
    model = _model(1)
    head = next(n for n in model.graph.node if n.name == "head")
    model.graph.initializer.append(numpy_helper.from_array(
        np.ones((V, D), dtype=np.float32), "head_w"))
    head.input[1] = "head_w"
    gemv_layout(model)
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    assert [(n.input[0], n.attribute[0].i if n.attribute else 0) for n in gathers] == [("emb", 0)]
    assert row_gathers(model) == 0
