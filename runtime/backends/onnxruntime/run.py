"""ONNX Runtime's run side: IO-bound runners over the bundle's ONNX files.

Light by design: it imports ``onnxruntime`` and the initializer reader (``records.py``), never
``onnx`` or the exporters (``lower.py``), so a process that only runs a bundle stays small.

At load, the weights file is mapped once and the same buffers are handed to every session
(``SessionOptions.add_initializer`` does not copy), with prepacking off so sessions do not make
private copies either: the weights are in memory once however many graphs read them.

State lives in two preallocated sets of ``OrtValue`` buffers per stream; each call reads one set
and writes the other through IO binding (ping-pong), so steps never copy state through Python.
"""
from __future__ import annotations

import os
from pathlib import Path
from contextlib import nullcontext
from typing import Any, ContextManager, Protocol

import numpy as np

from edgeseq.bundle import (BundleError, GraphEntry, Manifest, Quantization, one_row,
                            shared_state_specs)
from edgeseq.runtime.backends import base as backend_base
from edgeseq.runtime.backends.base import KeptBuffers, LoadedModel, check_io, static_traces
from edgeseq.runtime.backends.onnxruntime import (CONTROL_FLOW_KEY, SERVES_KEY, WEIGHTS_FILE,
                                                  OrtBackend)


class ExecutionProvider(Protocol):
    """An ONNX Runtime execution provider other than the CPU one, as a backend that runs
    the ONNX files through it sets it up (``runtime/backends/qnn``): ``configure`` adds it to
    each session's options; a session it did not join is refused rather than run on the CPU."""

    name: str

    def configure(self, opts: Any) -> None:
        ...

    def creating(self) -> ContextManager[None]:
        """Wraps each session's creation (where the provider loads and compiles)."""
        ...


def load(root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
         threads: int | None = None,
         prepack: frozenset[str] = frozenset(),
         ep: ExecutionProvider | None = None) -> LoadedModel:
    """The bundle's ONNX graphs as ONNX Runtime sessions on the CPU provider, or on ``ep``
    (then each runner's ``assigned`` counts the nodes each provider took)."""
    import onnxruntime as ort

    packs = packs_anyway(manifest.quant)
    threads = threads or default_threads()
    weights = _SharedWeights(root / WEIGHTS_FILE)
    runners: dict[str, Any] = {}
    stateful = [n for n, x in entries.items() if x.state]
    for name, e in entries.items():
        path = root / e.files[OrtBackend.format]
        data = _read_graph(path)
        props = model_props_of(path, data)
        sess_opts = weights.bind(path, session_options(threads, packs or name in prepack), data)
        if ep is not None:
            ep.configure(sess_opts)
            sess_opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        try:
            with ep.creating() if ep is not None else nullcontext():
                sess = ort.InferenceSession(str(path), sess_options=sess_opts,
                                            providers=None if ep else ["CPUExecutionProvider"],
                                            disabled_optimizers=_disabled(e, props))
        except Exception as err:  # ORT's own types (Fail, InvalidGraph, ...) name no file
            via = f" with {ep.name}" if ep else ""
            raise BundleError(f"{path}: ONNX Runtime cannot load it{via} ("
                              f"{_first_line(err)})") from None
        if ep is not None and ep.name not in sess.get_providers():
            # ONNX Runtime's Python layer retries on the CPU alone when a provider fails
            raise BundleError(f"{path}: {ep.name} could not be set up for graph {name} "
                              f"(ONNX Runtime fell back to the CPU; its log says why)")
        check_io(path, e, {i.name: (_ORT_DTYPES.get(i.type, i.type), list(i.shape))
                           for i in sess.get_inputs()})
        runners[name] = _OrtRunner(e, sess)
        if ep is not None:
            runners[name].assigned = assigned_nodes(sess)
        # A chunk graph that serves a one-position graph's calls (``StreamingGraph.serves``)
        # runs them when it is the one stateful graph asked for: one session, one packed copy
        # of the weights, for callers that put memory before step speed (docs/benchmarks.md).
        # With other stateful graphs loaded (a speculative plan's ``verify``), the caller's
        # choice of graphs stands as it made it.
        target = props.get(SERVES_KEY)
        if (ep is None and stateful == [name] and target and target in manifest.graphs
                and serves(e, manifest.graphs[target])):
            runners[target] = _OneRowRunner(manifest.graphs[target], e, sess)
    if packs:
        weights.release_pages()
    model = _OrtModel(runners, shared_state_specs(entries))
    model.weights = weights  # the sessions read these buffers: keep them alive
    return model


