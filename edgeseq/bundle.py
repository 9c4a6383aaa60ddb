"""The stateful streaming graph contract and the bundle that carries it.

Every family, whatever its maths, is reduced to pure step functions
``forward(*inputs, *state_in) -> (*outputs, *state_out)`` whose every cached or recurrent quantity
is an explicit, named, typed tensor (see ``shared/ARCHITECTURE.md``). A *bundle* is the folder that
``edgeseq convert`` writes: ``manifest.json``, the graph files per backend, the tokenizer and
``parity.json``. The runtime needs only the manifest, never the family's PyTorch code.
Whether its files are the recorded ones is ``edgeseq.trust``'s; writing one is
``edgeseq.output``'s.

Shapes use named dimensions: ``batch`` and ``chunk`` are dynamic; other dims are integers.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgeseq.errors import BundleError
from edgeseq.tokenize import files as tokenizer_files

SCHEMA_VERSION = 1
STATE_KINDS = ("kv", "recurrent", "window")
DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
          "bool": np.bool_}


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
    #: the same graph written with control flow (torch's ``scan``: an ONNX ``Scan``), for
    #: backends that run it: its cost follows the chunk's length, so a chunk of one costs
    #: about what ``serves``' graph does, and a runtime may run both from one session (one
    #: copy of the weights, packed once)
    control_flow: Any = None
    #: the one-position graph ``control_flow`` serves (``step``): the same state, and the same
    #: inputs and outputs less the ``chunk`` axis
    serves: str | None = None

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


def one_row(inputs: Sequence[TensorSpec]) -> bool:
    """Whether a graph with these inputs takes one position per sequence a call (a decode step,
    one frame): its first input varies only in batch. Backends pick kernels by it (matrix-vector
    rather than matrix-matrix products)."""
    return bool(inputs) and all(not isinstance(d, str) or d == "batch"
                                for d in inputs[0].shape)


def shared_state_specs(entries: Mapping[str, GraphEntry]) -> list[StateSpec]:
    """The state list every stateful graph of a bundle shares (same names, same order).

    Stateless graphs (an encoder) are skipped. A graph may carry a prefix of the list (an
    early-exit drafter runs the first layers only); the longest list is the bundle's."""
    stateful = [e for e in entries.values() if e.state]
    if not stateful:
        return []
    full = max(stateful, key=lambda e: len(e.state))
    names = [s.name for s in full.state]
    for e in stateful:
        if [s.name for s in e.state] != names[:len(e.state)]:
            raise ValueError(f"graph {e.name}: state is not a prefix of graph {full.name}'s")
    return list(full.state)


@dataclass(frozen=True)
class Quantization:
    """What a runtime reads of the manifest's ``quantization`` record (``Manifest.quant``); the
    whole record (per-format, per-graph reports) stays in ``Manifest.quantization`` for
    ``inspect``."""

    scheme: str                  # fp16 | int8 | int8-static | int4 | int4-tensor
    group_size: int | None = None

    @property
    def integer(self) -> bool:
        """Integer weights (every ``int*`` scheme): kernels that pack them at load."""
        return self.scheme.startswith("int")

    @property
    def compute(self) -> str:
        """The arithmetic the scheme's kernels run: ``int8``, ``int4`` or ``fp16``."""
        for kind in ("int4", "int8"):
            if self.scheme.startswith(kind):
                return kind
        return self.scheme

    @classmethod
    def from_record(cls, record: Any) -> "Quantization | None":
        """The typed view of a manifest's record; ValueError for one convert does not write."""
        if record is None:
            return None
        if not isinstance(record, dict) or not isinstance(record.get("scheme"), str):
            raise ValueError('"quantization" must be null or a record with a "scheme" string')
        group = record.get("group_size")
        if group is not None and not (type(group) is int and group > 0):
            raise ValueError('"quantization.group_size" must be a positive integer or null')
        return cls(record["scheme"].lower(), group)


