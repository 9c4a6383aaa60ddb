"""Device profiles: how much memory a target gives an app, how fast its DRAM is, and how fast
each compute unit (CPU, GPU, NPU) can go per dtype, so that a model's memory and latency can be
projected for that device before anything runs on it.

One TOML file per device (``devices/data/<id>.toml``; users add their own, see
``load_profiles``). The fields, and what they mean:

- ``id`` (``[a-z0-9][a-z0-9._-]*``), ``name``, ``kind`` (one of ``KINDS``), ``revision``,
  ``backends`` (preferred first: ``ort:<Name>ExecutionProvider`` for ONNX Runtime execution
  providers, ``executorch:<delegate>`` for ExecuTorch delegates, ``openvino:<CPU|GPU|NPU>``
  for OpenVINO's own runtime on that device; ``convert --target`` lowers for the first
  entries edgeseq can produce, ``convert/targets.py``), ``notes``, ``soc`` (the
  system-on-chip's part number, e.g. ``SM8650``, which an NPU compiler targets), ``placeholder``
  (true only for ``host.toml``, whose numbers are filled by ``edgeseq.devices.calibrate``).
- ``[memory]``: ``total_bytes`` (physical RAM); ``app_bytes`` (what one app can actually use
  before the OS kills it or it swaps: Android's low-memory killer, iOS jetsam limits, the
  desktop OS's own footprint); ``bandwidth_bytes_per_s`` (peak theoretical DRAM bandwidth =
  ``mt_per_s`` x 10^6 x ``bus_bits`` / 8, checked when both are given); ``type``.
- ``[cpu]``: ``name``, ``cores``, ``threads``, ``peak_gops`` (GOP/s per dtype: one FMA = 2 ops)
  and ``[[cpu.clusters]]`` (``core``, ``count``, ``ghz``, ``ops_per_cycle`` per core per dtype);
  the peak must equal the sum over clusters of count x GHz x ops/cycle (checked to 1 %).
- ``[gpu]``: ``name``, ``peak_gops``.
- ``[npu]``: ``name``, ``tops`` (the vendor's headline figure, int8 dense unless its source says
  otherwise), ``dtypes`` (what it executes), ``peak_gops`` (per-dtype figures where published),
  ``requires_static_shapes`` (the NPU compiler needs every shape fixed ahead of time).

Every number carries its source: a table's ``source`` (a string) or ``sources`` (a list) covers
its numbers, and ``<field>_source`` covers one field whose reasoning differs. Estimates say so
and say how they were derived. A unit whose peak is not published gives no number, only
``peak_gops_source`` (or ``tops_source``) saying so; asking for its peak raises ``DeviceError``.

Peaks are upper bounds (every SIMD pipe issuing its widest multiply-accumulate every cycle at
the highest clock), so ``roofline_seconds`` is a lower bound that no projection or measurement
should beat: the roofline model of Williams, Waterman and Patterson, "Roofline: an insightful
visual performance model for multicore architectures", CACM 52(4), 2009,
doi:10.1145/1498765.1498785. The measured ``host`` profile is the exception: its numbers are
the best rates measured, so its bound is a practical one, not a strict one.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is in the standard library from 3.11
    try:
        import tomli as tomllib  # the same parser, published for older Pythons
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

DATA_DIR = Path(__file__).parent / "data"
ENV_VAR = "EDGESEQ_DEVICES"
KINDS = ("phone", "laptop", "board", "npu-laptop", "host")
UNITS = ("cpu", "gpu", "npu")
DTYPES = ("fp32", "fp16", "bf16", "int16", "int8", "int4")
# bundle/torch spellings -> ours; uint8 activations run on the same int8 dot-product units
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                 "bfloat16": "bf16", "uint8": "int8", "qint8": "int8", "quint8": "int8",
                 "uint4": "int4"}
_ID = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
_BACKEND = re.compile(r"(ort:[A-Za-z0-9]+ExecutionProvider|executorch:[a-z0-9_]+"
                      r"|openvino:(CPU|GPU|NPU))\Z")
_TOLERANCE = 0.01  # derived numbers (bandwidth, cluster peaks) must match to 1 %


class DeviceError(ValueError):
    """A device profile is unknown, malformed or lacks a number.

    ``file`` is the offending file (or None) and ``problems`` every problem found in it.
    """

    def __init__(self, message: str, file: Path | None = None,
                 problems: list[str] | None = None):
        self.file = file
        self.problems = list(problems) if problems else [message]
        super().__init__(f"{file}: {message}" if file is not None else message)


def canonical_dtype(dtype: str) -> str:
    """``float32`` -> ``fp32`` and so on (bundle manifests use numpy names)."""
    d = dtype.lower()
    return DTYPE_ALIASES.get(d, d)


@dataclass(frozen=True, kw_only=True)
class _Sourced:
    """A table of numbers and where they come from."""

    sources: tuple[str, ...] = ()
    field_sources: Mapping[str, str] = field(default_factory=dict)
    NUMBERS = ()  # the fields that must have a source

    def source_of(self, name: str) -> str:
        """The source of one field: its own ``<name>_source``, else the table's sources."""
        return self.field_sources.get(name) or "; ".join(self.sources)

    def _unsourced(self, where: str) -> list[str]:
        return [f"{where}.{n} has no source (add `source`, `sources` or `{n}_source`)"
                for n in self.NUMBERS
                if getattr(self, n) not in (None, {}, ()) and not self.source_of(n).strip()]


@dataclass(frozen=True, kw_only=True)
class Cluster(_Sourced):
    """Identical cores at one clock: ``ops_per_cycle`` is per core, per dtype."""

    core: str
    count: int
    ghz: float
    ops_per_cycle: Mapping[str, float]
    NUMBERS = ("count", "ghz", "ops_per_cycle")

    def gops(self, dtype: str) -> float:
        return self.count * self.ghz * self.ops_per_cycle[dtype]

    def validate(self, where: str, placeholder: bool = False) -> list[str]:
        p = _missing(self, where, ("core", "count", "ghz", "ops_per_cycle"))
        p += _positive(where, {"count": self.count, "ghz": self.ghz}, placeholder)
        p += _dtype_map(f"{where}.ops_per_cycle", self.ops_per_cycle, placeholder)
        return p + self._unsourced(where)


@dataclass(frozen=True, kw_only=True)
class ComputeUnit(_Sourced):
    """A CPU, GPU or NPU: its peak per dtype in GOP/s (giga-operations per second)."""

    name: str
    peak_gops: Mapping[str, float] = field(default_factory=dict)
    cores: int | None = None
    threads: int | None = None
    clusters: tuple[Cluster, ...] = ()
    tops: float | None = None
    dtypes: tuple[str, ...] = ()
    requires_static_shapes: bool = False
    NUMBERS = ("peak_gops", "cores", "threads", "tops")

    def peak_ops(self, dtype: str) -> float | None:
        """Peak ops/s for ``dtype``, or None when this unit has no figure for it.

        An NPU dtype with no figure of its own (fp16 on most NPUs) gets the headline ``tops``:
        an optimistic bound, since no NPU runs a dtype faster than its quoted int8 rate, so a
        roofline built on it stays a lower bound.
        """
        dtype = canonical_dtype(dtype)
        if dtype in self.peak_gops:
            return self.peak_gops[dtype] * 1e9
        if self.tops is not None and dtype in self.dtypes:
            return self.tops * 1e12
        return None

    def validate(self, where: str, placeholder: bool = False) -> list[str]:
        p = _missing(self, where, ("name",))
        p += _dtype_map(f"{where}.peak_gops", self.peak_gops, placeholder)
        p += _positive(where, {"cores": self.cores, "threads": self.threads, "tops": self.tops},
                       placeholder)
        p += [f"{where}.dtypes: unknown dtype {d!r}; known: {', '.join(DTYPES)}"
              for d in self.dtypes if d not in DTYPES]
        for i, c in enumerate(self.clusters):
            p += c.validate(f"{where}.clusters[{i}]", placeholder)
        if where == "cpu":
            if not self.peak_gops and not placeholder:
                p.append("cpu.peak_gops is missing (give at least fp32)")
            p += self._check_clusters()
        elif not self.peak_gops and self.tops is None and not (
                self.field_sources.get("peak_gops") or self.field_sources.get("tops")):
            p.append(f"{where}: give peak_gops{' or tops' if where == 'npu' else ''}, or "
                     f"{'tops_source' if where == 'npu' else 'peak_gops_source'} saying why "
                     "there is no published figure")
        return p + self._unsourced(where)

    def _check_clusters(self) -> list[str]:
        cs = [c for c in self.clusters if isinstance(c.count, (int, float))
              and isinstance(c.ghz, (int, float)) and isinstance(c.ops_per_cycle, Mapping)]
        if not cs or len(cs) != len(self.clusters):
            return []
        p = []
        n = sum(c.count for c in cs)
        if isinstance(self.cores, int) and n != self.cores:
            p.append(f"cpu.cores is {self.cores} but the clusters hold {n} cores")
        for d, v in self.peak_gops.items():
            if not isinstance(v, (int, float)):
                continue
            if any(d not in c.ops_per_cycle for c in cs):
                p.append(f"cpu.peak_gops.{d}: not every cluster gives ops_per_cycle.{d}")
                continue
            derived = sum(c.gops(d) for c in cs)
            if not math.isclose(v, derived, rel_tol=_TOLERANCE):
                p.append(f"cpu.peak_gops.{d} = {v:g} but the clusters give "
                         f"{derived:g} (sum of count x ghz x ops_per_cycle.{d})")
        return p


@dataclass(frozen=True, kw_only=True)
class Memory(_Sourced):
    """Physical RAM, what one app may use of it, and peak DRAM bandwidth."""

    total_bytes: int
    app_bytes: int
    bandwidth_bytes_per_s: float
    type: str = ""
    mt_per_s: float | None = None
    bus_bits: int | None = None
    NUMBERS = ("total_bytes", "app_bytes", "bandwidth_bytes_per_s", "mt_per_s", "bus_bits")

    def validate(self, placeholder: bool = False) -> list[str]:
        w = "memory"
        p = _missing(self, w, ("total_bytes", "app_bytes", "bandwidth_bytes_per_s"))
        p += _positive(w, {"total_bytes": self.total_bytes, "app_bytes": self.app_bytes,
                           "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
                           "mt_per_s": self.mt_per_s, "bus_bits": self.bus_bits}, placeholder)
        if _num(self.app_bytes) and _num(self.total_bytes) and self.app_bytes > self.total_bytes:
            p.append(f"memory.app_bytes ({self.app_bytes}) exceeds memory.total_bytes "
                     f"({self.total_bytes})")
        if _num(self.mt_per_s) and _num(self.bus_bits) and _num(self.bandwidth_bytes_per_s) \
                and self.mt_per_s > 0 and self.bus_bits > 0:
            derived = self.mt_per_s * 1e6 * self.bus_bits / 8
            if not math.isclose(self.bandwidth_bytes_per_s, derived, rel_tol=_TOLERANCE):
                p.append(f"memory.bandwidth_bytes_per_s = {self.bandwidth_bytes_per_s:g} but "
                         f"mt_per_s x 1e6 x bus_bits / 8 = {derived:g}")
        return p + self._unsourced(w)


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """One target device (frozen; read with ``from_toml``, check with ``validate``)."""

    id: str
    name: str
    kind: str
    memory: Memory
    cpu: ComputeUnit
    gpu: ComputeUnit | None = None
    npu: ComputeUnit | None = None
    backends: tuple[str, ...] = ()
    revision: int = 1
    placeholder: bool = False
    notes: str = ""
    #: the system-on-chip's part number (``SM8650``), which NPU compilers take as their target
    #: (QNN's ``soc_model``: ``runtime/backends/qnn``); empty where none is needed
    soc: str = ""
    file: Path | None = field(default=None, compare=False)

    # -- what the profiler asks --------------------------------------------------------------
    @property
    def bandwidth(self) -> float:
        """Peak DRAM bandwidth in bytes/s (shared by CPU, GPU and NPU on these SoCs)."""
        self._require_numbers()
        return float(self.memory.bandwidth_bytes_per_s)

    @property
    def app_memory(self) -> int:
        """Bytes one app can use on this device."""
        self._require_numbers()
        return int(self.memory.app_bytes)

    def unit(self, name: str) -> ComputeUnit:
        """The ``cpu``, ``gpu`` or ``npu`` unit; DeviceError if this device has none."""
        if name not in UNITS:
            raise DeviceError(f"unknown unit {name!r}; known: {', '.join(UNITS)}")
        u = getattr(self, name)
        if u is None:
            have = ", ".join(n for n in UNITS if getattr(self, n) is not None)
            raise DeviceError(f"{self.id} has no {name} (it has: {have})")
        return u

    def peak_ops(self, dtype: str, unit: str = "cpu") -> float:
        """Peak operations per second of ``unit`` in ``dtype`` (an FMA counts 2).

        Raises:
            DeviceError: no such unit, no figure for that dtype, or an uncalibrated host.
        """
        self._require_numbers()
        u = self.unit(unit)
        v = u.peak_ops(dtype)
        if v is None:
            why = u.field_sources.get("peak_gops") or u.field_sources.get("tops")
            known = ", ".join(sorted(u.peak_gops)) or "none"
            raise DeviceError(f"{self.id}: {unit} ({u.name}) has no {canonical_dtype(dtype)} "
                              f"peak (known: {known})" + (f"; {why}" if why else ""))
        return v

    def _require_numbers(self) -> None:
        if self.placeholder:
            raise DeviceError(f"{self.id}: not calibrated; run `edgeseq devices --calibrate` "
                              "or edgeseq.devices.calibrate_host()")

    # -- checking ----------------------------------------------------------------------------
    def validate(self) -> list[str]:
        """Every problem at once (an empty list means valid)."""
        p = _missing(self, "", ("id", "name", "kind"))
        if isinstance(self.id, str) and self.id and not _ID.match(self.id):
            p.append(f"id {self.id!r} must match [a-z0-9][a-z0-9._-]*")
        if isinstance(self.kind, str) and self.kind and self.kind not in KINDS:
            p.append(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.backends:
            p.append("backends is empty (list the preferred backends, best first)")
        for b in self.backends:
            if not isinstance(b, str) or not _BACKEND.match(b):
                p.append(f"backend {b!r} must be ort:<Name>ExecutionProvider, "
                         "executorch:<delegate> or openvino:<CPU|GPU|NPU>")
        dup = sorted({b for b in self.backends if list(self.backends).count(b) > 1}, key=str)
        p += [f"backend {b!r} is listed twice" for b in dup]
        if self.memory is None:
            p.append("missing [memory] table")
        else:
            p += self.memory.validate(self.placeholder)
        if self.cpu is None:
            p.append("missing [cpu] table")
        else:
            p += self.cpu.validate("cpu", self.placeholder)
        for name in ("gpu", "npu"):
            u = getattr(self, name)
            if u is not None:
                p += u.validate(name, self.placeholder)
        return p

    # -- reading and writing -----------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "DeviceProfile":
        """Read and validate one device file.

        Raises:
            DeviceError: naming the file and listing every problem in it.
        """
        path = Path(path)
        if tomllib is None:
            raise DeviceError("reading device files needs Python 3.11 (tomllib) or tomli", path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DeviceError("no such file", path) from None
        except (OSError, UnicodeDecodeError) as e:
            raise DeviceError(f"cannot read: {e}", path) from None
        except tomllib.TOMLDecodeError as e:
            raise DeviceError(f"malformed TOML: {e}", path) from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], file: Path | None = None) -> "DeviceProfile":
        """Build from the file schema (a parsed TOML document or ``to_dict()``); validates.

        Raises:
            DeviceError: every problem at once (wrong types, unknown keys, bad values).
        """
        problems: list[str] = []
        prof = _parse_profile(data, problems, file)
        bad = {p.split(":")[0] for p in problems}
        problems += [p for p in prof.validate()
                     if not (p.startswith("missing ") and p[8:] in bad)]
        if problems:
            raise DeviceError("; ".join(problems), file, problems)
        return prof

    def to_dict(self) -> dict[str, Any]:
        """The file schema (what ``from_dict`` reads back): used for the host cache."""
        d: dict[str, Any] = {"id": self.id, "name": self.name, "kind": self.kind,
                             "revision": self.revision}
        if self.placeholder:
            d["placeholder"] = True
        if self.notes:
            d["notes"] = self.notes
        if self.soc:
            d["soc"] = self.soc
        d["backends"] = list(self.backends)
        d["memory"] = _table(self.memory, ("type", "total_bytes", "app_bytes",
                                           "bandwidth_bytes_per_s", "mt_per_s", "bus_bits"))
        for name in UNITS:
            u = getattr(self, name)
            if u is not None:
                t = _table(u, ("name", "cores", "threads", "peak_gops", "tops", "dtypes",
                               "requires_static_shapes"))
                if u.clusters:
                    t["clusters"] = [_table(c, ("core", "count", "ghz", "ops_per_cycle"))
                                     for c in u.clusters]
                d[name] = t
        return d

    def summary(self) -> dict[str, Any]:
        """The key numbers in SI units (bytes, bytes/s, ops/s), for ``edgeseq devices --json``
        and the profiler's reports; None where a number is unknown or not calibrated."""
        ok = not self.placeholder

        def peaks(u: ComputeUnit) -> dict[str, float]:
            return {d: v * 1e9 for d, v in u.peak_gops.items()} if ok else {}

        def unit(u: ComputeUnit | None) -> dict[str, Any] | None:
            if u is None:
                return None
            out: dict[str, Any] = {"name": u.name, "peak_ops_per_s": peaks(u)}
            if u.cores is not None:
                out.update(cores=u.cores if ok else None,
                           threads=u.threads if ok else None)
            if u.tops is not None or u.dtypes:
                out.update(tops=u.tops, dtypes=list(u.dtypes),
                           requires_static_shapes=u.requires_static_shapes)
            return out

        return {"id": self.id, "name": self.name, "kind": self.kind, "calibrated": ok,
                "total_memory_bytes": self.memory.total_bytes if ok else None,
                "app_memory_bytes": self.memory.app_bytes if ok else None,
                "dram_bandwidth_bytes_per_s": self.memory.bandwidth_bytes_per_s if ok else None,
                "cpu": unit(self.cpu), "gpu": unit(self.gpu), "npu": unit(self.npu),
                "backends": list(self.backends),
                "file": str(self.file) if self.file else None}


