"""The fused kernels of ``edgeseq.kernels`` against their ``_ref`` twins, and each twin against
the maths the family's graphs run (so a twin that drifted from the graphs fails here too).

Without a GPU the kernels run under Triton's interpreter on the CPU (``kernels/triton_env.py``);
on a GPU the same tests run the compiled kernels on CUDA tensors.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from edgeseq.kernels import triton_env
from edgeseq.kernels.decode_attention import decode_attention, decode_attention_ref
from edgeseq.kernels.lmu_memory import lmu_memory, lmu_memory_ref
from edgeseq.kernels.selective_scan import selective_scan, selective_scan_ref
from edgeseq.kernels.ssd_scan import ssd_scan, ssd_scan_ref

needs_triton = pytest.mark.skipif(not triton_env.has_triton(), reason="triton not installed")
DEV = "cpu" if triton_env.interpreting() else "cuda"


def _dev(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.to(DEV) if t is not None else None for t in ts]


def _mamba_inputs(b: int, l: int, n: int, e: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, e, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, l, e, generator=g) - 1)
    A = -torch.exp(torch.randn(n, e, generator=g) * 0.5)
    B = torch.randn(b, l, n, generator=g)
    C = torch.randn(b, l, n, generator=g)
    D = torch.randn(e, generator=g)
    h0 = torch.randn(b, n, e, generator=g)
    return [x, dt, A, B, C, D, h0]


@pytest.mark.parametrize("trace", [False, True])
def test_selective_scan_ref_is_the_mamba_graphs_scan(trace: bool) -> None:
    from edgeseq.families.mamba import MambaPrefill

    x, dt, A, B, C, D, h0 = _mamba_inputs(2, 7, 16, 40, seed=0)
    # the graph's scan over a static length of 8 with a 7-token chunk: the padded position
    # must leave the state alone, as the kernel (which has no padding) does
    graph = SimpleNamespace(length=8, trace=trace, scan_op=False,
                            _static_scan=lambda *a: MambaPrefill._static_scan(graph, *a))
    y_g, states_g, last_g = MambaPrefill._scan(graph, dt, dt * x, B, C, A, h0)
    y, last, states = selective_scan_ref(x, dt, A, B, C, None, h0, trace=trace)
    torch.testing.assert_close(y, y_g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_g, rtol=1e-5, atol=1e-5)
    if trace:
        torch.testing.assert_close(states, states_g[:, :7], rtol=1e-5, atol=1e-5)
    else:
        # the scan as torch's scan operator (ONNX Runtime's prefill: an ONNX Scan)
        y_s, _, last_s = MambaPrefill._scanned(dt, dt * x, B, C, A, h0)
        torch.testing.assert_close(y, y_s, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last, last_s, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("b,l,n,e,trace", [(1, 1, 16, 64, False), (2, 16, 16, 100, True),
                                           (3, 5, 10, 33, False)])
def test_selective_scan_kernel(b: int, l: int, n: int, e: int, trace: bool) -> None:
    args = _mamba_inputs(b, l, n, e, seed=b + l)
    y_r, h_r, tr_r = selective_scan_ref(*args, trace=trace)
    y, h, tr = selective_scan(*_dev(*args), trace=trace)
    torch.testing.assert_close(y.cpu(), y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.cpu(), h_r, rtol=1e-5, atol=1e-5)
    if trace:
        torch.testing.assert_close(tr.cpu(), tr_r, rtol=1e-5, atol=1e-5)
    # without D the output is the pure C.h read-out
    y0, _, _ = selective_scan(*_dev(*args[:5], None, args[6]))
    torch.testing.assert_close(y0.cpu(), y_r - args[5] * args[0], rtol=1e-4, atol=1e-4)


def _ssd_inputs(b: int, l: int, h: int, p: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=g) - 1)
    A = -torch.exp(torch.randn(h, generator=g) * 0.5)
    B = torch.randn(b, l, h, n, generator=g)
    C = torch.randn(b, l, h, n, generator=g)
    D = torch.randn(h, generator=g)
    h0 = torch.randn(b, h, p, n, generator=g)
    return [x, dt, A, B, C, D, h0]


def test_ssd_scan_ref_is_the_mamba2_graphs_closed_form() -> None:
    from edgeseq.families.mamba2 import ssd_chunk

    x, dt, A, B, C, D, h0 = _ssd_inputs(2, 9, 3, 8, 16, seed=1)
    t = torch.arange(9)
    y_g, h_g = ssd_chunk(x.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2),
                         C.transpose(1, 2), D, h0, t[:, None] >= t[None], t[:, None] > t[None])
    y, h = ssd_scan_ref(x, dt, A, B, C, D, h0)
    torch.testing.assert_close(y, y_g.transpose(1, 2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_g, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("b,l,h,p,n", [(1, 1, 4, 16, 16), (2, 12, 3, 40, 12)])
def test_ssd_scan_kernel(b: int, l: int, h: int, p: int, n: int) -> None:
    args = _ssd_inputs(b, l, h, p, n, seed=l)
    y_r, h_r = ssd_scan_ref(*args)
    y, hh = ssd_scan(*_dev(*args))
    torch.testing.assert_close(y.cpu(), y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hh.cpu(), h_r, rtol=1e-5, atol=1e-5)


def _legendre(order: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    from edgeseq.families.lmu_model import legendre_discrete

    a, b = legendre_discrete(order, theta)
    return torch.from_numpy(a).float(), torch.from_numpy(b).float().reshape(-1)


def test_lmu_memory_ref_is_the_lmu_filter() -> None:
    from edgeseq.families.lmu_model import fft_memory

    A, B = _legendre(12, 20.0)
    u = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    ms, last = lmu_memory_ref(u, A, B, torch.zeros(3, 12))
    # the family's reference: the exact LTI filter of u, by FFT in float64
    want = fft_memory(u.unsqueeze(-1), A, B.reshape(-1, 1))
    torch.testing.assert_close(ms, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last, want[:, -1], rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("r,l,d", [(1, 1, 16), (5, 9, 12), (20, 4, 33)])
def test_lmu_memory_kernel(r: int, l: int, d: int) -> None:
    A, B = _legendre(d, 16.0)
    g = torch.Generator().manual_seed(r)
    u, m0 = torch.randn(r, l, generator=g), torch.randn(r, d, generator=g)
    ms_r, m_r = lmu_memory_ref(u, A, B, m0)
    ms, m = lmu_memory(*_dev(u, A, B, m0))
    torch.testing.assert_close(ms.cpu(), ms_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.cpu(), m_r, rtol=1e-5, atol=1e-5)


def test_decode_attention_ref_is_the_graphs_attention() -> None:
    from edgeseq.families.seq2seq import attend, attend_t, mask_bias

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, s, 16, generator=g) for s in (1, 37, 37))
    mask = torch.ones(2, 37, dtype=torch.int64)
    mask[1, 30:] = 0
    bias = mask_bias(mask, torch.float32)
    want = attend(q, k, v, 0.25, bias).squeeze(2)
    got = decode_attention_ref(q.squeeze(2), k, v, 0.25, bias[:, 0, 0])
    torch.testing.assert_close(got, want)
    kt = k.transpose(-1, -2).contiguous()  # the stored layout of the cross keys
    torch.testing.assert_close(decode_attention_ref(q.squeeze(2), kt, v, 0.25, bias[:, 0, 0],
                                                    keys_transposed=True),
                               attend_t(q, kt, v, 0.25, bias).squeeze(2))


@needs_triton
@pytest.mark.parametrize("s,splits,transposed,masked", [(1, None, False, False),
                                                        (37, None, True, True),
                                                        (200, 8, False, True),
                                                        (50, 16, False, False)])
def test_decode_attention_kernel(s: int, splits: int | None, transposed: bool,
                                 masked: bool) -> None:
    g = torch.Generator().manual_seed(s)
    b, h, kd = 2, 3, 24
    q = torch.randn(b, h, kd, generator=g)
    k = torch.randn(b, h, s, kd, generator=g)
    v = torch.randn(b, h, s, kd, generator=g)
    bias = None
    if masked:
        # the second sequence's last third is padding, as a cross-attention mask makes it
        bias = torch.zeros(b, s)
        bias[1, s - s // 3:] = torch.finfo(torch.float32).min
    if transposed:
        k = k.transpose(-1, -2).contiguous()
    want = decode_attention_ref(q, k, v, 1 / math.sqrt(kd), bias, keys_transposed=transposed)
    got = decode_attention(*_dev(q, k, v), 1 / math.sqrt(kd), *_dev(bias),
                           keys_transposed=transposed, splits=splits)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@needs_triton
def test_kernels_refuse_tensors_on_the_wrong_device() -> None:
    if DEV == "cuda":
        pytest.skip("the interpreter's device rule")
    args = _mamba_inputs(1, 2, 4, 8, seed=0)
    args[0] = args[0].to("meta")
    with pytest.raises(ValueError, match="must be on cpu"):
        selective_scan(*args)
