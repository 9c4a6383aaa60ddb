"""The cost model of a bundle, in one place: what its weights, state and activations occupy and
what one call of a graph moves and computes. ``edgeseq inspect`` (weights by dtype, state per
position), ``edgeseq profile`` (the roofline cost and the memory split), the speculative memory
plan (the footprint before loading) and quantization (weights before and after) all ask here,
so one rule answers each question everywhere.

- **weights**: stored bytes per dtype of a format's files, each shared tensor once (ONNX
  initializer records read without the ``onnx`` package; a ``.pte``'s file size); and what a
  backend holds resident while running (``resident_weight_bytes``);
- **state**: the bundle's state list (``Manifest.state_specs``: the longest list, which every
  stateful graph shares a prefix of) at given sizes, per cached position, and resident
  (``STATE_COPIES`` of it plus the encoder outputs a decoder reads every step);
- **activations**: the tables convert records of what one call of each graph allocates, and
  their lookup at the sizes a runtime plans for;
- **roofline**: bytes moved and operations by dtype per call (``analyze``).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from edgeseq.bundle import DTYPES as BUNDLE_DTYPES, BundleError, GraphEntry, Manifest
from edgeseq.registry import format_of, runtime_memory

MB = 1 << 20
#: the weights file of an OpenVINO bundle (``runtime/backends/openvino``)
OPENVINO_WEIGHTS = "weights.openvino.bin"

#: Copies of the state a stream holds: the live one and the one being written (ONNX Runtime's
#: ping-pong buffers; ExecuTorch's planned outputs and the runner's clone; for encoder-decoders
#: the cross-attention K/V kept by the session and fed to every decoder step).
STATE_COPIES = 2

# Measured packed copies exceeded the conversion's estimate (onnxruntime.prepacked_bytes) by up
# to 7% (allocation headers, alignment); the plan counts this much more.
PREPACK_MARGIN = 1.15

#: Bytes per parameter when a .pte-only bundle is costed from its file size.
_PARAM_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}



# -- what the pieces cost ------------------------------------------------------------------------
def file_bytes(root: Path, name: str) -> int:
    """A bundle file's size, 0 if it is absent."""
    p = root / name
    return p.stat().st_size if p.is_file() else 0


# -- weights ----------------------------------------------------------------------------------
def _stored(file: str, name: str, ext: Mapping[str, str], dims: list[int], raw_bytes: int,
            itemsize: int) -> tuple[tuple, int]:
    """An initializer's identity (its place in the shared weights file, so a tensor two graphs
    share counts once; else its graph file and name) and its stored size in bytes."""
    n = max(0, math.prod(dims)) * itemsize
    if ext:
        length = str(ext.get("length", ""))
        return (ext.get("location"), ext.get("offset")), int(length) if length.isdigit() else n
    return (file, name), raw_bytes or n


def _initializer_bytes(init: Any, file: str) -> tuple[tuple, int]:
    """``_stored`` of an ``onnx`` initializer proto (the roofline reads whole graphs anyway)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    return _stored(file, init.name, {e.key: e.value for e in init.external_data},
                   list(init.dims), len(init.raw_data),
                   np.dtype(tensor_dtype_to_np_dtype(init.data_type)).itemsize)


def _onnx_weights(folder: Path, files: list[str]) -> Iterator[tuple[tuple, str, int]]:
    """(identity, dtype, stored bytes) of every initializer of the given ONNX files, read from
    the records alone: a damaged graph is a BundleError naming the file."""
    from edgeseq.runtime.backends.onnxruntime.records import ProtoError, initializers

    for f in files:
        try:
            records = initializers((folder / f).read_bytes())
            dtypes = [r.numpy_dtype() for r in records]
        except ProtoError as e:
            raise BundleError(f"{folder / f}: not an ONNX model ({e})") from None
        for r, dt in zip(records, dtypes):
            key, n = _stored(f, r.name, r.external_data, r.dims, r.raw_bytes, dt.itemsize)
            yield key, str(dt), n


def weight_bytes_by_dtype(folder: Path, files: list[str]) -> dict[str, int]:
    """Stored bytes of the initializers of the given ONNX files by dtype, each shared tensor
    once."""
    seen: set[tuple] = set()
    out: dict[str, int] = {}
    for key, dt, n in _onnx_weights(folder, files):
        if key not in seen:
            seen.add(key)
            out[dt] = out.get(dt, 0) + n
    return out


def format_files(man: Manifest, fmt: str, graphs: set[str] | None = None) -> list[str]:
    """The files of format ``fmt`` the manifest lists (of ``graphs``, default all), once each."""
    return sorted({g.files[fmt] for name, g in man.graphs.items()
                   if fmt in g.files and (graphs is None or name in graphs)})


def weight_bytes(root: Path, man: Manifest, backend: str) -> int:
    """Bytes of the bundle's weights for ``backend`` (as ``edgeseq inspect`` counts them): ONNX
    initializers, each shared tensor once; the ``.pte`` file size for ExecuTorch; OpenVINO's
    shared weights file (each constant once)."""
    fmt = format_of(backend)
    files = format_files(man, fmt)
    if fmt == "onnx":
        return sum(weight_bytes_by_dtype(root, files).values())
    if fmt == "openvino" and files:
        return file_bytes(root, OPENVINO_WEIGHTS)
    return sum((root / f).stat().st_size for f in files)


def resident_weight_bytes(root: Path, man: Manifest, backend: str, graphs: set[str]) -> int:
    """What ``backend`` holds of the weights of ``graphs`` while running: ORT the graphs' protos
    and the shared weights file; ExecuTorch the program and XNNPACK's packed copy of it."""
    fmt = format_of(backend)
    total = sum(file_bytes(root, f) for f in format_files(man, fmt, graphs))
    if fmt == "onnx":
        total += sum(p.stat().st_size for p in root.glob("*.onnx.data"))
    if fmt == "openvino" and total:
        # the mapped weights file and the CPU plugin's own (repacked) copy in each compiled
        # graph that reads them: counted as one copy, like XNNPACK's
        total = 2 * (total + file_bytes(root, OPENVINO_WEIGHTS))
    if fmt == "pte":
        total *= 2          # the program buffer and XNNPACK's packed weights
    return total


