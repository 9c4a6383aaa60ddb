"""The LMU's memory update over a chunk of frames: m_t = m_{t-1} Ad^T + u_t Bd^T.

m (r, d) for r independent rows (sequences, or sequences x channels), u (r, l) one scalar input
per row and frame, Ad (d, d) and Bd (d,) the discretised Legendre system (``families/lmu_model.py``:
``legendre_discrete``). Every frame's memory is returned (r, l, d): the LMU's hidden state reads
m_t at each frame. One program per block of rows keeps its (rows, d) memory and Ad^T on chip for
the whole chunk, where a graph does a (d, d) matrix product per frame through memory.
``lmu_memory_ref`` is the PyTorch twin; the test checks it against the family's FFT filter.
"""
from __future__ import annotations

import torch

from edgeseq.kernels import triton_env

# tl.dot's smallest tile
BLOCK_R = 16


def lmu_memory_ref(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m0: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(every memory (r, l, d), the last (r, d))."""
    m, ms = m0, []
    for t in range(u.shape[1]):
        m = m @ A.T + u[:, t, None] * B
        ms.append(m)
    return torch.stack(ms, 1), m


if triton_env.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _lmu_kernel(u_ptr, at_ptr, b_ptr, m0_ptr, ms_ptr, m_ptr, R, L, D,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        ds = tl.arange(0, BLOCK_D)
        mr, md = rs < R, ds < D
        m2 = mr[:, None] & md[None, :]
        at = tl.load(at_ptr + ds[:, None] * D + ds[None, :], mask=md[:, None] & md[None, :],
                     other=0.0)
        bv = tl.load(b_ptr + ds, mask=md, other=0.0)
        m = tl.load(m0_ptr + rs[:, None] * D + ds[None, :], mask=m2, other=0.0)
        for t in range(L):
            ut = tl.load(u_ptr + rs * L + t, mask=mr, other=0.0)
            # fp32 products throughout: the memory is a long recurrence (tf32 would drift)
            m = tl.dot(m, at, input_precision="ieee") + ut[:, None] * bv[None, :]
            tl.store(ms_ptr + (rs[:, None] * L + t) * D + ds[None, :], m, mask=m2)
        tl.store(m_ptr + rs[:, None] * D + ds[None, :], m, mask=m2)


def lmu_memory(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m0: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel; the same arguments and results as ``lmu_memory_ref`` (fp32)."""
    import triton

    triton_env.check_device(u, A, B, m0)
    r, l = u.shape
    d = A.shape[0]
    u, at, B, m0 = u.contiguous().float(), A.T.contiguous().float(), B.contiguous().float(), \
        m0.contiguous().float()
    ms = torch.empty(r, l, d, dtype=u.dtype, device=u.device)
    m = torch.empty_like(m0)
    _lmu_kernel[(triton.cdiv(r, BLOCK_R),)](u, at, B.reshape(-1), m0, ms, m, r, l, d,
                                            BLOCK_R=BLOCK_R,
                                            BLOCK_D=max(16, triton.next_power_of_2(d)))
    return ms, m
