"""Every error the CLI can reach ends in one ``edgeseq: error: <file or option>: <problem>`` line
and a non-zero exit, never a traceback or half-written output; inputs can come from files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeseq import cli

EDGESEQ = [sys.executable, "-m", "edgeseq.cli"]


@pytest.fixture
def env(tmp_path):
    # the bundle-verification cache of each test is its own (a copied bundle is a new one)
    return {**os.environ, "PYTHONWARNINGS": "ignore", "EDGESEQ_CACHE": str(tmp_path / "cache")}


def edgeseq(env, *args, timeout=300):
    return subprocess.run([*EDGESEQ, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def error_line(p, code=None, names=None):
    """The one error line of a failed command, checked: non-zero (or ``code``) exit, no
    traceback, nothing else on stderr, naming ``names``."""
    assert p.returncode != 0, p.stdout[-500:]
    if code is not None:
        assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeseq: error: "), p.stderr
    if names is not None:
        assert str(names) in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def bundle(mamba_bytes_bundle, tmp_path):
    """A private copy of the zoo's byte-level Mamba bundle, to tamper with."""
    dst = tmp_path / "mb"
    shutil.copytree(mamba_bytes_bundle, dst)
    return dst


def _write_parity(root: Path, content: str) -> None:
    """A parity.json as the bundle's author ships it: the files record matches (what an
    attacker who controls the whole bundle does), so only its content is wrong."""
    from edgeseq.trust import file_records

    (root / "parity.json").write_text(content)
    _edit_manifest(root, lambda d: d.update(files=file_records(root)))


def _edit_manifest(root: Path, change) -> None:
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))


# -- damaged bundles ---------------------------------------------------------------------------
def _truncate_step(root):
    with open(root / "step.onnx", "r+b") as f:
        f.truncate(1000)


def _state_shape(root):
    def change(d):
        for g in d["graphs"].values():
            for t in g.get("state", []):
                t["shape"] = [t["shape"][0], 999, *t["shape"][2:]]
    _edit_manifest(root, change)


def _state_dtype(root):
    def change(d):
        for g in d["graphs"].values():
            for t in g.get("state", []):
                t["dtype"] = "float16"
    _edit_manifest(root, change)


def _drop_graph(root):
    _edit_manifest(root, lambda d: d["graphs"].pop("step"))


def _garbage_manifest(root):
    (root / "manifest.json").write_text("[1, 2")


@pytest.mark.parametrize("damage", [_truncate_step, _state_shape, _state_dtype, _drop_graph,
                                    _garbage_manifest], ids=lambda f: f.__name__[1:])
def test_damaged_bundle_is_one_line(bundle, env, damage):
    damage(bundle)
    p = edgeseq(env, "run", bundle, "--prompt", "def ", "-n", "4")
    error_line(p, names=bundle)
    assert p.stdout == ""


@pytest.mark.parametrize("content,msg", [
    ('{"passed": tru', "not valid JSON"),
    ("[1, 2]", "not a parity report"),
    ('{"gates": 5}', "not a parity report"),
    ('{"checks": [3]}', "not a parity report"),
])
def test_inspect_broken_parity_json(bundle, env, content, msg):
    _write_parity(bundle, content)
    for extra in ([], ["--json"]):
        p = edgeseq(env, "inspect", bundle, *extra)
        assert msg in error_line(p, code=2, names=bundle / "parity.json")
        assert p.stdout == ""


def test_inspect_json_never_prints_nan(bundle, env):
    _write_parity(bundle, '{"passed": true, "checks": [], "max_abs": NaN}')
    p = edgeseq(env, "inspect", bundle, "--json")
    assert "non-finite" in error_line(p, code=1, names=bundle)
    assert p.stdout == ""
    _write_parity(bundle, '{"passed": true, "checks": [], "max_abs": 0.5}')
    json.loads(edgeseq(env, "inspect", bundle, "--json").stdout)  # a finite one prints


