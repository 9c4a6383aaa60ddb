"""Quantized bundles: int8 / int4 on ONNX Runtime, the accuracy gate, and `edgeseq inspect`."""
from __future__ import annotations

import json

import numpy as np
import pytest

import edgeseq

from ..cli.test_cli import edgeseq as cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm_bundles(tmp_path_factory, mamba_bytes_bundle):
    root = tmp_path_factory.mktemp("quant")
    out = {"fp32": mamba_bytes_bundle}  # ONNX and ExecuTorch, converted once per run (conftest)
    for scheme in ("int8", "int4"):
        # int4 on both backends (ExecuTorch 8da4w too) against an fp32 .pte of the same
        # program; int8 on ONNX Runtime only, for time
        fmt = "onnx" if scheme == "int8" else "onnx,pte"
        args = ["convert", "zoo:mamba-bytes", "-o", root / scheme, "--format", fmt]
        cli(*args, "--quant", scheme)
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
        assert parity["passed"] and parity["quantization"] == scheme
        man = json.loads((b / "manifest.json").read_text())
        q = man["quantization"]
        assert q["scheme"] == scheme and q["state"].startswith("float32")
        formats = ("onnx", "pte") if scheme == "int4" else ("onnx",)
        assert set(parity["gates"]) == set(q["formats"]) == set(formats)
        for fmt in formats:
            gate = parity["gates"][fmt]
            assert gate["tokens"] >= 512 and gate["agreement"] >= 0.9 and gate["kl_mean"] < 0.1
            step = q["formats"][fmt]["graphs"]["step"]
            # the family's sensitive layers stay one step above the scheme (float under int8,
            # int8 under int4); the big matrices are quantized
            above = step["kept_float"] if scheme == "int8" else step["int8_sensitive"]
            assert any("dt_proj" in k for k in above)
            assert any("in_proj" in k for k in step["quantized"])
            sess = edgeseq.load(b, backend=fmt)
            assert len(sess.generate(list(b"def "), 16, stop_at_eos=False)) == 16
        # state stays float32 at the interface
        assert all(s["dtype"] == "float32" for s in man["graphs"]["step"]["state"])
    # like for like: a .pte also holds its program (the methods' ops, ~0.8 MB for this model's
    # unrolled scans), which quantization does not shrink
    pte = {s: json.loads(cli("inspect", lm_bundles[s], "--json").stdout)["weights"]["pte"]
           ["file bytes"] for s in ("fp32", "int4")}
    assert 0 < pte["int4"] < pte["fp32"] / 3, pte


def test_int8_matches_fp32_closely_and_int4_less(lm_bundles):
    g8 = json.loads((lm_bundles["int8"] / "parity.json").read_text())["gates"]["onnx"]
    g4 = json.loads((lm_bundles["int4"] / "parity.json").read_text())["gates"]["onnx"]
    assert g8["kl_mean"] < g4["kl_mean"]


def test_quantized_sessions_give_back_the_mapped_weights(lm_bundles, monkeypatch):
    """Every session of a quantized bundle packs its weights at load, so the runtime drops the
    mapped originals' pages (they fault back in where a kernel reads them): the same tokens, and
    fewer resident pages of the weights file."""
    from edgeseq.runtime.backends.onnxruntime import WEIGHTS_FILE
    from edgeseq.runtime.backends.onnxruntime import run as ob

    def resident_weight_kb(bundle) -> int:
        name = str(bundle / WEIGHTS_FILE)
        kb, inside = 0, False
        for line in open("/proc/self/smaps"):
            if line[0] in "0123456789abcdef" and " " in line:
                inside = line.rstrip().endswith(name)
            elif inside and line.startswith("Rss:"):
                kb += int(line.split()[1])
        return kb

    b = lm_bundles["int4"]
    calls = []
    real = ob._SharedWeights.release_pages
    monkeypatch.setattr(ob._SharedWeights, "release_pages",
                        lambda self: (calls.append(1), real(self))[1])
    kept = edgeseq.load(b, backend="ort", threads=1)
    assert calls == [1]
    after_release = resident_weight_kb(b)
    toks = kept.generate(list(b"def main():"), 24, stop_at_eos=False)
    monkeypatch.setattr(ob._SharedWeights, "release_pages", lambda self: None)
    plain = edgeseq.load(b, backend="ort", threads=1)
    assert np.array_equal(plain.generate(list(b"def main():"), 24, stop_at_eos=False), toks)
    del kept
    # the weights file's resident pages: after the release, a fraction of what a session that
    # keeps them holds (both sessions map the same file; each mapping counted on its own)
    held = resident_weight_kb(b)
    assert after_release < 0.5 * held, (after_release, held)
    # an fp32 bundle's kernels read the mapped weights every step: nothing is released
    calls.clear()
    monkeypatch.setattr(ob._SharedWeights, "release_pages",
                        lambda self: (calls.append(1), real(self))[1])
    edgeseq.load(lm_bundles["fp32"], backend="ort", threads=1)
    assert calls == []


