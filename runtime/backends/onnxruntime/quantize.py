"""Weight quantization of a bundle's ONNX graphs (ONNX Runtime): the build side, imports ``onnx``.

Schemes:

* ``int8``: symmetric int8 weights, one scale per ``INT8_BLOCK`` weights along the input dim,
  activations quantized per block at run time (ONNX Runtime ``MatMulNBits`` with 8 bits,
  ``accuracy_level`` 4). Its one-row kernel beat ``DynamicQuantizeMatMul`` (per-channel
  weights, one activation scale per call), which it replaced: a Mamba-130M-shaped stack of
  GEMVs 9.5 -> 6.5 ms at 1 thread, 6.1 -> 5.0 ms at 2 (docs/benchmarks.md). Weights that
  only many-row graphs read (an encoder's) keep ``DynamicQuantizeMatMul``: on 1500 rows its
  GEMM is 2.4x faster (a 1500x384 @ 384x1536 product: 5.6 against 13.5 ms, 1 thread).
* ``int4``: weight-only 4-bit, symmetric, one scale per ``group_size`` weights along the input
  dim (ONNX Runtime ``MatMulNBits``, ``accuracy_level`` 4: int8 compute, the fast CPU path).
* ``int4-tensor``: 16 levels with one scale for a whole weight matrix (no groups; stored as int8
  values in [-8, 7] behind a ``DequantizeLinear``). Deliberately damaging on weights with outlier
  channels; it exists so the accuracy gate can be shown to catch it.

Only matrix products with constant weights are quantized. State tensors are graph inputs and
outputs and stay float32; so do normalisations, convolutions, SSM parameters (A, D, dt), and the
families' sensitive layers (``Family.quant_sensitive``) unless the user includes them.

ONNX Runtime's quantizers take ``MatMul`` with a (in, out) weight and embedding tables as row
Gathers: ``prepare`` puts a graph in that form first (the lowering already stores float weights
so, ``layout.py``; older bundles have the exporter's ``Gemm(x, W, b, transB=1)``).
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeseq.runtime.backends.onnxruntime import OrtBackend
from edgeseq.runtime.backends.onnxruntime.layout import (consumers, drop_unused_initializers,
                                                        gemm_to_matmul, row_gathers)

#: what ``quantize_model`` implements: the backend's schemes but ``int8-static``, which
#: calibrates first (``edgeseq.quant.static``)
SCHEMES = tuple(s for s in OrtBackend.quant_schemes if s != "int8-static")
DEFAULT_GROUP = OrtBackend.int4_group
#: int8's weights per scale: MatMulNBits' 8-bit kernel is fastest at 128 (64: 7.9 ms, 128: 6.5,
#: 256: 7.1 on the stack above), and finer scales than one per output channel
INT8_BLOCK = 128


def prepare(model: Any) -> None:
    """A float graph in the form the quantizers take: linear weights as ``MatMul`` (in, out),
    embedding tables gathered by row."""
    gemm_to_matmul(model)
    row_gathers(model)


def matmul_weights(model: Any) -> dict[str, str]:
    """node name -> weight initializer name, for MatMuls with a constant 2-D weight."""
    inits = {i.name: i for i in model.graph.initializer}
    return {n.name: n.input[1] for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2}


def _int8_dynamic(model: Any, nodes: list[str], exclude: list[str]) -> Any:
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import logging

    # the quantizer advises "pre-processing" on the root logger for every graph (the graphs
    # are already shape-inferred and optimized by the exporter): not the user's business
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save_model(model, str(src))
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_quantize=nodes or None,
                             nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})
            return onnx.load(str(dst))
    finally:
        root.setLevel(level)


def one_row_graph(model: Any) -> bool:
    """``edgeseq.bundle.one_row`` for an ONNX graph, from its first input's dims."""
    from types import SimpleNamespace

    from edgeseq.bundle import one_row

    ins = [SimpleNamespace(shape=[d.dim_param or d.dim_value for d in
                                  i.type.tensor_type.shape.dim]) for i in model.graph.input[:1]]
    return one_row(ins)


