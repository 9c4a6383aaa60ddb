"""Quantized bundles: int8 / int4 on ONNX Runtime, the accuracy gate, and `edgeseq inspect`."""
from __future__ import annotations

import json

import numpy as np
import pytest

import edgeseq

from ..cli.test_cli import edgeseq as cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for scheme in ("fp32", "int8", "int4"):
        args = ["convert", "zoo:mamba-bytes", "-o", root / scheme, "--format", "onnx"]
        if scheme != "fp32":
            args += ["--quant", scheme]
        cli(*args)
        out[scheme] = root / scheme
    return out


def _weights(bundle) -> dict:
    return json.loads(cli("inspect", bundle, "--json").stdout)["weights"]["onnx"]


def test_int_schemes_shrink_weights_and_pass_the_gate(lm_bundles):
    fp32 = sum(_weights(lm_bundles["fp32"]).values())
    for scheme, min_ratio in (("int8", 2.5), ("int4", 3.0)):
        b = lm_bundles[scheme]
        w = _weights(b)
        assert fp32 / sum(w.values()) >= min_ratio, (scheme, w)
        parity = json.loads((b / "parity.json").read_text())
        gate = parity["gate"]
        assert parity["passed"] and parity["quantization"] == scheme
        assert gate["tokens"] >= 512 and gate["agreement"] >= 0.9 and gate["kl_mean"] < 0.1
        man = json.loads((b / "manifest.json").read_text())
        q = man["quantization"]
        assert q["scheme"] == scheme and q["state"].startswith("float32")
        step = q["graphs"]["step"]
        # the family's sensitive layers stay float; the big matrices are quantized
        assert any("dt_proj" in k for k in step["kept_float"])
        assert any("in_proj" in k for k in step["quantized"])
        # state stays float32 at the interface
        assert all(s["dtype"] == "float32" for s in man["graphs"]["step"]["state"])
        sess = edgeseq.load(b, backend="ort")
        assert len(sess.generate(list(b"def "), 16, stop_at_eos=False)) == 16


def test_int8_matches_fp32_closely_and_int4_less(lm_bundles):
    g8 = json.loads((lm_bundles["int8"] / "parity.json").read_text())["gate"]
    g4 = json.loads((lm_bundles["int4"] / "parity.json").read_text())["gate"]
    assert g8["kl_mean"] < g4["kl_mean"]


def test_damaging_scheme_is_refused(tmp_path):
    out = tmp_path / "bad"
    p = cli("convert", "zoo:mamba-bytes", "-o", out, "--quant", "int4-tensor", check=False)
    assert p.returncode != 0 and "failed its accuracy gate" in p.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    # --force writes it anyway, with the failed gate recorded
    cli("convert", "zoo:mamba-bytes", "-o", out, "--quant", "int4-tensor", "--force")
    assert json.loads((out / "parity.json").read_text())["passed"] is False


def test_quant_refuses_other_formats(tmp_path):
    p = cli("convert", "zoo:mamba-bytes", "-o", tmp_path / "x", "--quant", "int8", "--format",
            "onnx,pte", check=False)
    assert p.returncode == 2 and "ONNX graphs (ONNX Runtime) only" in p.stderr


def test_inspect_text(lm_bundles):
    out = cli("inspect", lm_bundles["int4"]).stdout
    assert "quantization: int4, group 32" in out and "accuracy gate: passed" in out
    assert "layers.0.ssm" in out and "recurrent" in out and "uint8" in out


def test_classifier_gate_with_eval_file(tmp_path):
    from edgeseq.zoo.train_lmuformer_digits import load_data

    _, _, x, y = load_data()
    np.savez(tmp_path / "digits.npz", x=x.numpy(), y=y.numpy())
    b = tmp_path / "lmu8"
    cli("convert", "zoo:lmuformer-digits", "-o", b, "--quant", "int8", "--eval",
        tmp_path / "digits.npz")
    gate = json.loads((b / "parity.json").read_text())["gate"]
    assert gate["sequences"] == 360 and gate["accuracy"] >= gate["accuracy_fp32"] - 0.02
    p = cli("convert", "zoo:lmuformer-digits", "-o", tmp_path / "bad", "--quant", "int8",
            "--eval", tmp_path / "missing.npz", check=False)
    assert p.returncode != 0 and "missing.npz" in p.stderr


def test_inspect_bad_input(tmp_path):
    p = cli("inspect", tmp_path / "missing", check=False)
    assert p.returncode == 2 and "missing: no such bundle folder" in p.stderr
    p = cli("inspect", tmp_path, check=False)
    assert p.returncode == 2 and "not an edgeseq bundle (no manifest.json)" in p.stderr
