"""Device profiles: the built-in files, user files, errors, the roofline bound, host calibration
and the `edgeseq devices` command. No hardware and no network; the whole file runs in seconds."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import fields
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeseq.cli import main
from edgeseq.devices import (ComputeUnit, DeviceError, DeviceProfile, Memory, builtin_files,
                             calibrate_host, get_profile, load_profiles, roofline,
                             roofline_seconds)

BUILTIN = {"rpi5-8gb", "android-sd7gen3", "android-sd8gen3", "iphone15pro",
           "jetson-orin-nano-8gb", "macbook-air-m3-16gb", "snapdragon-x-elite-laptop",
           "x86-laptop-i5-1335u", "host"}

# A complete user file: 10 GB/s, 100 GFLOP/s fp32, a 2 TOPS NPU.
MINIMAL = """
id = "my-board"
name = "My board"
kind = "board"
backends = ["executorch:xnnpack", "ort:CPUExecutionProvider"]

[memory]
total_bytes = 4_000_000_000
app_bytes = 3_000_000_000
bandwidth_bytes_per_s = 10_000_000_000
source = "made up for the tests"

[cpu]
name = "4x made-up core @ 1.5625 GHz"
cores = 4
peak_gops = { fp32 = 100, int8 = 400 }
source = "made up for the tests"

[[cpu.clusters]]
core = "made-up"
count = 4
ghz = 1.5625
ops_per_cycle = { fp32 = 16, int8 = 64 }
source = "made up for the tests"

