"""Mamba's selective scan over a chunk of positions, in the layout of edgeseq's Mamba graphs.

h_t = exp(dt_t * A) * h_{t-1} + B_t (dt_t x_t),   y_t = C_t . h_t + D x_t

with the state channels last, h (b, n, e), as ``families/mamba.py`` keeps it: dt, x (b, l, e);
B, C (b, l, n); A (n, e) (already ``-exp(A_log)``, transposed); D (e,). A decoding step is the
chunk of one position. With ``trace`` every position's state is returned too (b, l, n, e): the
speculative ``verify`` graph rolls back to an accepted prefix by slicing it.

``selective_scan`` is the fused kernel: one program per (sequence, block of channels) keeps its
(n, block) slice of the state in registers for the whole chunk, so the state is read once and
written once per call, where the graph's form reads and writes it at every position (five small
operators a position a layer, the dispatch cost that makes a 16-token ``verify`` cost 4+ steps on
a CPU). ``selective_scan_ref`` is its plain PyTorch twin.
"""
from __future__ import annotations

import torch

from edgeseq.kernels import triton_env

# the block of channels one program owns: a (n, 64) fp32 state is 4 KiB of registers at n = 16
BLOCK_E = 64


def selective_scan_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor, D: torch.Tensor | None, h0: torch.Tensor,
                       trace: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(y (b, l, e), last state (b, n, e), every state (b, l, n, e) with ``trace``)."""
    h, ys, hs = h0, [], []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, None, :] * A) * h + B[:, t, :, None] * (dt[:, t] * x[:, t])[:, None]
        ys.append(torch.einsum("bn,bne->be", C[:, t], h))
        if trace:
            hs.append(h)
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + D * x
    return y, h, (torch.stack(hs, 1) if trace else None)


if triton_env.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _scan_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, h0_ptr, y_ptr, h_ptr, tr_ptr,
                     L, N, E, HAS_D: tl.constexpr, TRACE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
        seq = tl.program_id(0)
        es = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        ns = tl.arange(0, BLOCK_N)
        me, mn = es < E, ns < N
        m2 = mn[:, None] & me[None, :]
        ne = ns[:, None] * E + es[None, :]
        a = tl.load(a_ptr + ne, mask=m2, other=0.0)
        h = tl.load(h0_ptr + seq * N * E + ne, mask=m2, other=0.0)
        if HAS_D:
            d = tl.load(d_ptr + es, mask=me, other=0.0)
        for t in range(L):
            row = (seq * L + t)
            xt = tl.load(x_ptr + row * E + es, mask=me, other=0.0)
            dtt = tl.load(dt_ptr + row * E + es, mask=me, other=0.0)
            bt = tl.load(b_ptr + row * N + ns, mask=mn, other=0.0)
            ct = tl.load(c_ptr + row * N + ns, mask=mn, other=0.0)
            h = tl.exp(dtt[None, :] * a) * h + bt[:, None] * (dtt * xt)[None, :]
            y = tl.sum(ct[:, None] * h, axis=0)
            if HAS_D:
                y += d * xt
            tl.store(y_ptr + row * E + es, y, mask=me)
            if TRACE:
                tl.store(tr_ptr + row * N * E + ne, h, mask=m2)
        tl.store(h_ptr + seq * N * E + ne, h, mask=m2)


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor | None, h0: torch.Tensor,
                   trace: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The fused kernel; the same arguments and results as ``selective_scan_ref`` (fp32)."""
    import triton

    triton_env.check_device(x, dt, A, B, C, D, h0)
    b, l, e = x.shape
    n = A.shape[0]
    x, dt, A, B, C, h0 = (t.contiguous().float() for t in (x, dt, A, B, C, h0))
    y = torch.empty_like(x)
    h = torch.empty_like(h0)
    tr = torch.empty(b, l, n, e, dtype=x.dtype, device=x.device) if trace else h
    d = D.contiguous().float() if D is not None else x
    grid = (b, triton.cdiv(e, BLOCK_E))
    _scan_kernel[grid](x, dt, A, B, C, d, h0, y, h, tr, l, n, e, HAS_D=D is not None,
                       TRACE=trace, BLOCK_N=triton.next_power_of_2(n), BLOCK_E=BLOCK_E)
    return y, h, (tr if trace else None)
