"""Models past protobuf's 2 GB limit keep their weights in an external data file; forcing the
threshold down exercises the same path on a tiny model."""
import json

import numpy as np

import edgeseq
from edgeseq.convert.pipeline import convert
from edgeseq.runtime.backends import onnxruntime as ort_backend


def test_external_data_bundle_runs(monkeypatch, checkpoints, tmp_path):
    monkeypatch.setattr(ort_backend, "EXTERNAL_DATA_BYTES", 0)
    out = convert(checkpoints["mamba"], tmp_path / "b", formats=("onnx",), parity_tokens=16)
    assert (out / "step.onnx.data").stat().st_size > (out / "step.onnx").stat().st_size
    assert json.loads((out / "parity.json").read_text())["passed"]
    s = edgeseq.load(out, backend="ort")
    assert len(s.generate(np.array([1, 2, 3]), 4)) == 4


def test_onnx_inputs_carry_the_manifest_names(bundle_of):
    import onnxruntime as ort

    root = bundle_of("mamba")
    sess = ort.InferenceSession(str(root / "prefill.onnx"), providers=["CPUExecutionProvider"])
    ins = {i.name: i.shape for i in sess.get_inputs()}
    assert ins["input_ids"] == ["batch", "chunk"]
    assert ins["state_in.layers.0.ssm"][0] == "batch"
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert outs["logits"][:2] == ["batch", "chunk"]
