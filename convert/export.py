"""``torch.export`` of a StreamingGraph with the bundle's named dynamic dimensions.

Graph modules take ``forward(*inputs, *state)`` (``*state`` may be a var-positional parameter);
``torch.export`` wants ``dynamic_shapes`` in the same structure as the signature, so we build it
from ``inspect.signature``.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.export import Dim, ExportedProgram

from edgeseq.bundle import StreamingGraph
from edgeseq.convert.patch import flat_linear


def dynamic_shapes(graph: StreamingGraph, dims: dict[str, Any]) -> tuple:
    """One ``{axis: Dim}`` dict (or None) per tensor, grouped as the forward signature is."""
    per_tensor = []
    for spec in [*graph.inputs, *graph.state]:
        d = {i: dims[name] for i, name in enumerate(spec.shape)
             if isinstance(name, str) and dims.get(name) is not None}
        per_tensor.append(d or None)
    params = list(inspect.signature(graph.module.forward).parameters.values())
    out: list[Any] = []
    i = 0
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            out.append(tuple(per_tensor[i:]))
            i = len(per_tensor)
        else:
            out.append(per_tensor[i])
            i += 1
    return tuple(out)


def export_graph(graph: StreamingGraph, *, dynamic_batch: bool = True, batch: int = 1,
                 max_batch: int = 64, chunk_max: int | None = None) -> ExportedProgram:
    """Export with ``batch`` and ``chunk`` dynamic (batch fixed to ``batch`` if not dynamic).

    ``chunk_max`` bounds the chunk dim: ExecuTorch plans memory for the upper bound.
    """
    dims, args = example_args(graph, dynamic_batch=dynamic_batch, batch=batch,
                              max_batch=max_batch, chunk_max=chunk_max)
    with torch.no_grad(), flat_linear():
        return torch.export.export(graph.module, args, dynamic_shapes=dynamic_shapes(graph, dims),
                                   strict=False)


def example_args(graph: StreamingGraph, *, dynamic_batch: bool = True, batch: int = 1,
                 max_batch: int = 64, chunk_max: int | None = None
                 ) -> tuple[dict[str, Any], tuple]:
    """The named dynamic dims (``Dim`` or None) and example arguments to trace the graph with."""
    dims, example, _ = _example_sizes(graph, dynamic_batch, batch, max_batch, chunk_max)
    return dims, graph.example_inputs(example, vocab_size=_vocab(graph))


def example_pair(graph: StreamingGraph, *, chunk_max: int | None = None) -> tuple[tuple, tuple]:
    """Two example arguments (dynamic batch) whose every dynamic axis differs in size: what
    tells a traced stage which of its axes are dynamic (``edgeseq.convert.stages``)."""
    dims, example, bounds = _example_sizes(graph, True, 1, 64, chunk_max)
    for name, (hi, step) in bounds.items():
        if step > 1 and name in graph.example_dims:
            # not traced at the upper bound as for ExecuTorch's plan: each stage runs eagerly
            # on these, and a 30 s Whisper window costs seconds
            example[name] = max(step, graph.example_dims[name] // step * step)
    other = dict(example)
    for name, (hi, step) in bounds.items():
        other[name] = example[name] + step if example[name] + step <= hi else example[name] - step
    return (graph.example_inputs(example, vocab_size=_vocab(graph)),
            graph.example_inputs(other, vocab_size=_vocab(graph)))


def _example_sizes(graph: StreamingGraph, dynamic_batch: bool, batch: int, max_batch: int,
                   chunk_max: int | None
                   ) -> tuple[dict[str, Any], dict[str, int], dict[str, tuple[int, int]]]:
    """Dims (``Dim`` or None), example sizes, and per dynamic dim (upper bound, step)."""
    has_chunk = any("chunk" in s.shape for s in [*graph.inputs, *graph.state])
    dims: dict[str, Any] = {"batch": Dim("batch", min=1, max=max_batch) if dynamic_batch else None}
    bounds: dict[str, tuple[int, int]] = {"batch": (max_batch, 1)} if dynamic_batch else {}
    example = {**graph.example_dims, "batch": 2 if dynamic_batch else batch, "chunk": 5}
    for name, b in graph.dim_bounds.items():
        lo, hi, multiple = (*b, 1)[:3]
        if hi <= lo:
            dims[name] = None
            example[name] = hi
        elif multiple > 1:  # e.g. mel frames, which a stride-2 convolution halves
            dims[name] = multiple * Dim(f"_{name}", min=max(1, lo // multiple), max=hi // multiple)
            # ExecuTorch loses a derived dim's range in to_edge and plans memory from the example
            # size (the hint): trace at the upper bound so the plan covers every allowed size.
            example[name] = hi // multiple * multiple
            bounds[name] = (hi, multiple)
        else:
            dims[name] = Dim(name, min=lo, max=hi)
            bounds[name] = (hi, 1)
    if has_chunk:
        cmax = chunk_max or 4096
        if cmax > 1:
            dims["chunk"] = Dim("chunk", min=1, max=cmax)
            example["chunk"] = min(5, cmax)
            bounds["chunk"] = (cmax, 1)
        else:
            dims["chunk"] = None
            example["chunk"] = 1
    return dims, example, bounds


def _vocab(graph: StreamingGraph) -> int:
    for s in graph.outputs:
        if s.name == "logits":
            return int(s.shape[-1])
    return 2


class _HalfPrecision(torch.nn.Module):
    """A graph computed in fp16 whose interface (inputs, outputs, state) stays as specified, so
    the runtime and the manifest do not change with the precision."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.inner(input_ids, *[s.half() for s in state])
        return tuple(o.float() if o.is_floating_point() else o for o in out)


def half_precision(graphs: dict[str, StreamingGraph]) -> dict[str, StreamingGraph]:
    """fp16 copies of the graphs. One deepcopy memo for all of them, so weights that several
    graphs read (prefill and step share the model's) are copied and converted once."""
    import copy
    import dataclasses

    memo: dict[int, Any] = {}
    # the control-flow variant is for backends that lower from float (ONNX Runtime's fp16 is
    # a rewrite of the float graph): not carried into half precision
    return {name: dataclasses.replace(
                g, module=_HalfPrecision(copy.deepcopy(g.module, memo).half()).eval(),
                control_flow=None, serves=None)
            for name, g in graphs.items()}
