"""The Legendre Memory Unit and LMUFormer as PyTorch modules (their parallel, training-time
form): the Legendre delay system, spiking (LIF) neurons, the LMU cells and the LMUFormer blocks.
The papers and the upstream names they follow: ``edgeseq.families.lmu``'s docstring; that module
turns these into streaming graphs and reads checkpoints."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgeseq.families.base import config_from_dict


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