# -- state ------------------------------------------------------------------------------------
def _spec_bytes(spec: Any, dims: Mapping[str, int]) -> int:
    try:
        shape = spec.concrete_shape(dict(dims))
    except KeyError:
        return 0
    return int(np.prod(shape)) * np.dtype(BUNDLE_DTYPES.get(spec.dtype, np.float32)).itemsize


def state_bytes(man: Manifest, dims: Mapping[str, int], prefix: int | None = None) -> int:
    """One copy of the bundle's state at ``dims`` (``prefix``: its first N tensors, what an
    early-exit drafter carries)."""
    specs = man.state_specs
    specs = specs[:prefix] if prefix is not None else specs
    return int(sum(s.nbytes(dict(dims)) for s in specs))


def state_bytes_per_position(man: Manifest) -> int:
    """What one more cached position adds to one copy of the state (0 for recurrent state)."""
    at = {"batch": 1, "past": 0, "source": 0}
    return state_bytes(man, {**at, "past": 1}) - state_bytes(man, at)


def encoder_output_bytes(man: Manifest, dims: Mapping[str, int]) -> int:
    """The encoder's outputs at ``dims``: the cross-attention K/V a decoder reads every step."""
    enc = man.graphs.get("encoder")
    return 0 if enc is None else sum(_spec_bytes(s, dims) for s in enc.outputs)


def resident_state_bytes(man: Manifest, dims: Mapping[str, int]) -> int:
    """A stream's state as a runtime holds it (batch 1): ``STATE_COPIES`` of the state and the
    encoder's outputs."""
    d = {"batch": 1, "past": 0, "source": 0, "chunk": 1, **dims}
    d["batch"] = 1
    return STATE_COPIES * (state_bytes(man, d) + encoder_output_bytes(man, d))


# -- activations ------------------------------------------------------------------------------

SECONDARY = ("past", "source", "frames")



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