@dataclass(frozen=True)
class Partition:
    """Which device runs each operator of a bundle's graphs in one format (a backend that
    places operators on an accelerator writes it at lowering: ``Backend.partition``), so a
    user sees before shipping whether the GPU or NPU really runs the model. Read from the
    manifest's ``partitions`` record (``Manifest.partition``), validated at ``read_manifest``."""

    device: str        # the device the bundle targets (OpenVINO's CPU, GPU, NPU)
    #: the device whose plugin placed the operators: ``device``, or the CPU where this machine
    #: lacks it (then every count is the CPU's, and says nothing of the target's)
    checked_on: str
    #: per graph, per device, operator type -> count (compute operators; parameters,
    #: constants and results are not counted)
    graphs: dict[str, dict[str, dict[str, int]]]
    precision: str | None = None       # the inference precision the runtime is told to use

    def counts(self, graph: str) -> dict[str, int]:
        """{device: operators} of one graph."""
        return {d: sum(t.values()) for d, t in self.graphs.get(graph, {}).items()}

    def share(self, graph: str) -> float:
        """The fraction of a graph's operators on the target device."""
        c = self.counts(graph)
        total = sum(c.values())
        return c.get(self.device, 0) / total if total else 0.0

    def to_record(self) -> dict[str, Any]:
        return {"device": self.device, "checked_on": self.checked_on,
                "precision": self.precision, "graphs": self.graphs}

    @classmethod
    def from_record(cls, record: Any) -> "Partition":
        """The typed view of one format's record; ValueError for one convert does not write."""
        if not isinstance(record, dict):
            raise ValueError("a partition record must be an object")
        for key in ("device", "checked_on"):
            if not (isinstance(record.get(key), str) and record[key]):
                raise ValueError(f'a partition record needs a "{key}" string')
        precision = record.get("precision")
        if precision is not None and not isinstance(precision, str):
            raise ValueError('a partition record\'s "precision" must be a string or null')
        graphs = record.get("graphs")

        def counts_ok(types: Any) -> bool:
            return isinstance(types, dict) and all(
                isinstance(t, str) and type(n) is int and n >= 0 for t, n in types.items())

        if not (isinstance(graphs, dict) and all(
                isinstance(devs, dict) and all(isinstance(d, str) and counts_ok(types)
                                               for d, types in devs.items())
                for devs in graphs.values())):
            raise ValueError('a partition record\'s "graphs" must map each graph to '
                             '{device: {operator type: count}} with counts >= 0')
        return cls(record["device"], record["checked_on"], graphs, precision)


