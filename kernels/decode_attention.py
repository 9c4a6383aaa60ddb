"""Split-K decode attention: one query per sequence and head against a long key/value cache.

out = softmax(q K^T * scale + bias) V for q (b, h, k), K, V (b, h, s, k), bias (b, s) additive
(the padding mask of the cross-attention, or the future slots of a fixed-capacity cache; None
for none). The keys may also be given transposed, (b, h, k, s), as edgeseq's graphs store the
cross-attention keys (``families/seq2seq.py``): only the strides differ.

A decoding step has one query row, so a kernel with one program per (sequence, head) leaves a
GPU nearly idle on a long cache. Split-K (flash-decoding; Lean Attention balances the same
partial results across units) gives each program a slice of the keys: it writes its slice's
running max, sum of exponentials and weighted values, and a second kernel combines the slices
with the log-sum-exp rule. ``decode_attention_ref`` is the PyTorch twin (the graphs' own
``attend``).
"""
from __future__ import annotations

import math

import torch

from edgeseq.kernels import triton_env

# keys per tile inside a split; a split covers one or more tiles
BLOCK_S = 32


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         bias: torch.Tensor | None = None, keys_transposed: bool = False
                         ) -> torch.Tensor:
    """(b, h, k) attention output, in the form the decoder graphs compute it."""
    kt = k if keys_transposed else k.transpose(-1, -2)
    scores = torch.matmul(q.unsqueeze(2), kt).squeeze(2) * scale  # (b, h, s)
    if bias is not None:
        scores = scores + bias[:, None, :]
    return torch.matmul(torch.softmax(scores, -1).unsqueeze(2), v).squeeze(2)


if triton_env.has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _partial_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, mx_ptr, sm_ptr, acc_ptr,
                        H, S, K, SPLIT, scale,
                        sk_b, sk_h, sk_s, sk_k, sv_b, sv_h, sv_s,
                        HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        nsplit = tl.num_programs(1)
        b = bh // H
        hh = bh % H
        ks = tl.arange(0, BLOCK_K)
        mk = ks < K
        q = tl.load(q_ptr + bh * K + ks, mask=mk, other=0.0)
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        start = sp * SPLIT
        for s0 in range(start, start + SPLIT, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            ms = (ss < S) & (ss < start + SPLIT)
            kp = k_ptr + b * sk_b + hh * sk_h + ss[:, None] * sk_s + ks[None, :] * sk_k
            kk = tl.load(kp, mask=ms[:, None] & mk[None, :], other=0.0)
            s = tl.sum(kk * q[None, :], axis=1) * scale
            if HAS_BIAS:
                s += tl.load(bias_ptr + b * S + ss, mask=ms, other=0.0)
            s = tl.where(ms, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            # a slice whose keys are all past the end keeps m = -inf: no exp(-inf - -inf)
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            p = tl.exp(s - m_safe)
            alpha = tl.exp(m_i - m_safe)
            vp = v_ptr + b * sv_b + hh * sv_h + ss[:, None] * sv_s + ks[None, :]
            vv = tl.load(vp, mask=ms[:, None] & mk[None, :], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * vv, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        out = bh * nsplit + sp
        tl.store(mx_ptr + out, m_i)
        tl.store(sm_ptr + out, l_i)
        tl.store(acc_ptr + out * K + ks, acc, mask=mk)

    @triton.jit
    def _combine_kernel(mx_ptr, sm_ptr, acc_ptr, o_ptr, K, NSPLIT: tl.constexpr,
                        BLOCK_K: tl.constexpr):
        bh = tl.program_id(0)
        ks = tl.arange(0, BLOCK_K)
        mk = ks < K
        sp = tl.arange(0, NSPLIT)
        mx = tl.load(mx_ptr + bh * NSPLIT + sp)
        sm = tl.load(sm_ptr + bh * NSPLIT + sp)
        m = tl.max(mx, axis=0)
        w = tl.where(mx == -float("inf"), 0.0, tl.exp(mx - m))
        acc = tl.load(acc_ptr + (bh * NSPLIT + sp)[:, None] * K + ks[None, :],
                      mask=mk[None, :], other=0.0)
        o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * sm, axis=0)
        tl.store(o_ptr + bh * K + ks, o, mask=mk)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     bias: torch.Tensor | None = None, keys_transposed: bool = False,
                     splits: int | None = None) -> torch.Tensor:
    """The split-K kernels; the same arguments and result as ``decode_attention_ref`` (fp32).
    ``splits`` (a power of two) defaults to enough slices of ``BLOCK_S`` keys to reach ~16."""
    import triton

    triton_env.check_device(q, k, v, bias)
    b, h, kd = q.shape
    s = v.shape[2]
    if splits is None:
        splits = min(16, triton.next_power_of_2(max(1, math.ceil(s / BLOCK_S))))
    split = math.ceil(s / splits)
    q, v = q.contiguous().float(), v.contiguous().float()
    k = k.float()
    # strides of K as (b, h, s, k), whichever way it is stored
    sk = k.stride()
    sk_b, sk_h, sk_s, sk_k = (sk[0], sk[1], sk[3], sk[2]) if keys_transposed else sk
    bias_t = bias.contiguous().float() if bias is not None else q
    mx = torch.empty(b * h * splits, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    acc = torch.empty(b * h * splits, kd, dtype=torch.float32, device=q.device)
    bk = triton.next_power_of_2(kd)
    _partial_kernel[(b * h, splits)](q, k, v, bias_t, mx, sm, acc, h, s, kd, split, scale,
                                     sk_b, sk_h, sk_s, sk_k, v.stride(0), v.stride(1),
                                     v.stride(2), HAS_BIAS=bias is not None,
                                     BLOCK_S=BLOCK_S, BLOCK_K=bk)
    out = torch.empty(b, h, kd, dtype=torch.float32, device=q.device)
    _combine_kernel[(b * h,)](mx, sm, acc, out, kd, NSPLIT=splits, BLOCK_K=bk)
    return out
