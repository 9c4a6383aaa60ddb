"""A staged graph module (``edgeseq.convert.stages``) to one ONNX graph, tracing each layer
template once.

Each distinct stage is exported on its own with its weights as graph *inputs* (so the exporter's
constant folding cannot bake one layer's weights into the graph), its dynamic axes found by
running the stages on two example sizes (an axis whose size differs is dynamic; ``Dim.AUTO``
lets the exporter relate them, e.g. a cache one longer than its input). The pieces are then
wired into one graph: a template's nodes once per layer, renamed, reading that layer's weights
as initializers named as the module names them. What comes out is an ordinary ONNX graph: the
quantizer, the cost tables and the other runtimes that read ONNX files see no difference.

A module the stamping cannot take (an axis the exporter specializes, a control-flow subgraph)
raises ``StampError``; the caller then exports the module whole.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from edgeseq.bundle import StreamingGraph
from edgeseq.convert.stages import Stage, arg, out, stage_values, stages_of

_SYMBOL_PREFIX = "stamp"
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class StampError(Exception):
    """The staged export cannot be used for this module (the flat export still can)."""


@dataclass
class _Piece:
    """One stage's ONNX model: inputs ``in{j}`` (the stage's j-th input) and ``w:{name}`` (its
    module's weight ``name``), outputs ``out{j}``."""
    proto: Any


class _Positional(nn.Module):
    """A stage with ``forward(*tensors) -> tuple``, the one signature the export is given."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, *a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        got = self.m(*a)
        return (got,) if isinstance(got, torch.Tensor) else tuple(got)


def _weights(module: nn.Module, canonical: bool = False) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name: every alias of a shared one, or (``canonical``) one name
    each."""
    return {**dict(module.named_parameters(remove_duplicate=canonical)),
            **dict(module.named_buffers(remove_duplicate=canonical))}


def export_stamped(g: StreamingGraph, args_a: Sequence[torch.Tensor],
                   args_b: Sequence[torch.Tensor], opset: int) -> Any:
    """One ONNX model for ``g`` from its stages; ``args_a`` and ``args_b`` are example inputs
    differing in every dynamic axis. Raises ``StampError`` where it cannot."""
    import onnx

    from edgeseq.convert.patch import flat_linear

    stages = stages_of(g.module)
    if not stages:
        raise StampError("the module has no stages")
    with torch.no_grad(), flat_linear():
        env_a = stage_values(stages, args_a)
        env_b = stage_values(stages, args_b)
        pieces: dict[str, _Piece] = {}
        for k, st in enumerate(stages):
            key = st.template or f"stage{k}"
            if key not in pieces:
                pieces[key] = _export_piece(st, env_a, env_b, opset)
    full_names = {id(t): name for name, t in _weights(g.module, canonical=True).items()}
    return _compose(g, stages, pieces, full_names, onnx)


def _export_piece(st: Stage, env_a: dict[str, torch.Tensor], env_b: dict[str, torch.Tensor],
                  opset: int) -> _Piece:
    import onnx_ir
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions
    from torch.export import Dim
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    ins = [env_a[n] for n in st.inputs]
    shapes: list[Any] = []
    for n in st.inputs:
        a, b = env_a[n].shape, env_b[n].shape
        if len(a) != len(b):
            raise StampError(f"{n}: rank changes with the input size")
        shapes.append({d: Dim.AUTO for d in range(len(a)) if a[d] != b[d]} or None)
    try:
        ep = torch.export.export(_Positional(st.module), tuple(ins), dynamic_shapes=(tuple(shapes),),
                                 strict=False)
    except Exception as e:  # noqa: BLE001 - any failure means: export the module whole
        raise StampError(f"{type(st.module).__name__}: {type(e).__name__}: {e}") from e
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"
                    and n.name in ep.graph_signature.user_inputs]
    for node, spec, n in zip(placeholders, shapes, st.inputs):
        val = node.meta.get("val")
        for d in (spec or {}):
            if val is not None and is_concrete_int(val.shape[d]):
                raise StampError(f"{type(st.module).__name__}: axis {d} of {n} was specialized")
    prog = torch.onnx.export(ep, input_names=[f"in{j}" for j in range(len(ins))],
                             output_names=[f"out{j}" for j in range(len(st.outputs))],
                             opset_version=opset, dynamo=True, verbose=False, optimize=False)
    model = prog.model
    # the weights become inputs ``w:<name>`` before optimizing: nothing may fold one layer's
    # weights into the graph the other layers reuse
    weights = {f"m.{n}" for n in _weights(st.module)}
    graph = model.graph
    for name in [n for n in graph.initializers if n in weights]:
        value = graph.initializers.pop(name)
        value.const_value = None
        value.name = f"w:{name[2:]}"
        graph.inputs.append(value)
    onnxscript.optimizer.optimize_ir(model)        # what torch.onnx.export(optimize=True) runs
    onnxscript.rewriter.onnx_fusions.fuse(model)
    return _Piece(onnx_ir.serde.serialize_model(model))


