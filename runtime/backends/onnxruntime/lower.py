"""ONNX Runtime's build side: torch graphs to ONNX files with ``torch.onnx.export(dynamo=True)``.

Weights are stored once for all graphs: every large initializer goes, deduplicated by content,
into one ``weights.onnx.data`` file that each ``<graph>.onnx`` references as standard ONNX external
data (so plain ONNX Runtime opens the files too, and no graph nears protobuf's 2 GB limit).
``run.py`` maps that file once at load and hands the same buffers to every session.
"""
from __future__ import annotations

import functools
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.bundle import StreamingGraph
from edgeseq.runtime.backends.onnxruntime import CONTROL_FLOW_KEY, SERVES_KEY, WEIGHTS_FILE

OPSET = 18
# initializers at least this large go to the shared weights file; smaller ones stay inline
EXTERNAL_MIN_BYTES = 1024
ALIGN = 64
# weights of at least this many elements are stored in fp16 under --dtype fp16
FP16_MIN_ELEMENTS = 1024


def lower(graphs: dict[str, StreamingGraph], out: Path, dtype: str, fused: bool = True
          ) -> dict[str, str]:
    """``<graph>.onnx`` per graph and the shared weights file under ``out``, and the
    activation table the memory plan reads; returns {graph: file}. ``fused``: ONNX Runtime's
    fused attention where it applies (``fuse.py``)."""
    import onnx

    from edgeseq.bundle import one_row
    from edgeseq.convert.workers import job_count, run_jobs
    from edgeseq.runtime.backends.onnxruntime.layout import gemv_layout, linear_weights

    # Each graph is exported on its own (in parallel workers where the machine allows,
    # ``edgeseq.convert.workers``), written to a staging folder inside the bundle's
    # temporary folder, then read back here to share the weights across graphs.
    stage = out / ".lowering"
    stage.mkdir()
    # longest first: the graphs with a chunk dimension carry the most nodes
    order = sorted(graphs, key=lambda n: not _has_chunk(graphs[n]))
    jobs = {name: functools.partial(_lower_graph, graphs[name], dtype, stage / name, fused)
            for name in order}
    weight_bytes = max((_param_bytes(g) for g in graphs.values()), default=0)
    try:
        paths = run_jobs(jobs, job_count(len(jobs), weight_bytes), warm_up=_warm_up)
        models = {name: onnx.load(paths[name]) for name in graphs}
    finally:
        shutil.rmtree(stage)
    from edgeseq.runtime.backends.onnxruntime import OrtBackend
    from edgeseq.runtime.cost import activation_table

    # the one-row layout for the weights one-row graphs read, in every graph that reads them
    # (layout.py), then fp16: both before the weights are shared
    rows = set().union(*(linear_weights(models[n]) for n, g in graphs.items()
                         if one_row(g.inputs)))
    for model in models.values():
        gemv_layout(model, rows)
        if dtype == "fp16":
            weights_to_fp16(model)
    share_weights(models, out / WEIGHTS_FILE)
    files = {}
    for name, model in models.items():
        onnx.save_model(model, str(out / f"{name}.onnx"))
        files[name] = f"{name}.onnx"
    del models
    # What each call allocates, for memory plans made without onnx at run time. Read back
    # from the files: shape inference on the in-memory protos resolves nothing.
    tables = {}
    for name, f in files.items():
        proto = onnx.load(str(out / f), load_external_data=False)
        tables[name] = activation_table(proto, graphs[name])
        tables[name]["prepack_bytes"] = prepacked_bytes(proto)
    (out / OrtBackend.side_files["activation_table"]).write_text(json.dumps(tables))
    return files


