"""Fused attention in a bundle's ONNX graphs (build side, imports ``onnx``).

The exporter writes unmasked attention over a whole sequence (Whisper's encoder) as
``Softmax(Q K^T) V`` on (batch, heads, positions, head) tensors: two batched MatMuls and a Softmax
that write and read the full (heads, positions, positions) score tensor - 54 MB per layer at
Whisper's 1500 frames. ONNX Runtime's contrib ``MultiHeadAttention`` computes the same product
in one kernel that never materialises it (on the CPU, a flash-attention loop over blocks of
keys): for Whisper-tiny's shape (6 heads, 1500 positions) 105 -> 65 ms at 1 thread and
58 -> 31 ms at 2 (docs/benchmarks.md).

``fuse_attention`` finds that pattern as the dynamo exporter writes it,

    MatMul(Transpose(Xq, [0,2,1,3]), Transpose(Xk, [0,2,3,1])) [* c]  ->  Softmax(-1)
    MatMul(that, Transpose(Xv, [0,2,1,3]))

with Xq, Xk, Xv in (batch, positions, heads, head), a static head count and a head of at least
``MIN_HEAD``, and replaces it by
``MultiHeadAttention`` on the three tensors reshaped (no copy) to (batch, positions, hidden).
Anything else - a mask or bias added to the scores (decoders, T5's position bias), keys read
from a cache - is left as exported. The op runs on ONNX Runtime's CPU provider and OpenVINO's
ONNX reader; NPU providers do not take it, so a conversion for one leaves attention unfused
(``Backend.onnx_contrib_ops``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

MS_DOMAIN = "com.microsoft"
# below this head size the fused kernel was slower: the zoo's Whisper (4 heads of 16, 500
# positions) 3.7 -> 4.6 ms per encoder call
MIN_HEAD = 32


def _static_dims(model: Any) -> dict[str, list[int | None]]:
    out = {}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out


def _perm(node: Any) -> list[int]:
    from onnx import helper

    return next((list(helper.get_attribute_value(a)) for a in node.attribute
                 if a.name == "perm"), [])


def _scalar(inits: dict[str, Any], name: str) -> float | None:
    from onnx import numpy_helper

    if name not in inits:
        return None
    arr = numpy_helper.to_array(inits[name])
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def fuse_attention(model: Any) -> int:
    """Replace the exporter's unmasked attention by ``MultiHeadAttention`` (module docstring);
    returns how many were fused."""
    from onnx import helper, numpy_helper

    from edgeseq.runtime.backends.onnxruntime.layout import consumers

    g = model.graph
    nodes = list(g.node)
    prod = {o: n for n in nodes for o in n.output}
    users = consumers(g)
    inits = {i.name: i for i in g.initializer}
    dims = _static_dims(model)

    def made_by(name: str, op: str) -> Any:
        n = prod.get(name)
        return n if n is not None and n.op_type == op else None

    def only_user(name: str) -> Any:
        u = users.get(name, [])
        return u[0] if len(u) == 1 else None

    drop: set[int] = set()
    after: dict[int, list[Any]] = {}  # id(node) -> nodes replacing it
    fused = 0
    for sm in nodes:
        if sm.op_type != "Softmax" or next((helper.get_attribute_value(a) for a in sm.attribute
                                            if a.name == "axis"), -1) not in (-1, 3):
            continue
        scale, scores = None, sm.input[0]
        mul = made_by(scores, "Mul") or made_by(scores, "Div")
        if mul is not None:
            c = _scalar(inits, mul.input[1])
            if c is None or only_user(mul.output[0]) is not sm:
                continue
            scale, scores = (c if mul.op_type == "Mul" else 1.0 / c), mul.input[0]
        qk = made_by(scores, "MatMul")
        pv = only_user(sm.output[0])
        if qk is None or only_user(qk.output[0]) not in (sm, mul) or pv is None \
                or pv.op_type != "MatMul" or pv.input[0] != sm.output[0]:
            continue
        q_in, q_mul = qk.input[0], made_by(qk.input[0], "Mul")
        if q_mul is not None:  # the query scaled after its transpose
            c = _scalar(inits, q_mul.input[1])
            if c is None or only_user(q_mul.output[0]) is not qk:
                continue
            scale, q_in = (scale or 1.0) * c, q_mul.input[0]
        tq, tk, tv = (made_by(q_in, "Transpose"), made_by(qk.input[1], "Transpose"),
                      made_by(pv.input[1], "Transpose"))
        if None in (tq, tk, tv) or _perm(tq) != [0, 2, 1, 3] or _perm(tk) != [0, 2, 3, 1] \
                or _perm(tv) != [0, 2, 1, 3]:
            continue
        xq = dims.get(tq.input[0])
        if not xq or len(xq) != 4 or not xq[2] or not xq[3] or xq[3] < MIN_HEAD:
            continue
        heads, head = xq[2], xq[3]
        p = sm.name or sm.output[0]
        flat, split = p + "/mha_flat", p + "/mha_split"
        if flat not in inits:
            for name, shape in ((flat, [0, 0, -1]), (split, [0, 0, heads, head])):
                inits[name] = numpy_helper.from_array(np.array(shape, dtype=np.int64), name)
                g.initializer.append(inits[name])
        new = [helper.make_node("Reshape", [t.input[0], flat], [f"{p}/mha_{k}"],
                                name=f"{p}/mha_{k}_flat") for k, t in zip("qkv", (tq, tk, tv))]
        new += [helper.make_node("MultiHeadAttention", [f"{p}/mha_{k}" for k in "qkv"],
                                 [p + "/mha_out"], domain=MS_DOMAIN, num_heads=heads,
                                 scale=1.0 if scale is None else scale, name=p + "/mha"),
                helper.make_node("Reshape", [p + "/mha_out", split], [p + "/mha_bsnh"],
                                 name=p + "/mha_split"),
                helper.make_node("Transpose", [p + "/mha_bsnh"], [pv.output[0]],
                                 perm=[0, 2, 1, 3], name=p + "/mha_bnsh")]
        for n in (q_mul, qk, mul, sm, pv):
            if n is not None:
                drop.add(id(n))
        after[id(pv)] = new
        fused += 1
    if not fused:
        return 0
    out = []
    for n in nodes:
        if id(n) not in drop:
            out.append(n)
        out.extend(after.get(id(n), []))
    # the Transposes that fed the fused MatMuls read nothing now
    live = {o.name for o in g.output}
    keep: list[Any] = []
    for n in reversed(out):
        if any(o in live for o in n.output) or not n.output:
            keep.append(n)
            live.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused
