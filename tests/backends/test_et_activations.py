"""ExecuTorch lowering exports transformers' tanh GELU with x * x * x for x ** 3 (XNNPACK has no
cube; a portable pow is slow and splits the delegated graph): the same function, and the class
is restored after the export."""
import pytest
import torch


def test_gelu_new_as_products_is_the_same_function_and_is_restored():
    pytest.importorskip("executorch")
    from transformers.activations import NewGELUActivation

    from edgeseq.runtime.backends.executorch.lower import _xnnpack_friendly_activations

    act = NewGELUActivation()
    x = torch.linspace(-12, 12, 4001)
    ref = act(x)
    orig = NewGELUActivation.forward
    with _xnnpack_friendly_activations():
        assert NewGELUActivation.forward is not orig
        out = act(x)
        ep = torch.export.export(act, (x,))
    assert NewGELUActivation.forward is orig
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-6)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("pow" in o for o in ops), ops
