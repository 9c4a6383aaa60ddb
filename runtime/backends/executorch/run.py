"""ExecuTorch's run side: the ``.pte`` program's methods as runners (XNNPACK).

Light by design: it imports the ExecuTorch runtime's pybindings, never ``executorch.exir`` or
the exporters (``lower.py``).
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgeseq.bundle import BundleError, GraphEntry, Manifest, shared_state_specs
from edgeseq.runtime.backends.base import LoadedModel, check_io, fed_length, static_traces
from edgeseq.runtime.backends.executorch import ExecuTorchBackend


def load(root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
         threads: int | None = None,
         prepack: frozenset[str] = frozenset()) -> LoadedModel:
    from executorch.runtime import Runtime

    _register_quantized_kernels()
    _share_packed_weights()
    _set_threads(threads)
    files = {e.files[ExecuTorchBackend.format] for e in entries.values()}
    programs = {}
    for f in files:
        check_pte_header(root / f)
        programs[f] = _native(root / f, "not a loadable ExecuTorch program",
                              lambda: Runtime.get().load_program(root / f))
    runners = {}
    for name, e in entries.items():
        path = root / e.files[ExecuTorchBackend.format]
        # XNNPACK's cpuinfo probe logs to fd 2 on first use
        method = _native(path, f"cannot load method {name}",
                         lambda: programs[e.files[ExecuTorchBackend.format]].load_method(name))
        meta = method.metadata
        names = [s.name for s in e.inputs] + [s.input_name for s in e.state]
        check_io(path, e, {n: (_ET_DTYPES.get(int(t.dtype()), f"type {int(t.dtype())}"),
                               list(t.sizes()))
                           for n, t in zip(names, (meta.input_tensor_meta(i)
                                                   for i in range(meta.num_inputs())))})
        runners[name] = _EtRunner(e, method)
    model = _EtModel(runners, shared_state_specs(entries))
    # A method reads its program's memory: the program must live as long as the methods.
    model.programs = programs
    return model


#: ExecuTorch's ScalarType codes of the dtypes a manifest names
_ET_DTYPES = {6: "float32", 5: "float16", 4: "int64", 3: "int32", 11: "bool"}


#: a .pte starts with the flatbuffer's root offset (uint32) and file identifier ("ET" and a
#: two-digit version), then ExecuTorch's extended header: magic "eh00", its length (uint32),
#: the program's size, the segments' offset and (from 32 bytes of header on) their size (uint64
#: each, little-endian). See executorch/exir/_serialize/_program.py: _ExtendedHeader.
_PTE_HEAD = 8 + 32


def check_pte_header(path: Path) -> None:
    """Refuse a ``.pte`` whose header ExecuTorch would choke on before reading it: the runtime
    aborts the process (SIGABRT) on a non-UTF-8 file identifier and trusts the declared sizes."""
    import re

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_PTE_HEAD)

    def bad(why: str) -> BundleError:
        return BundleError(f"{path}: not an ExecuTorch program ({why})")

    if len(head) < 8 or not re.fullmatch(rb"ET[0-9]{2}", head[4:8]):
        raise bad("no ET file identifier at bytes 4..8")
    root_offset = int.from_bytes(head[0:4], "little")
    program_size = size
    if head[8:12] == b"eh00":
        if len(head) < 8 + 24:
            raise bad("truncated extended header")
        length = int.from_bytes(head[12:16], "little")
        program_size = int.from_bytes(head[16:24], "little")
        seg_offset = int.from_bytes(head[24:32], "little")
        seg_size = int.from_bytes(head[32:40], "little") if length > 24 and len(head) >= 40 else 0
        if length < 24 or length > 256:
            raise bad(f"extended header length {length}")
        if not 8 + length <= program_size <= size:
            raise bad(f"program size {program_size} against a file of {size} bytes")
        if seg_offset and not (program_size <= seg_offset <= size
                               and seg_offset + seg_size <= size):
            raise bad(f"segments at {seg_offset} (+{seg_size} bytes) against a file of "
                      f"{size} bytes")
    if not 8 <= root_offset < program_size:
        raise bad(f"root offset {root_offset} against a program of {program_size} bytes")


def _native(path: Path, what: str, call: Any) -> Any:
    """``call()`` with ExecuTorch's stderr log held back; its errors as one BundleError."""
    try:
        with captured_stderr(replay=False):
            return call()
    except (RuntimeError, ValueError) as e:
        raise BundleError(f"{path}: {what} ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
                          ) from None