def session_options(threads: int, packs: bool) -> Any:
    """One session's options (SessionOptions cannot be copied, and the shared weights are
    attached to each session's own). ``packs``: the session prepacks its weights."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # No arena: it keeps the encoder's largest activations (a Whisper encoder's attention
    # maps: ~100 MB for 30 s) for the life of the session and grows by powers of two;
    # without it they go back to the system after each run. Measured: Whisper-tiny peak RSS
    # 486 -> 398 MB, decode speed unchanged (docs/benchmarks.md).
    opts.enable_cpu_mem_arena = False
    # The memory pattern is one block per call for all intermediates: under a memory budget
    # (a fixed 64 KiB mmap threshold) a fresh mapping each call (2.2 MB for mamba-bytes'
    # verify) whose pages fault in zeroed; without it the (small) intermediates come from
    # the heap. Measured on the code workload's budgeted draft: 2018 -> 2311 tokens/s, peak
    # 31.2 -> 30.0 MiB. Without a budget the pattern is faster (2970 against 2537).
    opts.enable_mem_pattern = not backend_base.ALLOCATOR_BOUNDED
    # Private prepacked copies per session would undo the sharing; for decoding (one row per
    # step) prepacking did not change speed on our CPUs. Graphs that take many rows a call
    # (a speculative chunk) gain from it, and a memory plan that affords the packed copy
    # names them in ``prepack`` (measured on the zoo's typo fixer, ORT, 1 thread:
    # decoder_chunk at 16 tokens 527 -> 479 us; the input-guided loop ~10% faster).
    # Quantized kernels (MatMulNBits, DynamicQuantizeMatMul) pack their weights once at load;
    # without prepacking they repack on every call (measured at the Mamba-130M shape: int4
    # decode at 0.13x of fp32 instead of 2.9x). Each session then holds its packed copy of
    # the (small) quantized weights.
    opts.add_session_config_entry("session.disable_prepacking", "0" if packs else "1")
    # Recurrent states can decay into denormal floats, which CPUs process many times slower
    # (training the zoo model hit this); they carry no signal (< 1.2e-38), so the session's
    # threads flush them. No effect on the speed of healthy states.
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    # Worker threads sleep between operators instead of spinning: with another process busy on
    # a core (a phone is never idle), a spinning pool waits on its descheduled worker at every
    # parallel operator. Mamba-130M int4, 2 threads, the second core busy: 60-72 tokens/s
    # spinning, 97-117 not; on an idle host spinning gains ~5% (docs/benchmarks.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _disabled(e: GraphEntry, props: dict[str, str]) -> list[str]:
    """ONNX Runtime graph optimizers a graph runs without. A one-row graph (a decode step) keeps
    ``MatMul`` x scalar apart: fused, the scale sends the product from MLAS's one-row kernel
    (which takes none) to its general GEMM - T5's scaled LM head: t5-small decode at 1 thread
    49-56 -> 87-91 tokens/s without the fusion (docs/benchmarks.md).

    A graph with control flow (``CONTROL_FLOW_KEY``: Mamba's ``Scan`` prefill) runs without
    the transpose optimizer: it pushes the transposes around a ``Scan`` into the constants of
    the ops before it and reshapes such a constant in the graph (a (1536,) weight to (1, 1536,
    1)), but a weight handed over as a mapped buffer (``_SharedWeights``) keeps its shape, and
    the session fails on the mismatch (ONNX Runtime 1.31). Measured on the Mamba-130M int4
    prefill: no slower without it (16 tokens 54 ms, 60 with)."""
    out = ["MatMulScaleFusion"] if one_row(e.inputs) else []
    if props.get(CONTROL_FLOW_KEY):
        out += ["TransposeOptimizer", "TransposeOptimizer_CPUExecutionProvider"]
    return out


def _read_graph(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: cannot read it ({_first_line(e)})") from None


def model_props_of(path: Path, data: bytes) -> dict[str, str]:
    """The graph file's metadata (``records.model_props``); a malformed file is refused."""
    from edgeseq.runtime.backends.onnxruntime.records import ProtoError, model_props

    try:
        return model_props(data)
    except ProtoError as e:
        raise BundleError(f"{path}: not an ONNX model ({_first_line(e)})") from None


def assigned_nodes(sess: Any) -> dict[str, dict[str, int]]:
    """{provider: {operator type: nodes}} of a session created with graph-assignment
    recording on: which provider runs what, after ONNX Runtime's own graph optimizations."""
    out: dict[str, dict[str, int]] = {}
    for sub in sess.get_provider_graph_assignment_info():
        ops = out.setdefault(sub.ep_name, {})
        for node in sub.get_nodes():
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return out


def packs_anyway(quant: Quantization | None) -> bool:
    """Whether every session of a bundle quantized so (``Manifest.quant``) packs its weights
    (integer weights, see ``load``): a memory plan then has no packing to choose."""
    return quant is not None and quant.integer


def default_threads() -> int:
    """``EDGESEQ_THREADS`` if set (several processes sharing the cores, e.g. parallel tests),
    else the physical cores."""
    env = os.environ.get("EDGESEQ_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else _physical_cores()


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


class _OrtState:
    """Two buffer sets; ``cur`` holds the live state, the other receives the next one."""

    def __init__(self, bufs: list[list[Any]]):
        self.bufs = bufs
        self.cur = 0
        # IOBindings over these buffers (``_OrtRunner._run_bound``), per (runner, cur, chunk,
        # batch): they live and die with the state they point into
        self.bound: dict[tuple[Any, int, int, int], _Bound] = {}

    @property
    def live(self) -> list[Any]:
        return self.bufs[self.cur]


class _OrtRunner:
    def __init__(self, entry: GraphEntry, sess: Any, keep: bool | None = None):
        """``keep``: whether calls may keep their bindings (default ``keeps_bindings(entry)``;
        a chunk graph serving one-position calls takes that graph's answer)."""
        import onnxruntime

        self.ort = onnxruntime
        self.entry = entry
        #: {provider: {op type: nodes}} when a provider besides the CPU's was asked for
        self.assigned: dict[str, dict[str, int]] | None = None
        self.sess = sess
        self.io = sess.io_binding()
        # (input, axis) whose length is the number of tokens fed: a growing cache grows by it
        self.fed = next(((s.name, s.shape.index("chunk")) for s in entry.inputs
                         if "chunk" in s.shape), None)
        self.rows = next((s.name for s in entry.inputs if s.shape and s.shape[0] == "batch"),
                         None)
        # Bindings kept across calls (``_Bound``, ``keeps_bindings``): every output is bound
        # into a kept buffer, logits and window traces copied out after the call, so only
        # graphs whose every output shape is known before the call (from batch, chunk and a
        # window state's width: its trace is k-1 + chunk long) qualify.
        self.window = {f"trace.{s.name}": int(s.shape[-1]) for s in entry.state
                       if s.kind == "window" and isinstance(s.shape[-1], int)}

        def known(s: Any) -> bool:
            return all(not isinstance(d, str) or d in ("batch", "chunk")
                       or (d == "window" and s.name in self.window) for d in s.shape)

        # Per-position states (``trace.*``) are bound as outputs into buffers kept across calls
        # (``KeptBuffers`` says why); only those whose shape the call's batch and chunk fix.
        self.kept = [s for s in entry.outputs if s.name.startswith("trace.") and known(s)
                     and "window" not in s.shape]
        self._bufs = KeptBuffers()
        self.static = static_traces(entry)
        self.fixed = [s for s in entry.outputs if s not in self.kept and known(s)]
        self.reuse = ((keeps_bindings(entry) if keep is None else keep)
                      and len(self.kept) + len(self.fixed) == len(entry.outputs))

    def run(self, inputs: dict[str, np.ndarray], state: _OrtState
            ) -> tuple[dict[str, np.ndarray], _OrtState]:
        if self.reuse:
            return self._run_bound(inputs, state)
        ort = self.ort
        io = self.io
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        if not self.entry.state:  # a stateless graph (an encoder)
            feeds = {s.name: np.ascontiguousarray(inputs[s.name]) for s in self.entry.inputs}
            outs = self.sess.run([s.name for s in self.entry.outputs], feeds)
            return {s.name: o for s, o in zip(self.entry.outputs, outs)}, state
        for s in self.entry.inputs:
            io.bind_cpu_input(s.name, np.ascontiguousarray(inputs[s.name]))
        src, dst = state.bufs[state.cur], state.bufs[1 - state.cur]
        for spec, v in zip(self.entry.state, src):
            io.bind_ortvalue_input(spec.input_name, v)
        grow = inputs[self.fed[0]].shape[self.fed[1]] if self.fed else 1
        dims = {"batch": inputs[self.rows].shape[0] if self.rows else 1, "chunk": grow}
        kept = {}
        # bound in the graph's output order: ``get_outputs`` lists them in binding order
        for s in self.entry.outputs:
            if s not in self.kept:
                io.bind_output(s.name, "cpu")
                continue
            a = kept[s.name] = self._bufs.view(
                s.name, s.concrete_shape(dims), s.dtype,
                reserve=lambda s=s: int(np.prod(s.concrete_shape(
                    {**dims, "chunk": max(grow, self.entry.max_chunk or 1)}))))
            io.bind_ortvalue_output(s.name, ort.OrtValue.ortvalue_from_numpy(a))
        for j, (spec, v) in enumerate(zip(self.entry.state, dst)):
            want = _grown(spec, src[j].shape(), grow)
            if v.shape() != want:  # a growing KV cache: the spare buffer gets the new size
                v = dst[j] = ort.OrtValue.ortvalue_from_shape_and_type(want, np.float32)
            io.bind_ortvalue_output(spec.output_name, v)
        self.sess.run_with_iobinding(io)
        outs = io.get_outputs()
        result = {s.name: (kept[s.name][:, :grow] if s.name in self.static else kept[s.name])
                  if s.name in kept else outs[i].numpy() for i, s in enumerate(self.entry.outputs)}
        state.cur = 1 - state.cur
        return result, state

    def _run_bound(self, inputs: dict[str, np.ndarray], state: _OrtState
                   ) -> tuple[dict[str, np.ndarray], _OrtState]:
        """``run`` for states of a fixed shape: the state buffers, traces and logits stay bound
        between calls; only the token inputs are bound again. Binding a Mamba step's 8 states
        and 9 outputs anew took 52 of its 231 us a call (ORT, 1 thread, this host)."""
        src, dst = state.bufs[state.cur], state.bufs[1 - state.cur]
        grow = inputs[self.fed[0]].shape[self.fed[1]] if self.fed else 1
        batch = inputs[self.rows].shape[0] if self.rows else 1
        key = (self, state.cur, grow, batch)
        b = state.bound.get(key)
        if b is None or not b.holds(src, dst):   # ``assign`` may have replaced a buffer
            b = state.bound[key] = self._bind(src, dst, {"batch": batch, "chunk": grow})
        io = b.io
        for s in self.entry.inputs:
            io.bind_cpu_input(s.name, np.ascontiguousarray(inputs[s.name]))
        self.sess.run_with_iobinding(io)
        result = {name: a.copy() for name, a in b.fixed.items()}
        for name, a in b.kept.items():
            result[name] = a[:, :grow] if name in self.static else a
        state.cur = 1 - state.cur
        return result, state

    def _bind(self, src: list[Any], dst: list[Any], dims: dict[str, int]) -> "_Bound":
        ort = self.ort
        io = self.sess.io_binding()
        for spec, v in zip(self.entry.state, src):
            io.bind_ortvalue_input(spec.input_name, v)
        fixed, kept = {}, {}
        chunk = max(dims["chunk"], self.entry.max_chunk or 1)
        for s in self.entry.outputs:        # in output order, as ``run`` binds them
            # a window trace holds the k-1 inputs before the chunk, then the chunk's
            at = {**dims, "window": self.window.get(s.name, 0) + dims["chunk"]}
            longest = {**at, "chunk": chunk, "window": self.window.get(s.name, 0) + chunk}
            a = self._bufs.view(s.name, s.concrete_shape(at), s.dtype,
                                reserve=lambda s=s, n=longest: int(np.prod(s.concrete_shape(n))))
            (kept if s in self.kept else fixed)[s.name] = a
            io.bind_ortvalue_output(s.name, ort.OrtValue.ortvalue_from_numpy(a))
        for spec, v in zip(self.entry.state, dst):
            io.bind_ortvalue_output(spec.output_name, v)
        return _Bound(io, src, dst, fixed, kept)


def serves(chunk: GraphEntry, one: GraphEntry) -> bool:
    """Whether ``chunk``'s calls can stand for ``one``'s at a chunk of one: the same state, and
    each of ``one``'s inputs and outputs is ``chunk``'s of that name less its ``chunk`` axis."""
    def less_chunk(specs: list[Any]) -> dict[str, tuple[Any, ...]]:
        return {s.name: (s.dtype, tuple(d for d in s.shape if d != "chunk")) for s in specs
                if len(s.shape) > 1 and s.shape[1] == "chunk"}

    def plain(specs: list[Any]) -> dict[str, tuple[Any, ...]]:
        return {s.name: (s.dtype, tuple(s.shape)) for s in specs}

    return (chunk.state == one.state and less_chunk(chunk.inputs) == plain(one.inputs)
            and len(chunk.inputs) == len(one.inputs)
            and less_chunk(chunk.outputs) == plain(one.outputs)
            and len(chunk.outputs) == len(one.outputs))


class _OneRowRunner:
    """A one-position graph's calls (``step``: ids (b,), logits (b, v)) run by the session of
    the chunk graph that serves them (``serves``), at a chunk of one: ids (b, 1), logits
    (b, 1, v). Its IOBindings are kept across calls as the one-position graph's own would be
    (``keeps_bindings``): a chunk of one has every output's shape known before the call."""

    def __init__(self, entry: GraphEntry, chunk: GraphEntry, sess: Any):
        self.entry = entry
        self.sess = sess
        self.assigned: dict[str, dict[str, int]] | None = None
        self.inner = _OrtRunner(chunk, sess, keep=keeps_bindings(entry))

    @property
    def reuse(self) -> bool:
        return self.inner.reuse

    @reuse.setter
    def reuse(self, keep: bool) -> None:
        self.inner.reuse = keep

    def run(self, inputs: dict[str, np.ndarray], state: _OrtState
            ) -> tuple[dict[str, np.ndarray], _OrtState]:
        out, state = self.inner.run({k: np.asarray(v)[:, None] for k, v in inputs.items()},
                                    state)
        return {s.name: out[s.name][:, 0] for s in self.entry.outputs}, state


def keeps_bindings(entry: GraphEntry) -> bool:
    """Whether the runner keeps this graph's IOBindings across calls (``_run_bound``): graphs
    fed one token a call (``step``, ``exit_step``, ``draft_loop``) over a state of fixed shape.
    A kept binding also keeps its call's activation block (ONNX Runtime's memory pattern),
    two per graph (one per state buffer set), which a memory plan counts (measured on
    mamba-bytes: 304 KiB per binding of ``step``; 565 for the drafter's ``draft_loop``, 1.2
    MiB for a 16-token ``verify``, which is why chunk graphs bind anew on every call)."""
    return (bool(entry.state) and not any("past" in s.shape for s in entry.state)
            and not any("chunk" in s.shape for s in entry.inputs))


class _Bound:
    """One IOBinding with a state's buffers bound (``_OrtRunner._run_bound``) and the buffers
    it was made for, to tell when the state's list no longer holds them."""

    def __init__(self, io: Any, src: list[Any], dst: list[Any], fixed: dict[str, np.ndarray],
                 kept: dict[str, np.ndarray]):
        self.io, self.src, self.dst = io, list(src), list(dst)
        self.fixed, self.kept = fixed, kept

    def holds(self, src: list[Any], dst: list[Any]) -> bool:
        return (len(src) == len(self.src) and all(a is b for a, b in zip(src, self.src))
                and all(a is b for a, b in zip(dst, self.dst)))


def _grown(spec: Any, shape: list[int], grow: int = 1) -> list[int]:
    """The output shape of a state: ``grow`` positions (the tokens fed) more along a ``past``
    dim, else unchanged."""
    return [n + grow if d == "past" else n for d, n in zip(spec.shape, shape)]


class _OrtModel(LoadedModel):
    def from_numpy(self, arrays: list[np.ndarray]) -> _OrtState:
        import onnxruntime as ort

        live = [ort.OrtValue.ortvalue_from_numpy(np.array(a, copy=True, order="C")) for a in arrays]
        spare = [ort.OrtValue.ortvalue_from_numpy(np.empty_like(a)) for a in arrays]
        return _OrtState([live, spare])

    def to_numpy(self, state: _OrtState) -> list[np.ndarray]:
        return [v.numpy().copy() for v in state.live]

    def assign(self, state: _OrtState, arrays: list[np.ndarray]) -> _OrtState:
        import onnxruntime as ort

        live = state.live
        if len(live) != len(arrays) or any(a.dtype != np.float32 for a in arrays):
            return self.from_numpy(arrays)
        for j, (v, a) in enumerate(zip(live, arrays)):
            if v.shape() == list(a.shape):        # 5 us for Mamba's 8 states, against 35 us
                v.update_inplace(np.ascontiguousarray(a))   # for new buffers
            else:   # a KV cache cropped: a new live buffer; the runner resizes the spare
                live[j] = ort.OrtValue.ortvalue_from_numpy(np.array(a, copy=True, order="C"))
        return state

    def view_numpy(self, state: _OrtState) -> list[np.ndarray]:
        return [v.numpy() for v in state.live]


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


class _SharedWeights:
    """The weights file mapped once; one OrtValue per distinct tensor, shared by all sessions.

    The graph files are untrusted: an initializer's external data must be in this file (not a
    path of the graph's choosing) and inside it, or the bundle is refused."""

    def __init__(self, path: Path):
        import mmap

        self.path = path
        self.map = None
        self._mmap: Any = None
        if path.is_file():
            try:
                if path.stat().st_size:
                    with open(path, "rb") as f:
                        self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    self.map = np.frombuffer(self._mmap, dtype=np.uint8)
                else:
                    self.map = np.zeros(0, np.uint8)
            except (OSError, ValueError) as e:
                raise BundleError(f"{path}: cannot map the weights ({e})") from None
        self.values: dict[tuple[int, int, int, tuple[int, ...]], Any] = {}

    def release_pages(self) -> None:
        """Drop the mapping's resident pages once every session has packed its own copy of the
        weights (a quantized bundle): the originals are then read only where a kernel reads
        them directly (an embedding gather, a norm), and those pages fault back in from the
        page cache. Measured at the Mamba-130M shape, int4: 423 -> 350 MB RSS, same tokens."""
        import mmap

        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)

    def bind(self, model_path: Path, opts: Any, data: bytes) -> Any:
        """``opts`` with this graph's initializers attached, each read from the mapped file
        (``data``: the graph file's bytes)."""
        import onnxruntime as ort

        from edgeseq.runtime.backends.onnxruntime.records import EXTERNAL, ProtoError, initializers

        try:
            # the records only, without the onnx package (16 MB resident in every process)
            records = initializers(data)
        except ProtoError as e:
            raise BundleError(f"{model_path}: not an ONNX model ({_first_line(e)})") from None
        for init in records:
            if init.data_location != EXTERNAL:
                continue
            ext = init.external_data
            if ext.get("location") != self.path.name or self.map is None:
                raise BundleError(f"{model_path}: initializer {init.name} reads external data "
                                  f"from {ext.get('location')!r}; a bundle's graphs read only "
                                  f"{self.path.name}")
            try:
                offset, length = int(ext["offset"]), int(ext["length"])
                dtype = init.numpy_dtype()
                dims = tuple(int(d) for d in init.dims)
            except (KeyError, ValueError, TypeError) as e:
                raise BundleError(f"{model_path}: initializer {init.name}: bad external data "
                                  f"record ({_first_line(e)})") from None
            if offset < 0 or length < 0 or offset + length > self.map.size \
                    or any(d < 0 for d in dims) or int(np.prod(dims)) * dtype.itemsize != length:
                raise BundleError(f"{model_path}: initializer {init.name}: {length} bytes at "
                                  f"{offset} for shape {list(dims)} {dtype} do not fit "
                                  f"{self.path.name} ({self.map.size} bytes)")
            key = (offset, length, init.data_type, dims)
            if key not in self.values:
                arr = self.map[offset:offset + length].view(dtype).reshape(dims)
                self.values[key] = ort.OrtValue.ortvalue_from_numpy(arr)
            opts.add_initializer(init.name, self.values[key])
        return opts
