"""The OpenVINO backend's own parts (the shared suites run its parity: test_backends.py,
families/test_seq2seq.py): the IR and its one weights file, the partition record, the
workaround for the CPU plugin's attention snippet, refusing a damaged graph file."""
from __future__ import annotations

import hashlib
import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import edgeseq
from edgeseq.bundle import BundleError, Partition, read_manifest
from edgeseq.registry import families

pytest.importorskip("openvino")


def test_partition_record_counts_every_compute_operator(bundle_of):
    import openvino as ov

    root = bundle_of("mamba")
    man = read_manifest(root)
    part = man.partition("openvino")
    # on this machine the OpenVINO device is the CPU: the record says so, everything there
    assert (part.device, part.checked_on, part.precision) == ("CPU", "CPU", "f32")
    assert set(part.graphs) == {n for n, g in man.graphs.items() if "openvino" in g.files}
    core = ov.Core()
    for name, per_device in part.graphs.items():
        model = core.read_model(str(root / man.graphs[name].files["openvino"]),
                                str(root / "weights.openvino.bin"))
        ops = [op.get_type_name() for op in model.get_ordered_ops()
               if op.get_type_name() not in ("Parameter", "Result", "Constant")]
        assert part.counts(name) == {"CPU": len(ops)} and part.share(name) == 1.0
        assert per_device["CPU"]["MatMul"] == ops.count("MatMul") > 0


def test_inspect_shows_the_partition(bundle_of):
    from click.testing import CliRunner

    from edgeseq.cli import main

    res = CliRunner().invoke(main, ["inspect", str(bundle_of("mamba"))])
    assert res.exit_code == 0, res.output
    part = read_manifest(bundle_of("mamba")).partition("openvino")
    n = sum(part.counts("step").values())
    assert "partition (openvino): target device CPU; inference precision f32" in res.output
    assert f"    step: {n} operators: CPU {n} (100% on CPU)" in res.output


@pytest.mark.parametrize("damage, why", [
    (lambda r: r.update(device=7), '"device" string'),
    (lambda r: r.update(checked_on=""), '"checked_on" string'),
    (lambda r: r["graphs"]["step"]["CPU"].update(MatMul=-1), "counts >= 0"),
    (lambda r: r["graphs"]["step"].update(CPU=[1, 2]), "counts >= 0"),
    (lambda r: r["graphs"].update(nothere={"CPU": {"Add": 1}}), "graph nothere is not in"),
    (lambda r: r.clear() or r.update(x=1), '"device" string'),
])
def test_a_damaged_partition_record_is_refused_on_read(bundle_of, tmp_path, damage, why):
    root = tmp_path / "b"
    shutil.copytree(bundle_of("mamba"), root)
    path = root / "manifest.json"
    man = json.loads(path.read_text())
    damage(man["partitions"]["openvino"])
    path.write_text(json.dumps(man))
    with pytest.raises(BundleError, match=f"manifest.json: .*partitions.openvino: .*{why}"):
        read_manifest(root)


def test_partition_record_round_trips():
    rec = {"device": "GPU", "checked_on": "CPU", "precision": "f32",
           "graphs": {"step": {"GPU": {"MatMul": 3}, "CPU": {"Loop": 1}}}}
    p = Partition.from_record(rec)
    assert p.to_record() == rec and p.counts("step") == {"GPU": 3, "CPU": 1}
    assert p.share("step") == 0.75


def test_weights_are_stored_once_for_every_graph(bundle_of):
    root = bundle_of("t5")
    man = read_manifest(root)
    xmls = {g.files["openvino"] for g in man.graphs.values()}
    assert len(xmls) == len(man.graphs) >= 3
    # the decoder graphs share their weights: one file, about the size of ONNX's shared one
    blob = (root / "weights.openvino.bin").stat().st_size
    assert blob <= 1.05 * (root / "weights.onnx.data").stat().st_size
    assert not list(root.glob("*.bin"))[1:] and not (root / ".openvino").exists()


