"""The initializer records of an ONNX graph file, read without the ``onnx`` package.

At load the ONNX Runtime backend needs, of each graph file, only where each initializer's bytes
lie in the bundle's weights file (name, element type, shape, external-data location, offset and
length), and what the lowering stamped on the file (its metadata), to hand ONNX Runtime the mapped weights instead of letting it read paths of the graph's
choosing. Importing ``onnx`` for that cost 16 MB of resident memory in every process that runs a
bundle (measured at the Mamba-130M shape; docs/benchmarks.md) and parsed every node of the graph
into Python objects. This reads the protobuf wire format of the few fields it needs and skips the
rest by length.

The file is untrusted: every length is checked against the buffer, varints are at most 10 bytes,
nesting is fixed (model -> graph -> initializer -> external-data entry; model -> metadata entry), and anything malformed is
``ProtoError``, which the backend reports as "not an ONNX model" naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np


# onnx.proto field numbers (stable since the format's first release)
_MODEL_GRAPH = 7
_MODEL_METADATA_PROPS = 14
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA = 1, 2, 8, 9
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
#: TensorProto.DataLocation.EXTERNAL
EXTERNAL = 1

#: TensorProto.DataType -> numpy, for the element types a bundle's initializers hold
NUMPY_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
                7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32,
                13: np.uint64}


class ProtoError(ValueError):
    """The bytes are not a well-formed ONNX model (the message says where they stop making
    sense)."""


@dataclass
class Initializer:
    name: str = ""
    data_type: int = 0
    dims: list[int] = field(default_factory=list)
    data_location: int = 0
    external_data: dict[str, str] = field(default_factory=dict)
    #: bytes held in the graph file itself (``raw_data``), 0 for external or typed-field data
    raw_bytes: int = 0

    def numpy_dtype(self) -> np.dtype:
        if self.data_type not in NUMPY_DTYPES:
            raise ProtoError(f"initializer {self.name}: element type {self.data_type} is not one "
                             f"a bundle stores")
        return np.dtype(NUMPY_DTYPES[self.data_type])


def initializers(data: bytes | memoryview) -> list[Initializer]:
    """Every initializer record of the model's main graph, in file order."""
    buf = memoryview(data)
    out = []
    for num, wire, val in _fields(buf, 0, len(buf)):
        if num == _MODEL_GRAPH and wire == 2:
            start, end = val
            for gnum, gwire, gval in _fields(buf, start, end):
                if gnum == _GRAPH_INITIALIZER and gwire == 2:
                    out.append(_tensor(buf, *gval))
    return out


def model_props(data: bytes | memoryview) -> dict[str, str]:
    """The model's ``metadata_props`` (what the lowering stamped on the graph file)."""
    buf = memoryview(data)
    out = {}
    for num, wire, val in _fields(buf, 0, len(buf)):
        if num == _MODEL_METADATA_PROPS and wire == 2:
            out.update(_entry(buf, val))
    return out


def _entry(buf: memoryview, span: object) -> dict[str, str]:
    """One ``StringStringEntryProto`` as {key: value}."""
    key = value = ""
    for num, wire, val in _fields(buf, *span):  # type: ignore[misc]
        if num == _ENTRY_KEY and wire == 2:
            key = _text(buf, val)
        elif num == _ENTRY_VALUE and wire == 2:
            value = _text(buf, val)
    return {key: value}


def _tensor(buf: memoryview, start: int, end: int) -> Initializer:
    t = Initializer()
    for num, wire, val in _fields(buf, start, end):
        if num == _TENSOR_DIMS:
            if wire == 0:
                t.dims.append(_signed(val))
            elif wire == 2:                      # packed
                i, stop = val
                while i < stop:
                    v, i = _varint(buf, i, stop)
                    t.dims.append(_signed(v))
        elif num == _TENSOR_DATA_TYPE and wire == 0:
            t.data_type = val
        elif num == _TENSOR_NAME and wire == 2:
            t.name = _text(buf, val)
        elif num == _TENSOR_RAW_DATA and wire == 2:
            t.raw_bytes = val[1] - val[0]
        elif num == _TENSOR_DATA_LOCATION and wire == 0:
            t.data_location = val
        elif num == _TENSOR_EXTERNAL_DATA and wire == 2:
            t.external_data.update(_entry(buf, val))
    return t


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value): an int for varints, (start, end) for length-delimited
    fields, None for fixed-width ones (skipped)."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise ProtoError(f"field number 0 at byte {i}")
        if wire == 0:
            val, i = _varint(buf, i, end)
            yield num, wire, val
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if n > end - i:
                raise ProtoError(f"a field of {n} bytes at byte {i} runs past its end ({end})")
            yield num, wire, (i, i + n)
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            if i > end:
                raise ProtoError(f"a fixed-width field runs past the end at byte {end}")
            yield num, wire, None
        else:
            raise ProtoError(f"wire type {wire} at byte {i}")


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    result = shift = 0
    for _ in range(10):
        if i >= end:
            raise ProtoError(f"a number cut off at byte {i}")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
    raise ProtoError(f"a number longer than 10 bytes at byte {i}")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _text(buf: memoryview, span: object) -> str:
    start, end = span  # type: ignore[misc]
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtoError(f"a name that is not UTF-8 at byte {start}") from None
