"""Stamped ONNX export (runtime/backends/onnxruntime/stamp.py): a staged module's layer template
is traced once and replicated with each layer's weights; the graph computes what the module does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeseq.bundle import StateSpec, StreamingGraph, TensorSpec
from edgeseq.convert.export import example_pair
from edgeseq.convert.stages import run_stages, stack_stages
from edgeseq.runtime.backends.onnxruntime import stamp
from edgeseq.runtime.backends.onnxruntime.lower import OPSET

ort = pytest.importorskip("onnxruntime")


class Stack(nn.Module):
    """ids (b, c) and a cache per layer (b, t, d) -> logits and the caches one chunk longer."""

    def __init__(self, biases: tuple[bool, ...] = (True, True, True), d: int = 8, v: int = 11,
                 specialize: bool = False):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.layers = nn.ModuleList(nn.Linear(d, d, bias=b) for b in biases)
        self.head = nn.Linear(d, v)
        self.specialize = specialize

    def forward(self, ids: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return run_stages(self.stages(), (ids, *cache))

    def stages(self):  # noqa: ANN201
        st = stack_stages(self, self.layers, 1, ["scale"], 1, "layer")
        # each layer also reads and extends its own cache (graph input j+1, output j+1)
        from dataclasses import replace

        from edgeseq.convert.stages import arg, out
        for i, s in enumerate(st[1:-1]):
            st[1 + i] = replace(s, inputs=(*s.inputs, arg(1 + i)), outputs=(*s.outputs, out(1 + i)))
        return st

    def prologue(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.emb(ids)
        return x, x.abs().mean(dim=(1, 2), keepdim=True) + 1

    def layer_call(self, lay: nn.Module, x: torch.Tensor, scale: torch.Tensor,
                   cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.specialize and x.shape[0] == 2:   # a branch on a dynamic size
            x = x * 2
        y = torch.relu(lay(x)) / scale
        return x + y, torch.cat([cache, y], dim=1)

    def epilogue(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, -1])


def _graph(module: Stack) -> StreamingGraph:
    n = len(module.layers)

    def example(dims: dict[str, int], seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        b = dims["batch"]
        return [torch.randint(0, 11, (b, dims["chunk"]), generator=g),
                *[torch.randn(b, dims["past"], 8, generator=g) for _ in range(n)]]

    return StreamingGraph("toy", module.eval(), [TensorSpec("ids", ("batch", "chunk"), "int64")],
                          [TensorSpec("logits", ("batch", 11))],
                          [StateSpec(f"c.{i}", ("batch", "past", 8), "float32", "kv")
                           for i in range(n)],
                          example_dims={"past": 3}, dim_bounds={"past": (0, 64)},
                          make_example=example)


def _run(proto, g: StreamingGraph, args) -> list[np.ndarray]:  # noqa: ANN001
    sess = ort.InferenceSession(proto.SerializeToString())
    names = [s.name for s in g.inputs] + [s.input_name for s in g.state]
    return sess.run(None, {n: a.numpy() for n, a in zip(names, args)})


def test_stamped_graph_computes_the_module_and_traces_the_layer_once(monkeypatch):
    torch.manual_seed(0)
    g = _graph(Stack())
    traced = []
    real = stamp._export_piece
    monkeypatch.setattr(stamp, "_export_piece",
                        lambda st, *a: traced.append(type(st.module).__name__) or real(st, *a))
    a, b = example_pair(g, chunk_max=16)
    proto = stamp.export_stamped(g, a, b, OPSET)
    assert traced == ["Method", "LayerCall", "Method"]        # 5 stages, 3 exports
    inits = {i.name for i in proto.graph.initializer}
    assert {f"layers.{i}.weight" for i in range(3)} <= inits  # each layer its own weights
    dims = {"batch": 4, "chunk": 3, "past": 9}
    for args in (a, b, g.example_inputs(dims, vocab_size=11)):
        with torch.no_grad():
            want = g.module(*args)
        got = _run(proto, g, args)
        for w, x in zip(want, got):
            assert w.shape == x.shape
            np.testing.assert_allclose(x, w.numpy(), atol=1e-5)


def test_layers_of_other_shapes_are_refused():
    g = _graph(Stack(biases=(True, True, False)))   # not one template: the last has no bias
    with pytest.raises(stamp.StampError, match="layer"):
        stamp.export_stamped(g, *example_pair(g, chunk_max=16), OPSET)


def test_a_specialized_axis_is_refused():
    g = _graph(Stack(specialize=True))
    with pytest.raises(stamp.StampError):
        stamp.export_stamped(g, *example_pair(g, chunk_max=16), OPSET)
