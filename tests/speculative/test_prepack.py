"""The memory plan's packing switch (ONNX Runtime): the chunk graph's weights repacked at load
when the budget affords the private copy, counted in the plan, dropped first when it does not."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgeseq.bundle import read_manifest

MB = 1 << 20


def _gemm_model():
    """MatMul on an initializer, Gemm with transB, MatMul on a transposed initializer, a MatMul
    of two activations, and an int64 initializer: the packer takes the first three only."""
    from onnx import TensorProto, helper, numpy_helper

    f32 = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f32(5, 20), "w1"), numpy_helper.from_array(f32(3, 7), "w2"),
             numpy_helper.from_array(f32(17, 9), "w3"),
             numpy_helper.from_array(np.zeros((4, 4), np.int64), "w4")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]),                  # K 5, N 20 -> 32
             helper.make_node("Gemm", ["y", "w2"], ["b"], transB=1),          # K 7, N 3 -> 16
             helper.make_node("Transpose", ["w3"], ["w3t"], perm=[1, 0]),
             helper.make_node("MatMul", ["z", "w3t"], ["c"]),                 # K 9, N 17 -> 32
             helper.make_node("MatMul", ["a", "d"], ["e"]),
             helper.make_node("MatMul", ["i", "w4"], ["j"])]
    io = lambda n, t=TensorProto.FLOAT: helper.make_tensor_value_info(n, t, None)  # noqa: E731
    g = helper.make_graph(nodes, "g", [io("x"), io("y"), io("z"), io("d"),
                                       io("i", TensorProto.INT64)],
                          [io("b"), io("c"), io("e"), io("j", TensorProto.INT64)], inits)
    return helper.make_model(g)


def test_the_packed_size_counts_constant_float_gemm_operands_in_16_column_panels() -> None:
    from edgeseq.runtime.backends.onnxruntime.lower import prepacked_bytes

    assert prepacked_bytes(_gemm_model()) == 4 * (32 * 5 + 16 * 7 + 32 * 9)


def test_an_unconstrained_plan_packs_every_graph_and_tighter_ones_drop_only_that(
        bundle_of) -> None:
    from edgeseq.runtime.cost import prepack_bytes
    from edgeseq.runtime.speculative.plan import make_plan

    for family, graph, kind in (("t5", "decoder_chunk", "input"), ("mamba", "verify", "ngram")):
        bundle = bundle_of(family)
        man = read_manifest(bundle)
        kw = {"max_source": 24, "max_length": 25} if family == "t5" else {}
        packed = prepack_bytes(bundle, man, "ort", graph)
        assert packed > 0
        free = make_plan(bundle, man, "ort", kind, None, **kw)
        assert free.prepack == set(free.graphs) and graph in free.prepack
        assert free.footprint["prepacked"] == sum(prepack_bytes(bundle, man, "ort", g)
                                                  for g in free.graphs) > packed
        assert free.to_json()["prepack"] == sorted(free.graphs)
        # a budget one byte short: the chunk graph alone is packed; shorter by that: none
        chunk = make_plan(bundle, man, "ort", kind, free.total - 1, **kw)
        assert chunk.prepack == {graph} and chunk.footprint["prepacked"] == packed
        tight = make_plan(bundle, man, "ort", kind, chunk.total - 1, **kw)
        assert tight.prepack == set() and tight.footprint["prepacked"] == 0
        for p in (chunk, tight):
            assert (p.mode, p.k_max, p.width, p.rollback, p.graphs) == (
                free.mode, free.k_max, free.width, free.rollback, free.graphs)
        # ExecuTorch's XNNPACK packs its weights whatever the plan: nothing to choose there
        et = make_plan(bundle, man, "executorch", kind, None, **kw)
        assert et.prepack == set() and not et.footprint.get("prepacked")


def test_a_bundle_without_the_recorded_size_is_never_packed(bundle_of, tmp_path: Path) -> None:
    import json
    import shutil

    from edgeseq.runtime.speculative.plan import make_plan

    old = tmp_path / "old"
    shutil.copytree(bundle_of("t5"), old)
    path = old / read_manifest(old).side_file("onnx", "activation_table")
    table = json.loads(path.read_text())
    for t in table.values():
        t.pop("prepack_bytes")
    path.write_text(json.dumps(table))
    plan = make_plan(old, read_manifest(old), "ort", "input", None, max_source=24,
                     max_length=25)
    assert plan.mode == "input" and plan.prepack == set()


def test_the_packed_session_decodes_the_same_tokens(bundle_of) -> None:
    from edgeseq.runtime.session import load as load_plain
    from edgeseq.runtime.speculative import load

    bundle = bundle_of("mamba")
    plain = load_plain(bundle)
    ss = load(bundle, speculate="ngram")
    assert ss.plan.prepack == {"verify", "step", "prefill"}
    for graph in ss.plan.prepack:
        opts = ss.session.model.runners[graph].sess.get_session_options()
        assert opts.get_session_config_entry("session.disable_prepacking") == "0"
    opts = plain.model.runners["step"].sess.get_session_options()
    assert opts.get_session_config_entry("session.disable_prepacking") == "1"
    # every option ``load`` sets reaches the sessions, through the per-session clone
    for runner in [*plain.model.runners.values(), *ss.session.model.runners.values()]:
        opts = runner.sess.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert opts.get_session_config_entry("session.set_denormal_as_zero") == "1"
    rng = np.random.default_rng(0)
    for _ in range(8):
        base = rng.integers(1, 30, int(rng.integers(2, 12)))
        ids = np.concatenate([base, base, base[:3]])
        assert ss.generate(ids, 24) == plain.generate(ids, 24).tolist(), ids
    assert ss.stats.drafted > 0


_MEASURE = """
import sys
from pathlib import Path

import numpy as np

from edgeseq.bundle import read_manifest
from edgeseq.runtime.backends.onnxruntime import OrtBackend


def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024


root = Path(sys.argv[1])
man = read_manifest(root)
entries = {"verify": man.graphs["verify"]}
keep = []


def load(prepack=frozenset()):
    model = OrtBackend().load(root, man, entries, 1, prepack)
    # each load maps the weights file anew; packing reads all of it, a plain load none (its
    # first call does): page both in, so that the difference is the packed copy
    int(np.asarray(model.weights.map).sum())
    keep.append(model)
    return rss()


r0 = load()                                   # library code paged in
r1 = load()
r2 = load(frozenset({"verify"}))
print((r2 - r1) - (r1 - r0))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_the_planned_size_covers_what_packing_allocates(mamba_bytes_bundle: Path) -> None:
    """zoo:mamba-bytes' verify (4 MiB of weights): the RSS a packed session adds over an
    unpacked one is within the plan's count, and is most of it (the switch takes effect). In a
    fresh process: a large one reuses freed heap, and a session's growth does not show."""
    import subprocess
    import sys

    from edgeseq.runtime.cost import prepack_bytes

    r = subprocess.run([sys.executable, "-c", _MEASURE, str(mamba_bytes_bundle)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    extra = int(r.stdout.split()[-1])
    planned = prepack_bytes(mamba_bytes_bundle, read_manifest(mamba_bytes_bundle), "ort",
                            "verify")
    assert 0.5 * planned < extra <= planned, (extra / MB, planned / MB)