def test_growing_cache_matches_ort_past_sixteen_shapes(bundle_of):
    """The CPU plugin's fused attention snippet went wrong from the 16th distinct cache length
    (openvino 2026.4.1); run.compile_config turns snippets off. 24 calls of decoder_step with a
    cache growing by one each, against ONNX Runtime on the same inputs."""
    root = bundle_of("whisper")
    ort = edgeseq.load(root, backend="ort")
    ov = edgeseq.load(root, backend="openvino")
    rng = np.random.default_rng(0)
    frames = ort.config["audio"]["window_frames"]
    feats = rng.standard_normal((1, ort.config["audio"]["n_mels"], frames)).astype(np.float32)
    cross, _ = ort.model.run("encoder", {"input_features": feats}, None)
    worst = []
    for p in range(24):
        state = [rng.standard_normal(s.concrete_shape({"batch": 1, "past": p}))
                 .astype(np.float32) for s in ort.model.specs]
        feed = {"input_ids": np.array([5]), "cache_position": np.array([p]), **cross}
        a, _ = ort.model.run("decoder_step", feed, ort.model.from_numpy(state))
        b, _ = ov.model.run("decoder_step", feed, ov.model.from_numpy(state))
        worst.append(float(np.abs(a["logits"] - b["logits"]).max()))
    assert max(worst) <= 1e-4, worst


def test_a_graph_reading_outside_the_weights_file_is_refused(bundle_of, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(bundle_of("mamba"), root)
    xml = root / "step.xml"
    tree = ET.parse(xml)
    const = next(layer.find("data") for layer in tree.getroot().iter("layer")
                 if layer.get("type") == "Const")
    const.set("offset", str((root / "weights.openvino.bin").stat().st_size))
    tree.write(xml, encoding="utf-8", xml_declaration=True)
    man = json.loads((root / "manifest.json").read_text())
    # recorded as the bundle's own (a bundle from elsewhere whose author made it so)
    man["files"]["step.xml"] = {"bytes": xml.stat().st_size,
                                "sha256": hashlib.sha256(xml.read_bytes()).hexdigest()}
    (root / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match=r"step.xml: constant .* outside weights.openvino.bin"):
        edgeseq.load(root, backend="openvino")


def test_quantization_is_refused_for_openvino(checkpoints, tmp_path):
    from edgeseq.convert.pipeline import convert

    with pytest.raises(BundleError, match="--quant int8: the openvino backend does not quantize"):
        convert(checkpoints["s4d"], tmp_path / "q", formats=("onnx", "openvino"), quant="int8")


@pytest.mark.parametrize("family", sorted(families()))
def test_every_familys_shared_bundle_passes_parity_on_openvino(bundle_of, family):
    """Every family (causal LMs, encoder-decoders, speech, the classifier): the shared bundle's
    parity report holds an OpenVINO check that passed, drafting graphs included."""
    report = json.loads((bundle_of(family) / "parity.json").read_text())
    checks = [c for c in report["checks"] + report.get("graph_checks", [])
              if c["format"] == "openvino"]
    assert checks and all(c["passed"] for c in checks), checks
    assert read_manifest(bundle_of(family)).partition("openvino") is not None


def test_openvino_alone_and_fp16(bundle_of, checkpoints, tmp_path):
    """Without --format onnx the lowering stages its own ONNX files and leaves none behind;
    --dtype fp16 halves the weights file (OpenVINO's frontend would fold the ONNX files' fp16
    weights back to fp32), parity still holding."""
    from edgeseq.convert.pipeline import convert

    out = convert(checkpoints["s4d"], tmp_path / "fp16", formats=("openvino",), dtype="fp16",
                  parity_tokens=8)
    assert not list(out.glob("*.onnx*")) and not (out / ".openvino").exists()
    assert json.loads((out / "parity.json").read_text())["passed"]
    fp32 = (bundle_of("s4d") / "weights.openvino.bin").stat().st_size     # same checkpoint
    assert (out / "weights.openvino.bin").stat().st_size < 0.6 * fp32
