"""Stage 2 of ``edgeseq profile``: the roofline cost of each graph per call (bytes moved,
operations by dtype), from the ONNX graph at the measured sizes or, for a ``.pte``-only bundle,
from the file size and the manifest; the state-bytes rule the measurement and the projection use."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgeseq.bundle import DTYPES as BUNDLE_DTYPES, GraphEntry, Manifest, read_manifest
from edgeseq.registry import format_of


#: Copies of the state a stream holds: the live one and the one being written (ONNX Runtime's
#: ping-pong buffers; ExecuTorch's planned outputs and the runner's clone; for encoder-decoders
#: the cross-attention K/V kept by the session and fed to every decoder step).
STATE_COPIES = 2

#: Bytes per parameter when a .pte-only bundle is costed from its file size.
_PARAM_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


def _state_bytes(manifest: Manifest, dims: Mapping[str, int]) -> int:
    """Per-stream state at ``dims`` (batch 1): every state spec, plus the encoder's outputs (the
    cross-attention K/V a decoder reads every step), times ``STATE_COPIES``."""
    d = {"batch": 1, "past": 0, "source": 0, "chunk": 1, **dims}
    specs = next((g.state for g in manifest.graphs.values() if g.state), [])
    total = sum(s.nbytes(d) for s in specs)
    enc = manifest.graphs.get("encoder")
    if enc is not None:
        total += sum(_spec_bytes(s, d) for s in enc.outputs)
    return STATE_COPIES * total


def _spec_bytes(spec: Any, dims: Mapping[str, int]) -> int:
    try:
        shape = spec.concrete_shape(dict(dims))
    except KeyError:
        return 0
    return int(np.prod(shape)) * np.dtype(BUNDLE_DTYPES.get(spec.dtype, np.float32)).itemsize


@dataclass
class GraphCost:
    """What one call of a graph moves and computes (a lower bound on its DRAM traffic)."""

    graph: str
    dims: dict[str, int]
    weight_bytes: int            # weights read by one call (each initializer once)
    io_bytes: int                # graph inputs and outputs: state read and written, K/V, logits
    flops: dict[str, float]      # operations by compute dtype (an FMA counts 2)
    tokens: int = 1              # tokens (frames) per call
    source: str = "onnx graph"
    unresolved: int = 0          # matrix products whose shapes could not be inferred

    @property
    def bytes_moved(self) -> int:
        return self.weight_bytes + self.io_bytes

    @property
    def intensity(self) -> float:
        """Operations per byte moved."""
        return sum(self.flops.values()) / max(1, self.bytes_moved)

    def to_json(self) -> dict[str, Any]:
        return {"dims": self.dims, "tokens_per_call": self.tokens,
                "bytes_per_call": self.bytes_moved,
                "bytes_by_kind": {"weights": self.weight_bytes, "io": self.io_bytes},
                "flops_by_dtype": {k: float(v) for k, v in self.flops.items()},
                "intensity_ops_per_byte": self.intensity, "source": self.source,
                "unresolved_matmuls": self.unresolved}


_MATMUL_INT8 = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul",
                "MatMulNBits", "MatMulBnb4", "QGemm"}
_CONV_INT8 = {"ConvInteger", "QLinearConv"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Sigmoid", "Tanh",
                "Softplus", "Relu", "Erf", "Reciprocal", "Neg", "Abs", "Gelu", "Where", "Max",
                "Min", "Clip", "HardSigmoid", "LeakyRelu", "Cos", "Sin", "Softmax",
                "LayerNormalization", "SimplifiedLayerNormalization", "ReduceSum", "ReduceMean",
                "ReduceMax", "CumSum"}
_ONNX_FLOAT = {1: "fp32", 10: "fp16", 16: "bf16", 11: "fp64"}


def _dtype_name(elem: int | None) -> str:
    return _ONNX_FLOAT.get(elem or 1, "int8" if elem in (2, 3) else "fp32")


def _concrete(model: Any, dims: Mapping[str, int]) -> Any:
    """The graph with its named input/output dims set to ``dims`` and old value_info dropped,
    ready for shape inference at those sizes."""
    g = model.graph
    for vi in [*g.input, *g.output]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param and d.dim_param in dims:
                d.dim_value = int(dims[d.dim_param])
    del g.value_info[:]
    return model


def _onnx_cost(path: Path, entry: GraphEntry, dims: Mapping[str, int], seen: set | None = None
               ) -> GraphCost:
    import onnx

    model = _concrete(onnx.load(str(path), load_external_data=False), dims)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; unresolved nodes fall back
        pass
    g = model.graph
    shapes: dict[str, tuple[list[int | None], int]] = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        tt = vi.type.tensor_type
        shapes[vi.name] = ([d.dim_value if d.HasField("dim_value") else None
                            for d in tt.shape.dim], tt.elem_type)
    inits = {i.name: i for i in g.initializer}
    for i in g.initializer:
        shapes[i.name] = (list(i.dims), i.data_type)
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)

    def shape(name: str) -> list[int] | None:
        s = shapes.get(name, (None, 0))[0]
        return s if s is not None and all(isinstance(v, int) and v >= 0 for v in s) else None

    tokens = _items_per_call(entry, dims)
    flops: dict[str, float] = {}
    unresolved = 0

    def add(dtype: str, n: float) -> None:
        flops[dtype] = flops.get(dtype, 0.0) + float(n)

    for node in g.node:
        op = node.op_type
        out = shape(node.output[0]) if node.output else None
        if op in ("MatMul", "Gemm", "FusedMatMul") or op in _MATMUL_INT8:
            a = shape(node.input[0])
            k = None
            attrs = {at.name: at.i for at in node.attribute}
            if op == "MatMulNBits":  # its weight is packed: the sizes are attributes
                k = attrs.get("K")
            elif a:
                k = a[0] if (op == "Gemm" and attrs.get("transA")) else a[-1]
            if out is not None and k:
                n = 2.0 * float(np.prod(out)) * k
            else:  # fall back on the weight: 2 x tokens x K x N
                unresolved += 1
                w = next((inits[x] for x in node.input[1:] if x in inits), None)
                kn = (attrs["K"] * attrs["N"] if op == "MatMulNBits" and "N" in attrs
                      else float(np.prod(w.dims)) if w is not None else 0.0)
                n = 2.0 * tokens * kn
            add("int8" if op in _MATMUL_INT8 else _dtype_name(shapes.get(node.input[0],
                                                                             ([], 1))[1]), n)
        elif op in ("Conv", "ConvTranspose") or op in _CONV_INT8:
            w = shape(node.input[1 if op in ("Conv", "ConvTranspose", "ConvInteger") else 3])
            if out is not None and w:
                add("int8" if op in _CONV_INT8 else _dtype_name(shapes.get(node.input[0],
                                                                            ([], 1))[1]),
                    2.0 * float(np.prod(out)) * float(np.prod(w[1:])))
            else:
                unresolved += 1
        elif op in _ELEMENTWISE:
            src = shape(node.input[0]) if op.startswith("Reduce") else out
            if src is not None:
                add(_dtype_name(shapes.get(node.output[0], ([], 1))[1]), float(np.prod(src)))

    # Weights read by one call: each initializer once, in its stored dtype; a table read only by
    # Gather (an embedding) costs the rows gathered, not the whole table.
    seen = set() if seen is None else seen
    wbytes = 0
    for init in g.initializer:
        key, nbytes = _initializer_bytes(init, path.name)
        users = consumers.get(init.name, [])
        if users and all(u.op_type == "Gather" and u.input[0] == init.name for u in users) \
                and len(init.dims) >= 2:
            rows = 0
            for u in users:
                idx = shape(u.input[1])
                rows += int(np.prod(idx)) if idx is not None else tokens
            nbytes = min(nbytes, rows * nbytes // max(1, init.dims[0]))
        seen.add(key)
        wbytes += nbytes
    io = sum(_spec_bytes(s, dims) for s in [*entry.inputs, *entry.outputs])
    io += sum(_spec_bytes(s, dims) for s in entry.state) + sum(
        _spec_bytes(s, {**dims, "past": dims.get("past", 0) + 1}) for s in entry.state)
    return GraphCost(entry.name, dict(dims), wbytes, io, flops, tokens, "onnx graph",
                     unresolved)


def _items_per_call(entry: GraphEntry, dims: Mapping[str, int]) -> int:
    """Tokens (or frames) one call processes: the first input's sequence axis (``chunk``,
    ``source``, ``frames``, or a fixed chunk such as a classifier's ``(batch, 8, features)``);
    1 for a step."""
    first = entry.inputs[0].shape if entry.inputs else ()
    for d in first[1:]:
        if d in ("chunk", "source", "frames"):
            return max(1, int(dims.get(d, 1)))
    if entry.name != "step" and len(first) == 3 and isinstance(first[1], int):
        return first[1]  # (batch, k frames, features)
    return 1


def _pte_cost(root: Path, man: Manifest, entry: GraphEntry, dims: Mapping[str, int]) -> GraphCost:
    """A .pte-only bundle: the program file's size as the weights read per call (an upper
    estimate: a method may read only part of the program), 2 ops per parameter per token."""
    size = (root / entry.files["pte"]).stat().st_size
    scheme = _scheme(man)
    compute = "int8" if scheme in ("int8", "int4") else ("fp16" if scheme == "fp16" else "fp32")
    tokens = _items_per_call(entry, dims)
    params = size / _PARAM_BYTES.get(scheme, 4.0)
    io = sum(_spec_bytes(s, dims) for s in [*entry.inputs, *entry.outputs]) + 2 * sum(
        _spec_bytes(s, dims) for s in entry.state)
    return GraphCost(entry.name, dict(dims), size, io, {compute: 2.0 * params * tokens},
                     tokens, "pte file size + manifest")


def _scheme(man: Manifest) -> str:
    q = man.quantization
    if isinstance(q, dict) and q.get("scheme"):
        s = str(q["scheme"]).lower()
        return "int4" if s.startswith("int4") else ("int8" if s.startswith("int8") else s)
    return "fp16" if str(man.dtype) in ("fp16", "float16") else "fp32"


def analyze(bundle: str | Path, measured: Mapping[str, Any] | None = None,
            dims: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, GraphCost]:
    """The roofline cost of each graph per call, at the sizes it was measured with (``measured``'s
    per-graph mean dims) or at ``dims`` (graph -> {dim: size}); batch 1 otherwise.

    ONNX graphs are read when the bundle has them (whatever the backend: the computation is the
    same); a .pte-only bundle is costed from its file size.
    """
    root = Path(bundle)
    man = read_manifest(root)
    out = {}
    seen: set = set()
    for name, e in man.graphs.items():
        d = {"batch": 1, "chunk": 1, "past": 0, "source": 1}
        if measured is not None:
            d.update((measured.get("graphs") or {}).get(name, {}).get("dims") or {})
        if dims and name in dims:
            d.update(dims[name])
        d["batch"] = 1
        if "onnx" in e.files:
            out[name] = _onnx_cost(root / e.files["onnx"], e, d, seen)
        else:
            out[name] = _pte_cost(root, man, e, d)
    return out


def weight_bytes(bundle: str | Path, backend: str) -> int:
    """Bytes of the bundle's weights for ``backend`` (as ``edgeseq inspect`` counts them): ONNX
    initializers, each shared tensor once; the ``.pte`` file size for ExecuTorch."""
    import onnx

    root = Path(bundle)
    man = read_manifest(root)
    fmt = format_of(backend)
    files = sorted({g.files[fmt] for g in man.graphs.values() if fmt in g.files})
    if fmt == "pte":
        return sum((root / f).stat().st_size for f in files)
    seen, total = set(), 0
    for f in files:
        for init in onnx.load(str(root / f), load_external_data=False).graph.initializer:
            key, nbytes = _initializer_bytes(init, f)
            if key not in seen:
                seen.add(key)
                total += nbytes
    return total


def _initializer_bytes(init: Any, file: str) -> tuple[tuple, int]:
    """An initializer's identity (its place in the shared weights file, so a tensor two graphs
    share counts once) and its stored size in bytes."""
    from onnx.helper import tensor_dtype_to_np_dtype

    ext = {e.key: e.value for e in init.external_data}
    if ext:
        return (ext.get("location"), ext.get("offset")), int(ext["length"])
    n = int(np.prod(init.dims)) if init.dims else 1
    return (file, init.name), len(init.raw_data) or n * np.dtype(
        tensor_dtype_to_np_dtype(init.data_type)).itemsize