def _lower_graph(g: StreamingGraph, dtype: str, path: Path, fused: bool = True) -> str:
    """One graph to an ONNX file at ``path`` (weights beside it): export, translation, the
    bundle's dimension names, fused attention (``fuse.py``) if ``fused``."""
    import onnx
    import torch

    from edgeseq.convert.export import example_pair, export_graph
    from edgeseq.convert.stages import stages_of
    from edgeseq.runtime.backends.onnxruntime.fuse import fuse_attention
    from edgeseq.runtime.backends.onnxruntime.stamp import StampError, export_stamped

    tune_exporter()
    if g.control_flow is not None:
        import dataclasses

        g = dataclasses.replace(g, module=g.control_flow)
    proto = None
    if stages_of(g.module):
        try:
            proto = export_stamped(g, *example_pair(g, chunk_max=g.max_chunk), OPSET)
        except StampError as e:
            print(f"  onnx: {g.name}: exported whole ({e})", file=sys.stderr, flush=True)
    if proto is None:
        ep = export_graph(g, dynamic_batch=True, chunk_max=g.max_chunk)
        names_in = [s.name for s in g.inputs] + [s.input_name for s in g.state]
        names_out = [s.name for s in g.outputs] + [s.output_name for s in g.state]
        proto = torch.onnx.export(ep, input_names=names_in, output_names=names_out,
                                  opset_version=OPSET, dynamo=True, verbose=False,
                                  optimize=True).model_proto
    model = _strip_node_metadata(_name_dynamic_dims(proto, g))
    if g.control_flow is not None:
        onnx.helper.set_model_props(model, {CONTROL_FLOW_KEY: "1",
                                            **({SERVES_KEY: g.serves} if g.serves else {})})
    if fused:
        fuse_attention(model)
    onnx.save_model(model, str(path), save_as_external_data=True,
                    location=f"{path.name}.data", size_threshold=EXTERNAL_MIN_BYTES)
    return str(path)