class Roofline(NamedTuple):
    """The two terms of the roofline bound and which one binds."""

    memory_s: float
    compute_s: float

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def roofline(bytes_moved: float, flops_by_dtype: Mapping[str, float], profile: DeviceProfile,
             unit: str = "cpu") -> Roofline:
    """Both roofline terms: DRAM time ``bytes / bandwidth`` and compute time
    ``sum_d flops_d / peak_d`` (the dtypes share the unit, so their times add).

    Raises:
        ValueError: a negative amount. DeviceError: a missing unit or dtype peak.
    """
    if bytes_moved < 0 or any(v < 0 for v in flops_by_dtype.values()):
        raise ValueError("bytes_moved and flops must be >= 0")
    compute = sum(f / profile.peak_ops(d, unit) for d, f in flops_by_dtype.items() if f)
    return Roofline(bytes_moved / profile.bandwidth, compute)


def roofline_seconds(bytes_moved: float, flops_by_dtype: Mapping[str, float],
                     profile: DeviceProfile, unit: str = "cpu") -> float:
    """Lower bound on the time of a step: ``max(bytes / bandwidth, sum_d flops_d / peak_d)``
    (Williams, Waterman & Patterson 2009). A projection or a measurement below it is wrong.

    Args:
        bytes_moved: DRAM traffic of the step (weights read + state read and written + ...).
        flops_by_dtype: operations per dtype (``{"int8": 2e9, "fp32": 1e7}``; an FMA = 2).
        profile: the device. unit: ``cpu``, ``gpu`` or ``npu``.
    """
    return roofline(bytes_moved, flops_by_dtype, profile, unit).seconds


