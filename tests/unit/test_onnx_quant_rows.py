"""int8 picks its kernel by who reads a weight (runtime/backends/onnxruntime/quantize.py): a
weight only many-row graphs read (an encoder's) becomes a per-channel ``MatMulInteger`` (fused to
``DynamicQuantizeMatMul`` at load: the faster GEMM on many rows); one that a one-row graph (a
decode step) reads is an 8-bit ``MatMulNBits`` in every graph that reads it, so the bundle's
weights file still holds it once."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeseq.runtime.backends.onnxruntime import WEIGHTS_FILE  # noqa: E402
from edgeseq.runtime.backends.onnxruntime.lower import share_weights  # noqa: E402
from edgeseq.runtime.backends.onnxruntime.quantize import (  # noqa: E402
    one_row_graph, quantize_bundle_graphs)

K, N = 256, 128
RNG = np.random.default_rng(0)
ENC_W = (RNG.standard_normal((N, K)) * 0.05).astype(np.float32)   # exporter layout (out, in)
DEC_W = (RNG.standard_normal((K, N)) * 0.05).astype(np.float32)   # one-row layout (in, out)


def _graph(name: str, dims: list, weights: dict[str, np.ndarray], gemm: bool) -> onnx.ModelProto:
    w = next(iter(weights))
    node = (helper.make_node("Gemm", ["x", w], ["y"], transB=1, name="lin") if gemm
            else helper.make_node("MatMul", ["x", w], ["y"], name="lin"))
    g = helper.make_graph([node], name, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                       dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(a, n) for n, a in weights.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _bundle(folder: Path) -> dict[str, str]:
    models = {
        # an encoder: many rows, a weight no step reads
        "encoder": _graph("encoder", ["batch", "frames", K], {"enc.w": ENC_W}, gemm=True),
        # a step and a chunk graph reading the same decoder weight (named differently)
        "step": _graph("step", ["batch", K], {"dec.w.T": DEC_W}, gemm=False),
        "chunk": _graph("chunk", ["batch", "chunk", K], {"step.dec.w.T": DEC_W}, gemm=False),
    }
    share_weights(models, folder / WEIGHTS_FILE)
    files = {}
    for name, m in models.items():
        onnx.save_model(m, str(folder / f"{name}.onnx"))
        files[name] = f"{name}.onnx"
    return files


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_one_row_graphs_are_told_by_their_first_input(tmp_path: Path) -> None:
    _bundle(tmp_path)
    rows = {g: one_row_graph(onnx.load(str(tmp_path / f"{g}.onnx"), load_external_data=False))
            for g in ("encoder", "step", "chunk")}
    assert rows == {"encoder": False, "step": True, "chunk": False}


def test_int8_gives_encoder_weights_the_gemm_and_step_weights_the_blocked_kernel(
        tmp_path: Path) -> None:
    files = _bundle(tmp_path)
    x_enc = RNG.standard_normal((1, 40, K)).astype(np.float32)
    want = x_enc @ ENC_W.T
    reports = quantize_bundle_graphs(tmp_path, files, "int8", keep=[])
    assert "MatMulInteger" in _ops(tmp_path / "encoder.onnx")
    assert "MatMulNBits" not in _ops(tmp_path / "encoder.onnx")
    for g in ("step", "chunk"):   # the chunk graph many-row, but it shares the step's weight
        assert "MatMulNBits" in _ops(tmp_path / f"{g}.onnx"), g
        assert "MatMulInteger" not in _ops(tmp_path / f"{g}.onnx"), g
    assert "many-row graphs read int8 per-channel" in reports["encoder"]["how"]
    assert reports["encoder"]["quantized"] and reports["step"]["quantized"]
    sess = ort.InferenceSession(str(tmp_path / "encoder.onnx"),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x_enc})[0]
    # int8 weights and activations: within a few quantization steps of the float product
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_int4_is_blocked_everywhere(tmp_path: Path) -> None:
    files = _bundle(tmp_path)
    quantize_bundle_graphs(tmp_path, files, "int4", keep=[], group_size=128)
    for g in ("encoder", "step", "chunk"):
        assert "MatMulNBits" in _ops(tmp_path / f"{g}.onnx"), g
