"""ONNX weights: one shared external data file, each tensor once, readable by plain ORT."""
import numpy as np
import pytest
from safetensors.numpy import load_file

from ..conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_stored_once(bundle_of, checkpoints, family):
    root = bundle_of(family)
    data = (root / "weights.onnx.data").read_bytes()
    params = load_file(checkpoints[family] / "model.safetensors")
    matrices = [(k, a) for k, a in params.items()
                if k.endswith(".weight") and a.ndim == 2 and a.nbytes >= 1024]
    assert matrices
    for name, a in matrices:
        # once, though the prefill and step graphs both read it (constants that the exporter
        # folds from parameters, like S4D's discretised A, may add other tensors)
        assert data.count(a.tobytes()) == 1, name
    for g in ("prefill", "step"):
        assert (root / f"{g}.onnx").stat().st_size < len(data)


def test_plain_onnxruntime_opens_the_graphs(bundle_of):
    import onnxruntime as ort

    root = bundle_of("mamba")
    sess = ort.InferenceSession(str(root / "step.onnx"), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = [1 if isinstance(d, str) else d for d in i.shape]
        feeds[i.name] = (np.ones(shape, np.int64) if "int64" in i.type
                         else np.zeros(shape, np.float32))
    logits = sess.run(["logits"], feeds)[0]
    assert logits.shape == (1, 97) and np.isfinite(logits).all()


def test_onnx_inputs_carry_the_manifest_names(bundle_of):
    import onnxruntime as ort

    root = bundle_of("mamba")
    sess = ort.InferenceSession(str(root / "prefill.onnx"), providers=["CPUExecutionProvider"])
    ins = {i.name: i.shape for i in sess.get_inputs()}
    assert ins["input_ids"] == ["batch", "chunk"]
    assert ins["state_in.layers.0.ssm"][0] == "batch"
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert outs["logits"][:2] == ["batch", "chunk"]