def _share_packed_weights() -> bool:
    """Turn on XNNPACK's weight cache (ExecuTorch's ``weight_cache_enabled`` backend option):
    one packed copy of each weight for every method and delegate partition of every program in
    the process. Without it XNNPACK packs a private copy per partition, and a bundle loads
    several methods over the same weights (``prefill``, ``step``, ``verify``): measured on
    mamba-bytes, its four methods took 20.5 MiB with private copies and 10.6 MiB shared, and
    the drafter's ``draft_loop`` (16 steps, a partition each between the argmaxes) 10.3 MiB and
    1.4 MiB. The cache keys are the named data's SHA-256 digests, so programs cannot mix up
    weights. ExecuTorch's Android and iOS builds enable it; the Python runtime exposes no call
    for it, so it is set through the runtime's C++ ``set_option`` and read back: if either
    is missing or the read-back disagrees, weights stay private (correct, only larger).
    ``EDGESEQ_XNNPACK_WEIGHT_CACHE=0`` keeps them private."""
    global _WEIGHT_CACHE
    if _WEIGHT_CACHE is not None:
        return _WEIGHT_CACHE
    _WEIGHT_CACHE = False
    if os.environ.get("EDGESEQ_XNNPACK_WEIGHT_CACHE", "1") == "0":
        return False
    import ctypes

    lib_path = _executorch_lib("libexecutorch.so")
    if lib_path is None:
        return False
    try:
        lib = ctypes.CDLL(str(lib_path))     # the copy the pybindings already loaded
        set_opt = lib["_ZN10executorch7runtime10set_optionEPKcNS0_4SpanINS0_13BackendOptionEEE"]
        get_opt = lib["_ZN10executorch7runtime10get_optionEPKcNS0_4SpanINS0_13BackendOptionEEE"]
    except (OSError, AttributeError):
        return False
    for f in (set_opt, get_opt):      # (backend name, Span{data, size}): 0 is Error::Ok
        f.restype = ctypes.c_uint32
        f.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]

    def option(value: int) -> Any:
        # BackendOption: char key[64], then std::variant<bool, int, std::array<char, 256>>
        # (256 bytes of storage, then the alternative's index); the buffer is larger than the
        # struct, so a layout that grew would still be read and written inside it
        buf = (ctypes.c_uint8 * 1024)()
        key = b"weight_cache_enabled"
        buf[:len(key)] = key
        buf[64] = value
        buf[64 + 256] = 0          # index 0: bool
        return buf

    if set_opt(b"XnnpackBackend", option(1), 1) != 0:
        return False
    back = option(0)
    if get_opt(b"XnnpackBackend", back, 1) != 0 or back[64] != 1 or back[64 + 256] != 0:
        set_opt(b"XnnpackBackend", option(0), 1)
        return False
    _WEIGHT_CACHE = True
    return True


_WEIGHT_CACHE: bool | None = None


def _set_threads(threads: int | None) -> None:
    """XNNPACK's thread pool is one per process, sized to the cores at first use: resize it when
    the caller asks for a number (``threads`` or ``EDGESEQ_THREADS``), as ORT's sessions are."""
    threads = threads or int(os.environ.get("EDGESEQ_THREADS") or 0) or None
    if not threads:
        return
    try:
        from executorch.extension.pybindings import portable_lib as pl

        if pl._threadpool_get_thread_count() != threads:
            pl._unsafe_reset_threadpool(threads)
    except (ImportError, AttributeError, RuntimeError):
        pass    # an older runtime without the call keeps its pool


def _register_quantized_kernels() -> None:
    """Register ExecuTorch's quantized kernels (``quantized_decomposed::embedding_4bit`` ...) with
    the Python runtime: quantized embeddings run outside XNNPACK, and the pybindings link only the
    portable and optimized kernels. On a device the app links ``quantized_ops_lib`` instead."""
    global _QUANTIZED_KERNELS
    if _QUANTIZED_KERNELS is not None:
        return
    import ctypes

    lib = _executorch_lib("libexecutorch_kernels_quantized.so")
    # RTLD_GLOBAL: its static registrars add the kernels to the runtime's one registry.
    _QUANTIZED_KERNELS = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL) if lib else False