def _compose(g: StreamingGraph, stages: list[Stage], pieces: dict[str, _Piece],
             full_names: dict[int, str], onnx: Any) -> Any:
    from onnx import helper

    names_in = [s.name for s in g.inputs] + [s.input_name for s in g.state]
    names_out = [s.name for s in g.outputs] + [s.output_name for s in g.state]
    specs = {s.name: s for s in g.inputs}              # a graph input's spec by its name
    specs.update({s.input_name: s for s in g.state})
    bound = {arg(j): n for j, n in enumerate(names_in)}
    bound.update({out(j): n for j, n in enumerate(names_out)})
    # built in place: copying a proto copies its weights (0.8 s for t5-small)
    model = onnx.ModelProto()
    graph = model.graph
    graph.name = g.name
    outputs: dict[str, Any] = {}
    env_dims: dict[str, list[str | None]] = {}    # an intermediate value's axes, named
    weights: dict[str, torch.Tensor] = {}
    opsets: dict[str, int] = {}
    for k, st in enumerate(stages):
        piece = pieces[st.template or f"stage{k}"]
        gp = piece.proto.graph
        for o in piece.proto.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        prefix = f"s{k}/"
        rename: dict[str, str] = {"": ""}
        local = _weights(st.module)
        used = {v for node in gp.node for v in node.input}
        for vi in gp.input:
            if not vi.name.startswith("w:"):
                j = int(vi.name[2:])
                rename[vi.name] = bound.get(st.inputs[j], st.inputs[j])
                continue
            if vi.name not in used:  # e.g. T5's position table, held by the first layer only
                continue
            t = local.get(vi.name[2:])
            want = vi.type.tensor_type
            if t is None or [d.dim_value for d in want.shape.dim] != list(t.shape):
                raise StampError(f"template {st.template}: layer {k} has no weight "
                                 f"{vi.name[2:]} of the first layer's shape")
            name = full_names.get(id(t))
            if name is None:
                raise StampError(f"{type(st.module).__name__}: a weight the graph does not own")
            rename[vi.name] = name
            weights[name] = t
        for init in gp.initializer:     # the piece's own constants (shapes, scalars)
            rename[init.name] = prefix + init.name
            copy = graph.initializer.add()
            copy.CopyFrom(init)
            copy.name = prefix + init.name
        # an output a node of the piece makes takes the stage's name; one that is an input or a
        # constant of the piece (a pass-through) is copied out by an Identity
        produced = {v for node in gp.node for v in node.output}
        passed: list[tuple[str, str]] = []
        for vi in gp.output:
            j = int(vi.name[3:])
            target = bound.get(st.outputs[j], st.outputs[j])
            if vi.name in produced and vi.name not in rename:
                rename[vi.name] = target
            else:
                passed.append((vi.name, target))

        def rn(v: str, prefix: str = prefix, rename: dict[str, str] = rename) -> str:
            return rename.get(v, prefix + v)

        symbols = _symbols(gp, st, bound, specs, env_dims)
        for node in gp.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in node.attribute):
                raise StampError(f"{type(st.module).__name__}: a control-flow subgraph")
            copy = graph.node.add()
            copy.CopyFrom(node)
            copy.name = prefix + node.name
            copy.input[:] = [rn(v) for v in node.input]
            copy.output[:] = [rn(v) for v in node.output]
            del copy.metadata_props[:]
        for src, target in passed:
            graph.node.add().CopyFrom(helper.make_node("Identity", [rn(src)], [target],
                                                       name=f"{prefix}pass/{target}"))
        for vi in gp.value_info:
            _renamed(graph.value_info.add(), vi, rn(vi.name), symbols, k)
        for vi in gp.output:
            name = st.outputs[int(vi.name[3:])]
            env_dims[name] = _dim_names(vi, symbols, k)
            target = bound.get(name, "")
            if target in names_out:
                outputs[target] = (vi, symbols, k)
    for name, t in weights.items():
        arr = t.detach().cpu().numpy()
        init = graph.initializer.add()
        init.name = name
        init.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        init.dims.extend(arr.shape)
        init.raw_data = arr.tobytes()
    for n in names_in:
        graph.input.add().CopyFrom(helper.make_tensor_value_info(
            n, helper.np_dtype_to_tensor_dtype(np.dtype(specs[n].dtype)), list(specs[n].shape)))
    missing = [n for n in names_out if n not in outputs]
    if missing:
        raise StampError(f"no stage produces {', '.join(missing)}")
    for n in names_out:
        _renamed(graph.output.add(), *outputs[n][:1], n, *outputs[n][1:])
    first = next(iter(pieces.values())).proto
    model.ir_version = first.ir_version
    model.producer_name, model.producer_version = first.producer_name, first.producer_version
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
    return model