def test_inspect_malformed_quantization_record(bundle, env):
    _edit_manifest(bundle, lambda d: d.update(quantization={"formats": 5}))
    p = edgeseq(env, "inspect", bundle)
    error_line(p, code=2, names=bundle / "manifest.json")
    assert p.stdout == ""  # nothing half-printed before the error


def test_inspect_damaged_graph(bundle, env):
    """A graph replaced by other bytes: the size record speaks first; bytes of the right size
    that are not ONNX are named as such (never a protobuf traceback or "unexpected")."""
    size = (bundle / "step.onnx").stat().st_size
    (bundle / "step.onnx").write_bytes(os.urandom(5000))
    p = edgeseq(env, "inspect", bundle)
    assert "truncated or replaced" in error_line(p, code=2, names=bundle / "step.onnx")
    (bundle / "step.onnx").write_bytes(b"\xff" * size)
    p = edgeseq(env, "inspect", bundle)
    line = error_line(p, code=2, names=bundle / "step.onnx")
    assert "not an ONNX model" in line and "unexpected" not in line
    assert p.stdout == ""


def test_inspect_verify(bundle, env):
    p = edgeseq(env, "inspect", bundle, "--verify")
    assert p.returncode == 0, p.stderr
    n = len(json.loads((bundle / "manifest.json").read_text())["files"])
    assert p.stdout.strip() == f"{bundle}: verified {n} files"
    data = bytearray((bundle / "step.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    (bundle / "step.onnx").write_bytes(bytes(data))
    (bundle / "stray.bin").write_bytes(b"x")
    p = edgeseq(env, "inspect", bundle, "--verify")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 2 and all(ln.startswith("edgeseq: error: ") for ln in lines), lines
    assert any(str(bundle / "step.onnx") in ln for ln in lines)
    assert any(str(bundle / "stray.bin") in ln for ln in lines)


# -- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize("args,option", [
    (["--do-sample", "--temperature", "nan"], "--temperature"),
    (["--do-sample", "--temperature", "inf"], "--temperature"),
    (["--do-sample", "--top-p", "nan"], "--top-p"),
    (["--length-penalty", "-inf"], "--length-penalty"),
    (["--diversity-penalty", "nan"], "--diversity-penalty"),
])
def test_non_finite_options_are_refused(bundle, env, args, option):
    p = edgeseq(env, "run", bundle, "--prompt", "a", "-n", "3", *args)
    assert "must be a finite number" in error_line(p, code=2, names=option)
    assert p.stdout == ""


def test_convert_refuses_an_empty_format_list(env, tmp_path):
    out = tmp_path / "out"
    p = edgeseq(env, "convert", "zoo:mamba-bytes", "-o", out, "--format", ",")
    error_line(p, code=2, names="--format")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# -- input files -------------------------------------------------------------------------------
def test_prompt_file_equals_prompt(bundle, env, tmp_path):
    text = "def fibonacci(n):\n    \"\"\"Return the n-th number — fast.\"\"\"\n"
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    a = json.loads(edgeseq(env, "run", bundle, "--prompt", text, "-n", "24", "--json").stdout)
    b = json.loads(edgeseq(env, "run", bundle, "--prompt-file", tmp_path / "p.txt", "-n", "24",
                           "--json").stdout)
    assert a["tokens"] == b["tokens"] and a["prompt_tokens"] == b["prompt_tokens"] == len(
        text.encode())


