"""The backend interface (``Backend``): lower graphs to files, load files into runners,
quantize, profile operators; shared pieces of the runners.

A runner executes one graph: ``run(inputs, state) -> (outputs, state)``. State is an opaque,
backend-owned handle (ONNX Runtime keeps it in preallocated OrtValues; ExecuTorch and torch in
tensors); ``to_numpy``/``from_numpy`` convert it for snapshots, ``state_dict`` and tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

import numpy as np

from edgeseq.bundle import BundleError, GraphEntry, Manifest, StateSpec, StreamingGraph


#: set by ``edgeseq.runtime.speculative.session.bound_allocator``: glibc maps every buffer of
#: 64 KiB or more afresh, so backends avoid allocating such buffers on every call
ALLOCATOR_BOUNDED = False


def static_traces(entry: GraphEntry) -> set[str]:
    """``trace.*`` outputs of a graph that returns every position of a static length (Mamba's
    ``verify``): runners hand back the first ``chunk`` positions, the ones fed."""
    if not any("chunk" in s.shape for s in entry.inputs):
        return set()
    return {s.name for s in entry.outputs if s.name.startswith("trace.") and len(s.shape) > 1
            and "window" not in s.shape and s.shape[1] == entry.max_chunk}


def fed_length(entry: GraphEntry, inputs: dict[str, np.ndarray]) -> int:
    """The number of tokens (positions) a call feeds: the length of its ``chunk`` input, else 1."""
    spec = next((s for s in entry.inputs if "chunk" in s.shape), None)
    return int(inputs[spec.name].shape[spec.shape.index("chunk")]) if spec else 1


def check_io(path: Path, entry: GraphEntry, actual: dict[str, tuple[str, list[Any]]]) -> None:
    """Refuse a graph file whose inputs disagree with the manifest (an edited state shape or
    dtype would otherwise fail, or read out of bounds, deep in the runtime). ``actual``: the
    file's {input name: (dtype name, dims)}, a dim an int where the file fixes it; the
    manifest's named dims are not compared (their sizes are the runtime's)."""
    problems = []
    specs = [(s.name, s.dtype, s.shape) for s in entry.inputs]
    specs += [(s.input_name, s.dtype, s.shape) for s in entry.state]
    for name, want_dtype, want_shape in specs:
        if name not in actual:
            problems.append(f"no input {name}")
            continue
        dtype, dims = actual[name]
        if dtype != want_dtype:
            problems.append(f"{name} is {dtype}, the manifest says {want_dtype}")
        elif len(dims) != len(want_shape) or any(
                isinstance(d, int) and isinstance(m, int) and d != m
                for d, m in zip(dims, want_shape)):
            problems.append(f"{name} has shape {list(dims)}, the manifest says "
                            f"{list(want_shape)}")
    if problems:
        raise BundleError(f"{path}: graph {entry.name} does not match the manifest: "
                          + "; ".join(problems))


class KeptBuffers:
    """Output buffers kept across a runner's calls, one flat array per output name, grown only
    when a call needs more: ``trace.*`` outputs (per-position states, the largest outputs of a
    verify or draft_loop call) would otherwise be a fresh allocation per call, and under a memory
    budget (glibc's 64 KiB mmap threshold) each is a new mapping whose pages fault in zeroed
    (measured: a quarter of a speculative round on mamba-bytes). Their readers (a commit, a
    drafter's rollback) are done with a view before the graph runs again."""

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}

    def view(self, name: str, shape: tuple[int, ...] | list[int], dtype: Any,
             reserve: Callable[[], int] | None = None) -> np.ndarray:
        """A C-ordered array of ``shape`` over the kept buffer for ``name``; a buffer grown here
        is sized for at least ``reserve()`` elements (the graph's longest chunk), asked only
        when it grows."""
        n = int(np.prod(shape))
        flat = self._flat.get(name)
        if flat is None or flat.size < n or flat.dtype != dtype:
            flat = self._flat[name] = np.empty(max(n, reserve() if reserve else 0), dtype=dtype)
        return flat[:n].reshape(shape)


class Runner(Protocol):
    entry: GraphEntry

    def run(self, inputs: dict[str, np.ndarray], state: Any) -> tuple[dict[str, np.ndarray], Any]:
        ...


MB = 1 << 20


@dataclass(frozen=True)
class RuntimeMemory:
    """What a backend's runtime holds besides weights, state and activations, one set per backend
    (the speculative memory plan and the profile's device projection both count with it).

    Measured on this project's bundles as RSS above the baseline after load, minus weights and
    planned memory, rounded up. About half of ``base`` is library code paged in on first use
    (RssFile: 6 MiB for ExecuTorch, 10 MiB for ONNX Runtime on the dev VM), and how much one touch
    maps depends on the host's page cache: CI's host measured 14 MiB more than ours on the same
    ExecuTorch bundle, so ``base`` carries that margin."""

    base: int                   # once per process: the runtime's code and bookkeeping
    per_graph: int              # each graph loaded (a session, a method)
    #: freed intermediates are kept by the allocator and fragment: a call's intermediates,
    #: times this, bound what it leaves behind
    activation_factor: float = 1.0

    def runtime_bytes(self, graphs: int) -> int:
        """The runtime's share of a process that loads ``graphs`` graphs."""
        return self.base + self.per_graph * graphs


class OpsProfiler(Protocol):
    """A backend's operator profiler (the ``ops.py`` of its folder; ``edgeseq profile`` runs it
    in a child process of its own)."""

    #: where the times come from, as the profile reports it
    SOURCE: str

    def profiling(self, tmp: Path) -> ContextManager[None]:
        """Turn the runtime's profiler on for the sessions loaded inside the block; its
        traces go under ``tmp``."""
        ...

    def collect(self, model: "LoadedModel", tmp: Path, sequence: list[str]) -> dict[str, Any]:
        """Per graph, the time per operator type (``edgeseq.runtime.profile.ops.top_ops``) of
        the calls made, ``sequence`` naming the graph of each call in order."""
        ...


class Backend:
    """The interface of one backend, one folder ``runtime/backends/<name>/`` whose
    ``__init__.py`` holds the subclass, registered with ``@register_backend("name")``. Each
    part the backend lacks is declared, not left out: no ``quant_schemes``, ``ops_profiler``
    returns None (``tests/test_completeness.py`` checks every registered class)."""

    name: str = "?"
    #: the bundle format it lowers to and runs, the key under which a graph's file is recorded
    #: in the manifest (``onnx``, ``pte``, ``pt2``); ``edgeseq.registry.formats`` lists them
    format: str = "?"
    aliases: tuple[str, ...] = ()       # other names a user may give for it (--backend)
    memory: RuntimeMemory = RuntimeMemory(16 * MB, 4 * MB)
    #: the ``convert --quant`` schemes it implements, either on the torch graphs before lowering
    #: (``quantize_graphs``) or on its lowered files (``quantize_files``); empty: it does not
    #: quantize, and convert refuses ``--quant`` for its format
    #: files its lowering writes besides the graphs, by role (``{"activation_table": "..."}``):
    #: the manifest declares those a bundle holds (``Manifest.side_files``), and readers find
    #: them there
    side_files: dict[str, str] = {}
    quant_schemes: tuple[str, ...] = ()
    #: int4: weights per scale when the user names none (``convert --group-size``): the group
    #: its kernels run fastest at good accuracy
    int4_group: int = 32
    #: it runs ONNX Runtime's ``com.microsoft`` operators where it runs the ONNX files (the
    #: lowering may fuse attention into one, ``onnxruntime/fuse.py``); an NPU provider does not,
    #: and a conversion that targets it writes the graphs unfused
    onnx_contrib_ops: bool = True
    #: the most sequences one call may carry (None: any); an NPU compiled for fixed shapes
    #: serves one, and callers with more (a gate's batch) split their rows
    max_batch: int | None = None
    #: it runs a graph at the precision it was lowered in, so parity with the reference is
    #: exact (to float rounding); False for an accelerator that computes in its own precision
    #: (the HTP runs float graphs in fp16): its results are held to the accuracy gate instead
    exact: bool = True
    #: the entries of device profiles' ``backends`` lists (``devices/data/*.toml``) whose
    #: bundles it produces: ``convert --target`` lowers for the first of a profile's entries
    #: some backend names here (``openvino:GPU``: the part after the colon is the device)
    targets: tuple[str, ...] = ()

    def available(self) -> str | None:
        """None if usable here, else why not (a missing package, say)."""
        return None

    def lower(self, graphs: dict[str, StreamingGraph], out: Path, dtype: str,
              quantized: bool = False) -> dict[str, str]:
        """Write the graphs under ``out``; return {graph name: file name relative to out}.
        ``quantized``: the graphs come from ``quantize_graphs``."""
        raise NotImplementedError

    def load(self, root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
             threads: int | None = None,
             prepack: frozenset[str] = frozenset()) -> "LoadedModel":
        """Open ``entries`` of the bundle at ``root``, whose ``manifest`` the caller has read
        (once per load: a backend asks it, never the file). ``prepack``: graphs whose weights
        the runtime may repack into its kernels' layout at load (a private copy; a memory plan
        decides, see ``speculative/plan.py``). Backends that always pack (XNNPACK) or never do
        ignore it."""
        raise NotImplementedError

    def quantize_graphs(self, graphs: dict[str, StreamingGraph], scheme: str, keep: list[str],
                        group_size: int, sensitive: list[str]
                        ) -> tuple[dict[str, StreamingGraph], dict[str, Any]]:
        """Quantized copies of ``graphs`` for ``lower(..., quantized=True)``, and a report per
        graph. ``keep``: weights left in float; ``sensitive``: one step above the scheme."""
        raise NotImplementedError(f"{self.name} does not quantize torch graphs")

    def quantize_files(self, folder: Path, files: dict[str, str], scheme: str, keep: list[str],
                       group_size: int, sensitive: list[str]) -> dict[str, Any]:
        """Quantize the lowered graph ``files`` under ``folder`` in place; a report per
        graph."""
        raise NotImplementedError(f"{self.name} does not quantize its files")

    def target_device(self, entry: str) -> str | None:
        """The device a profile's ``entry`` (one of ``targets``) asks this backend to compile
        for, or None: the entry names a runtime part (an execution provider, a delegate), not
        a device."""
        return None

    def partition(self, root: Path, files: dict[str, str], device: str | None,
                  task: Any = None, config: dict[str, Any] | None = None
                  ) -> dict[str, Any] | None:
        """Which device runs each operator of the lowered ``files`` under ``root`` when they
        are compiled for ``device`` (``edgeseq.bundle.Partition``'s record), or None: the
        backend runs every operator on the one processor it names (the CPU). ``task`` and
        ``config`` (the bundle's task plug-in and model config) say which shapes an
        accelerator compiling fixed shapes would fix."""
        return None

    def ops_profiler(self) -> OpsProfiler | None:
        """Its operator profiler (``ops.py`` in its folder), or None: it has none, and
        ``edgeseq profile`` refuses it."""
        return None

    def import_runtime(self) -> None:
        """Import the runtime's libraries now (a measurement takes its baseline after, so they
        count as the process's, not as the bundle's)."""

    def threads(self, threads: int | None) -> int | None:
        """The intra-op threads a load with ``threads`` runs with (None: the runtime's own
        choice)."""
        return threads


class LoadedModel:
    """The runners of one bundle on one backend, plus state allocation and conversion."""

    def __init__(self, runners: dict[str, Any], specs: list[StateSpec]):
        self.runners = runners
        self.specs = specs

    def init_state(self, batch: int) -> Any:
        # a growing KV cache (named dim ``past``) starts empty
        return self.from_numpy([s.allocate({"batch": batch, "past": 0}) for s in self.specs])

    def reorder(self, state: Any, index: np.ndarray) -> Any:
        """Rows of the state picked by ``index`` (beam search: each beam continues a parent)."""
        return self.from_numpy([a[index] for a in self.to_numpy(state)])

    def from_numpy(self, arrays: list[np.ndarray]) -> Any:
        raise NotImplementedError

    def to_numpy(self, state: Any) -> list[np.ndarray]:
        raise NotImplementedError

    def assign(self, state: Any, arrays: list[np.ndarray]) -> Any:
        """``arrays`` as the state, written into ``state``'s own buffers where a backend can
        (a rollback every speculative round: no allocation); returns the state to use."""
        return self.from_numpy(arrays)

    def view_numpy(self, state: Any) -> list[np.ndarray]:
        """The state as arrays that may share the backend's memory: read them, or copy them
        (``from_numpy`` does) before the next call."""
        return self.to_numpy(state)

    def run(self, graph: str, inputs: dict[str, np.ndarray], state: Any
            ) -> tuple[dict[str, np.ndarray], Any]:
        return self.runners[graph].run(inputs, state)