[npu]
name = "made-up NPU"
tops = 2
dtypes = ["int8", "fp16"]
requires_static_shapes = true
source = "made up for the tests"
"""


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No real cache, no user device folders from the environment."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGESEQ_DEVICES", raising=False)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- the built-in files ----------------------------------------------------------------------
def test_every_builtin_profile_loads_and_validates():
    profiles = load_profiles()
    assert set(profiles) == BUILTIN  # pins the list: a new file must be added here (and docs)
    for f in builtin_files():
        p = DeviceProfile.from_toml(f)
        assert p.id == f.stem, f"{f.name}: the file must be named <id>.toml"
        assert p.validate() == []
        assert p.backends and p.cpu is not None
        assert DeviceProfile.from_dict(p.to_dict(), f) == p  # the schema round-trips
        if not p.placeholder:
            assert 0 < p.app_memory <= p.memory.total_bytes
            assert p.bandwidth > 1e9 and p.peak_ops("fp32") > 1e9 and p.peak_ops("int8") > 1e9


def _numbers(p: DeviceProfile):
    """(where, table, field) for every number in a profile."""
    tables = [("memory", p.memory)] + [(u, getattr(p, u)) for u in ("cpu", "gpu", "npu")
                                       if getattr(p, u) is not None]
    for where, t in list(tables):
        tables += [(f"{where}.clusters[{i}]", c) for i, c in enumerate(getattr(t, "clusters", ()))]
    for where, t in tables:
        for f in fields(t):
            v = getattr(t, f.name)
            if f.name in t.NUMBERS and v not in (None, {}, ()):
                yield where, t, f.name
            else:  # every numeric field must be declared in NUMBERS, or its source goes unchecked
                assert not isinstance(v, (int, float)) or isinstance(v, bool), (where, f.name)


def test_every_number_of_every_builtin_has_a_source():
    for f in builtin_files():
        p = DeviceProfile.from_toml(f)
        for where, t, name in _numbers(p):
            assert t.source_of(name).strip(), f"{f.name}: {where}.{name} has no source"
        if not p.placeholder:  # each top table points at a document or a page
            for t in (p.memory, p.cpu):
                text = " ".join([*t.sources, *t.field_sources.values()])
                assert "http" in text, f"{f.name}: no URL among the sources of {t}"
        for u in (p.gpu, p.npu):  # a unit with no published peak says why
            if u is not None and not u.peak_gops and u.tops is None:
                assert u.field_sources.get("peak_gops") or u.field_sources.get("tops")


def test_a_number_without_a_source_is_rejected(tmp_path):
    no_source = MINIMAL.replace('source = "made up for the tests"\n', "", 1)  # [memory]'s
    f = _write(tmp_path / "nosrc.toml", no_source)
    with pytest.raises(DeviceError) as e:
        DeviceProfile.from_toml(f)
    assert "memory.total_bytes has no source" in str(e.value)


# -- user files ------------------------------------------------------------------------------
def test_user_file_folder_and_env_var_are_picked_up(tmp_path, monkeypatch):
    one = _write(tmp_path / "a" / "my-board.toml", MINIMAL)
    folder = tmp_path / "b"
    _write(folder / "x.toml", MINIMAL.replace('"my-board"', '"board-x"'))
    _write(folder / "y.toml", MINIMAL.replace('"my-board"', '"board-y"'))
    _write(folder / "notes.txt", "not a device")
    assert {"my-board"} <= set(load_profiles([one]))
    assert {"board-x", "board-y"} <= set(load_profiles([folder])) - {"my-board"}
    assert get_profile(one).id == "my-board"  # a path works too
    assert get_profile("board-x", extra=[folder]).file == folder / "x.toml"
    monkeypatch.setenv("EDGESEQ_DEVICES", os.pathsep.join([str(one), str(folder)]))
    assert {"my-board", "board-x", "board-y"} <= set(load_profiles())
    # a user file with a built-in id replaces the built-in one
    over = _write(tmp_path / "c" / "rpi.toml", MINIMAL.replace('"my-board"', '"rpi5-8gb"'))
    assert load_profiles([over])["rpi5-8gb"].name == "My board"


def test_the_documented_example_is_valid(tmp_path):
    import re

    doc = (Path(__file__).parents[2] / "docs" / "devices.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)
    p = get_profile(_write(tmp_path / "my-a55-board.toml", example))
    assert p.id == "my-a55-board" and p.peak_ops("int8") == 256e9 and p.npu.requires_static_shapes


def test_bad_file_names_the_file_and_every_problem(tmp_path):
    bad = MINIMAL.replace('name = "My board"\n', "").replace(
        "bandwidth_bytes_per_s = 10_000_000_000", "bandwidth_bytes_per_s = -1").replace(
        'kind = "board"', 'kind = "board"\ncolour = "red"')
    f = _write(tmp_path / "bad.toml", bad)
    with pytest.raises(DeviceError) as e:
        DeviceProfile.from_toml(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: ") and e.value.file == f
    assert "missing name" in msg
    assert "memory.bandwidth_bytes_per_s must be > 0, got -1" in msg
    assert "unknown key colour" in msg
    assert len(e.value.problems) == 3, e.value.problems
    # the loader reports it the same way, next to the other bad files
    g = _write(tmp_path / "worse.toml", "id = ")
    with pytest.raises(DeviceError) as e:
        load_profiles([f, g])
    assert str(f) in str(e.value) and str(g) in str(e.value)


def test_malformed_toml_and_wrong_types(tmp_path):
    f = _write(tmp_path / "broken.toml", 'id = "x"\nname = \n')
    with pytest.raises(DeviceError, match=r"broken\.toml: malformed TOML: .*line 2"):
        get_profile(f)
    g = _write(tmp_path / "types.toml", MINIMAL.replace("cores = 4", 'cores = "four"'))
    with pytest.raises(DeviceError) as e:
        get_profile(g)
    assert "cpu.cores: expected an integer, got 'four'" in str(e.value)
    with pytest.raises(DeviceError, match="no such file"):
        get_profile(tmp_path / "absent.toml")


def test_derived_numbers_must_agree(tmp_path):
    f = _write(tmp_path / "d.toml", MINIMAL.replace("fp32 = 100,", "fp32 = 120,").replace(
        "total_bytes = 4_000_000_000", "total_bytes = 4_000_000_000\nmt_per_s = 3200\n"
        "bus_bits = 64").replace("app_bytes = 3_000_000_000", "app_bytes = 5_000_000_000"))
    with pytest.raises(DeviceError) as e:
        get_profile(f)
    msg = str(e.value)
    assert "cpu.peak_gops.fp32 = 120 but the clusters give 100" in msg
    assert "mt_per_s x 1e6 x bus_bits / 8 = 2.56e+10" in msg
    assert "memory.app_bytes (5000000000) exceeds memory.total_bytes" in msg


def test_unknown_device_lists_known_ids():
    with pytest.raises(DeviceError) as e:
        get_profile("rpi5")
    msg = str(e.value)
    assert "unknown device 'rpi5'" in msg and "did you mean 'rpi5-8gb'" in msg
    assert all(i in msg for i in BUILTIN)
    assert isinstance(e.value, ValueError)


# -- the roofline ----------------------------------------------------------------------------
@pytest.fixture
def board(tmp_path) -> DeviceProfile:
    return get_profile(_write(tmp_path / "my-board.toml", MINIMAL))


def test_roofline_memory_bound(board):
    assert board.bandwidth == 10e9
    assert math.isclose(roofline_seconds(1e9, {"fp32": 1e6}, board), 0.1)
    assert roofline(1e9, {"fp32": 1e6}, board).bound == "memory"


def test_roofline_compute_bound(board):
    assert board.peak_ops("fp32") == 100e9 and board.peak_ops("float32") == 100e9
    assert math.isclose(roofline_seconds(1e6, {"fp32": 50e9}, board), 0.5)
    # dtypes share the unit: their times add (0.5 s fp32 + 0.25 s int8)
    r = roofline(1e6, {"fp32": 50e9, "int8": 100e9}, board)
    assert math.isclose(r.seconds, 0.75) and r.bound == "compute"
    # the NPU: int8 at 2 TOPS; fp16 has no figure of its own and gets the headline TOPS
    assert math.isclose(roofline_seconds(0, {"int8": 4e12}, board, unit="npu"), 2.0)
    assert board.peak_ops("fp16", "npu") == 2e12


def test_roofline_errors(board):
    with pytest.raises(DeviceError, match="has no gpu"):
        roofline_seconds(1, {"fp32": 1}, board, unit="gpu")
    with pytest.raises(DeviceError, match="has no fp16 peak"):
        board.peak_ops("fp16")
    with pytest.raises(ValueError):
        roofline_seconds(-1, {}, board)
    with pytest.raises(DeviceError, match="not published"):  # the vendor gives no figure
        get_profile("android-sd8gen3").peak_ops("fp32", "gpu")
    with pytest.raises(DeviceError, match="not calibrated"):
        get_profile("host").bandwidth


def test_profiles_are_frozen(board):
    with pytest.raises(AttributeError):
        board.id = "other"  # type: ignore[misc]
    assert isinstance(board.memory, Memory) and isinstance(board.cpu, ComputeUnit)


# -- host calibration ------------------------------------------------------------------------
def test_calibrate_host_tiny_budget_and_cache(tmp_path):
    t0 = time.perf_counter()
    host = calibrate_host(seconds_budget=0.3)
    assert time.perf_counter() - t0 < 3
    assert host.id == "host" and not host.placeholder and host.validate() == []
    assert host.bandwidth > 0 and host.app_memory > 0 and host.memory.total_bytes > 0
    assert host.peak_ops("fp32") > 0 and host.peak_ops("int8") > 0 and host.cpu.cores >= 1
    assert "measured on this host by edgeseq.devices.calibrate at" in host.memory.source_of(
        "bandwidth_bytes_per_s")
    cache = tmp_path / "cache" / "edgeseq" / "host.json"
    assert cache.is_file() and host.file == cache
    # measured once: the next call, get_profile and the loader read the cache
    t0 = time.perf_counter()
    assert calibrate_host() == host and time.perf_counter() - t0 < 0.5
    assert get_profile("host") == host and load_profiles()["host"] == host


def test_int8_falls_back_to_onnxruntime(monkeypatch):
    import torch

    from edgeseq.devices.calibrate import measure_matmul

    def no_int_mm(*a):
        raise RuntimeError("no _int_mm on this CPU")

    monkeypatch.setattr(torch, "_int_mm", no_int_mm)
    rate, how = measure_matmul("int8", 0.05)
    assert rate > 0 and how.startswith("onnxruntime MatMulInteger")


# -- the command -----------------------------------------------------------------------------
def test_cli_devices_table_and_json(tmp_path):
    user = _write(tmp_path / "u" / "my-board.toml", MINIMAL)
    r = CliRunner().invoke(main, ["devices", "--devices", str(user)])
    assert r.exit_code == 0, r.output
    assert all(i in r.stdout for i in BUILTIN | {"my-board"})
    assert "not calibrated (run with --calibrate)" in r.stdout
    r = CliRunner().invoke(main, ["devices", "--json"])
    assert r.exit_code == 0, r.output
    rows = {d["id"]: d for d in json.loads(r.stdout)}
    assert set(rows) == BUILTIN
    pi = rows["rpi5-8gb"]
    assert pi["dram_bandwidth_bytes_per_s"] == 17_068_000_000 and pi["npu"] is None
    assert pi["cpu"]["peak_ops_per_s"]["fp32"] == pytest.approx(153.6e9)
    assert pi["backends"][0] == "executorch:xnnpack" and pi["file"].endswith("rpi5-8gb.toml")
    assert rows["snapdragon-x-elite-laptop"]["npu"]["tops"] == 45
    assert rows["host"]["note"] == "not calibrated (run with --calibrate)"
    assert rows["host"]["app_memory_bytes"] is None


def test_cli_devices_bad_file(tmp_path):
    bad = _write(tmp_path / "bad.toml", MINIMAL.replace(
        "bandwidth_bytes_per_s = 10_000_000_000", "bandwidth_bytes_per_s = -5"))
    r = CliRunner().invoke(main, ["devices", "--devices", str(bad)])
    assert r.exit_code == 2
    assert r.stderr.startswith(f"edgeseq: error: {bad}: ")
    assert "memory.bandwidth_bytes_per_s must be > 0" in r.stderr