def many_row_weights(models: dict[str, Any]) -> dict[str, list[str]]:
    """graph -> its MatMul nodes whose weight no one-row graph of the bundle reads (matched by
    content, after ``prepare``): an encoder's. int8 gives them the many-row kernel."""
    from edgeseq.runtime.backends.onnxruntime.layout import content_key

    keys = {}
    for name, model in models.items():
        prepare(model)
        inits = {i.name: i for i in model.graph.initializer}
        keys[name] = {node: content_key(inits[w]) for node, w in matmul_weights(model).items()}
    rows = {name: one_row_graph(model) for name, model in models.items()}
    row_read = {k for name in models if rows[name] for k in keys[name].values()}
    return {name: [node for node, k in keys[name].items() if k not in row_read]
            for name in models if not rows[name]}


def quantize_model(model: Any, scheme: str, keep: list[str], group_size: int = DEFAULT_GROUP,
                   sensitive: list[str] | None = None, many_rows: list[str] | None = None
                   ) -> tuple[Any, dict[str, Any]]:
    """Quantize one ONNX model in memory; returns it and a per-weight report.

    ``keep``: weights left in float. ``sensitive``: weights kept one step above the scheme: int8
    under ``int4`` (float under ``int8``, where they join ``keep``). ``many_rows``: MatMul nodes
    only many-row graphs read (``many_row_weights``): under ``int8`` they take
    ``DynamicQuantizeMatMul``, whose GEMM is the faster on many rows.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    sensitive = list(sensitive or [])
    if scheme != "int4":
        keep, sensitive = keep + sensitive, []
    prepare(model)
    weights = matmul_weights(model)
    exclude = [node for node, w in weights.items()
               if any(fnmatch.fnmatch(w, pat) for pat in keep)]
    promoted = [node for node, w in weights.items() if node not in exclude
                and any(fnmatch.fnmatch(w, pat) for pat in sensitive)]
    chosen = {node: w for node, w in weights.items() if node not in exclude + promoted}
    # int8 on many rows: the per-channel GEMM (``_int8_dynamic``), after the blocked ones
    gemm = [n for n in (many_rows or []) if n in chosen] if scheme == "int8" else []
    for n in gemm:
        del chosen[n]
    bits, block = {"int4": (4, group_size), "int8": (8, INT8_BLOCK)}.get(scheme, (0, 0))
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    blocks = {node: block_for(dims[w][0], block) for node, w in chosen.items()} if bits else {}
    # a table tied to a quantized LM head is read from the head's MatMulNBits blob, whose rows
    # are whole blocks only where its block divides the table's width (else it is quantized on
    # its own, or kept float if the group does not fit)
    tied = [w[:-2] for node, w in chosen.items() if bits and w.endswith(".T")
            and dims[w][0] % blocks[node] == 0]
    tables = [] if scheme == "int4-tensor" else quantize_embeddings(
        model, 8 if scheme == "int8" else 4, keep + tied, group_size)

    shared_tables: list[str] = []
    if scheme == "int4-tensor":
        _per_tensor_int4(model, sorted(set(chosen.values())))
        how = "int4 levels, one scale per weight matrix (int8 storage + DequantizeLinear)"
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # one quantizer pass per block size (it takes one for all the nodes it quantizes)
        for size in sorted(set(blocks.values()), reverse=True):
            others = [n for n in weights if blocks.get(n) != size]
            q = MatMulNBitsQuantizer(model, bits=bits, block_size=size, is_symmetric=True,
                                     accuracy_level=4, nodes_to_exclude=others)
            q.process()
            model = q.model.model
        smaller = sorted({b for b in blocks.values() if b != block}, reverse=True)
        how = (f"int{bits} weights, symmetric, group {block}"
               + (f" ({', '.join(map(str, smaller))} where a width is not a multiple of it)"
                  if smaller else "") + " (MatMulNBits, accuracy level 4: int8 compute)")
        shared_tables = share_tied_nbits(model, tied, bits)
        if shared_tables:
            how += (f"; the tied embedding reads the LM head's int{bits} blocks "
                    f"(GatherBlockQuantized)")
        if promoted:
            model = _int8_dynamic(model, promoted, [])
            how += "; sensitive layers int8 per-channel (DynamicQuantizeMatMul)"
        if gemm:
            model = _int8_dynamic(model, gemm, [])
            how += ("; weights only many-row graphs read int8 per-channel "
                    "(DynamicQuantizeMatMul)")
    if tables:
        how += (f"; embedding tables {'int8 per row' if scheme == 'int8' else 'int4 per row group'}"
                f" (dequantized after the Gather)")
    report = {"scheme": scheme, "how": how,
              "quantized": sorted(set(chosen.values()) | {weights[n] for n in gemm}
                                  | set(tables) | set(shared_tables)),
              "kept_float": sorted({weights[n] for n in exclude})}
    if promoted:
        report["int8_sensitive"] = sorted({weights[n] for n in promoted})
    return model, report


def block_for(k: int, block: int) -> int:
    """The block of a weight with ``k`` inputs: ``block``, or the largest smaller power of two
    (down to 16) that divides ``k`` - ``MatMulNBits`` pads a partial last block, which on a
    192-wide model wastes a third of the bytes at 128."""
    size = block
    while k % size and size > 16:
        size //= 2
    return size if k % size == 0 else block


def share_tied_nbits(model: Any, tied: list[str], bits: int) -> list[str]:
    """Embedding Gathers on a table whose transpose became a MatMulNBits weight read the same
    4- or 8-bit blocks: ``GatherBlockQuantized`` dequantizes only the rows read, from the (vocab,
    blocks, bytes) blob with its implicit zero point (8 or 128; measured identical to
    MatMulNBits' dequantized weights). Its scales need a trailing block dim: a Reshape in the graph, so the file holds
    them once (ONNX Runtime may fold it into a copy in memory, 1/8 of the blob). Returns the
    tables."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes, done = [], []
    for n in g.node:
        w = n.input[0] if n.op_type == "Gather" and n.input else ""
        blob, scales = w + f".T_Q{bits}", w + ".T_scales"
        if w not in tied or blob not in inits or scales not in inits:
            new_nodes.append(n)
            continue
        rows, blocks, block_bytes = inits[blob].dims
        group = block_bytes * 8 // bits
        k = blocks * group
        s3 = scales + "_3d"
        if w not in done:  # a Reshape node, not a second initializer: the file stores them once
            shape3 = numpy_helper.from_array(np.array([rows, blocks, 1], dtype=np.int64),
                                             s3 + "_shape")
            g.initializer.append(shape3)
            new_nodes.append(helper.make_node("Reshape", [scales, shape3.name], [s3],
                                              name=s3 + "_reshape"))
        out = n.output[0]
        new_nodes += [
            helper.make_node("GatherBlockQuantized", [blob, n.input[1], s3], [out + "_blocks"],
                             domain="com.microsoft", gather_axis=0, quantize_axis=2,
                             block_size=group, bits=bits, name=n.name + "_gbq"),
            helper.make_node("Shape", [n.input[1]], [out + "_ids_shape"]),
            helper.make_node("Concat", [out + "_ids_shape", w + ".k"], [out + "_shape"], axis=0),
            helper.make_node("Reshape", [out + "_blocks", out + "_shape"], [out])]
        if w + ".k" not in inits:
            inits[w + ".k"] = numpy_helper.from_array(np.array([k], dtype=np.int64), w + ".k")
            g.initializer.append(inits[w + ".k"])
        done.append(w)
    del g.node[:]
    g.node.extend(new_nodes)
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    drop_unused_initializers(g)
    return sorted(set(done))


def _per_tensor_int4(model: Any, names: list[str]) -> None:
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    dq = []
    for name in names:
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        scale = np.float32(max(float(np.abs(w).max()), 1e-12) / 7.0)
        q = np.clip(np.round(w / scale), -8, 7).astype(np.int8)
        g.initializer.remove(inits[name])
        g.initializer.extend([numpy_helper.from_array(q, name + ".q4"),
                              numpy_helper.from_array(np.array(scale), name + ".scale")])
        dq.append(helper.make_node("DequantizeLinear", [name + ".q4", name + ".scale"], [name],
                                   name=name + ".dequantize"))
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(dq + nodes)


def quantize_embeddings(model: Any, bits: int, keep: list[str], group: int = DEFAULT_GROUP
                        ) -> list[str]:
    """Embedding tables (``Gather`` rows of a 2-D constant) to int8 per row, or int4 with one
    scale per ``group`` values of a row (two values per byte), dequantized after the Gather: only
    the rows read are expanded. Returns the tables quantized."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    users = consumers(g)
    done, new_nodes = [], []
    targets = {}
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        w = n.input[0] if n.input else ""
        if (n.op_type == "Gather" and w in inits and len(inits[w].dims) == 2
                and attrs.get("axis", 0) == 0 and not any(fnmatch.fnmatch(w, p) for p in keep)
                and all(u.op_type == "Gather" for u in users[w])
                and (bits == 8 or inits[w].dims[1] % group == 0)):
            targets[n.name] = w
    for w in sorted(set(targets.values())):
        arr = numpy_helper.to_array(inits[w]).astype(np.float32)
        rows, k = arr.shape
        if bits == 8:
            scale = np.maximum(np.abs(arr).max(1), 1e-12) / 127.0
            q = np.clip(np.round(arr / scale[:, None]), -127, 127).astype(np.int8)
        else:
            blocks = arr.reshape(rows, k // group, group)
            scale = np.maximum(np.abs(blocks).max(2), 1e-12) / 7.0          # (rows, k/group)
            q4 = (np.clip(np.round(blocks / scale[..., None]), -8, 7) + 8).astype(np.uint8)
            q4 = q4.reshape(rows, k)
            q = (q4[:, 0::2] | (q4[:, 1::2] << 4)).astype(np.uint8)        # (rows, k/2)
        g.initializer.remove(inits[w])
        g.initializer.extend([numpy_helper.from_array(q, w + ".q"),
                              numpy_helper.from_array(scale.astype(np.float32), w + ".scale")])
        done.append(w)
    consts = []

    def const(name: str, values: list[int]) -> str:
        if not any(c.name == name for c in consts):
            consts.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    for n in g.node:
        if n.name not in targets:
            new_nodes.append(n)
            continue
        w, ids, out = targets[n.name], n.input[1], n.output[0]
        p = n.name + "_q"
        k = int(inits[w].dims[1])
        new_nodes += [helper.make_node("Gather", [w + ".q", ids], [p + "_rows"], axis=0),
                      helper.make_node("Gather", [w + ".scale", ids], [p + "_scale"], axis=0),
                      helper.make_node("Shape", [ids], [p + "_ids_shape"])]
        if bits == 8:
            new_nodes += [
                helper.make_node("Cast", [p + "_rows"], [p + "_f"], to=TensorProto.FLOAT),
                helper.make_node("Unsqueeze", [p + "_scale", const("q_axes_last", [-1])],
                                 [p + "_s"]),
                helper.make_node("Mul", [p + "_f", p + "_s"], [out])]
        else:
            new_nodes += [
                helper.make_node("BitwiseAnd", [p + "_rows", w + ".mask"], [p + "_lo"]),
                helper.make_node("BitShift", [p + "_rows", w + ".four"], [p + "_hi"],
                                 direction="RIGHT"),
                helper.make_node("Unsqueeze", [p + "_lo", const("q_axes_last", [-1])], [p + "_lo1"]),
                helper.make_node("Unsqueeze", [p + "_hi", const("q_axes_last", [-1])], [p + "_hi1"]),
                helper.make_node("Concat", [p + "_lo1", p + "_hi1"], [p + "_pair"], axis=-1),
                helper.make_node("Concat", [p + "_ids_shape", const(f"q_groups_{k}", [k // group, group])],
                                 [p + "_gshape"], axis=0),
                helper.make_node("Reshape", [p + "_pair", p + "_gshape"], [p + "_grouped"]),
                helper.make_node("Cast", [p + "_grouped"], [p + "_f"], to=TensorProto.FLOAT),
                helper.make_node("Sub", [p + "_f", const("q_eight_f", [8]) + "_f"], [p + "_c"]),
                helper.make_node("Unsqueeze", [p + "_scale", const("q_axes_last", [-1])], [p + "_s"]),
                helper.make_node("Mul", [p + "_c", p + "_s"], [p + "_deq"]),
                helper.make_node("Concat", [p + "_ids_shape", const(f"q_k_{k}", [k])],
                                 [p + "_oshape"], axis=0),
                helper.make_node("Reshape", [p + "_deq", p + "_oshape"], [out])]
    if bits == 4:
        for w in done:
            g.initializer.extend([numpy_helper.from_array(np.array(15, dtype=np.uint8), w + ".mask"),
                                  numpy_helper.from_array(np.array(4, dtype=np.uint8), w + ".four")])
        g.initializer.append(numpy_helper.from_array(np.array(8.0, dtype=np.float32), "q_eight_f_f"))
    g.initializer.extend(consts)
    del g.node[:]
    g.node.extend(new_nodes)
    return done


def quantize_bundle_graphs(folder: Path, files: dict[str, str], scheme: str, keep: list[str],
                           group_size: int = DEFAULT_GROUP, sensitive: list[str] | None = None
                           ) -> dict[str, Any]:
    """Quantize every ``<graph>.onnx`` of a bundle folder in place (weights re-shared once)."""
    many: dict[str, list[str]] = {}

    def survey(models: dict[str, Any]) -> None:
        many.update(many_row_weights(models))

    # only int8 has a many-row kernel of its own: the survey hashes every weight
    return rewrite_bundle_graphs(
        folder, files, lambda name, model: quantize_model(model, scheme, keep, group_size,
                                                          sensitive, many.get(name)),
        survey if scheme == "int8" else None)


def rewrite_bundle_graphs(folder: Path, files: dict[str, str],
                          rewrite: Callable[[str, Any], tuple[Any, Any]],
                          survey: Callable[[dict[str, Any]], None] | None = None
                          ) -> dict[str, Any]:
    """Load every graph of a bundle folder, ``rewrite(name, model) -> (model, report)`` it, and
    save them back with their weights shared once; returns the reports by graph. ``survey``
    sees all the graphs before the first rewrite (what one graph's rewrite depends on the
    others for)."""
    import onnx

    from edgeseq.runtime.backends.onnxruntime import WEIGHTS_FILE
    from edgeseq.runtime.backends.onnxruntime.lower import share_weights

    models = {name: onnx.load(str(folder / f), load_external_data=True)
              for name, f in files.items()}
    if survey is not None:
        survey(models)
    reports = {}
    for name in list(models):
        kept = {p.key: p.value for p in models[name].metadata_props}
        models[name], reports[name] = rewrite(name, models[name])
        # ONNX Runtime's quantizers replace a model's metadata: the bundle's entries
        # (``SERVES_KEY``) stay, the rewriter's own are added
        props = {p.key: p.value for p in models[name].metadata_props}
        onnx.helper.set_model_props(models[name], {**kept, **props})
    (folder / WEIGHTS_FILE).unlink(missing_ok=True)
    share_weights(models, folder / WEIGHTS_FILE)
    for name, model in models.items():
        onnx.save_model(model, str(folder / files[name]))
    return reports
