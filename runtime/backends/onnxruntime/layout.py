"""Weight layout of a bundle's float ONNX graphs (build side, imports ``onnx``).

The exporter writes a linear layer as ``Gemm(x, W, b, transB=1)`` against the weight as PyTorch
stores it, (out, in). For one row (a decode step) ONNX Runtime's CPU kernels stream a (in, out)
matrix about twice as fast: MLAS has a one-row kernel for each layout, and the one for a
transposed B (dot products along rows) runs at half the bandwidth. Measured on this project's
2-core AVX2 host, without prepacking (how bundles run): a 768 x 50280 LM head 11.1 -> 6.2 ms at
1 thread; a Mamba-130M-shaped stack of GEMVs (494 MB) 35.5 -> 27.6 ms (docs/benchmarks.md).

The layout is for the weights a one-row graph reads (``edgeseq.bundle.one_row``): for many rows a
call (an encoder, a prefill chunk) the exporter's layout ran as fast or faster (t5-small's
encoder, 33 tokens: 38 vs 40-50 ms), so weights only such graphs read keep it; a weight both
kinds read (Mamba's prefill and step) takes the one-row layout, decoding being the longer part.

``gemv_layout`` therefore stores those constant linear weights transposed once, as ``<name>.T``
(the name the quantizers have always given it), read by ``MatMul`` (+ ``Add`` for a bias, which
ONNX Runtime fuses back into a non-transposed ``Gemm``). A table both gathered (an embedding) and
multiplied (a tied LM head) would then be stored twice; its ``Gather`` reads the transposed
table by column instead (``Gather(W.T, ids, axis=1)`` then a ``Transpose``: only the rows read
are touched, one strided element each).

The quantizers want row tables: ``row_gathers`` turns those column reads back into row Gathers
before they run (and gives the table back its own name).
"""
from __future__ import annotations

import hashlib
from typing import Any, Container

import numpy as np

# the suffix of a weight stored transposed, and of the nodes that read a table by column
T = ".T"
_COLUMNS = "_columns"


def subgraphs(node: Any) -> list[Any]:
    """The graphs a node holds as attributes (a ``Scan``'s body, an ``If``'s branches)."""
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def reads(node: Any) -> list[str]:
    """The names ``node`` reads from its graph: its inputs, and those its subgraphs read from
    the enclosing scope, which are no inputs of the node."""
    out = list(node.input)
    for sub in subgraphs(node):
        inner = ({o for n in sub.node for o in n.output}
                 | {i.name for i in sub.initializer} | {i.name for i in sub.input})
        out += [x for n in sub.node for x in reads(n) if x not in inner]
    return out


def drop_unused_initializers(g: Any) -> None:
    used = {i for node in g.node for i in reads(node)}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def consumers(g: Any) -> dict[str, list[Any]]:
    """{value name: the nodes of graph ``g`` that read it}."""
    out: dict[str, list[Any]] = {}
    for node in g.node:
        for x in reads(node):
            out.setdefault(x, []).append(node)
    return out


def content_key(init: Any) -> bytes:
    """An initializer's identity across graphs, which may name the same weight differently
    (a chunk graph's module holds the step's as ``step.``): its bytes, type and shape."""
    return hashlib.sha1(init.raw_data).digest() + repr((init.data_type, list(init.dims))).encode()


