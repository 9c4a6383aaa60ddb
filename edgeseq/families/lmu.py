"""Legendre Memory Units and LMUFormer (spiking and not) as O(1)-per-frame streaming graphs.

* LMU: Voelker, Kajić & Eliasmith, "Legendre Memory Units: Continuous-Time Representation in
  Recurrent Neural Networks" (NeurIPS 2019). A memory of order d holds a sliding window of length
  theta of a scalar signal u as the coefficients of its Legendre expansion: theta m' = A m + B u,
  discretised here by zero-order hold (exactly, through a matrix exponential).
* Parallel LMU training: Chilkuri & Eliasmith, "Parallelizing Legendre Memory Unit Training"
  (ICML 2021): without feedback from h or m into u, the memory is a causal convolution of u with
  the impulse response H[:, t] = Ad^t Bd, computed by FFT.
* LMUFormer: Liu, Datta, Han & Beerel, "LMUFormer: Low Complexity Yet Powerful Spiking Model With
  Legendre Memory Units" (ICLR 2024): a convolutional patch embedding, an LMU token mixer and a
  convolutional channel mixer with residuals, optionally with multi-step leaky integrate-and-fire
  (LIF) neurons in place of activations. Its "recurrent" evaluation recomputes the prefix at every
  frame; the streaming graphs here carry every causal quantity as explicit state instead.

Module and parameter names follow the official implementation (github.com/zeyuliu1037/LMUFormer,
``lmu_rnn_conv1d`` and ``slmu_rnn_conv1d``), so its state dicts load (``A``, ``B``, ``H``, ``fft_H``
buffers included): its training script's ``best_model.pth`` converts as the file itself, the sizes
read from the weights and the rest taken in upstream's argument names (``_infer_config``). The LIF neuron is spikingjelly's ``MultiStepLIFNode`` (decay_input, hard reset
to 0, Heaviside spike with a sigmoid surrogate gradient) in plain PyTorch.

Streaming: the patch embedding's kernel-3 convolutions are centred (padding 1), so each looks one
frame ahead; the step graph outputs frame t - L after reading frame t, with L (the manifest's
``lookahead``) the number of such convolutions in the chain. Every convolution keeps a window of
its last two inputs as state, with a validity mask flowing beside the data, so the zero padding of
the parallel model is reproduced exactly at both ends: frames before the first are invalid (the
initial state), and L "flush" frames marked invalid finish the sequence. Causal state (LMU memory,
LIF membranes, the running mean of the classification head) only advances on valid frames.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeseq.bundle import BundleError, StateSpec, StreamingGraph, TensorSpec
from edgeseq.checkpoint import load_into, load_state_dict, read_config
from edgeseq.families.base import Family, config_from_dict
from edgeseq.registry import register_family

DEFAULT_CHUNK = 8


# -- the Legendre delay system ---------------------------------------------------------------------
def legendre_continuous(order: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Continuous (A, B) of the Legendre delay system, float64: theta m' = A m + B u, folded 1/theta."""
    q = np.arange(order, dtype=np.float64)
    r = (2 * q + 1)[:, None] / theta
    i, j = np.meshgrid(q, q, indexing="ij")
    a = r * np.where(i < j, -1.0, (-1.0) ** (i - j + 1))
    b = r * ((-1.0) ** q)[:, None]
    return a, b


