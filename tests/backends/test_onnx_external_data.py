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
