"""Mamba-2's scan (SSD: a scalar decay per head) over a chunk, in the layout of edgeseq's graphs.

h_t = exp(dt_t A) h_{t-1} + (dt_t x_t) B_t^T,   y_t = h_t C_t + D x_t

per head, with h (b, h, p, n) as ``families/mamba2.py`` keeps it: x (b, l, h, p); dt (b, l, h);
A (h,) (``-exp(A_log)``); B, C (b, l, h, n) (the groups already expanded to heads); D (h,).

The graphs run a chunk in SSD's closed form (an (l, l) decay matrix per head), which is the right
shape for a GPU's matrix units over long chunks; decoding and verification are chunks of 1-32
positions, where one program per (sequence, head, block of p) carrying its (block, n) state
across the positions reads the state once per call. ``ssd_scan_ref`` is the sequential PyTorch
twin; the test also checks it against the family's closed form.
"""
from __future__ import annotations

import torch

from edgeseq.kernels import triton_env

BLOCK_P = 32


def ssd_scan_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor | None, h0: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (b, l, h, p), last state (b, h, p, n))."""
    h, ys = h0, []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, h, 1, 1)
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + D[:, None] * x
    return y, h


if triton_env.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _ssd_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, h0_ptr, y_ptr, h_ptr,
                    L, H, P, N, HAS_D: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        ns = tl.arange(0, BLOCK_N)
        mp, mn = ps < P, ns < N
        m2 = mp[:, None] & mn[None, :]
        state = ((seq * H + head) * P + ps[:, None]) * N + ns[None, :]
        h = tl.load(h0_ptr + state, mask=m2, other=0.0)
        a = tl.load(a_ptr + head)
        if HAS_D:
            d = tl.load(d_ptr + head)
        for t in range(L):
            row = (seq * L + t) * H + head
            xt = tl.load(x_ptr + row * P + ps, mask=mp, other=0.0)
            dtt = tl.load(dt_ptr + row)
            bt = tl.load(b_ptr + row * N + ns, mask=mn, other=0.0)
            ct = tl.load(c_ptr + row * N + ns, mask=mn, other=0.0)
            h = tl.exp(dtt * a) * h + (dtt * xt)[:, None] * bt[None, :]
            y = tl.sum(h * ct[None, :], axis=1)
            if HAS_D:
                y += d * xt
            tl.store(y_ptr + row * P + ps, y, mask=mp)
        tl.store(h_ptr + state, h, mask=m2)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor | None, h0: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel; the same arguments and results as ``ssd_scan_ref`` (fp32)."""
    import triton

    triton_env.check_device(x, dt, A, B, C, D, h0)
    b, l, nh, p = x.shape
    n = B.shape[-1]
    x, dt, A, B, C, h0 = (t.contiguous().float() for t in (x, dt, A, B, C, h0))
    y = torch.empty_like(x)
    h = torch.empty_like(h0)
    d = D.contiguous().float() if D is not None else A
    grid = (b, nh, triton.cdiv(p, BLOCK_P))
    _ssd_kernel[grid](x, dt, A, B, C, d, h0, y, h, l, nh, p, n, HAS_D=D is not None,
                      BLOCK_P=BLOCK_P, BLOCK_N=triton.next_power_of_2(n))
    return y, h
