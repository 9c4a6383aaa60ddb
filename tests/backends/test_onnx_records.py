"""``runtime/backends/onnxruntime/records.py``: the initializer records of a graph file read without
the ``onnx`` package, as ``onnx`` reads them; malformed bytes are a ``ProtoError``; running a
bundle on ONNX Runtime imports no ``onnx``."""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from edgeseq.runtime.backends.onnxruntime.records import ProtoError, initializers

onnx = pytest.importorskip("onnx")


def _as_onnx_reads_them(path):
    proto = onnx.load(str(path), load_external_data=False)
    return [(i.name, int(i.data_type), [int(d) for d in i.dims], int(i.data_location),
             {e.key: e.value for e in i.external_data}, len(i.raw_data))
            for i in proto.graph.initializer]


@pytest.mark.parametrize("graph", ["prefill.onnx", "step.onnx"])
def test_records_match_onnx(bundle_of, graph):
    path = bundle_of("mamba") / graph
    ours = [(i.name, i.data_type, i.dims, i.data_location, i.external_data, i.raw_bytes)
            for i in initializers(path.read_bytes())]
    assert ours == _as_onnx_reads_them(path)
    assert any(loc == 1 for *_, loc, _, _ in ours)    # external records were among them
    assert any(raw > 0 for *_, raw in ours)           # and small ones held in the graph


def test_packed_and_negative_dims_and_every_wire_type(tmp_path):
    from onnx import TensorProto, helper

    t = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], [0.0] * 6)
    t.dims[:] = [2, -1, 3]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "weights.onnx.data"), ("offset", "128"), ("length", "24")):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.ClearField("float_data")
    t.doc_string = "a doc string"                   # a field the reader skips
    node = helper.make_node("Identity", ["w"], ["y"], name="n")
    g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", 1, None)], [t])
    m = helper.make_model(g)
    data = m.SerializeToString()
    (rec,) = initializers(data)
    assert (rec.name, rec.data_type, rec.dims, rec.data_location) == ("w", 1, [2, -1, 3], 1)
    assert rec.external_data == {"location": "weights.onnx.data", "offset": "128", "length": "24"}


def test_malformed_bytes_are_a_proto_error_never_another_exception(bundle_of):
    data = (bundle_of("mamba") / "step.onnx").read_bytes()
    rng = random.Random(0)
    cases = [data[:n] for n in (1, 7, 100, len(data) // 3, len(data) - 1)]
    cases += [b"\xff" * 64, b"\x08" + b"\xff" * 11, os.urandom(4096), b"\x3a\x90\xff\xff\xff\x0f"]
    for _ in range(60):
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(bytes(b))
    for case in cases:
        try:
            initializers(case)
        except ProtoError:
            pass


def test_running_a_bundle_imports_no_onnx(bundle_of):
    code = ("import sys, edgeseq; s = edgeseq.load(sys.argv[1], backend='ort'); "
            "s.generate([1, 2, 3], max_new_tokens=4, stop_at_eos=False); "
            "print(sorted(m for m in sys.modules if m == 'onnx' or m.startswith('onnx.')))")
    r = subprocess.run([sys.executable, "-c", code, str(bundle_of("mamba"))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
