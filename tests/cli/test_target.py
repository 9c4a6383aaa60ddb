"""``edgeseq convert --target DEVICE_ID``: the device profile's preferred backends, in order,
each skipped one named with what is missing; ``run`` then uses the first by default."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from edgeseq.bundle import BundleError, read_manifest
from edgeseq.convert.targets import plan
from edgeseq.devices.catalog import get_profile
from edgeseq.registry import backends

from .test_cli import edgeseq, error_line

LAPTOP = "x86-laptop-i5-1335u"
HAS_OPENVINO = backends()["openvino"]().available() is None


def _ort_has(provider: str) -> bool:
    import onnxruntime

    return provider in onnxruntime.get_available_providers()


def test_the_intel_laptop_prefers_openvino_on_its_gpu():
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed")
    p = plan(get_profile(LAPTOP))
    assert p.formats == ["openvino", "onnx", "pte"]
    assert p.devices == {"openvino": "GPU"}
    (skip,) = p.skipped
    assert skip.startswith("ort:OpenVINOExecutionProvider: ")
    if not _ort_has("OpenVINOExecutionProvider"):
        assert skip.endswith("OpenVINO: onnxruntime-openvino not installed")


def test_a_backend_without_its_package_is_skipped_saying_so(monkeypatch):
    monkeypatch.setattr(backends()["openvino"], "available",
                        lambda self: "openvino is not installed (No module named 'openvino')")
    p = plan(get_profile(LAPTOP))
    assert p.formats == ["onnx", "pte"] and p.devices == {}
    assert p.skipped[0] == ("openvino:GPU: openvino is not installed "
                            "(No module named 'openvino')")


def test_nothing_producible_is_one_error_naming_each_missing_part():
    prof = dataclasses.replace(get_profile(LAPTOP), id="npu-only",
                               backends=("executorch:qnn", "ort:TensorrtExecutionProvider"))
    with pytest.raises(BundleError) as e:
        plan(prof)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--target npu-only: none of its backends can be "
                                              "produced here (executorch:qnn: edgeseq has no "
                                              "lowering to ExecuTorch's qnn delegate yet")
    if not _ort_has("TensorrtExecutionProvider"):
        assert msg.endswith("; ort:TensorrtExecutionProvider: Tensorrt: onnxruntime-gpu not "
                            "installed)")


def test_every_builtin_profile_is_planned_or_refused_in_one_line():
    from edgeseq.devices.catalog import load_profiles

    for prof in load_profiles().values():
        try:
            p = plan(prof)
        except BundleError as e:
            assert "\n" not in str(e)
            continue
        assert len(p.formats) + len(p.skipped) <= len(prof.backends)
        assert p.formats and all(":" in s for s in p.skipped)


@pytest.fixture(scope="module")
def target_bundle(checkpoints, tmp_path_factory):
    """A tiny S4D lowered for a user's profile that prefers OpenVINO, then ONNX Runtime, and
    names a delegate edgeseq cannot produce (no ExecuTorch: its lowering is the slow one)."""
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed")
    root = tmp_path_factory.mktemp("target")
    text = (Path(get_profile(LAPTOP).file).read_text()
            .replace(f'id = "{LAPTOP}"', 'id = "my-intel-box"'))
    text = "\n".join('backends = ["openvino:CPU", "executorch:qnn", "ort:CPUExecutionProvider"]'
                     if line.startswith("backends = ") else line for line in text.splitlines())
    (root / "box.toml").write_text(text)
    out = root / "bundle"
    p = edgeseq("convert", checkpoints["s4d"], "-o", out, "--target", root / "box.toml",
                "--parity-tokens", "8")
    return out, p.stderr


def test_convert_target_lowers_in_the_profiles_order(target_bundle):
    out, stderr = target_bundle
    assert ("--target my-intel-box: skipping executorch:qnn: edgeseq has no lowering to "
            "ExecuTorch's qnn delegate yet (issue #25)") in stderr
    man = read_manifest(out)
    assert man.target == "my-intel-box" and man.backends == ["openvino", "ort"]
    assert {f for g in man.graphs.values() for f in g.files} == {"openvino", "onnx"}
    assert man.partition("openvino").device == "CPU"
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and {c["format"] for c in parity["checks"]} == {"openvino", "onnx"}


def test_run_uses_the_targets_first_backend_by_default(target_bundle):
    out, _ = target_bundle
    args = ("run", out, "--prompt-ids", "1,2,3", "-n", "4", "--json")
    first = json.loads(edgeseq(*args).stdout)
    assert first["backend"] == "openvino"
    named = json.loads(edgeseq(*args, "--backend", "ort").stdout)
    assert named["backend"] == "ort" and named["tokens"] == first["tokens"]


def test_the_default_backend_is_the_first_usable_one(target_bundle, monkeypatch):
    from edgeseq.runtime.session import default_backend

    man = read_manifest(target_bundle[0])
    assert default_backend(man) == "openvino"
    # a bundle converted without --target runs on ORT, as before
    assert default_backend(dataclasses.replace(man, backends=[])) == "ort"
    # a backend of a newer edgeseq, or one not installed here, gives way to the next
    assert default_backend(dataclasses.replace(man, backends=["tflite", "executorch"])) == \
        "executorch"
    monkeypatch.setattr(backends()["openvino"], "available", lambda self: "not installed")
    assert default_backend(man) == "ort"


def test_target_and_format_together_are_refused(checkpoints, tmp_path):
    p = edgeseq("convert", checkpoints["s4d"], "-o", tmp_path / "b", "--target", LAPTOP,
                "--format", "onnx", check=False)
    assert p.returncode != 0
    assert "give --target (the device's preferred formats) or --format, not both" in error_line(p)
    p = edgeseq("convert", checkpoints["s4d"], "-o", tmp_path / "b", "--target", "nosuch",
                check=False)
    assert p.returncode != 0 and "unknown device 'nosuch'" in error_line(p)
    assert not (tmp_path / "b").exists()


def test_profile_entries_name_an_openvino_device():
    prof = get_profile(LAPTOP)
    assert not prof.validate()
    bad = dataclasses.replace(prof, backends=("openvino:TPU", "openvino:GPU"))
    assert bad.validate() == ["backend 'openvino:TPU' must be ort:<Name>ExecutionProvider, "
                              "executorch:<delegate> or openvino:<CPU|GPU|NPU>"]


def _phone(tmp_path: Path) -> Path:
    """A user's Qualcomm profile preferring the QNN provider, then ONNX Runtime's CPU."""
    text = (Path(get_profile("android-sd8gen3").file).read_text()
            .replace('id = "android-sd8gen3"', 'id = "my-phone"'))
    text = "\n".join('backends = ["ort:QNNExecutionProvider", "ort:CPUExecutionProvider"]'
                     if line.startswith("backends = ") else line for line in text.splitlines())
    (tmp_path / "phone.toml").write_text(text)
    return tmp_path / "phone.toml"


def test_a_qualcomm_target_runs_on_the_npu_by_default(checkpoints, tmp_path):
    """A profile that prefers ONNX Runtime's QNN provider: the ONNX files, QNN first in the
    manifest with its partition (the step wholly on the NPU), and ``run`` on it by default,
    giving ONNX Runtime's tokens (the HTP runs the tiny S4D in fp16)."""
    if backends()["qnn"]().available() is not None:
        pytest.skip(backends()["qnn"]().available())
    out = tmp_path / "bundle"
    edgeseq("convert", checkpoints["s4d"], "-o", out, "--target", _phone(tmp_path),
            "--parity-tokens", "8")
    man = read_manifest(out)
    assert man.backends == ["qnn", "ort"]
    assert {f for g in man.graphs.values() for f in g.files} == {"onnx"}
    part = man.partition("qnn")
    assert part.device == "NPU" and part.share("step") == 1.0 and part.share("prefill") < 1.0
    args = ("run", out, "--prompt-ids", "1,2,3", "-n", "6", "--json")
    first = json.loads(edgeseq(*args).stdout)
    assert first["backend"] == "qnn"
    assert json.loads(edgeseq(*args, "--backend", "ort").stdout)["tokens"] == first["tokens"]


def test_a_model_the_npu_cannot_take_keeps_the_targets_other_backends(checkpoints, tmp_path):
    """A text encoder-decoder's source has any length, which the HTP cannot compile: the
    conversion says so and the bundle serves the profile's next backend."""
    if backends()["qnn"]().available() is not None:
        pytest.skip(backends()["qnn"]().available())
    out = tmp_path / "bundle"
    p = edgeseq("convert", checkpoints["t5"], "-o", out, "--target", _phone(tmp_path),
                "--parity-tokens", "8")
    assert "qnn: left out of the target's backends" in p.stderr
    man = read_manifest(out)
    assert man.backends == ["ort"] and "qnn" not in man.partitions