def linear_weights(model: Any) -> set[bytes]:
    """The constant weights (``content_key``) the graph reads as ``Gemm(x, W, transB=1)``."""
    from onnx import helper

    inits = {i.name: i for i in model.graph.initializer}
    return {content_key(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "Gemm" and n.input[1] in inits
            and any(a.name == "transB" and helper.get_attribute_value(a) == 1
                    for a in n.attribute)}


def gemm_to_matmul(model: Any, only: Container[bytes] | None = None) -> int:
    """Rewrite ``Gemm(A, W, [C], transB=1, alpha=beta=1)`` with constant W (whose
    ``content_key`` is in ``only``, if given) as ``MatMul(A, W.T)`` (+ ``Add``); returns how
    many."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes, n = [], 0
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ok = (node.op_type == "Gemm" and node.input[1] in inits and attrs.get("transB", 0) == 1
              and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0
              and attrs.get("beta", 1.0) == 1.0
              and (only is None or content_key(inits[node.input[1]]) in only))
        if not ok:
            new_nodes.append(node)
            continue
        wt_name = node.input[1] + T
        if wt_name not in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            t = numpy_helper.from_array(np.ascontiguousarray(w.T), wt_name)
            g.initializer.append(t)
            inits[wt_name] = t
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], wt_name], [mm_out],
                                          name=node.name + "_matmul"))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                              name=node.name + "_bias"))
        n += 1
    del g.node[:]
    g.node.extend(new_nodes)
    drop_unused_initializers(g)
    return n


def _ranks(model: Any) -> dict[str, int]:
    """Known ranks of the graph's values (inputs and shape-inferred intermediates)."""
    ranks = {}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            ranks[v.name] = len(t.shape.dim)
    return ranks


def gemv_layout(model: Any, weights: Container[bytes] | None = None) -> int:
    """Linear weights (of ``weights``, if given) stored (in, out) for the one-row kernels, tied
    tables gathered by column (module docstring) - also a table another graph of the bundle
    reads as one of ``weights`` (T5's encoder embedding, tied to the decoder's head), so the
    bundle stores it once; returns how many linear layers were rewritten."""
    from onnx import helper, numpy_helper

    n = gemm_to_matmul(model, weights)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    ranks = _ranks(model)
    new_nodes = []
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        table = node.input[0] if node.op_type == "Gather" and node.input else ""
        tied = table + T in inits or (table in inits and weights is not None
                                      and content_key(inits[table]) in weights)
        if (not table or not tied or attrs.get("axis", 0) != 0 or node.input[1] not in ranks
                or len(inits[table + T].dims if table + T in inits else inits[table].dims) != 2):
            new_nodes.append(node)
            continue
        if table + T not in inits:
            arr = numpy_helper.to_array(inits[table])
            inits[table + T] = numpy_helper.from_array(np.ascontiguousarray(arr.T), table + T)
            g.initializer.append(inits[table + T])
        r = ranks[node.input[1]]
        cols = node.output[0] + _COLUMNS
        new_nodes += [helper.make_node("Gather", [table + T, node.input[1]], [cols], axis=1,
                                       name=node.name + _COLUMNS),
                      helper.make_node("Transpose", [cols], [node.output[0]],
                                       perm=[*range(1, r + 1), 0], name=node.name + "_rows")]
    del g.node[:]
    g.node.extend(new_nodes)
    drop_unused_initializers(g)
    return n


def row_gathers(model: Any) -> int:
    """Undo ``gemv_layout``'s column reads: each ``Gather(W.T, ids, axis=1)`` + ``Transpose``
    becomes ``Gather(W, ids)`` again, ``W`` stored as rows (the quantizers find embedding
    tables as row Gathers); returns how many."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    readers = consumers(g)
    new_nodes, skip, n = [], set(), 0
    for node in g.node:
        if id(node) in skip:
            continue
        wt = node.input[0] if node.op_type == "Gather" and node.input else ""
        users = readers.get(node.output[0], []) if node.output else []
        if not (wt.endswith(T) and wt in inits and node.name.endswith(_COLUMNS)
                and len(users) == 1 and users[0].op_type == "Transpose"):
            new_nodes.append(node)
            continue
        table = wt[:-len(T)]
        if table not in inits:
            arr = numpy_helper.to_array(inits[wt])
            inits[table] = numpy_helper.from_array(np.ascontiguousarray(arr.T), table)
            g.initializer.append(inits[table])
        new_nodes.append(helper.make_node("Gather", [table, node.input[1]],
                                          [users[0].output[0]], axis=0,
                                          name=node.name[:-len(_COLUMNS)]))
        skip.add(id(users[0]))
        n += 1
    del g.node[:]
    g.node.extend(new_nodes)
    drop_unused_initializers(g)
    return n