def test_damaging_scheme_is_refused(tmp_path):
    out = tmp_path / "bad"
    p = cli("convert", "zoo:mamba-bytes", "-o", out, "--quant", "int4-tensor", check=False)
    assert p.returncode != 0 and "failed its accuracy gate" in p.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    # --force writes it anyway, with the failed gate recorded
    cli("convert", "zoo:mamba-bytes", "-o", out, "--quant", "int4-tensor", "--force")
    assert json.loads((out / "parity.json").read_text())["passed"] is False


def test_quant_refuses_formats_without_the_scheme(tmp_path):
    p = cli("convert", "zoo:mamba-bytes", "-o", tmp_path / "x", "--quant", "int8", "--format",
            "onnx,pt2", check=False)
    assert p.returncode == 2 and "pt2 (the PyTorch reference format) is not quantized" in p.stderr
    p = cli("convert", "zoo:mamba-bytes", "-o", tmp_path / "x", "--quant", "int4-tensor",
            "--format", "pte", check=False)
    assert p.returncode == 2 and "ONNX Runtime only" in p.stderr
    assert not (tmp_path / "x").exists()


def test_inspect_text(lm_bundles):
    out = cli("inspect", lm_bundles["int4"]).stdout
    # each backend's own group (Backend.int4_group) when none is named
    assert "quantization: int4, group 128 (onnx), 32 (pte)" in out
    assert "accuracy gate (onnx): passed" in out and "accuracy gate (pte): passed" in out
    assert "pte step: 8da4w" in out
    assert "layers.0.ssm" in out and "recurrent" in out and "uint8" in out


def test_classifier_gate_with_eval_file(tmp_path):
    from edgeseq.zoo.train_lmuformer_digits import load_data

    _, _, x, y = load_data()
    np.savez(tmp_path / "digits.npz", x=x.numpy(), y=y.numpy())
    b = tmp_path / "lmu8"
    cli("convert", "zoo:lmuformer-digits", "-o", b, "--quant", "int8", "--format", "onnx",
        "--eval", tmp_path / "digits.npz")
    gate = json.loads((b / "parity.json").read_text())["gates"]["onnx"]
    assert gate["sequences"] == 360 and gate["accuracy"] >= gate["accuracy_fp32"] - 0.02
    p = cli("convert", "zoo:lmuformer-digits", "-o", tmp_path / "bad", "--quant", "int8",
            "--format", "onnx", "--eval", tmp_path / "missing.npz", check=False)
    assert p.returncode != 0 and "missing.npz" in p.stderr


def test_inspect_bad_input(tmp_path):
    p = cli("inspect", tmp_path / "missing", check=False)
    assert p.returncode == 2 and "missing: no such bundle folder" in p.stderr
    p = cli("inspect", tmp_path, check=False)
    assert p.returncode == 2 and "not an edgeseq bundle (no manifest.json)" in p.stderr


def test_seq2seq_int8_gate_on_both_backends(checkpoints, tmp_path):
    b = tmp_path / "t5q"
    cli("convert", checkpoints["t5"], "-o", b, "--quant", "int8", "--format", "onnx,pte")
    parity = json.loads((b / "parity.json").read_text())
    assert parity["passed"] and set(parity["gates"]) == {"onnx", "pte"}
    for g in parity["gates"].values():
        assert g["sources"] == 16 and g["exact_match"] >= 0.9 and g["cer"] <= 0.05
    man = json.loads((b / "manifest.json").read_text())
    for fmt in ("onnx", "pte"):
        enc = man["quantization"]["formats"][fmt]["graphs"]["encoder"]
        assert enc["quantized"], fmt