@dataclass(frozen=True)
class DraftRecord:
    """The manifest's ``draft`` record: a draft bundle shipped inside this one (``edgeseq
    convert --distill draft``), which ``--speculate draft`` (no path) drafts with. ``path`` is
    the bundle-relative folder holding the draft's own ``manifest.json``; its files are in this
    bundle's files record too, so the draft is checked with the target."""

    path: str
    recipe: str = "draft"

    @classmethod
    def from_record(cls, record: Any) -> "DraftRecord | None":
        """The typed view of a manifest's record; ValueError for one convert does not write."""
        if record is None:
            return None
        if not isinstance(record, dict) or not isinstance(record.get("path"), str) \
                or not isinstance(record.get("recipe", "draft"), str):
            raise ValueError('"draft" must be null or a record with a "path" string (and a '
                             '"recipe" string)')
        return cls(record["path"], record.get("recipe", "draft"))

    @property
    def manifest_file(self) -> str:
        return f"{self.path}/{MANIFEST_FILE}"


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
    #: every file of the bundle but manifest.json: {relative path: {"bytes": n, "sha256": hex}},
    #: written by convert once the bundle is complete; None in bundles older than the record
    files: dict[str, dict[str, Any]] | None = None
    #: files lowering wrote besides the graphs, per format and role (``{"onnx":
    #: {"activation_table": "onnx_activation_table.json"}}``: each backend's ``side_files``)
    side_files: dict[str, dict[str, str]] = field(default_factory=dict)
    #: per format, which device runs each operator (``Partition`` records, written by backends
    #: that place operators on an accelerator: ``{"openvino": {...}}``)
    partitions: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the backends ``target``'s device profile prefers, in its order, among those the bundle
    #: was lowered for (``convert --target``): ``load`` runs the first by default; empty: ORT
    backends: list[str] = field(default_factory=list)
    #: the draft bundle inside this one (``DraftRecord``'s fields), or None
    draft: dict[str, Any] | None = None
    #: SHA-256 of manifest.json as ``read_manifest`` parsed it (not written): the trust record's
    #: fingerprint comes from the bytes read, without reading the file again
    read_sha256: str | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = {"schema_version": self.schema_version, "created_by": self.created_by,
             "family": self.family, "task": self.task, "source": self.source,
             "dtype": self.dtype, "quantization": self.quantization, "target": self.target,
             "tokenizer": self.tokenizer, "config": self.config,
             "graphs": {k: g.to_json() for k, g in self.graphs.items()}}
        if self.side_files:
            d["side_files"] = self.side_files
        if self.partitions:
            d["partitions"] = self.partitions
        if self.backends:
            d["backends"] = list(self.backends)
        if self.draft is not None:
            d["draft"] = self.draft
        if self.files is not None:
            d["files"] = self.files
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Manifest":
        files = d.get("files")
        if files is not None and not (isinstance(files, dict) and all(
                isinstance(v, dict) and isinstance(v.get("bytes"), int)
                and isinstance(v.get("sha256"), str) for v in files.values())):
            raise ValueError('"files" must map each path to {"bytes": int, "sha256": str}')
        sides = d.get("side_files") or {}
        if not (isinstance(sides, dict) and all(
                isinstance(v, dict) and all(isinstance(k, str) for k in v)
                for v in sides.values())):
            raise ValueError('"side_files" must map each format to {role: file}')
        parts = d.get("partitions") or {}
        if not isinstance(parts, dict):
            raise ValueError('"partitions" must map each format to a partition record')
        prefer = d.get("backends") or []
        if not (isinstance(prefer, list) and all(isinstance(b, str) for b in prefer)):
            raise ValueError('"backends" must be a list of backend names')
        return cls(family=d["family"], task=d["task"], source=d["source"],
                   graphs={k: GraphEntry.from_json(k, g) for k, g in d["graphs"].items()},
                   tokenizer=d.get("tokenizer"), dtype=d.get("dtype", "float32"),
                   quantization=d.get("quantization"), target=d.get("target", "host"),
                   config=d.get("config", {}), schema_version=d["schema_version"],
                   created_by=d.get("created_by", "edgeseq"), files=files,
                   side_files=sides, partitions=parts, backends=prefer,
                   draft=d.get("draft"))

    def side_file(self, fmt: str, role: str) -> str | None:
        """The bundle-relative file of a side file (None: the bundle has none, e.g. one
        converted before it was declared)."""
        return self.side_files.get(fmt, {}).get(role)

    def partition(self, fmt: str) -> Partition | None:
        """The typed partition record of a format (None: its backend wrote none), checked by
        ``validate``."""
        rec = self.partitions.get(fmt)
        return None if rec is None else Partition.from_record(rec)

    @property
    def quant(self) -> Quantization | None:
        """The quantization as a typed record (None: float weights), checked by ``validate``."""
        return Quantization.from_record(self.quantization)

    @property
    def draft_record(self) -> DraftRecord | None:
        """The draft bundle shipped inside this one (None: none), checked by ``validate``."""
        return DraftRecord.from_record(self.draft)

    def draft_root(self, root: str | os.PathLike) -> Path | None:
        """The folder of the draft bundle inside the bundle at ``root`` (None: none)."""
        rec = self.draft_record
        return None if rec is None else Path(root) / rec.path

    @property
    def state_specs(self) -> list[StateSpec]:
        """The bundle's state list (``shared_state_specs`` of its graphs)."""
        return shared_state_specs(self.graphs)

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
            for s in [*g.inputs, *g.outputs, *g.state]:
                if not all(isinstance(d, str) or (type(d) is int and 0 <= d <= MAX_DIM)
                           for d in s.shape):
                    problems.append(f"graph {name}: {s.name} has a bad shape {list(s.shape)} "
                                    f"(named dims or integers 0..{MAX_DIM})")
        for check in (lambda: shared_state_specs(self.graphs), lambda: self.quant,
                      lambda: self.draft_record):
            try:
                check()
            except ValueError as e:
                problems.append(str(e))
        for fmt in self.partitions:
            try:
                rec = self.partition(fmt)
            except ValueError as e:
                problems.append(f"partitions.{fmt}: {e}")
                continue
            stray = sorted(set(rec.graphs) - set(self.graphs))
            if stray:
                problems.append(f"partitions.{fmt}: graph {stray[0]} is not in the bundle")
        if root is not None:
            problems += self._file_problems(Path(root))
        return problems

    def referenced_files(self) -> dict[Any, str]:
        """{bundle-relative path: what refers to it} for every file the manifest names."""
        refs: dict[Any, str] = {}

        def add(f: Any, what: str) -> None:
            # a name that is not a string (a list, a number) is refused by path_problem
            refs.setdefault(f if isinstance(f, str) else _NotAPath(f), what)

        for name, g in self.graphs.items():
            for backend, f in g.files.items():
                add(f, f"graph {name}: {backend} file")
        for fmt, sides in self.side_files.items():
            for role, f in sides.items():
                add(f, f"{fmt} side file ({role})")
        try:
            for f in tokenizer_files(self.tokenizer):
                add(f, "tokenizer file")
        except (KeyError, TypeError, AttributeError):
            add(repr(self.tokenizer), "tokenizer entry (malformed)")
        try:
            rec = self.draft_record
        except ValueError:
            rec = None      # reported by validate
        if rec is not None:
            # the draft's manifest is a file of this bundle: a path leaving the folder, or a
            # draft that is not in the files record, is refused as any other file is
            add(rec.manifest_file, "draft bundle")
        return refs

    def _file_problems(self, root: Path) -> list[str]:
        # every name is checked before anything is opened: a FIFO or a device would hang or
        # flood the reader, and a path leaving the folder would read (or run) someone else's file
        problems = []
        refs = self.referenced_files()
        bad = set()
        for f, what in refs.items():
            why = path_problem(root, f)
            if why:
                bad.add(f)
                problems.append(f"{what} {f!r} {why}")
        if self.files is not None:
            for f, rec in self.files.items():
                why = path_problem(root, f)
                if why and f not in refs:    # a named file's problem is listed once, above
                    problems.append(f"files entry {f!r} {why}")
            for f, what in refs.items():
                if f not in bad and f not in self.files:
                    problems.append(f"{what} {f!r} is not in the manifest's files record")
        return problems


