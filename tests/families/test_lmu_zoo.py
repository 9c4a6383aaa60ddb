"""The LMUFormer zoo models on scikit-learn's digits: the converted streaming bundles predict
exactly what the PyTorch models predict, on every test sample, on both backends."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgeseq
from edgeseq import zoo
from edgeseq.families.lmu import LMUFormerFamily

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits():
    from edgeseq.zoo.train_lmuformer_digits import load_data

    _, _, x_test, y_test = load_data()
    return x_test, y_test


@pytest.mark.parametrize("name,min_acc", [("lmuformer-digits", 0.97), ("slmuformer-digits", 0.96)])
def test_zoo_digits_stream_equals_pytorch(tmp_path, digits, name, min_acc):
    from edgeseq.convert.pipeline import convert

    x, y = digits
    fam = LMUFormerFamily()
    model = fam.load(zoo.resolve(f"zoo:{name}"))
    with torch.no_grad():
        ref = model.running_logits(x).numpy()
    ref_pred = ref[:, -1].argmax(-1)
    acc = float((ref_pred == y.numpy()).mean())
    assert acc >= min_acc, acc
    bundle = convert(f"zoo:{name}", tmp_path / name, formats=("onnx", "pte"))
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["config"]["input"] == {"features": 1, "frames": 64,
                                      "scaling": man["config"]["input"]["scaling"]}
    assert "pixel" in man["config"]["input"]["scaling"]
    for backend in ("ort", "executorch"):
        sess = edgeseq.load(bundle, backend=backend)
        sess.push(x.numpy())          # all test digits as rows of one stream
        sess.finish()
        run = sess.running()
        assert run.shape == ref.shape
        # the same prediction after every frame of every test sample
        assert np.array_equal(run.argmax(-1), ref.argmax(-1)), backend
        # The same spikes: one flipped spike moves the logits by > 1e-3. A backend's GEMMs round
        # differently from PyTorch's, and a membrane that sits within that rounding of its
        # threshold can flip (measured: 1 sample of 360 for the spiking model on XNNPACK, from
        # frame 41 on; on ONNX Runtime none on AVX2 hosts, 1 on a Zen 5 host, whose AVX-512
        # kernels ORT picks at run time). Allow at most 1% of the samples.
        flipped = int((np.abs(run - ref).max((1, 2)) > 1e-3).sum())
        assert flipped <= len(x) // 100, (backend, flipped)
    # early exit at 0.9: the running prediction is stable well before the end
    from edgeseq.runtime.classify import Classification

    fracs = []
    for r in ref:
        ef = Classification(int(r[-1].argmax()), [], r.shape[0], r).exit_frame(0.9)
        fracs.append(1.0 if ef is None else (ef + 1) / r.shape[0])
    print(f"{name}: accuracy {acc:.4f}, mean fraction read before an early exit at 0.9: "
          f"{np.mean(fracs):.3f}")
    assert np.mean(fracs) < 0.8