# -- parsing helpers -------------------------------------------------------------------------
def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _missing(obj: Any, where: str, names: Iterable[str]) -> list[str]:
    pre = f"{where}." if where else ""
    return [f"missing {pre}{n}" for n in names if getattr(obj, n) in (None, "", {})]


def _positive(where: str, values: Mapping[str, Any], placeholder: bool) -> list[str]:
    p = []
    for n, v in values.items():
        if _num(v) and (v < 0 or (v == 0 and not placeholder)):
            p.append(f"{where}.{n} must be > 0, got {v:g}")
    return p


def _dtype_map(where: str, m: Mapping[str, Any] | None, placeholder: bool) -> list[str]:
    p = []
    for d, v in (m or {}).items():
        if d not in DTYPES:
            p.append(f"{where}: unknown dtype {d!r}; known: {', '.join(DTYPES)}")
        elif _num(v) and (v < 0 or (v == 0 and not placeholder)):
            p.append(f"{where}.{d} must be > 0, got {v:g}")
    return p


def _table(obj: _Sourced, names: tuple[str, ...]) -> dict[str, Any]:
    t: dict[str, Any] = {}
    for n in names:
        v = getattr(obj, n)
        if v in (None, "", (), {}) or (n == "requires_static_shapes" and not v):
            continue
        t[n] = list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v
    if obj.sources:
        t["sources"] = list(obj.sources)
    for n, s in obj.field_sources.items():
        t[f"{n}_source"] = s
    return t