def test_seq2seq_gate_with_references(tmp_path):
    data = tmp_path / "typos.tsv"
    data.write_text("Retrun the numbr of itmes.\tReturn the number of items.\n"
                    "Teh list is emtpy.\tThe list is empty.\n", encoding="utf-8")
    b = tmp_path / "typo8"
    cli("convert", "zoo:t5-typo-bytes", "-o", b, "--quant", "int8", "--format", "onnx",
        "--eval", data)
    g = json.loads((b / "parity.json").read_text())["gates"]["onnx"]
    assert g["sources"] == 2 and g["data"] == str(data)
    for k in ("exact_match_target", "exact_match_target_fp32", "cer_target", "cer_target_fp32"):
        assert 0 <= g[k] <= 1, k
    assert g["cer_target"] <= g["cer_target_fp32"] + g["max_cer"]


def test_int8_static_calibrates_on_user_data(tmp_path):
    import difflib
    import inspect

    import onnx

    calib = tmp_path / "calib.txt"
    calib.write_text(inspect.getsource(difflib)[:6000], encoding="utf-8")
    p = cli("convert", "zoo:mamba-bytes", "-o", tmp_path / "x", "--quant", "int8-static",
            check=False)
    assert p.returncode == 2 and "--calibration FILE" in p.stderr
    p = cli("convert", "zoo:mamba-bytes", "-o", tmp_path / "x", "--quant", "int8-static",
            "--calibration", tmp_path / "missing.txt", check=False)
    assert p.returncode == 2 and "missing.txt: calibration file not found" in p.stderr
    b = tmp_path / "s8"
    cli("convert", "zoo:mamba-bytes", "-o", b, "--quant", "int8-static", "--calibration", calib)
    man = json.loads((b / "manifest.json").read_text())
    rec = man["quantization"]["formats"]["onnx"]
    assert rec["calibration"] == str(calib)
    assert set(rec["graphs"]) == {"prefill", "step", "verify"}
    assert rec["graphs"]["step"]["scheme"] == "int8-static"
    # the verify graph (speculative decoding only) sees no calibration data: dynamic int8
    assert "no calibration feeds" in rec["graphs"]["verify"]["how"]
    ops = {n.op_type for n in onnx.load(str(b / "step.onnx"), load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ, as NPU providers take it
    gate = json.loads((b / "parity.json").read_text())["gates"]["onnx"]
    assert gate["passed"] and gate["agreement"] >= 0.9


def test_speech_int8_gate(checkpoints, tmp_path):
    """The speech gate compares greedy text over 4 chirp sources, and its verdict follows its
    thresholds: a pass writes the bundle, a failure exits 2 naming the numbers and writes
    nothing. Which of the two this tiny test model gets is not fixed: chirps are not what it
    was trained on, its 48-token outputs sit near ties, and the CPU's int8 kernels decide them
    (AVX2 hosts passed; a Zen 5 host, AVX-512 VNNI, matched 3 of 4 sources with 1 thread).
    Broken int8 would match none."""
    import re

    b = tmp_path / "wq"
    p = cli("convert", checkpoints["whisper"], "-o", b, "--quant", "int8", "--format", "onnx",
            check=False)
    m = re.search(r"onnx\s+exact_match ([0-9.]+), cer ([0-9.]+), max_drop ([0-9.]+), "
                  r"max_cer ([0-9.]+)", p.stderr)
    assert m, p.stderr[-2000:]
    exact, cer, max_drop, max_cer = map(float, m.groups())
    assert exact >= 0.5, p.stderr[-2000:]
    if exact >= 1 - max_drop and cer <= max_cer:
        assert p.returncode == 0, p.stderr[-2000:]
        g = json.loads((b / "parity.json").read_text())["gates"]["onnx"]
        assert g["passed"] and g["sources"] == 4 and "chirps" in g["data"]
    else:
        assert p.returncode == 2 and "failed its accuracy gate" in p.stderr
        assert not b.exists(), "a failed gate left a bundle behind"
