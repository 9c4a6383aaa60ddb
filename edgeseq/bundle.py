"""The stateful streaming graph contract and the bundle that carries it.

Every family, whatever its maths, is reduced to pure step functions
``forward(*inputs, *state_in) -> (*outputs, *state_out)`` whose every cached or recurrent quantity
is an explicit, named, typed tensor (see ``shared/ARCHITECTURE.md``). A *bundle* is the folder that
``edgeseq convert`` writes: ``manifest.json``, the graph files per backend, the tokenizer and
``parity.json``. The runtime needs only the manifest, never the family's PyTorch code.

Shapes use named dimensions: ``batch`` and ``chunk`` are dynamic; other dims are integers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

SCHEMA_VERSION = 1
STATE_KINDS = ("kv", "recurrent", "window")
DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
          "bool": np.bool_}


class BundleError(Exception):
    """A bundle or checkpoint is malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorSpec:
    """A named graph input or output. ``shape`` mixes named dims (str) and fixed sizes (int)."""

    name: str
    shape: tuple[str | int, ...]
    dtype: str = "float32"

    def concrete_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else int(d) for d in self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass(frozen=True)
class StateSpec(TensorSpec):
    """A state tensor carried between calls of a step graph.

    ``kind`` tells the runtime how to roll it back and count its bytes: ``kv`` (attention cache,
    rolled back by cropping), ``recurrent`` (SSM/LMU state, membranes: snapshot and restore) or
    ``window`` (causal convolution buffer: snapshot and restore). ``init`` is the initial value
    (``zeros`` for every family so far). The graph's input is ``state_in.<name>`` and its output
    ``state_out.<name>``.
    """

    kind: str = "recurrent"
    init: str = "zeros"

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "kind": self.kind, "init": self.init}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StateSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"], d.get("kind", "recurrent"),
                   d.get("init", "zeros"))

    @property
    def input_name(self) -> str:
        return f"state_in.{self.name}"

    @property
    def output_name(self) -> str:
        return f"state_out.{self.name}"

    def nbytes(self, dims: dict[str, int]) -> int:
        return int(np.prod(self.concrete_shape(dims))) * np.dtype(DTYPES[self.dtype]).itemsize

    def from_trace(self, trace: np.ndarray, t: int) -> np.ndarray:
        """This state after position ``t`` of a ``verify`` call, from its ``trace.<name>``
        output: (batch, chunk, ...) indexed at t; a ``window`` state is traced as the whole
        window (batch, ..., k-1 + chunk), whose slice [t+1, t+k) is the state after t."""
        if self.kind == "window":
            return trace[..., t + 1:t + 1 + int(self.shape[-1])]
        return trace[:, t]

    def allocate(self, dims: dict[str, int]) -> np.ndarray:
        if self.init != "zeros":
            raise BundleError(f"state {self.name}: unknown init {self.init!r}")
        return np.zeros(self.concrete_shape(dims), dtype=DTYPES[self.dtype])


@dataclass
class StreamingGraph:
    """A pure ``torch.nn.Module`` plus the specs of its inputs, outputs and state.

    ``module.forward(*inputs, *state_in)`` returns ``(*outputs, *state_out)`` in spec order.
    ``example_dims`` gives the sizes used to trace it (dynamic dims must differ from fixed ones).
    """

    name: str
    module: Any  # torch.nn.Module; typed loosely so the runtime never imports torch
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    state: list[StateSpec]
    example_dims: dict[str, int] = field(default_factory=lambda: {"batch": 2, "chunk": 5})
    max_chunk: int | None = None  # largest chunk the runtime should feed (bounds prefill memory)
    #: bounds (min, max[, multiple]) of named dims other than ``batch`` and ``chunk``
    #: (``source``, ``past``, ``frames``): dynamic in the exported graph, and ExecuTorch plans
    #: memory for the max. A third number makes the dim a multiple of it (even mel frames).
    dim_bounds: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: builds example inputs from concrete dims when random ones would be invalid (masks, positions)
    make_example: Any = None

    def example_inputs(self, dims: dict[str, int] | None = None, seed: int = 0,
                       vocab_size: int | None = None) -> tuple:
        """Inputs to trace or test with: token ids in range, random features, random state.

        Every state example is its own tensor: ``torch.export`` merges example inputs that are the
        same object, which would make layers share one state in the exported graph.
        """
        import torch

        dims = {**self.example_dims, **(dims or {})}
        if self.make_example is not None:
            return tuple(self.make_example(dims, seed))
        g = torch.Generator().manual_seed(seed)
        out = []
        for spec in self.inputs:
            shape = spec.concrete_shape(dims)
            if spec.dtype == "int64":
                out.append(torch.randint(0, vocab_size or 2, shape, generator=g, dtype=torch.int64))
            else:
                out.append(torch.randn(shape, generator=g))
        for spec in self.state:
            out.append(0.1 * torch.randn(spec.concrete_shape(dims), generator=g))
        return tuple(out)