class _Reader:
    """Reads one table, recording wrong types and unknown keys as problems."""

    def __init__(self, data: Any, where: str, problems: list[str]):
        self.where, self.problems = where, problems
        if not isinstance(data, Mapping):
            problems.append(f"{where or 'the file'} must be a table")
            data = {}
        self.data, self.seen = data, set()

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: str) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return None
        v = self.data[key]
        ok = {"str": isinstance(v, str), "bool": isinstance(v, bool), "number": _num(v),
              "int": isinstance(v, int) and not isinstance(v, bool),
              "strs": isinstance(v, list) and all(isinstance(x, str) for x in v),
              "map": isinstance(v, Mapping) and all(_num(x) for x in v.values()),
              "table": isinstance(v, Mapping),
              "tables": isinstance(v, list) and all(isinstance(x, Mapping) for x in v)}[kind]
        if not ok:
            want = {"str": "a string", "bool": "true or false", "number": "a number",
                    "int": "an integer", "strs": "a list of strings",
                    "map": "a table of numbers", "table": "a table",
                    "tables": "an array of tables"}[kind]
            self.problems.append(f"{self._path(key)}: expected {want}, got {v!r}")
            return None
        return v

    def sources(self) -> dict[str, Any]:
        """``sources`` and ``field_sources`` keyword arguments for a ``_Sourced``."""
        srcs = []
        for key in ("source", "sources"):
            v = self.get(key, "str" if key == "source" else "strs")
            if v:
                srcs += [v] if isinstance(v, str) else v
        fields_ = {}
        for k in self.data:
            if k.endswith("_source") and k != "source":
                v = self.get(k, "str")
                if v:
                    fields_[k[: -len("_source")]] = v
        return {"sources": tuple(srcs), "field_sources": fields_}

    def finish(self) -> None:
        for k in self.data:
            if k not in self.seen:
                self.problems.append(f"unknown key {self._path(k)}")


def _parse_unit(data: Any, where: str, problems: list[str]) -> ComputeUnit:
    r = _Reader(data, where, problems)
    clusters = []
    for i, c in enumerate(r.get("clusters", "tables") or []):
        cr = _Reader(c, f"{where}.clusters[{i}]", problems)
        clusters.append(Cluster(core=cr.get("core", "str"), count=cr.get("count", "int"),
                                ghz=cr.get("ghz", "number"),
                                ops_per_cycle=cr.get("ops_per_cycle", "map") or {},
                                **cr.sources()))
        cr.finish()
    u = ComputeUnit(name=r.get("name", "str"), peak_gops=r.get("peak_gops", "map") or {},
                    cores=r.get("cores", "int"), threads=r.get("threads", "int"),
                    clusters=tuple(clusters), tops=r.get("tops", "number"),
                    dtypes=tuple(r.get("dtypes", "strs") or ()),
                    requires_static_shapes=bool(r.get("requires_static_shapes", "bool")),
                    **r.sources())
    r.finish()
    return u


def _parse_profile(data: Mapping[str, Any], problems: list[str],
                   file: Path | None) -> DeviceProfile:
    r = _Reader(data, "", problems)
    mem = None
    m = r.get("memory", "table")
    if m is not None:
        mr = _Reader(m, "memory", problems)
        mem = Memory(total_bytes=mr.get("total_bytes", "int"),
                     app_bytes=mr.get("app_bytes", "int"),
                     bandwidth_bytes_per_s=mr.get("bandwidth_bytes_per_s", "number"),
                     type=mr.get("type", "str") or "", mt_per_s=mr.get("mt_per_s", "number"),
                     bus_bits=mr.get("bus_bits", "int"), **mr.sources())
        mr.finish()
    units = {}
    for name in UNITS:
        t = r.get(name, "table")
        units[name] = None if t is None else _parse_unit(t, name, problems)
    revision = r.get("revision", "int")
    prof = DeviceProfile(id=r.get("id", "str"), name=r.get("name", "str"),
                         kind=r.get("kind", "str"), memory=mem, cpu=units["cpu"],
                         gpu=units["gpu"], npu=units["npu"],
                         backends=tuple(r.get("backends", "strs") or ()),
                         revision=1 if revision is None else revision,
                         placeholder=bool(r.get("placeholder", "bool")),
                         notes=r.get("notes", "str") or "", soc=r.get("soc", "str") or "",
                         file=file)
    r.finish()
    return prof