def _warm_up() -> None:
    """Export a one-op module: the exporters' one-time set-up, done before workers fork."""
    import torch

    tune_exporter()

    class Twice(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    ep = torch.export.export(Twice(), (torch.ones(2),))
    torch.onnx.export(ep, dynamo=True, verbose=False, optimize=True)


def tune_exporter() -> None:
    """Two costs of torch 2.13's ONNX exporter that buy edgeseq's graphs nothing, removed once
    per process (docs/benchmarks.md, conversion cost):

    - it builds its operator registry afresh for every ``torch.onnx.export`` (0.35 s each; a
      stamped graph is three exports) and mutates it only for a ``custom_translation_table``,
      which edgeseq never passes: built once here;
    - it re-traces every program to decompose the operators the registry lacks, with symbolic
      shapes, ~40 % of an export; where the program has no such operator that pass changes
      nothing (the same ONNX graph, node for node, for every seq2seq graph): skipped then.
    """
    from torch.onnx._internal.exporter import _core, _registration

    if not getattr(_core._prepare_exported_program_for_export, "_edgeseq_tuned", False):
        full = _core._prepare_exported_program_for_export

        def prepare(exported_program: Any, *, registry: Any) -> Any:
            _plain_casts(exported_program.graph_module)
            if not _all_registered(exported_program, registry):
                return full(exported_program, registry=registry)
            from torch.onnx._internal.exporter import _fx_passes

            gm = exported_program.graph_module
            if not _has_scan(gm):
                # its fake-tensor run of a ``scan`` over a dynamic batch fails (torch 2.13);
                # a scan graph's operands are float already (Mamba's; parity checks it)
                _fx_passes.insert_type_promotion_nodes(gm)
            exported_program._graph_module = _fx_passes.remove_assertion_nodes(gm)
            return exported_program

        prepare._edgeseq_tuned = True  # type: ignore[attr-defined]
        _core._prepare_exported_program_for_export = prepare
    cls = _registration.ONNXRegistry
    if getattr(cls.from_torchlib, "_edgeseq_shared", False):
        return
    build = cls.from_torchlib.__func__
    made: dict[Any, Any] = {}

    def from_torchlib(klass: Any, *a: Any, **kw: Any) -> Any:
        key = (klass, a, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = build(klass, *a, **kw)
        return made[key]

    from_torchlib._edgeseq_shared = True  # type: ignore[attr-defined]
    cls.from_torchlib = classmethod(from_torchlib)  # type: ignore[method-assign]


def _plain_casts(gm: Any) -> None:
    """``Tensor.to(dtype)`` (a composite the exporter has no translation for, e.g. T5's norm
    casting to float32): dropped where the dtype is already that, else the ``_to_copy`` it
    decomposes to."""
    import torch

    aten = torch.ops.aten
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.to.dtype:
            continue
        src, dtype = node.args[0], node.args[1]
        val = getattr(src, "meta", {}).get("val")
        if val is not None and val.dtype == dtype:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
        else:
            node.target, node.args, node.kwargs = aten._to_copy.default, (src,), {"dtype": dtype}
        changed = True
    if changed:
        gm.recompile()


def _all_registered(exported_program: Any, registry: Any) -> bool:
    """Every operator of the program has an ONNX translation as it stands (what the
    exporter's decomposition pass would leave alone). Of higher-order operators only ``scan``
    counts, where its body's operators do: the exporter translates it to an ONNX ``Scan``,
    and its decomposition pass fails on a ``scan`` over a dynamic batch (torch 2.13)."""
    return _registered_graph(exported_program.graph_module, registry)


def _has_scan(gm: Any) -> bool:
    import torch

    return any(n.op == "call_function" and n.target is torch.ops.higher_order.scan
               for n in gm.graph.nodes)


def _registered_graph(gm: Any, registry: Any) -> bool:
    import operator

    import torch

    asserts = {torch.ops.aten._assert_tensor_metadata.default,
               torch.ops.aten._assert_scalar.default,
               torch.ops.aten.sym_constrain_range_for_size.default}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in asserts:
            continue
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            if not registry.is_registered(t):
                return False
        elif t is torch.ops.higher_order.scan:
            body = getattr(gm, node.args[0].target, None)
            if body is None or not _registered_graph(body, registry):
                return False
        elif getattr(t, "__module__", None) not in (operator.__name__, "_operator"):
            return False
    return True


def _has_chunk(g: StreamingGraph) -> bool:
    return any("chunk" in s.shape for s in [*g.inputs, *g.state])


def _param_bytes(g: StreamingGraph) -> int:
    return sum(p.numel() * p.element_size() for p in g.module.parameters())


def weights_to_fp16(model: Any) -> Any:
    """Store large float32 initializers as float16, cast back to float32 where they are read.

    Compute and state stay float32 (ONNX Runtime's CPU provider lacks fp16 kernels for most ops,
    and recurrent state accumulates rounding error); the weights, which dominate the bytes read per
    token, halve.
    """
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    new_inits, casts = [], []
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size >= FP16_MIN_ELEMENTS:
            half_name = f"{init.name}__fp16"
            new_inits.append(numpy_helper.from_array(arr.astype(np.float16), half_name))
            casts.append(helper.make_node("Cast", [half_name], [init.name], to=onnx.TensorProto.FLOAT,
                                          name=f"{init.name}__cast"))
        else:
            new_inits.append(init)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)
    return model


def _strip_node_metadata(model: Any) -> Any:
    """Drop the exporter's per-node metadata (the FX node, its Python stack trace with the
    converting machine's paths, name scopes): three quarters of a Mamba prefill graph's bytes
    (479 of 659 kB), read by nothing at run time; inside subgraphs too (a ``Scan``'s body)."""
    from edgeseq.runtime.backends.onnxruntime.layout import subgraphs

    def strip(graph: Any) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            for sub in subgraphs(node):
                strip(sub)

    strip(model.graph)
    return model


def _name_dynamic_dims(model: Any, graph: StreamingGraph) -> Any:
    """Give dynamic axes the bundle's names (``batch``, ``chunk``) instead of the exporter's
    symbols (``s1``, ``s70``), so the ONNX file reads like its manifest.

    Inputs and plain outputs (an encoder's ``cross.*``) are named as their specs name them. A
    state output is not: a growing cache comes out longer than it went in (``s70 + s22``), so
    only the symbols inside its expression are renamed (``past + chunk``). Giving two sizes one
    name would tell ONNX Runtime they are equal, and it then plans buffers of the wrong size."""
    g = model.graph
    specs = {s.name: s for s in [*graph.inputs, *graph.outputs]}
    specs.update({s.input_name: s for s in graph.state})
    rename: dict[str, str] = {}
    for vi in [*g.input, *g.output]:
        spec = specs.get(vi.name)
        for dim, want in zip(vi.type.tensor_type.shape.dim, spec.shape if spec else ()):
            if isinstance(want, str) and _SYMBOL.fullmatch(dim.dim_param):
                rename.setdefault(dim.dim_param, want)

    def sub(expr: str) -> str:
        return _SYMBOL.sub(lambda m: rename.get(m.group(0), m.group(0)), expr)

    state_out = {s.output_name for s in graph.state}
    for vi in [*g.input, *g.output, *g.value_info]:
        spec = None if vi.name in state_out else specs.get(vi.name)
        wants = spec.shape if spec else ()
        for i, dim in enumerate(vi.type.tensor_type.shape.dim):
            if not dim.dim_param:
                continue
            want = wants[i] if i < len(wants) else None
            dim.dim_param = want if isinstance(want, str) else sub(dim.dim_param)
    return model


_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def share_weights(models: dict[str, Any], data_path: Path) -> None:
    """Move every large initializer of every model into one file, each distinct tensor once."""
    import hashlib

    from onnx import TensorProto

    offsets: dict[bytes, tuple[int, int]] = {}
    with open(data_path, "wb") as f:
        for model in models.values():
            for init in model.graph.initializer:
                raw = init.raw_data
                if len(raw) < EXTERNAL_MIN_BYTES:
                    continue
                key = hashlib.sha1(raw).digest() + bytes(str((init.data_type, list(init.dims))), "ascii")
                if key not in offsets:
                    pad = -f.tell() % ALIGN
                    f.write(b"\0" * pad)
                    offsets[key] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = offsets[key]
                init.ClearField("raw_data")
                init.data_location = TensorProto.EXTERNAL
                del init.external_data[:]
                for k, v in (("location", data_path.name), ("offset", str(offset)),
                             ("length", str(length))):
                    entry = init.external_data.add()
                    entry.key, entry.value = k, v


# MLAS packs a float GEMM's constant B (K x N) into panels of 16 columns
_PACK_COLUMNS = 16


def prepacked_bytes(proto: Any) -> int:
    """Bytes ONNX Runtime's CPU kernels allocate when a session prepacks this graph's weights:
    the constant B of every float MatMul / Gemm (an initializer, or one transposed or cast,
    which ORT folds first), padded to MLAS's 16-column panels. Measured against RSS on the zoo
    bundles: mamba-bytes' verify 3.91 MiB estimated, 4.0 measured; the typo fixer's
    decoder_chunk 1.63 and 1.75 (``speculative/plan.py`` adds a margin)."""
    from onnx import TensorProto

    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    total = 0
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        attrs = {a.name: a for a in node.attribute}
        trans_b = node.op_type == "Gemm" and "transB" in attrs and attrs["transB"].i
        # B as ORT sees it after constant folding: an initializer through Transposes and Casts
        src, flip, cast = node.input[1], False, False
        while src not in inits and src in producer \
                and producer[src].op_type in ("Transpose", "Cast"):
            flip ^= producer[src].op_type == "Transpose"
            cast |= producer[src].op_type == "Cast"
            src = producer[src].input[0]
        if src not in inits or len(inits[src].dims) != 2:
            continue
        if not cast and inits[src].data_type != TensorProto.FLOAT:
            continue
        dims = list(inits[src].dims)[::-1] if flip else list(inits[src].dims)
        k, n = (dims[1], dims[0]) if trans_b else (dims[0], dims[1])
        total += -(-n // _PACK_COLUMNS) * _PACK_COLUMNS * k * 4
    return total
