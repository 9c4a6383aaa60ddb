"""A bundle as untrusted data: paths that leave it, files that are not regular, modified or
swapped files, pickles planted where code could run, broken graph headers, a manifest that
disagrees with its graphs. Each is refused with one BundleError naming the file."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeseq import trust as trust_mod
from edgeseq.bundle import BundleError, read_manifest
from edgeseq.trust import file_records, verify_bundle
from edgeseq.runtime.session import load

from ..conftest import OPTIONAL_FORMATS

#: the OpenVINO backend's name is its format's (tests/conftest.py: installed here or not)
BACKENDS = ("ort", "executorch", "torch", *OPTIONAL_FORMATS)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("EDGESEQ_CACHE", str(path))
    return path


@pytest.fixture
def copy(bundle_of, tmp_path, cache):
    """A private copy of the mamba bundle (every format), to tamper with."""
    dst = tmp_path / "b"
    shutil.copytree(bundle_of("mamba"), dst)
    return dst


def manifest(root):
    return json.loads((root / "manifest.json").read_text())


def write_manifest(root, data):
    (root / "manifest.json").write_text(json.dumps(data))


def rerecord(root):
    """What an attacker who controls the whole bundle does: a files record that matches."""
    data = manifest(root)
    data["files"] = file_records(root)
    write_manifest(root, data)


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_converted_bundle_has_a_complete_files_record(bundle_of):
    root = bundle_of("mamba")
    rec = manifest(root)["files"]
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert set(rec) == on_disk
    assert verify_bundle(root) == []
    assert (root / "step.onnx").stat().st_size == rec["step.onnx"]["bytes"]


def test_every_escaping_path_is_listed_in_one_error(copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(copy / "step.onnx", outside)
    os.symlink(outside, copy / "link.onnx")
    os.mkfifo(copy / "fifo.pte")
    data = manifest(copy)
    g = data["graphs"]
    g["step"]["files"]["onnx"] = "../outside.onnx"
    g["prefill"]["files"]["onnx"] = str(outside)            # absolute
    g["verify"]["files"]["onnx"] = "link.onnx"               # symlink leaving the folder
    g["step"]["files"]["pte"] = "fifo.pte"                   # never opened
    g["prefill"]["files"]["pte"] = "/dev/zero"
    data["tokenizer"] = {"type": "hf", "file": "../../etc/passwd"}
    write_manifest(copy, data)
    with pytest.raises(BundleError) as e:
        read_manifest(copy)
    msg = one_line(e)
    assert msg.startswith(f"{copy / 'manifest.json'}: ")
    for name in ("../outside.onnx", str(outside), "link.onnx", "fifo.pte", "/dev/zero",
                 "../../etc/passwd"):
        assert repr(name) in msg, name
    assert "leaves the bundle" in msg and "not a regular file" in msg
    with pytest.raises(BundleError):       # and through load, on every backend
        load(copy, backend="ort")


def test_files_record_entries_are_checked_too(copy):
    os.mkfifo(copy / "extra")
    data = manifest(copy)
    data["files"]["extra"] = {"bytes": 0, "sha256": "0" * 64}
    data["files"]["../../etc/passwd"] = {"bytes": 0, "sha256": "0" * 64}
    write_manifest(copy, data)
    with pytest.raises(BundleError) as e:
        read_manifest(copy)
    msg = one_line(e)
    assert "'extra' is not a regular file" in msg and "'../../etc/passwd'" in msg


def test_truncated_file_is_refused_by_size(copy):
    data = (copy / "weights.onnx.data").read_bytes()
    (copy / "weights.onnx.data").write_bytes(data[:len(data) // 2])
    read_manifest(copy)       # inspect still reads it; loading refuses it
    with pytest.raises(BundleError) as e:
        load(copy, backend="executorch")   # a backend that does not even read this file
    assert f"{copy / 'weights.onnx.data'}: {len(data) // 2} bytes" in one_line(e)
    assert "truncated or replaced" in str(e.value)
    assert any("truncated" in p for p in verify_bundle(copy))


def test_swapped_bytes_are_refused_by_hash_on_first_load(copy):
    p = copy / "weights.onnx.data"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    read_manifest(copy)
    with pytest.raises(BundleError) as e:
        load(copy, backend="ort")
    assert "weights.onnx.data: SHA-256 differs" in one_line(e)
    assert any("weights.onnx.data" in p for p in verify_bundle(copy))


def test_a_verified_bundle_is_hashed_once(copy, monkeypatch):
    load(copy, backend="ort")          # a copy of a bundle not converted under this cache
    calls = []
    real = trust_mod._file_sha256
    monkeypatch.setattr(trust_mod, "_file_sha256",
                        lambda p: (calls.append(Path(p).name), real(p))[1])
    load(copy, backend="ort")
    # no file is hashed again: the bundle is recognised by its manifest's bytes, hashed as
    # read_manifest read them (one read per load: tests/backends/test_manifest_reads.py)
    assert calls == []
    os.utime(copy / "step.onnx")        # touched: hashed again
    load(copy, backend="ort")
    assert "step.onnx" in calls


def test_old_bundle_without_files_record_loads_with_a_warning(copy):
    data = manifest(copy)
    del data["files"]
    write_manifest(copy, data)
    with pytest.warns(UserWarning, match="no files record"):
        load(copy, backend="ort")
    assert "no files record" in verify_bundle(copy)[0]


# -- nothing unpickles -------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path, marker):
    """A pickle that creates ``marker`` when unpickled, padded to the file's own size (an
    unpickler stops at STOP and ignores the rest), so only a hash could tell."""
    size = path.stat().st_size
    blob = pickle.dumps(_Payload(marker))
    if path.suffix == ".pt2":   # a torch archive: torch.load runs it with weights_only=False
        import torch

        path.unlink()
        torch.save({"x": _Payload(marker)}, path)
        return
    path.write_bytes(blob + b"\0" * max(0, size - len(blob)))


def test_the_payload_runs_code_when_unpickled(tmp_path):
    """Control: the planted bytes do run code under an unpickler (so the tests below can fail)."""
    marker = tmp_path / "ran"
    f = tmp_path / "x.bin"
    f.write_bytes(b"\0" * 4096)
    _plant(f, marker)
    pickle.loads(f.read_bytes())
    assert marker.exists()
    marker.unlink()
    g = tmp_path / "x.pt2"
    g.write_bytes(b"")
    _plant(g, marker)
    import torch

    torch.load(g, weights_only=False)
    assert marker.exists()


BUNDLE_FILES = ("prefill.onnx", "step.onnx", "weights.onnx.data", "model.pte", "prefill.pt2",
                "step.pt2", "onnx_activation_table.json", "pte_planned_memory.json",
                "parity.json") + (("prefill.xml", "step.xml", "weights.openvino.bin")
                                  if "openvino" in OPTIONAL_FORMATS else ())
# the files each backend parses at load (a planted pickle there must be refused by the parser;
# weights.onnx.data is only numbers to ONNX Runtime, whatever its bytes)
READS = {"ort": {"prefill.onnx", "step.onnx"}, "executorch": {"model.pte"},
         "torch": {"prefill.pt2", "step.pt2"},
         # weights.openvino.bin is only numbers to OpenVINO (its offsets are checked)
         "openvino": {"prefill.xml", "step.xml"}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hostile_manifest", [False, True], ids=["as-shipped", "rerecorded"])
def test_planted_pickles_never_run(copy, tmp_path, backend, hostile_manifest):
    marker = tmp_path / "ran"
    shipped = (copy / "manifest.json").read_bytes()
    for name in BUNDLE_FILES:              # one file at a time, the others intact
        original = (copy / name).read_bytes()
        _plant(copy / name, marker)
        if hostile_manifest:
            rerecord(copy)
        try:
            load(copy, backend=backend)
        except BundleError as e:
            msg = str(e)
            assert "\n" not in msg and str(copy) in msg, msg
            assert name in msg or (backend == "torch" and "--backend torch refused" in msg), msg
        else:
            # with a record to match, a file this backend does not open at load passes unread
            assert hostile_manifest and name not in READS[backend], name
        assert not marker.exists(), f"{name} on {backend} ran code"
        (copy / name).write_bytes(original)
        (copy / "manifest.json").write_bytes(shipped)


def test_torch_backend_loads_only_bundles_converted_here(copy):
    with pytest.raises(BundleError) as e:      # the cache here never saw this conversion
        load(copy, backend="torch")
    assert "not converted on this machine" in one_line(e)
    trust_mod.record_converted(copy)          # as convert does
    assert len(load(copy, backend="torch").generate([1, 2, 3], 2)) == 2
    p = copy / "step.pt2"                      # then modified: refused before unpickling
    data = bytearray(p.read_bytes())
    data[-100] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError) as e:
        load(copy, backend="torch")
    assert "step.pt2: SHA-256 differs" in one_line(e)


# -- broken graph files ------------------------------------------------------------------------
def _pte(data):
    data[4:8] = b"\xff\xfe\xfd\xfc"
    return data


PTE_CASES = {
    "non-utf8 identifier": _pte,
    "wrong magic": lambda d: d[:4] + b"PK\x03\x04" + d[8:],
    "truncated": lambda d: d[:len(d) // 2],
    "header only": lambda d: d[:6],
    "program size": lambda d: d[:16] + (10 ** 12).to_bytes(8, "little") + d[24:],
    "segments past the end": lambda d: d[:24] + (len(d) - 8).to_bytes(8, "little") + d[32:],
    "garbage body": lambda d: d[:64] + b"\xff" * (len(d) - 64),
}


@pytest.mark.parametrize("case", sorted(PTE_CASES))
def test_broken_pte_is_an_error_not_an_abort(copy, case):
    p = copy / "model.pte"
    p.write_bytes(bytes(PTE_CASES[case](bytearray(p.read_bytes()))))
    rerecord(copy)
    code = textwrap.dedent(f"""
        from edgeseq.bundle import BundleError
        from edgeseq.runtime.session import load
        try:
            load({str(copy)!r}, backend="executorch")
        except BundleError as e:
            print("REFUSED", e)
            raise SystemExit(3)
        print("LOADED")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    out = r.stdout.strip().splitlines()
    assert len(out) == 1 and "model.pte" in out[0], r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name,cut", [("step.onnx", "half"), ("step.onnx", "garbage"),
                                      ("prefill.onnx", "empty"), ("weights.onnx.data", "half")])
