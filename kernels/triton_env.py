"""Where the Triton kernels run: a CUDA GPU, or Triton's interpreter on the CPU.

Triton decides between compiling and interpreting when a function is *decorated* (``triton.jit``
reads ``TRITON_INTERPRET`` then, for its own ``tl.*`` library too, at its import), so the choice
is made here, once, before any kernel module imports triton (the test suite sets it at its
start, since torch may import triton first; ``TOO_LATE`` says when that happened): without a CUDA device the interpreter is switched on, which runs the same
kernel source with NumPy on CPU tensors. That is how CI (never a GPU) checks every kernel
against its ``_ref`` twin; the interpreter is for correctness only, never for speed.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch


def has_triton() -> bool:
    """Whether the ``triton`` package is importable (the ``dev`` extra installs it)."""
    return importlib.util.find_spec("triton") is not None


def has_gpu() -> bool:
    return torch.cuda.is_available()


def interpreting() -> bool:
    """True when kernels run under Triton's interpreter (no GPU, or asked for)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


#: triton was imported (its own ``tl.*`` functions compiled for a GPU) before this module could
#: switch the interpreter on: kernels cannot run on the CPU in this process
TOO_LATE = not has_gpu() and "triton" in sys.modules and \
    os.environ.get("TRITON_INTERPRET") != "1"

if not has_gpu():
    # must precede the first import of triton in the process (see the module's docstring)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels take CUDA tensors on a GPU and CPU tensors under the interpreter; one line
    otherwise, rather than Triton's pointer errors."""
    if TOO_LATE:
        raise RuntimeError("edgeseq.kernels: triton was imported before edgeseq.kernels without "
                           "TRITON_INTERPRET=1 and there is no GPU; set TRITON_INTERPRET=1 in "
                           "the environment to run the kernels on the CPU")
    want = "cpu" if interpreting() else "cuda"
    for t in tensors:
        if t is not None and t.device.type != want:
            raise ValueError(f"edgeseq.kernels: tensors must be on {want} here "
                             f"({'interpreter' if want == 'cpu' else 'GPU'}), got {t.device}")