def _symbols(gp: Any, st: Stage, bound: dict[str, str], specs: dict[str, Any],
             env_dims: dict[str, list[str | None]]) -> dict[str, str]:
    """The piece's dimension symbols -> the graph's names for those sizes: a graph input's
    named axis, or what an earlier piece's output (``env_dims``) was named."""
    got: dict[str, str] = {}
    for vi in gp.input:
        if vi.name.startswith("w:"):
            continue
        name = st.inputs[int(vi.name[2:])]
        spec = specs.get(bound.get(name, ""))
        wants = list(spec.shape) if spec is not None else env_dims.get(name, [])
        for dim, want in zip(vi.type.tensor_type.shape.dim, wants):
            if dim.dim_param and isinstance(want, str):
                got.setdefault(dim.dim_param, want)
    return got


def _dim_names(vi: Any, symbols: dict[str, str], k: int) -> list[str | None]:
    """``vi``'s axes as the composed graph names them (None: a fixed size)."""
    return [_rename_expr(d.dim_param, symbols, k) if d.dim_param else None
            for d in vi.type.tensor_type.shape.dim]


def _rename_expr(expr: str, symbols: dict[str, str], k: int) -> str:
    return _WORD.sub(lambda m: symbols.get(m.group(0), f"{_SYMBOL_PREFIX}{k}_{m.group(0)}"), expr)


def _renamed(slot: Any, vi: Any, name: str, symbols: dict[str, str], k: int) -> None:
    """``vi`` into ``slot`` as ``name``, its symbols the graph's axis names where known and
    otherwise private to the piece (two pieces' ``s1`` are different sizes)."""
    slot.CopyFrom(vi)
    slot.name = name
    for dim in slot.type.tensor_type.shape.dim:
        if dim.dim_param:
            dim.dim_param = _rename_expr(dim.dim_param, symbols, k)
