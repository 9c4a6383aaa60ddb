"""The real commands, as a user runs them, including bad input and its one-line error."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from ..conftest import FAMILIES, OPTIONAL_FORMATS

EDGESEQ = [sys.executable, "-m", "edgeseq.cli"]


def edgeseq(*args, check=True, **kw):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([*EDGESEQ, *map(str, args)], capture_output=True, text=True, env=env, **kw)
    if check and p.returncode:
        raise AssertionError(f"edgeseq {args} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def error_line(p):
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("edgeseq: error:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_zoo_json_lists_the_default():
    rows = json.loads(edgeseq("zoo", "--json").stdout)
    assert {"name", "family", "task"} <= set(rows[0])
    assert any(r["name"] == "mamba-bytes" and r["family"] == "mamba" for r in rows)


@pytest.mark.parametrize("backend", ["ort", "executorch"])
def test_run_json(bundle_of, backend):
    p = edgeseq("run", bundle_of(FAMILIES[0]), "--prompt-ids", "1,2,3", "-n", "12",
                "--backend", backend, "--json")
    out = json.loads(p.stdout)
    assert len(out["tokens"]) == 12 and isinstance(out["text"], str)
    assert out["first_token_ms"] > 0 and out["tokens_per_s"] > 0


def test_run_streams_text_and_summary(bundle_of):
    p = edgeseq("run", bundle_of(FAMILIES[0]), "--prompt-ids", "4,5", "-n", "5")
    assert len(p.stdout.split()) == 5 and "tokens/s" in p.stderr


@pytest.mark.parametrize("args,msg", [
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "1,100000"], "ids must be in"),
    (["--prompt", "hi"], "has no tokenizer"),
    ([], "exactly one of --prompt/--text, --prompt-ids, --audio or --input"),
])
def test_run_bad_input(bundle_of, args, msg):
    p = edgeseq("run", bundle_of(FAMILIES[0]), *args, check=False)
    assert p.returncode != 0 and msg in error_line(p)


def _convert_fails(src, out, msg):
    p = edgeseq("convert", src, "-o", out, "--format", "onnx", check=False)
    assert p.returncode != 0
    line = error_line(p)
    assert str(src) in line and msg in line, line
    assert not out.exists()
    assert not [q for q in out.parent.iterdir() if q.name.startswith(f".{out.name}")]
    return line


def test_convert_missing_path(tmp_path):
    _convert_fails(tmp_path / "nope", tmp_path / "out", "no such file")


def test_convert_unsupported_architecture(tmp_path):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "bert"}')
    line = _convert_fails(src, tmp_path / "out", "unsupported architecture 'bert'")
    assert "mamba" in line


def test_convert_truncated_safetensors(tmp_path, checkpoints):
    src = tmp_path / "trunc"
    shutil.copytree(checkpoints["mamba"], src)
    w = src / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _convert_fails(src, tmp_path / "out", "truncated safetensors")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_convert_refuses_code_running_pickle(tmp_path, checkpoints):
    src = tmp_path / "evil"
    src.mkdir()
    shutil.copy(checkpoints["mamba"] / "config.json", src)
    marker = tmp_path / "pwned"
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Evil(marker)}, f)
    _convert_fails(src, tmp_path / "out", "refused")
    assert not marker.exists()


def test_convert_weights_only_bin_loads(tmp_path, checkpoints):
    from safetensors.torch import load_file

    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(checkpoints["mamba"] / "config.json", src)
    torch.save(load_file(checkpoints["mamba"] / "model.safetensors"), src / "pytorch_model.bin")
    out = tmp_path / "out"
    edgeseq("convert", src, "-o", out, "--format", "pt2", "--parity-tokens", "16", "-q")
    assert json.loads((out / "parity.json").read_text())["passed"]


def test_convert_refuses_to_overwrite(checkpoints, bundle_of):
    p = edgeseq("convert", checkpoints["mamba"], "-o", bundle_of(FAMILIES[0]), check=False)
    assert p.returncode != 0 and "already exists" in error_line(p)


def test_unknown_zoo_name(tmp_path):
    p = edgeseq("convert", "zoo:nope", "-o", tmp_path / "o", check=False)
    assert p.returncode != 0 and "zoo:nope: no such zoo model" in error_line(p)


def test_bundle_is_self_describing(bundle_of):
    root = bundle_of(FAMILIES[0])
    m = json.loads((root / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["family"] == FAMILIES[0]
    assert len(m["source"]["sha256"]) == 64
    for g in m["graphs"].values():
        assert set(g["files"]) == {"onnx", "pte", "pt2", *OPTIONAL_FORMATS}
        for s in g["state"]:
            assert {"name", "shape", "dtype", "kind", "init"} <= set(s)
            assert s["shape"][0] == "batch"
        for f in g["files"].values():
            assert (root / f).is_file()
    parity = json.loads((root / "parity.json").read_text())
    assert parity["prompt"] and len(parity["reference_tokens"]) == 64


def test_convert_format_list_and_unknown_format(tmp_path, checkpoints):
    out = tmp_path / "b"
    edgeseq("convert", checkpoints["s4d"], "-o", out, "--format", "onnx,pt2", "-q",
            "--parity-tokens", "8")
    files = json.loads((out / "manifest.json").read_text())["graphs"]["step"]["files"]
    assert set(files) == {"onnx", "pt2"}
    p = edgeseq("convert", checkpoints["s4d"], "-o", tmp_path / "c", "--format", "tflite",
                check=False)
    assert p.returncode != 0 and "unknown format 'tflite'" in error_line(p)
