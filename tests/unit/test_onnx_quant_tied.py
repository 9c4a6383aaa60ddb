"""A tied embedding under the ONNX Runtime quantizers (runtime/backends/onnxruntime/quantize.py):
the LM head becomes a MatMulNBits weight (8 or 4 bits) and the embedding's Gather reads the same
blocks through GatherBlockQuantized, so the table is stored once and dequantizes as the head
does. The graph starts in the lowering's float layout (``layout.gemv_layout``)."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeseq.runtime.backends.onnxruntime.layout import gemv_layout  # noqa: E402
from edgeseq.runtime.backends.onnxruntime.quantize import quantize_model  # noqa: E402

V, D = 64, 256


def _model() -> onnx.ModelProto:
    """ids -> embedding (tied) -> [its rows as an output] -> head."""
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((V, D)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["x"], name="embed"),
         helper.make_node("Gemm", ["x", "emb"], ["logits"], transB=1, name="head")],
        "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(emb, "emb")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    gemv_layout(m)
    return m


def _run(model: onnx.ModelProto, ids: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"ids": ids})


@pytest.mark.parametrize("scheme,step", [("int8", 2 / 255), ("int4", 2 / 15)])
def test_a_tied_table_reads_the_heads_blocks(scheme: str, step: float) -> None:
    ids = np.array([0, 5, 63, 17], dtype=np.int64)
    model = _model()
    want_x, want_logits = _run(model, ids)
    q, report = quantize_model(model, scheme, keep=[], group_size=128)
    ops = [n.op_type for n in q.graph.node]
    assert "MatMulNBits" in ops and "GatherBlockQuantized" in ops and "Gather" not in ops
    # the table is stored once: as the head's blocks
    assert {i.name for i in q.graph.initializer} >= {f"emb.T_Q{scheme[-1]}", "emb.T_scales"}
    assert not any(i.name in ("emb", "emb.T") for i in q.graph.initializer)
    assert "the tied embedding reads the LM head's" in report["how"]
    x, logits = _run(q, ids)
    # the rows read are the head's own dequantized weights (its blob: (vocab, blocks, bytes),
    # low nibble first; zero point 2^(bits-1)) - a wrong zero point or layout misses by scales
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    blob, scales = inits[f"emb.T_Q{scheme[-1]}"], inits["emb.T_scales"].reshape(V, -1)
    if scheme == "int4":
        blob = np.stack([blob & 15, blob >> 4], -1)
    zero = 8 if scheme == "int4" else 128
    levels = blob.reshape(V, scales.shape[1], 128).astype(np.float32) - zero
    table = (levels * scales[..., None]).reshape(V, D)
    np.testing.assert_allclose(x, table[ids], rtol=1e-6, atol=1e-6)
    # and within a quantization step of the float table
    assert np.abs(x - want_x).max() <= step * np.abs(want_x).max()
    assert np.argmax(logits, -1).tolist() == np.argmax(want_logits, -1).tolist()
