import json

import numpy as np
import pytest

from edgeseq.bundle import BundleError, GraphEntry, Manifest, StateSpec, TensorSpec, read_manifest
from edgeseq.output import atomic_folder


def _manifest(**kw):
    st = [StateSpec("layers.0.ssm", ("batch", 8, 4), "float32", "recurrent")]
    g = GraphEntry("step", [TensorSpec("input_ids", ("batch",), "int64")],
                   [TensorSpec("logits", ("batch", 10))], st, {"onnx": "step.onnx"})
    return Manifest(family="mamba", task="causal_lm", source={"path": "x"}, graphs={"step": g},
                    tokenizer=None, **kw)


def test_state_spec_roundtrip_and_allocation():
    s = StateSpec("layers.3.conv", ("batch", 16, 3), "float32", "window")
    assert StateSpec.from_json(json.loads(json.dumps(s.to_json()))) == s
    a = s.allocate({"batch": 2})
    assert a.shape == (2, 16, 3) and a.dtype == np.float32 and not a.any()
    assert s.nbytes({"batch": 2}) == 2 * 16 * 3 * 4
    assert s.input_name == "state_in.layers.3.conv" and s.output_name == "state_out.layers.3.conv"


def test_manifest_roundtrip(tmp_path):
    m = _manifest()
    (tmp_path / "step.onnx").write_bytes(b"x")
    (tmp_path / "manifest.json").write_text(json.dumps(m.to_json()))
    back = read_manifest(tmp_path)
    assert back.to_json() == m.to_json()


def test_validate_reports_every_problem(tmp_path):
    m = _manifest()
    g = m.graphs["step"]
    g.state[0] = StateSpec("layers.0.ssm", ("batch", 8), "float32", "bogus_kind")
    g.outputs.append(TensorSpec("logits", ("batch",), "complex64"))
    problems = m.validate(tmp_path)
    text = " | ".join(problems)
    assert "bogus_kind" in text and "duplicate" in text and "complex64" in text
    assert "'step.onnx' is missing" in text


def test_read_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: malformed"):
        read_manifest(tmp_path)


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(dest) as tmp:
            (tmp / "half.onnx").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(dest) as tmp:
        (tmp / "ok").write_text("1")
    assert (dest / "ok").read_text() == "1"
    with pytest.raises(BundleError, match="already exists"):
        with atomic_folder(dest):
            pass


@pytest.mark.parametrize("scheme,compute,integer", [
    ("int8", "int8", True), ("int8-static", "int8", True), ("int4", "int4", True),
    ("int4-tensor", "int4", True), ("fp16", "fp16", False)])
def test_quantization_is_a_typed_record(scheme, compute, integer):
    m = _manifest(quantization={"scheme": scheme, "group_size": 32, "formats": {}})
    assert m.validate() == []
    assert (m.quant.scheme, m.quant.compute, m.quant.integer) == (scheme, compute, integer)
    assert _manifest().quant is None


@pytest.mark.parametrize("record", ["int8", {"scheme": 8}, {"formats": 5},
                                    {"scheme": "int4", "group_size": "32"}])
def test_a_quantization_record_convert_does_not_write_is_a_problem(record):
    problems = _manifest(quantization=record).validate()
    assert any('"quantization' in p for p in problems), problems


def test_side_files_are_declared_and_stay_inside_the_bundle(tmp_path):
    m = _manifest()
    m.side_files = {"onnx": {"activation_table": "onnx_activation_table.json"}}
    (tmp_path / "step.onnx").write_bytes(b"x")
    (tmp_path / "onnx_activation_table.json").write_text("{}")
    (tmp_path / "manifest.json").write_text(json.dumps(m.to_json()))
    back = read_manifest(tmp_path)
    assert back.side_file("onnx", "activation_table") == "onnx_activation_table.json"
    assert back.side_file("pte", "planned_memory") is None
    m.side_files = {"onnx": {"activation_table": "../outside.json"}}
    (tmp_path / "manifest.json").write_text(json.dumps(m.to_json()))
    with pytest.raises(BundleError, match="side file"):
        read_manifest(tmp_path)