def test_prompt_file_larger_than_a_command_line(bundle, env, tmp_path):
    """A prompt over the kernel's argument limit (about 2 MB in all, 128 KiB per argument)."""
    (tmp_path / "big.txt").write_text("x = 1\n" * 50_000)  # 300 KB
    p = edgeseq(env, "run", bundle, "--prompt-file", tmp_path / "big.txt", "-n", "4", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["prompt_tokens"] == 300_000


def _fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("make,msg", [
    (lambda t: t / "missing.txt", "no such"),
    (lambda t: Path("/dev/zero"), "not a regular file"),
    (_fifo, "not a regular file"),
    (lambda t: (t / "bin.txt").write_bytes(b"ok \xff\xfe") and t / "bin.txt", "not UTF-8"),
])
def test_bad_prompt_files(bundle, env, tmp_path, make, msg):
    path = make(tmp_path)
    p = edgeseq(env, "run", bundle, "--prompt-file", path, "-n", "2", timeout=120)  # no hang
    assert msg in error_line(p, code=2, names=path)


def test_prompt_file_that_is_a_folder(bundle, env, tmp_path):
    p = edgeseq(env, "run", bundle, "--prompt-file", tmp_path)  # click's own usage error
    assert p.returncode == 2 and "is a directory" in p.stderr and "Traceback" not in p.stderr


def test_prompt_file_over_the_size_limit(bundle, env, tmp_path):
    from edgeseq.limits import LIMITS

    var = LIMITS["input_bytes"][0]
    (tmp_path / "p.txt").write_text("y" * 101)
    p = edgeseq({**env, var: "100"}, "run", bundle, "--prompt-file", tmp_path / "p.txt")
    line = error_line(p, code=2, names=tmp_path / "p.txt")
    assert var in line  # says how to raise it


def test_prompt_file_and_prompt_are_exclusive(bundle, env, tmp_path):
    (tmp_path / "p.txt").write_text("a")
    for other in (["--prompt", "b"], ["--prompt-ids", "1,2"], ["--text", "c"]):
        p = edgeseq(env, "run", bundle, "--prompt-file", tmp_path / "p.txt", *other)
        assert "exactly one of" in error_line(p, code=2)


def test_text_file_over_the_source_limit_with_speculate(bundle_of, env, tmp_path):
    """A T5 source past what its encoder takes: the advice is one a CLI user can follow."""
    from edgeseq.limits import DEFAULT_MAX_SOURCE

    ids = ",".join(["5"] * (DEFAULT_MAX_SOURCE + 1))
    for extra in (["--speculate", "input"], []):
        p = edgeseq(env, "run", bundle_of("t5"), "--prompt-ids", ids, "-n", "4", *extra)
        line = error_line(p, code=2)
        assert str(DEFAULT_MAX_SOURCE) in line and "max_source" not in line, line
        assert "shorten" in line


# -- the top-level handler ---------------------------------------------------------------------
def _boom(exc):
    def raise_(*a, **k):
        raise exc
    return raise_


@pytest.fixture
def bundle_stub(tmp_path, monkeypatch):
    """A folder ``inspect`` takes for a bundle (these tests are about what happens after)."""
    import edgeseq.bundle

    monkeypatch.setattr(edgeseq.bundle, "read_manifest", lambda root: object())
    return tmp_path


def test_unexpected_exception_is_one_line(bundle_stub, monkeypatch):
    bundle = bundle_stub
    monkeypatch.setattr(cli, "_inspect", _boom(RuntimeError("deep inside\nsecond line")))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    res = CliRunner().invoke(cli.main, ["inspect", str(bundle)])
    assert res.exit_code == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"edgeseq: error: {bundle}: RuntimeError: deep inside")
    assert cli.DEBUG_ENV in lines[0]


def test_debug_env_shows_the_traceback(bundle_stub, monkeypatch):
    bundle = bundle_stub
    monkeypatch.setattr(cli, "_inspect", _boom(RuntimeError("deep inside")))
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    res = CliRunner().invoke(cli.main, ["inspect", str(bundle)])
    assert isinstance(res.exception, RuntimeError)  # re-raised, not summarised


def test_keyboard_interrupt_exits_130_quietly(bundle_stub, monkeypatch):
    bundle = bundle_stub
    monkeypatch.setattr(cli, "_inspect", _boom(KeyboardInterrupt()))
    res = CliRunner().invoke(cli.main, ["inspect", str(bundle)])
    assert res.exit_code == 130 and res.stderr == ""


def test_click_usage_errors_unchanged(tmp_path):
    bundle = tmp_path
    res = CliRunner().invoke(cli.main, ["run", str(bundle), "--top-k", "-1"])
    assert res.exit_code == 2 and "Invalid value for '--top-k'" in res.stderr