def zoh(a: np.ndarray, b: np.ndarray, dt: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Zero-order-hold discretisation: exp([[A, B], [0, 0]] dt) = [[Ad, Bd], [0, I]]."""
    n, m = a.shape[0], b.shape[1]
    block = np.zeros((n + m, n + m))
    block[:n, :n], block[:n, n:] = a * dt, b * dt
    e = torch.linalg.matrix_exp(torch.from_numpy(block)).numpy()
    return e[:n, :n], e[:n, n:]


def legendre_discrete(order: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(Ad (d, d), Bd (d, 1)) in float64, as ``scipy.signal.cont2discrete(..., method="zoh")``."""
    return zoh(*legendre_continuous(order, theta))


def impulse_response(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """H[:, t] = Ad^t Bd for t < n, (d, n) float64."""
    out = np.empty((a.shape[0], n))
    v = b[:, 0].copy()
    for t in range(n):
        out[:, t] = v
        v = a @ v
    return out


# -- spiking neurons -------------------------------------------------------------------------------
class _Spike(torch.autograd.Function):
    """Heaviside forward (x >= 0), sigmoid surrogate gradient (spikingjelly's default, alpha 4)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(4.0 * x)
        return grad * 4.0 * s * (1 - s)


def spike(x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _Spike.apply(x)
    return (x >= 0).to(x.dtype)


class LIF(nn.Module):
    """Multi-step leaky integrate-and-fire neuron over the time axis (dim 1 of (b, t, c)).

    v <- v + (x - v) / tau; s = [v >= v_threshold]; v <- v (1 - s) (hard reset to 0; the reset
    is detached from the graph in training, as spikingjelly's ``detach_reset=True``).
    """

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0):
        super().__init__()
        self.tau = float(tau)
        self.v_threshold = float(v_threshold)

    def step(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = v + (x - v) / self.tau
        s = spike(v - self.v_threshold)
        return s, v * (1 - s.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x[:, 0])
        out = []
        for t in range(x.shape[1]):
            s, v = self.step(x[:, t], v)
            out.append(s)
        return torch.stack(out, 1)


def _lif_bcn(lif: LIF, x: torch.Tensor) -> torch.Tensor:
    """LIF over the time axis of a (b, c, n) tensor."""
    return lif(x.transpose(1, 2)).transpose(1, 2)


# -- LMU cells -------------------------------------------------------------------------------------
class LMUCell(nn.Module):
    """The LMU of Voelker et al. (2019) in its general recurrent form.

    u_t = e_x x_t + e_h h_{t-1} + e_m m_{t-1};  m_t = Ad m_{t-1} + Bd u_t;
    h_t = f(W_x x_t + W_h h_{t-1} + W_m m_t).
    Encoders ``e_*`` and kernels ``W_*`` are learned; a disabled connection is absent. Without the
    h->u, m->u and h->h connections the memory is an LTI filter of x and ``forward`` runs it in
    parallel (FFT); ``forward_recurrent`` always steps.
    """

    def __init__(self, input_size: int, hidden_size: int, order: int, theta: float,
                 hidden_to_memory: bool = False, memory_to_memory: bool = False,
                 hidden_to_hidden: bool = False):
        super().__init__()
        self.order, self.hidden_size = order, hidden_size
        self.e_x = nn.Linear(input_size, 1, bias=False)
        self.e_h = nn.Linear(hidden_size, 1, bias=False) if hidden_to_memory else None
        self.e_m = nn.Linear(order, 1, bias=False) if memory_to_memory else None
        self.W_x = nn.Linear(input_size, hidden_size)
        self.W_h = nn.Linear(hidden_size, hidden_size, bias=False) if hidden_to_hidden else None
        self.W_m = nn.Linear(order, hidden_size, bias=False)
        a, b = legendre_discrete(order, theta)
        self.register_buffer("A", torch.from_numpy(a).float())
        self.register_buffer("B", torch.from_numpy(b).float())

    @property
    def parallel(self) -> bool:
        return self.e_h is None and self.e_m is None and self.W_h is None

    def step(self, x: torch.Tensor, h: torch.Tensor, m: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.e_x(x)
        if self.e_h is not None:
            u = u + self.e_h(h)
        if self.e_m is not None:
            u = u + self.e_m(m)
        m = m @ self.A.T + u @ self.B.T
        pre = self.W_x(x) + self.W_m(m)
        if self.W_h is not None:
            pre = pre + self.W_h(h)
        return torch.tanh(pre), m

    def forward_recurrent(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h, m = x.new_zeros(b, self.hidden_size), x.new_zeros(b, self.order)
        out = []
        for t in range(x.shape[1]):
            h, m = self.step(x[:, t], h, m)
            out.append(h)
        return torch.stack(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.parallel:
            return self.forward_recurrent(x)
        m = fft_memory(self.e_x(x), self.A, self.B)
        return torch.tanh(self.W_x(x) + self.W_m(m))


def fft_memory(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               h: torch.Tensor | None = None) -> torch.Tensor:
    """m_t = sum_{s<=t} Ad^(t-s) Bd u_s for u (batch, n, 1) -> (batch, n, d), by FFT.

    ``h`` is a stored impulse response (d, >= n) to reuse; computed in float64 otherwise. Outside
    training the convolution runs in float64, so the reference is the exact filter and a
    streaming graph's error is its own.
    """
    n = u.shape[1]
    if h is None or h.shape[1] < n:
        h = torch.from_numpy(impulse_response(a.double().cpu().numpy(), b.double().cpu().numpy(), n))
    h = h[:, :n].to(u.device)
    dtype = u.dtype if torch.is_grad_enabled() and u.requires_grad else torch.float64
    uf = torch.fft.rfft(u.transpose(1, 2).to(dtype), n=2 * n)  # (b, 1, n+1)
    hf = torch.fft.rfft(h.to(dtype), n=2 * n)  # (d, n+1)
    m = torch.fft.irfft(uf * hf.unsqueeze(0), n=2 * n)[..., :n]  # (b, d, n)
    return m.transpose(1, 2).to(u.dtype)


class LMUFFTCell(nn.Module):
    """LMUFormer's LMU (parallel form): u = f_u(W_u x), m = H * u, h = f_h(W_h [m; x]).

    ``A``, ``B`` (discrete), ``H`` (impulse response for ``seq_len`` steps) and ``fft_H`` are
    buffers, as in the official implementation. The spiking variant puts batch norm and a LIF
    neuron after each of u, m and h.
    """

    def __init__(self, input_size: int, hidden_size: int, memory_size: int, seq_len: int,
                 theta: float, spiking: bool = False, tau: float = 2.0, v_threshold: float = 1.0):
        super().__init__()
        self.hidden_size, self.memory_size, self.seq_len, self.theta = (
            hidden_size, memory_size, seq_len, theta)
        self.spiking = spiking
        self.W_u = nn.Linear(input_size, 1)
        self.W_h = nn.Linear(memory_size + input_size, hidden_size)
        a, b = legendre_discrete(memory_size, theta)
        h = impulse_response(a, b, seq_len)
        self.register_buffer("A", torch.from_numpy(a).float())
        self.register_buffer("B", torch.from_numpy(b).float())
        self.register_buffer("H", torch.from_numpy(h).float())
        self.register_buffer("fft_H", torch.fft.rfft(torch.from_numpy(h).float(), n=2 * seq_len))
        if spiking:
            self.bn_u = nn.BatchNorm1d(1)
            self.bn_m = nn.BatchNorm1d(memory_size)
            self.bn_h = nn.BatchNorm1d(hidden_size)
            self.f_u, self.f_m, self.f_h = (LIF(tau, v_threshold) for _ in range(3))
        else:
            self.f_u, self.f_h = nn.ReLU(), nn.ReLU()

    def _impulse(self, n: int) -> torch.Tensor:
        """Ad^t Bd for t < n in float64 from the float32 ``A``/``B`` the step graphs use; cached
        (the stored ``H`` was computed in float32 and only covers ``seq_len`` steps)."""
        key = (self.A.data_ptr(), self.A._version, self.B.data_ptr(), self.B._version)
        cache = getattr(self, "_h64", None)
        if cache is None or cache.shape[1] < n or self._h64_key != key:
            a, b = self.A.double().cpu().numpy(), self.B.double().cpu().numpy()
            cache = torch.from_numpy(impulse_response(a, b, max(n, self.seq_len))).to(self.A.device)
            self._h64, self._h64_key = cache, key
        return cache[:, :n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, c) -> (b, n, hidden)."""
        if self.spiking:
            u = self.f_u(self.bn_u(self.W_u(x).transpose(1, 2)).transpose(1, 2))
        else:
            u = self.f_u(self.W_u(x))
        m = fft_memory(u, self.A, self.B, self._impulse(u.shape[1]))
        if self.spiking:
            m = _lif_bcn(self.f_m, self.bn_m(m.transpose(1, 2))).transpose(1, 2)
            pre = self.bn_h(self.W_h(torch.cat([m, x], -1)).transpose(1, 2)).transpose(1, 2)
            return self.f_h(pre)
        return self.f_h(self.W_h(torch.cat([m, x], -1)))


# -- LMUFormer -------------------------------------------------------------------------------------
@dataclass
class LMUFormerConfig:
    in_channels: int          # features per frame
    embed_dims: int
    depths: int               # number of blocks
    num_classes: int
    spiking: bool = False
    mlp_ratio: float = 4.0
    memory_size: int | None = None  # default: embed_dims (2x for the spiking model, as official)
    theta: float = 128.0
    seq_len: int = 128        # length of the stored impulse response H
    n_conv_layers: int = 4    # convolutions of the non-spiking patch embedding (Tokenizer)
    tau: float = 2.0
    v_threshold: float = 1.0
    #: what the model reads: frames per sequence (None: any), and how raw data is scaled
    input_frames: int | None = None
    input_scaling: str = ""
    labels: list[str] = field(default_factory=list)
    model_type: ClassVar[str] = "edgeseq_lmuformer"

    @property
    def memory(self) -> int:
        return self.memory_size or (2 * self.embed_dims if self.spiking else self.embed_dims)

    @property
    def hidden(self) -> int:
        return int(self.embed_dims * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMUFormerConfig":
        return config_from_dict(cls, d)


def _conv3(c_in: int, c_out: int) -> nn.Conv1d:
    return nn.Conv1d(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=False)


class Tokenizer(nn.Module):
    """Non-spiking patch embedding: n x (conv3 -> ReLU -> BN), then x + rpe_conv(x)."""

    def __init__(self, c: LMUFormerConfig):
        super().__init__()
        chans = [c.in_channels] + [c.embed_dims] * c.n_conv_layers
        self.conv_layers = nn.Sequential(*[
            nn.Sequential(_conv3(chans[i], chans[i + 1]), nn.ReLU(), nn.Identity(),
                          nn.BatchNorm1d(chans[i + 1]))
            for i in range(c.n_conv_layers)])
        self.rpe_conv = _conv3(c.embed_dims, c.embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, n)
        x = self.conv_layers(x)
        return x + self.rpe_conv(x)


class Conv1d4EB(nn.Module):
    """Spiking patch embedding: 4 x (conv3 -> BN -> LIF), then x + LIF(BN(rpe_conv(x)))."""

    def __init__(self, c: LMUFormerConfig):
        super().__init__()
        e = c.embed_dims
        self.proj_conv, self.proj_bn = _conv3(c.in_channels, e), nn.BatchNorm1d(e)
        self.proj_conv1, self.proj_bn1 = _conv3(e, e), nn.BatchNorm1d(e)
        self.proj_conv2, self.proj_bn2 = _conv3(e, e), nn.BatchNorm1d(e)
        self.proj_conv3, self.proj_bn3 = _conv3(e, e), nn.BatchNorm1d(e)
        self.rpe_conv, self.rpe_bn = _conv3(e, e), nn.BatchNorm1d(e)
        (self.proj_lif, self.proj_lif1, self.proj_lif2, self.proj_lif3,
         self.rpe_lif) = (LIF(c.tau, c.v_threshold) for _ in range(5))

    def stages(self) -> list[tuple[nn.Conv1d, nn.BatchNorm1d, LIF]]:
        return [(self.proj_conv, self.proj_bn, self.proj_lif),
                (self.proj_conv1, self.proj_bn1, self.proj_lif1),
                (self.proj_conv2, self.proj_bn2, self.proj_lif2),
                (self.proj_conv3, self.proj_bn3, self.proj_lif3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, n)
        for conv, bn, lif in self.stages():
            x = _lif_bcn(lif, bn(conv(x)))
        return x + _lif_bcn(self.rpe_lif, self.rpe_bn(self.rpe_conv(x)))


class LMUMixer(nn.Module):
    """Token mixer (official ``LMU`` / ``SLMU``): the LMU cell, then a 1x1 conv and BN (+ LIF)."""

    def __init__(self, c: LMUFormerConfig):
        super().__init__()
        e = c.embed_dims
        self.lmu = LMUFFTCell(e, e, c.memory, c.seq_len, c.theta, c.spiking, c.tau, c.v_threshold)
        self.proj_conv = nn.Conv1d(e, e, kernel_size=1)
        self.proj_bn = nn.BatchNorm1d(e)
        if c.spiking:
            self.proj_lif = LIF(c.tau, c.v_threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, n)
        h = self.lmu(x.transpose(1, 2)).transpose(1, 2)
        y = self.proj_bn(self.proj_conv(h))
        return _lif_bcn(self.proj_lif, y) if hasattr(self, "proj_lif") else y


class ConvFFN(nn.Module):
    """Channel mixer: 1x1 conv -> BN -> GELU (LIF) -> 1x1 conv -> BN -> ReLU (LIF)."""

    def __init__(self, c: LMUFormerConfig):
        super().__init__()
        e, h = c.embed_dims, c.hidden
        self.fc1_conv, self.fc1_bn = nn.Conv1d(e, h, kernel_size=1), nn.BatchNorm1d(h)
        self.fc2_conv, self.fc2_bn = nn.Conv1d(h, e, kernel_size=1), nn.BatchNorm1d(e)
        if c.spiking:
            self.fc1_lif, self.fc2_lif = LIF(c.tau, c.v_threshold), LIF(c.tau, c.v_threshold)
        else:
            self.fc1_lif, self.fc2_lif = nn.GELU(), nn.ReLU()

    def act(self, f: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _lif_bcn(f, x) if isinstance(f, LIF) else f(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, n)
        x = self.act(self.fc1_lif, self.fc1_bn(self.fc1_conv(x)))
        return self.act(self.fc2_lif, self.fc2_bn(self.fc2_conv(x)))


class Block(nn.Module):
    def __init__(self, c: LMUFormerConfig):
        super().__init__()
        self.attn = LMUMixer(c)
        self.mlp = ConvFFN(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class LMUFormer(nn.Module):
    """Sequence classifier: (batch, frames, features) -> class logits (batch, classes)."""

    def __init__(self, config: LMUFormerConfig):
        super().__init__()
        self.config = config
        self.patch_embed = Conv1d4EB(config) if config.spiking else Tokenizer(config)
        self.block = nn.ModuleList(Block(config) for _ in range(config.depths))
        self.head = nn.Linear(config.embed_dims, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, f) -> (b, n, c): the last block's output per frame."""
        x = self.patch_embed(x.transpose(1, 2))
        for blk in self.block:
            x = blk(x)
        return x.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(1))

    def running_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, classes): the prediction after each frame (head of the running mean; the
        official ``all_seq`` test mode). Its last frame equals ``forward``."""
        f = self.features(x)
        count = torch.arange(1, f.shape[1] + 1, dtype=f.dtype, device=f.device)[:, None]
        return self.head(f.cumsum(1) / count)

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()
              if not k.endswith("fft_H")}  # complex; rebuilt from H at load
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder


#: state tensors per spiking block: memory, 6 LIF membranes, memory_lo (the float64 remainder)
SPIKING_BLOCK_STATES = 8
#: candidate parity inputs of a spiking model: 0 = uniform [0, 1), s = s x standard normal
PARITY_SCALES = (0, 0.5, 1.0, 2.0, 4.0)
#: stretches of the sequence a firing rate is reported for
RATE_PARTS = 4


@torch.no_grad()
def spike_rates(model: LMUFormer, x: torch.Tensor, parts: int = RATE_PARTS
                ) -> dict[str, list[float]]:
    """Firing rate of every LIF layer of the parallel model on x, in each of ``parts`` equal
    stretches of the sequence (a layer silent from some frame on cannot show a flipped spike)."""
    out: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: out.__setitem__(name, o))
             for name, m in model.named_modules() if isinstance(m, LIF)]
    try:
        model.features(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: [round(float(c.mean()), 4) for c in s.chunk(parts, dim=1)]
            for name, s in out.items()}


# -- streaming graphs --------------------------------------------------------------------------------
def _fold(conv: nn.Conv1d, bn: nn.BatchNorm1d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight (o, i, k) and bias (o,) with an eval-mode batch norm after it folded in."""
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0])
    if bn is None:
        return w.clone(), b.clone()
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return w * scale[:, None, None], (b - bn.running_mean) * scale + bn.bias.detach()


def _affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode batch norm as x * scale + shift."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias.detach() - bn.running_mean * scale


class LMUFormerStream(nn.Module):
    """k frames per call, O(1) work and state per frame.

    ``(frames (b, k, f), valid (b, k), *state) -> (logits (b, k, classes), ready (b, k), *state)``.
    ``ready[:, i]`` is 1 when output i is the running prediction after a real frame (it lags the
    input by ``lookahead`` frames); ``valid`` 0 marks the flush frames that end a sequence.
    """

    def __init__(self, model: LMUFormer, k: int):
        super().__init__()
        c = model.config
        self.k, self.spiking, self.tau, self.th = k, c.spiking, c.tau, c.v_threshold
        pe = model.patch_embed
        convs: list[tuple[torch.Tensor, torch.Tensor]] = []
        posts: list[tuple[torch.Tensor, torch.Tensor]] = []  # non-spiking: BN after the ReLU
        if c.spiking:
            for conv, bn, _ in pe.stages():
                convs.append(_fold(conv, bn))
            convs.append(_fold(pe.rpe_conv, pe.rpe_bn))
        else:
            for seq in pe.conv_layers:
                convs.append(_fold(seq[0], None))
                posts.append(_affine(seq[3]))
            convs.append(_fold(pe.rpe_conv, None))
        self.conv_w = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w, _ in convs)
        self.conv_b = nn.ParameterList(nn.Parameter(b, requires_grad=False) for _, b in convs)
        self.post_s = nn.ParameterList(nn.Parameter(s, requires_grad=False) for s, _ in posts)
        self.post_t = nn.ParameterList(nn.Parameter(t, requires_grad=False) for _, t in posts)
        self.blocks = model.block
        self.head = model.head
        # The Legendre matrices, transposed for the row-vector update m A^T + u B^T, under names
        # that quantization can recognise and keep in float (LMUFormerFamily.quant_sensitive).
        self.memory_At = nn.ParameterList(nn.Parameter(b.attn.lmu.A.T.contiguous().clone(),
                                                       requires_grad=False) for b in model.block)
        self.memory_Bt = nn.ParameterList(nn.Parameter(b.attn.lmu.B.T.contiguous().clone(),
                                                       requires_grad=False) for b in model.block)
        # folded 1x1 convs of each block: proj (attn), fc1, fc2 (mlp)
        self.folded = nn.ParameterList()
        for blk in model.block:
            for conv, bn in ((blk.attn.proj_conv, blk.attn.proj_bn), (blk.mlp.fc1_conv, blk.mlp.fc1_bn),
                             (blk.mlp.fc2_conv, blk.mlp.fc2_bn)):
                w, b = _fold(conv, bn)
                self.folded.append(nn.Parameter(w[:, :, 0], requires_grad=False))
                self.folded.append(nn.Parameter(b, requires_grad=False))
            if c.spiking:
                cell = blk.attn.lmu
                for lin, bn in ((cell.W_u, cell.bn_u), (cell.W_h, cell.bn_h)):
                    s, t = _affine(bn)
                    self.folded.append(nn.Parameter(lin.weight.detach() * s[:, None], requires_grad=False))
                    self.folded.append(nn.Parameter(lin.bias.detach() * s + t, requires_grad=False))
                s, t = _affine(cell.bn_m)
                self.folded.append(nn.Parameter(s, requires_grad=False))
                self.folded.append(nn.Parameter(t, requires_grad=False))

    def _lif(self, x: torch.Tensor, v: torch.Tensor, ok: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        v2 = v + (x - v) / self.tau
        s = (v2 >= self.th).to(x.dtype)
        return s, torch.where(ok, v2 * (1 - s), v)

    def forward(self, frames: torch.Tensor, valid: torch.Tensor, *state: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        st = list(state)
        n_conv = len(self.conv_w)
        windows, masks = st[0:2 * n_conv:2], st[1:2 * n_conv:2]
        pos = 2 * n_conv
        n_embed_lif = n_conv if self.spiking else 0
        embed_v = st[pos:pos + n_embed_lif]
        pos += n_embed_lif
        per_block = SPIKING_BLOCK_STATES if self.spiking else 1
        block_state = st[pos:pos + per_block * len(self.blocks)]
        pos += per_block * len(self.blocks)
        run_sum, run_count = st[pos], st[pos + 1]
        logits, ready = [], []
        for i in range(self.k):
            x = frames[:, i]                      # (b, f)
            m = valid[:, i].unsqueeze(-1)          # (b, 1)
            # patch embedding: a chain of centred kernel-3 convolutions, one frame of delay each
            for j in range(n_conv):
                xin = x * m
                full = torch.cat([windows[j], xin.unsqueeze(-1)], -1)   # (b, c_in, 3)
                y = F.conv1d(full, self.conv_w[j], self.conv_b[j])[:, :, 0]   # (b, c_out)
                center = full[:, :, 1]
                windows[j] = full[:, :, 1:]
                mfull = torch.cat([masks[j], m], -1)                        # (b, 3)
                m = mfull[:, 1:2]
                masks[j] = mfull[:, 1:]
                ok = m > 0.5
                if self.spiking:
                    y, embed_v[j] = self._lif(y, embed_v[j], ok)
                    x = center + y if j == n_conv - 1 else y
                elif j < n_conv - 1:
                    x = F.relu(y) * self.post_s[j] + self.post_t[j]
                else:
                    x = center + y
            ok = m > 0.5
            for bi, blk in enumerate(self.blocks):
                x = self._block(bi, blk, x, block_state, per_block, ok)
            run_sum = torch.where(ok, run_sum + x, run_sum)
            run_count = torch.where(ok, run_count + 1, run_count)
            logits.append(self.head(run_sum / torch.clamp(run_count, min=1.0)))
            ready.append(m[:, 0])
        out_state = []
        for w, mk in zip(windows, masks):
            out_state += [w, mk]
        out_state += embed_v + block_state + [run_sum, run_count]
        return (torch.stack(logits, 1), torch.stack(ready, 1), *out_state)

    def _block(self, bi: int, blk: Block, x: torch.Tensor, st: list[torch.Tensor],
               per: int, ok: torch.Tensor) -> torch.Tensor:
        """One block on one frame; its state (st[bi * per:...]) advances only where ``ok``."""
        cell = blk.attn.lmu
        f = self.folded
        base = bi * (12 if self.spiking else 6)
        pw, pb, w1, b1, w2, b2 = (f[base + i] for i in range(6))
        s0 = bi * per
        mem = st[s0]
        if not self.spiking:
            u = F.relu(cell.W_u(x))                                       # (b, 1)
            new = mem @ self.memory_At[bi] + u @ self.memory_Bt[bi]       # (b, d)
            st[s0] = torch.where(ok, new, mem)
            h = F.relu(cell.W_h(torch.cat([new, x], -1)))
            x = x + F.linear(h, pw, pb)
            return x + F.relu(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2))
        wu, bu, wh, bh, ms, mt = (f[base + 6 + i] for i in range(6))
        su, st[s0 + 1] = self._lif(F.linear(x, wu, bu), st[s0 + 1], ok)
        # The spiking model thresholds the memory (f_m): its recurrence runs in float64 (the
        # float32 A, B cast exactly), on the memory carried as a float32 pair (memory + memory_lo,
        # ~48 significant bits), so that it stays the exact filter the reference computes
        # (float64 FFT) instead of drifting by a float32 rounding per frame, and so that kernels
        # that round a float32 product differently (XNNPACK) cannot move a membrane across its
        # threshold through it. The casts sit in the graph (not float64 weights), so --dtype
        # fp16's conversion of the weights leaves it well-typed.
        lo = st[s0 + 7]
        new64 = ((mem.double() + lo.double()) @ self.memory_At[bi].double()
                 + su.double() @ self.memory_Bt[bi].double())
        new = new64.float()
        st[s0] = torch.where(ok, new, mem)
        st[s0 + 7] = torch.where(ok, (new64 - new.double()).float(), lo)
        sm, st[s0 + 2] = self._lif(new * ms + mt, st[s0 + 2], ok)
        sh, st[s0 + 3] = self._lif(F.linear(torch.cat([sm, x], -1), wh, bh), st[s0 + 3], ok)
        sp, st[s0 + 4] = self._lif(F.linear(sh, pw, pb), st[s0 + 4], ok)
        x = x + sp
        s1, st[s0 + 5] = self._lif(F.linear(x, w1, b1), st[s0 + 5], ok)
        s2, st[s0 + 6] = self._lif(F.linear(s1, w2, b2), st[s0 + 6], ok)
        return x + s2


def lookahead(c: LMUFormerConfig) -> int:
    """Frames of delay of the streaming graph: one per centred kernel-3 convolution."""
    return (4 if c.spiking else c.n_conv_layers) + 1


def state_specs(c: LMUFormerConfig) -> list[StateSpec]:
    """In the order ``LMUFormerStream`` reads them."""
    e, f = c.embed_dims, c.in_channels
    n_conv = lookahead(c)
    out: list[StateSpec] = []
    for j in range(n_conv):
        out.append(StateSpec(f"embed.{j}.window", ("batch", f if j == 0 else e, 2), "float32", "window"))
        out.append(StateSpec(f"embed.{j}.valid", ("batch", 2), "float32", "window"))
    if c.spiking:
        out += [StateSpec(f"embed.{j}.lif", ("batch", e), "float32", "recurrent")
                for j in range(n_conv)]
    for i in range(c.depths):
        out.append(StateSpec(f"block.{i}.memory", ("batch", c.memory), "float32", "recurrent"))
        if c.spiking:
            for name, n in (("lif_u", 1), ("lif_m", c.memory), ("lif_h", e), ("lif_proj", e),
                            ("lif_fc1", c.hidden), ("lif_fc2", e), ("memory_lo", c.memory)):
                out.append(StateSpec(f"block.{i}.{name}", ("batch", n), "float32", "recurrent"))
    out.append(StateSpec("head.sum", ("batch", e), "float32", "recurrent"))
    out.append(StateSpec("head.count", ("batch", 1), "float32", "recurrent"))
    return out


# -- the LMUFormer repository's checkpoints --------------------------------------------------------
#: upstream argument names (src/run.py, src/gsc.yml, ``ConvLMU``'s keywords) -> ours
UPSTREAM_NAMES = {"dim": "embed_dims", "layer": "depths", "mlp_ratios": "mlp_ratio",
                  "n_class": "num_classes", "audio_length": "input_frames"}
#: upstream ``model`` names (``timm.create_model``) this family builds, -> spiking
UPSTREAM_MODELS = {"lmu_rnn_conv1d": False, "slmu_rnn_conv1d": True}
#: upstream arguments that do not change these two models (accepted and ignored)
UPSTREAM_IGNORED = ("num_heads", "patch_size", "sr_ratios", "time_step", "T", "qkv_bias",
                    "qk_scale", "img_size_h", "img_size_w", "test_mode")
#: upstream hard-codes the LMU's window (src/blocks/lmu.py: ``seq_len=128, theta=128``)
UPSTREAM_THETA = 128.0


def _upstream_keys(sd: dict[str, Any]) -> bool:
    return any(k.startswith("patch_embed.") for k in sd) and any(
        k.startswith("block.0.attn.lmu.") for k in sd)


def _labels_from_csv(path: Path, where: Path) -> list[str]:
    import csv

    if not path.is_file():
        raise BundleError(f"{where}: label_csv {str(path)!r} not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "display_name" not in rows[0] or "index" not in rows[0]:
        raise BundleError(f"{path}: expected upstream's label CSV (index,mid,display_name)")
    return [r["display_name"] for r in sorted(rows, key=lambda r: int(r["index"]))]


def _infer_config(raw: dict[str, Any], sd: dict[str, torch.Tensor], path: Path
                  ) -> dict[str, Any]:
    """Our config keys from a config in upstream's or our own terms plus what the state dict
    determines (sizes); a size given and contradicted by the weights is an error naming the
    argument. Nothing the weights fix is left to the user."""
    where = path.parent / "config.json" if path.is_file() else path / "config.json"
    cfg: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "model_type" or k in UPSTREAM_IGNORED:
            continue
        if k == "label_csv":  # upstream's class list: index,mid,display_name
            cfg["labels"] = _labels_from_csv(where.parent / v, where)
            continue
        if k == "model":
            if v not in UPSTREAM_MODELS:
                raise BundleError(f"{where}: model {v!r}: edgeseq converts the LMUFormer "
                                  f"repository's {' and '.join(UPSTREAM_MODELS)}")
            cfg["spiking"] = UPSTREAM_MODELS[v]
            continue
        cfg[UPSTREAM_NAMES.get(k, k)] = v
    for variant, key in (("slmu_rnn_ms_conv1d", "block.0.attn.prev_bn.weight"),
                         ("attn_ms_conv1d", "block.0.attn.q_conv.weight")):
        if key in sd:
            raise BundleError(f"{path}: an LMUFormer {variant} checkpoint ({key}); edgeseq "
                              f"converts {' and '.join(UPSTREAM_MODELS)}")
    if "patch_embed.proj_conv.weight" in sd:
        spiking, first = True, sd["patch_embed.proj_conv.weight"]
    elif "patch_embed.conv_layers.0.0.weight" in sd:
        spiking, first = False, sd["patch_embed.conv_layers.0.0.weight"]
        cfg.setdefault("n_conv_layers", len({k.split(".")[2] for k in sd
                                             if k.startswith("patch_embed.conv_layers.")}))
    else:
        raise BundleError(f"{path}: not an LMUFormer state dict (no patch_embed.proj_conv or "
                          f"patch_embed.conv_layers weights)")
    lmu = "block.0.attn.lmu."
    need = [lmu + n for n in ("A", "H", "W_h.weight")] + ["head.weight",
                                                        "block.0.mlp.fc1_conv.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise BundleError(f"{path}: LMUFormer state dict without {absent[0]}")
    e = int(first.shape[0])
    found = {"spiking": spiking, "in_channels": int(first.shape[1]), "embed_dims": e,
             "depths": len({k.split(".")[1] for k in sd if k.startswith("block.")}),
             "num_classes": int(sd["head.weight"].shape[0]),
             "mlp_ratio": sd["block.0.mlp.fc1_conv.weight"].shape[0] / e,
             "memory_size": int(sd[lmu + "A"].shape[0]), "seq_len": int(sd[lmu + "H"].shape[1])}
    ours = {v: k for k, v in UPSTREAM_NAMES.items()}
    hidden = int(sd["block.0.mlp.fc1_conv.weight"].shape[0])
    for k, v in found.items():
        if cfg.get(k) is None:  # None: "the default", which the weights settle
            cfg.pop(k, None)
        given = cfg.get(k, v)
        same = (int(e * float(given)) == hidden) if k == "mlp_ratio" else given == v
        if not same:
            name = "model" if k == "spiking" and "model" in raw else next(
                (n for n in raw if UPSTREAM_NAMES.get(n, n) == k), ours.get(k, k))
            raise BundleError(f"{where}: {name} = {raw.get(name, cfg[k])!r}, but the weights in "
                              f"{path.name} have {k} = {v!r}")
        cfg.setdefault(k, v)
    cfg["mlp_ratio"] = float(cfg["mlp_ratio"])
    if cfg.get("labels") and len(cfg["labels"]) != cfg["num_classes"]:
        raise BundleError(f"{where}: {len(cfg['labels'])} labels for {cfg['num_classes']} classes")
    # theta is not a stored size, but A = exp(A_legendre / theta) is stored: check the candidate
    a = sd[lmu + "A"].double().numpy()
    candidates = ([float(cfg["theta"])] if "theta" in cfg
                  else [UPSTREAM_THETA, float(cfg["seq_len"])])
    for theta in candidates:
        if np.abs(legendre_discrete(a.shape[0], theta)[0] - a).max() < 1e-5:
            cfg["theta"] = theta
            break
    else:
        raise BundleError(f"{path}: {lmu}A is not the Legendre memory of order {a.shape[0]} for "
                          f"theta {' or '.join(f'{t:g}' for t in candidates)} (upstream hard-codes "
                          f"128 in src/blocks/lmu.py); give \"theta\" in {where.name}")
    return cfg


@register_family("lmuformer")
class LMUFormerFamily(Family):
    """edgeseq's ``LMUFormer`` (config.json with ``model_type: edgeseq_lmuformer`` + weights in
    safetensors), or the LMUFormer repository's own checkpoint (``best_model.pth`` as its training
    script saves it, a DataParallel state dict) given as the file itself: the sizes are read from
    the weights, the rest from an optional ``config.json`` beside it in upstream's terms
    (``UPSTREAM_NAMES``, docs/lmu.md)."""
    # the Legendre matrices A and B define the memory itself: a 4-bit A is no longer a delay
    # line (digits agreement 0.35), and even int8 A/B under int4 flipped 2 of 32 gate sequences
    quant_sensitive = ("memory_At*", "memory_Bt*")
    quant_sensitive_floor = "float"

    task = "classification"
    model_types = ("edgeseq_lmuformer",)

    @classmethod
    def config_from_weights(cls, path: Path, raw: dict[str, Any]) -> dict[str, Any] | None:
        """For a checkpoint without ``model_type``: claim it when its weights are LMUFormer's."""
        sd = {k.removeprefix("module."): v for k, v in load_state_dict(path).items()}
        return {**raw, "model_type": cls.model_types[0]} if _upstream_keys(sd) else None

    def load(self, path: Path) -> LMUFormer:
        path = Path(path)
        raw = read_config(path)
        sd = {k.removeprefix("module."): v for k, v in load_state_dict(path).items()}
        where = path.parent / "config.json" if path.is_file() else path / "config.json"
        try:
            # our own checkpoints use upstream's module names, so one path serves both
            config = LMUFormerConfig.from_dict(
                {"model_type": LMUFormerConfig.model_type, **_infer_config(raw, sd, path)})
        except (ValueError, TypeError) as e:
            raise BundleError(f"{where}: {e}") from None
        model = LMUFormer(config)
        own = model.state_dict()
        for k in own:  # fft_H is derived from H (and complex, which safetensors cannot hold)
            if k.endswith("fft_H") and k not in sd and k[:-5] + "H" in sd:
                h = sd[k[:-5] + "H"].float()
                sd[k] = torch.fft.rfft(h, n=2 * h.shape[1])
        load_into(model, sd, path)
        return model.float().eval()

    def graphs(self, model: LMUFormer, chunk: int = DEFAULT_CHUNK) -> dict[str, StreamingGraph]:
        c = model.config
        state = state_specs(c)
        out = {}
        for name, k in (("step", 1), ("chunk", chunk)):
            ins = [TensorSpec("frames", ("batch", k, c.in_channels)),
                   TensorSpec("valid", ("batch", k))]
            outs = [TensorSpec("logits", ("batch", k, c.num_classes)),
                    TensorSpec("ready", ("batch", k))]
            out[name] = StreamingGraph(name, LMUFormerStream(model, k).eval(), ins, outs, state,
                                       example_dims={"batch": 2})
        return out

    def model_config(self, model: LMUFormer, chunk: int = DEFAULT_CHUNK) -> dict[str, Any]:
        c = model.config
        return {"num_classes": c.num_classes, "labels": list(c.labels) or
                [str(i) for i in range(c.num_classes)],
                "input": {"features": c.in_channels, "frames": c.input_frames,
                          "scaling": c.input_scaling},
                "lookahead": lookahead(c), "chunk": chunk, "spiking": c.spiking,
                "embed_dims": c.embed_dims, "depths": c.depths, "memory_size": c.memory,
                "theta": c.theta}

    @torch.no_grad()
    def reference_running(self, model: LMUFormer, x: torch.Tensor) -> torch.Tensor:
        """(b, n, f) -> running class logits (b, n, classes), parallel (FFT) mode."""
        return model.running_logits(x)

    def parity_inputs(self, model: LMUFormer, n: int = 4, seed: int = 0) -> torch.Tensor:
        """n sequences of the model's length. A spiking model gets the input scale under which
        its quietest layer fires most evenly over the whole sequence (``PARITY_SCALES``): parity on
        inputs that leave layers silent, or silent late in the sequence, would not see a flipped
        spike there."""
        c = model.config
        g = torch.Generator().manual_seed(seed)
        frames = c.input_frames or c.seq_len
        if not c.spiking:
            return torch.rand(n, frames, c.in_channels, generator=g)
        best, best_score = None, ()
        for scale in PARITY_SCALES:
            x = (torch.rand(n, frames, c.in_channels, generator=g) if scale == 0
                 else scale * torch.randn(n, frames, c.in_channels, generator=g))
            rates = spike_rates(model, x)
            # the quietest (or most saturated) layer and stretch first, then the next, ...
            score = tuple(sorted(min(r, 1 - r) for q in rates.values() for r in q))
            if best is None or score > best_score:
                best, best_score = x, score
        return best

    def spike_rates(self, model: LMUFormer, x: torch.Tensor) -> dict[str, list[float]]:
        return spike_rates(model, x) if model.config.spiking else {}

    def make_test_checkpoint(self, folder: Path, seed: int = 0, **overrides: Any) -> Path:
        """A small random LMUFormer whose batch norms have non-trivial statistics."""
        torch.manual_seed(seed)
        kw: dict[str, Any] = dict(in_channels=3, embed_dims=16, depths=2, num_classes=5,
                                  mlp_ratio=2.0, theta=32.0, seq_len=32, input_frames=40)
        kw.update(overrides)
        model = LMUFormer(LMUFormerConfig(**kw))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, nn.BatchNorm1d):
                    n = mod.num_features
                    mod.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                    mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
                    # spiking layers need inputs near their threshold (1) to fire at all
                    mod.weight.copy_(2.0 + 0.3 * torch.randn(n, generator=g))
                    mod.bias.copy_(0.8 + 0.5 * torch.randn(n, generator=g))
        model.eval().save_pretrained(folder)
        return Path(folder)