_QUANTIZED_KERNELS: Any = None


def _executorch_lib(name: str) -> Path | None:
    """A shared library shipped in the executorch package's ``lib`` folder, if present."""
    import importlib.util

    spec = importlib.util.find_spec("executorch")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return next((Path(r) / "lib" / name for r in roots if (Path(r) / "lib" / name).is_file()),
                None)


class _EtRunner:
    def __init__(self, entry: GraphEntry, method: Any):
        self.entry = entry
        self.method = method
        self.max_chunk = entry.max_chunk
        # static-length traces (per-position states past the chunk) are cut to the fed length
        self.static = static_traces(entry)
        self.names = [s.name for s in entry.inputs]
        self.batched = [s.shape[:1] == ("batch",) for s in entry.inputs]
        self.n_out = len(entry.outputs)

    def run(self, inputs: dict[str, np.ndarray], state: list) -> tuple[dict[str, np.ndarray], list]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.names]
        rows = next((a.shape[0] for a, b in zip(args, self.batched) if b), 1)
        if rows > 1:
            return self._run_rows(args, self.batched, state, rows)
        out = self.method.execute([*args, *state])
        n = self.n_out
        # The pybindings return clones of the outputs (not views of the method's planned
        # memory, which the next call overwrites): they are the caller's as they are. Copying
        # the traces again into kept buffers (as the ORT runner binds them) cost a copy of
        # chunk x state per call and saved no allocation.
        fed = fed_length(self.entry, inputs) if self.static else 0
        result = {s.name: o.numpy()[:, :fed] if s.name in self.static else o.numpy()
                  for s, o in zip(self.entry.outputs, out[:n])}
        # The state goes back in as the pybindings' clones (``contiguous`` returns the tensor
        # itself when it is in C order, which ExecuTorch's contiguity check on inputs accepts: a
        # Mamba step 218 -> 199 us); ``_tensor`` for empty ones (ExecuTorch's strides)
        return result, [o.contiguous() if o.numel() else _tensor(o.numpy()) for o in out[n:]]

    def _run_rows(self, args: list, batched: list[bool], state: list, rows: int
                  ) -> tuple[dict[str, np.ndarray], list]:
        """The program is planned for batch 1: run a batch (beams) one row at a time."""
        import torch

        outs, states = [], []
        for r in range(rows):
            row_args = [a[r:r + 1] if b else a for a, b in zip(args, batched)]
            o, s = self.run({spec.name: a.numpy() for spec, a in zip(self.entry.inputs, row_args)},
                            [t[r:r + 1] for t in state])
            outs.append(o)
            states.append(s)
        result = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        return result, [torch.cat(parts) for parts in zip(*states)] if states[0] else []


class _EtModel(LoadedModel):
    def from_numpy(self, arrays: list[np.ndarray]) -> list:
        import torch

        return [_tensor(a) for a in arrays]

    def to_numpy(self, state: list) -> list[np.ndarray]:
        return [t.numpy().copy() for t in state]

    def view_numpy(self, state: list) -> list[np.ndarray]:
        return [t.numpy() for t in state]


def _tensor(a: np.ndarray) -> Any:
    """A tensor copy of ``a``. An empty array gets the strides ExecuTorch computes for its shape
    (sizes of 0 count as 1); torch's own would be 0 and fail ExecuTorch's stride check."""
    import torch

    if a.size:
        return torch.from_numpy(np.array(a, copy=True, order="C"))
    strides, acc = [], 1
    for n in reversed(a.shape):
        strides.append(acc)
        acc *= max(n, 1)
    return torch.empty_strided(a.shape, tuple(reversed(strides)),
                               dtype=torch.from_numpy(a).dtype)


@contextmanager
def captured_stderr(replay: bool = True) -> Iterator[None]:
    """Hold back what native code writes to fd 2; replay it only if the body fails (and
    ``replay``: the caller may turn the failure into its own one-line error)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            if replay:
                buf.seek(0)
                sys.stderr.write(buf.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
