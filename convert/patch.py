"""Export-friendly module patches, applied only while a graph is being exported.

``flat_linear``: ``nn.Linear`` on a (b, l, d) input exports as ``MatMul`` against a transposed
copy of the weight, while on (b, d) it exports as ``Gemm(transB=1)`` against the weight as stored.
A prefill graph and a step graph would then carry two layouts of every weight, which the bundle
could not store once. Flattening the leading dims makes every graph read the same layout.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _flat_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dim() <= 2:
        return F.linear(x, self.weight, self.bias)
    y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@contextmanager
def flat_linear() -> Iterator[None]:
    original = nn.Linear.forward
    nn.Linear.forward = _flat_linear_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Linear.forward = original  # type: ignore[method-assign]