class _NotAPath:
    """A manifest's file entry that is not a string, kept for its error message."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


#: the largest fixed dimension a manifest may declare (a state or input of more elements than
#: this along one axis is not a model edgeseq converts; it bounds what ``allocate`` asks for)
MAX_DIM = 1 << 24
#: the largest manifest.json read (real ones are a few KB; this one names the cap)
MAX_MANIFEST_BYTES = 16 << 20
MANIFEST_FILE = "manifest.json"


def path_problem(root: Path, name: Any) -> str | None:
    """Why ``name`` is not a regular file inside the bundle ``root`` (None if it is): not a
    plain relative path, a ``..`` part, a symlink leaving the folder, missing, or not a regular
    file (a FIFO, a device, a socket, a folder). Decided with ``stat``: nothing is opened."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name \
            or os.path.isabs(name) or any(p in ("", ".", "..") for p in name.split("/")):
        return "is not a plain relative path inside the bundle"
    path = root / name
    real, base = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base:
        return f"leaves the bundle (resolves to {real})"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    return None


def read_manifest(bundle: str | os.PathLike) -> Manifest:
    """The bundle's manifest, checked as untrusted data: well-formed, and every file it names
    (graphs, tokenizer, the files record) a regular file inside the folder (one error listing
    every problem). Sizes and hashes are checked at load (``check_integrity``)."""
    root = Path(bundle)
    path = root / MANIFEST_FILE
    if not root.exists():
        raise BundleError(f"{root}: no such bundle folder")
    why = path_problem(root, MANIFEST_FILE)
    if why == "is missing":
        raise BundleError(f"{root}: not an edgeseq bundle (no manifest.json)")
    if why:
        raise BundleError(f"{path}: {why}")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes, over the "
                          f"{MAX_MANIFEST_BYTES >> 20} MiB a manifest may have (MAX_MANIFEST_BYTES)")
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"a JSON object expected, got {type(data).__name__}")
        manifest = Manifest.from_json(data)
        manifest.read_sha256 = hashlib.sha256(raw).hexdigest()
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise BundleError(f"{path}: malformed manifest ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    problems = manifest.validate(root)
    if problems:
        raise BundleError(f"{path}: " + "; ".join(problems))
    return manifest


