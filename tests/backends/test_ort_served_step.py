"""A Mamba bundle's ONNX ``prefill`` is lowered with its scan as an ONNX ``Scan``
(``StreamingGraph.control_flow``), whose cost follows the chunk's length. Loaded without the
``step`` graph, ONNX Runtime runs step calls through the prefill's session at a chunk of one:
one session, one packed copy of the weights. The served steps must give what the ``step``
graph's own session gives, through prefill chunks in between."""
import numpy as np
import pytest

from edgeseq.bundle import read_manifest
from edgeseq.runtime.session import load


@pytest.fixture(scope="module")
def mamba(bundle_of):
    return bundle_of("mamba")


def test_the_prefill_file_names_the_graph_it_serves(mamba) -> None:
    import onnx

    from edgeseq.runtime.backends.onnxruntime import CONTROL_FLOW_KEY, SERVES_KEY

    m = onnx.load(str(mamba / "prefill.onnx"), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    assert props.get(SERVES_KEY) == "step" and props.get(CONTROL_FLOW_KEY)
    assert any(n.op_type == "Scan" for n in m.graph.node)
    # the step graph keeps its own file, for runtimes that load it alone
    m = onnx.load(str(mamba / "step.onnx"), load_external_data=False)
    assert SERVES_KEY not in {p.key for p in m.metadata_props}


def test_served_steps_match_the_step_session(mamba) -> None:
    from edgeseq.runtime.backends.onnxruntime.run import _OneRowRunner, _OrtRunner

    served = load(mamba, backend="ort", threads=1, graphs={"prefill"})
    own = load(mamba, backend="ort", threads=1, graphs={"step"})
    assert isinstance(served.model.runners["step"], _OneRowRunner)
    assert served.model.runners["step"].sess is served.model.runners["prefill"].sess
    assert isinstance(own.model.runners["step"], _OrtRunner)
    # asked for, the step graph gets its session (the faster step; docs/benchmarks.md)
    both = load(mamba, backend="ort", threads=1, graphs={"prefill", "step"})
    assert all(isinstance(r, _OrtRunner) for r in both.model.runners.values())
    assert both.model.runners["step"].sess is not both.model.runners["prefill"].sess
    vocab = int(read_manifest(mamba).config["vocab_size"])
    rng = np.random.default_rng(0)
    s_served = served.model.init_state(1)
    s_own = own.model.init_state(1)
    for i in range(24):
        ids = rng.integers(0, vocab, (1,))
        a, s_served = served.model.run("step", {"input_ids": ids}, s_served)
        b, s_own = own.model.run("step", {"input_ids": ids}, s_own)
        assert a["logits"].shape == b["logits"].shape == (1, vocab)
        np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-4, rtol=0, err_msg=i)
        for x, y in zip(served.model.to_numpy(s_served), own.model.to_numpy(s_own)):
            np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)
        if i % 8 == 7:   # a chunk through the same session, then steps again
            chunk = rng.integers(0, vocab, (1, 5))
            _, s_served = served.model.run("prefill", {"input_ids": chunk}, s_served)
            s_own = own.model.from_numpy(served.model.to_numpy(s_served))


def test_greedy_tokens_match_with_and_without_the_served_step(mamba) -> None:
    served = load(mamba, backend="ort", threads=1, graphs={"prefill"})
    plain = load(mamba, backend="ort", threads=1)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    assert (served.generate(prompt, 24, stop_at_eos=False).tolist()
            == plain.generate(prompt, 24, stop_at_eos=False).tolist())