def test_broken_onnx_files_are_a_bundle_error(copy, name, cut):
    """With a record to match (so the parsers see the bytes): a truncated or garbage graph, and
    weights too short for the initializers that point into them. (Garbage weights of the right
    size are only numbers; the hash check refuses them, above.)"""
    p = copy / name
    data = p.read_bytes()
    p.write_bytes({"half": data[:len(data) // 2], "garbage": os.urandom(len(data)),
                   "empty": b""}[cut])
    rerecord(copy)
    with pytest.raises(BundleError) as e:
        load(copy, backend="ort")
    assert name in one_line(e)


def test_onnx_external_data_outside_the_weights_file_is_refused(copy, tmp_path):
    import onnx

    p = copy / "step.onnx"
    proto = onnx.load(str(p), load_external_data=False)
    ext = next(i for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL)
    for e in ext.external_data:
        if e.key == "location":
            e.value = "../../../etc/passwd"
    onnx.save_model(proto, str(p))
    rerecord(copy)
    with pytest.raises(BundleError) as e:
        load(copy, backend="ort")
    assert "reads external data from '../../../etc/passwd'" in one_line(e)


@pytest.mark.parametrize("backend", ["ort", "executorch"])
@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_state_changed_in_the_manifest_is_refused(copy, backend, change):
    data = manifest(copy)
    for g in data["graphs"].values():
        st = next(s for s in g["state"] if s["name"] == "layers.0.ssm")
        if change == "shape":
            st["shape"] = [d * 2 if isinstance(d, int) else d for d in st["shape"]]
        else:
            st["dtype"] = "float16"
    write_manifest(copy, data)
    with pytest.raises(BundleError) as e:
        load(copy, backend=backend)
    msg = one_line(e)
    assert "state_in.layers.0.ssm" in msg and "does not match the manifest" in msg


def test_missing_graph_is_refused(copy):
    data = manifest(copy)
    del data["graphs"]["step"]
    # the partition records name the bundle's graphs too (checked first, on read)
    for rec in data.get("partitions", {}).values():
        rec["graphs"].pop("step", None)
    write_manifest(copy, data)
    with pytest.raises(BundleError) as e:
        load(copy, backend="ort")
    assert "needs graph step" in one_line(e)


@pytest.mark.parametrize("formats", [(), ("onnx", "bogus"), ("",)])
def test_convert_refuses_no_or_unknown_formats(checkpoints, tmp_path, formats):
    from edgeseq.convert.pipeline import convert

    with pytest.raises(BundleError) as e:
        convert(checkpoints["mamba"], tmp_path / "out", formats=formats)
    assert one_line(e).startswith("--format: ")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