def _intermediates(proto: Any, dims: dict[str, int]) -> int:
    """Bytes of every tensor one call produces, by ONNX shape inference at concrete sizes."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    model = _concrete(model, dims)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort; unresolved tensors count by the fallback
        pass
    total, unresolved = 0, 0
    g = model.graph
    for vi in [*g.value_info, *g.output]:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(s is None for s in shape):
            unresolved += 1
            continue
        size = {1: 4, 7: 8, 10: 2, 9: 1, 6: 4, 2: 1, 3: 1}.get(tt.elem_type, 4)
        total += int(np.prod(shape)) * size
    # a tensor whose shape stays unknown counts as an average known one
    return total + unresolved * (total // max(1, len(g.value_info)))


def _powers(lo: int, hi: int) -> list[int]:
    out, v = [], 1
    while v < hi:
        if v >= lo:
            out.append(v)
        v *= 2
    return out + [hi]


def activation_table(proto: Any, graph: Any) -> dict[str, Any]:
    """What one call of an ONNX graph allocates, as a function of its dynamic sizes, computed at
    conversion so the runtime plans without the ``onnx`` package (or its memory).

    The main dim (``chunk``, else ``source``/``frames``) is sampled at powers of two up to its
    bound; at each, the cost is linear in the other dims (``past``, ``source``: every tensor
    of one batch row grows linearly in each), so two more samples give the slopes. The runtime
    reads the sample at or above the size it plans for, so the table never undercounts.
    """
    names = {d for s in [*graph.inputs, *graph.state] for d in s.shape if isinstance(d, str)}
    names.discard("batch")
    bounds = {k: (int(v[0]), int(v[1])) for k, v in graph.dim_bounds.items()}
    if "chunk" in names:
        bounds["chunk"] = (1, int(graph.max_chunk or 512))
    main = next((d for d in ("chunk", "source", "frames") if d in names), None)
    second = [d for d in SECONDARY if d in names and d != main and d in bounds]
    base = {"batch": 1, **{d: max(bounds[d][0], 2 if d == "frames" else 1) for d in names
                           if d in bounds}}
    points = []
    for v in (_powers(bounds[main][0], bounds[main][1]) if main else [None]):
        at = dict(base)
        if main:
            at[main] = max(v, 4) if main == "frames" else v
        a = _intermediates(proto, at)
        slopes = {}
        for d in second:
            hi = dict(at)
            hi[d] = bounds[d][1]
            span = max(1, bounds[d][1] - at[d])
            slopes[d] = max(0.0, (_intermediates(proto, hi) - a) / span)
        points.append({"at": v, "base": a, "from": {d: at[d] for d in second},
                       "slope": slopes})
    return {"main": main, "points": points}


def _from_table(table: dict[str, Any], dims: dict[str, int]) -> int:
    main, pts = table["main"], table["points"]
    pt = pts[-1]
    if main:
        want = dims.get(main, 1)
        pt = next((p for p in pts if p["at"] >= want), None)
        if pt is None:     # beyond the graph's bound: scale the last sample (not reached: the
            pt = pts[-1]   # runtime never feeds more than the bound)
    extra = sum(sl * max(0, dims.get(d, 0) - pt["from"][d]) for d, sl in pt["slope"].items())
    return int(pt["base"] + extra)


@functools.lru_cache(maxsize=64)
def _tables(path: str) -> dict[str, Any]:
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {}


def activation_bytes(root: Path, man: Manifest, backend: str, graph: str,
                     dims: dict[str, int]) -> int:
    fmt = format_of(backend)
    if fmt == "pte":
        planned = man.side_file("pte", "planned_memory")
        if planned is not None:
            return int(_tables(str(root / planned)).get(graph, 0))
        return 8 * file_bytes(root, man.graphs[graph].files["pte"])   # older bundle: a safe guess
    if fmt == "onnx":
        table = man.side_file("onnx", "activation_table")
        tables = _tables(str(root / table)) if table is not None else {}
        if graph in tables:
            return int(runtime_memory(backend).activation_factor
                       * _from_table(tables[graph], dims))
        return 16 * file_bytes(root, man.graphs[graph].files["onnx"]) + 16 * MB   # older bundle
    return 4 * resident_weight_bytes(root, man, backend, {graph})


def prepack_bytes(root: Path, man: Manifest, backend: str, graph: str) -> int:
    """What packing ``graph``'s weights at load adds (ONNX Runtime), margin included; 0 where
    there is nothing to choose: another backend (XNNPACK always packs), a quantized bundle (ORT
    packs its kernels' weights anyway) or a bundle converted before the table recorded it."""
    from edgeseq.runtime.backends.onnxruntime.run import packs_anyway

    # the manifest in hand, not the file again: the plan asks this for every graph
    if format_of(backend) != "onnx" or packs_anyway(man.quant):
        return 0
    name = man.side_file("onnx", "activation_table")
    table = _tables(str(root / name)).get(graph, {}) if name is not None else {}
    return int(PREPACK_MARGIN * int(table.get("prepack_bytes", 0)))


# -- roofline ---------------------------------------------------------------------------------
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
        elif op == "MultiHeadAttention":  # fused (onnxruntime/fuse.py): Q K^T and P V
            q, kv = shape(node.input[0]), shape(node.input[1])
            if q is not None and kv is not None and len(q) == 3:
                add(_dtype_name(shapes.get(node.input[0], ([], 1))[1]),
                    4.0 * float(np.prod(q)) * kv[-2])
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
    """The arithmetic of the bundle's weights: its quantization's, else its dtype's."""
    if man.quant is not None:
        return man.quant.compute
    return "fp16" if str(man.dtype) in ("fp16", "float16") else "fp32"


def analyze(root: Path, man: Manifest, measured: Mapping[str, Any] | None = None,
            dims: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, GraphCost]:
    """The roofline cost of each graph per call, at the sizes it was measured with (``measured``'s
    per-graph mean dims) or at ``dims`` (graph -> {dim: size}); batch 1 otherwise.

    ONNX graphs are read when the bundle has them (whatever the backend: the computation is the
    same); a .pte-only bundle is costed from its file size.
    """
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

