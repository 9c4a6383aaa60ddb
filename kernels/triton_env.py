"""Where the Triton kernels run: a CUDA GPU, or Triton's interpreter on the CPU.

Triton decides between compiling and interpreting when a kernel is *decorated* (``triton.jit``
reads ``TRITON_INTERPRET`` then), so the choice is made here, once, before any kernel module
defines its kernels: without a CUDA device the interpreter is switched on, which runs the same
kernel source with NumPy on CPU tensors. That is how CI (never a GPU) checks every kernel
against its ``_ref`` twin; the interpreter is for correctness only, never for speed.
"""
from __future__ import annotations

import importlib.util
import os

import torch


def has_triton() -> bool:
    """Whether the ``triton`` package is importable (the ``dev`` extra installs it)."""
    return importlib.util.find_spec("triton") is not None


def has_gpu() -> bool:
    return torch.cuda.is_available()


def interpreting() -> bool:
    """True when kernels run under Triton's interpreter (no GPU, or asked for)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


if not has_gpu():
    # must precede the first ``triton.jit`` of the process (see the module's docstring)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels take CUDA tensors on a GPU and CPU tensors under the interpreter; one line
    otherwise, rather than Triton's pointer errors."""
    want = "cpu" if interpreting() else "cuda"
    for t in tensors:
        if t is not None and t.device.type != want:
            raise ValueError(f"edgeseq.kernels: tensors must be on {want} here "
                             f"({'interpreter' if want == 'cpu' else 'GPU'}), got {t.device}")