@dataclass
class GraphEntry:
    """A graph as the manifest records it: its specs and one file per backend."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    state: list[StateSpec]
    files: dict[str, str]  # backend -> file name relative to the bundle
    max_chunk: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs],
                "state": [s.to_json() for s in self.state],
                "files": dict(self.files), "max_chunk": self.max_chunk}

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> "GraphEntry":
        return cls(name, [TensorSpec.from_json(s) for s in d["inputs"]],
                   [TensorSpec.from_json(s) for s in d["outputs"]],
                   [StateSpec.from_json(s) for s in d["state"]], dict(d["files"]),
                   d.get("max_chunk"))


@dataclass
class Manifest:
    """``manifest.json``: everything a runtime needs to drive the bundle's graphs."""

    family: str
    task: str
    source: dict[str, Any]            # {"path", "sha256", "format"}
    graphs: dict[str, GraphEntry]
    tokenizer: dict[str, Any] | None  # {"type": "bytes"} | {"type": "hf", "file": ...}
    dtype: str = "float32"
    quantization: dict[str, Any] | None = None
    target: str = "host"
    config: dict[str, Any] = field(default_factory=dict)  # vocab_size, eos_token_id, ...
    schema_version: int = SCHEMA_VERSION
    created_by: str = "edgeseq"

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "created_by": self.created_by,
                "family": self.family, "task": self.task, "source": self.source,
                "dtype": self.dtype, "quantization": self.quantization, "target": self.target,
                "tokenizer": self.tokenizer, "config": self.config,
                "graphs": {k: g.to_json() for k, g in self.graphs.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Manifest":
        return cls(family=d["family"], task=d["task"], source=d["source"],
                   graphs={k: GraphEntry.from_json(k, g) for k, g in d["graphs"].items()},
                   tokenizer=d.get("tokenizer"), dtype=d.get("dtype", "float32"),
                   quantization=d.get("quantization"), target=d.get("target", "host"),
                   config=d.get("config", {}), schema_version=d["schema_version"],
                   created_by=d.get("created_by", "edgeseq"))

    def validate(self, root: Path | None = None) -> list[str]:
        """Every problem at once (an empty list means valid)."""
        problems = []
        if self.schema_version > SCHEMA_VERSION:
            problems.append(f"schema_version {self.schema_version} is newer than this edgeseq "
                            f"({SCHEMA_VERSION}); upgrade edgeseq")
        if not self.graphs:
            problems.append("no graphs")
        for name, g in self.graphs.items():
            seen = set()
            for s in [*g.inputs, *g.outputs]:
                if s.name in seen:
                    problems.append(f"graph {name}: duplicate tensor name {s.name}")
                seen.add(s.name)
                if s.dtype not in DTYPES:
                    problems.append(f"graph {name}: {s.name} has unknown dtype {s.dtype}")
            for s in g.state:
                if s.kind not in STATE_KINDS:
                    problems.append(f"graph {name}: state {s.name} has unknown kind {s.kind}")
                if s.dtype not in DTYPES:
                    problems.append(f"graph {name}: state {s.name} has unknown dtype {s.dtype}")
            if root is not None:
                for backend, f in g.files.items():
                    if not (root / f).is_file():
                        problems.append(f"graph {name}: {backend} file {f} is missing")
        return problems


def read_manifest(bundle: str | os.PathLike) -> Manifest:
    root = Path(bundle)
    path = root / "manifest.json"
    if not root.exists():
        raise BundleError(f"{root}: no such bundle folder")
    if not path.is_file():
        raise BundleError(f"{root}: not an edgeseq bundle (no manifest.json)")
    try:
        data = json.loads(path.read_text())
        manifest = Manifest.from_json(data)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise BundleError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    problems = manifest.validate(root)
    if problems:
        raise BundleError(f"{path}: " + "; ".join(problems))
    return manifest


def sha256_of(paths: Sequence[Path]) -> str:
    """Hash of the given files (sorted by name), streamed so large checkpoints stay cheap."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_folder(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; rename it to ``dest`` only if the body succeeds.

    A failed conversion therefore leaves no half-written bundle behind.
    """
    dest = Path(dest).absolute()
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest}: already exists (use --overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
