"""An independent re-expression of the LMUFormer repository's two models (github.com/zeyuliu1037/
LMUFormer, src/lmu_rnn.py ``lmu_rnn_conv1d`` / ``slmu_rnn_conv1d`` and src/blocks/*), written for
the tests from reading that code (no upstream code is copied): the same module tree, so its
``state_dict`` has upstream's keys one for one, and the same arithmetic in the same order and
precision (float32 FFT against the stored float32 ``fft_H``; spikingjelly's ``MultiStepLIFNode``
with tau 2, threshold 1, hard reset to 0, time on dim 0). It is the reference edgeseq's conversion
is checked against; edgeseq's own family code is not used here.

Upstream quirks kept: the LMU's ``seq_len`` and ``theta`` are fixed at 128 (so inputs are 128
frames), the spiking patch embedding builds its convolutions for 128 input channels and 256
embedding dims whatever it is asked, and the training script saves ``best_model.pth`` as
``torch.save(model.state_dict())`` of a ``DataParallel`` (keys prefixed ``module.``).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.signal import cont2discrete
from torch import nn

SEQ_LEN = THETA = 128


class MultiStepLIF(nn.Module):
    """(T, ...) -> spikes (T, ...): v += (x - v) / tau; s = v >= 1; v *= 1 - s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x[0])
        out = []
        for t in range(x.shape[0]):
            v = v + (x[t] - v) / 2.0
            s = (v - 1.0 >= 0).to(x.dtype)
            out.append(s)
            v = v * (1 - s)
        return torch.stack(out)


def _bcn_lif(lif: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Upstream's ``lif(x.permute(2, 1, 0)).permute(2, 1, 0)`` on (B, C, N)."""
    return lif(x.permute(2, 1, 0).contiguous()).permute(2, 1, 0).contiguous()


class LMUFFTCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, memory_size: int):
        super().__init__()
        self.memory_size = memory_size
        self.W_u = nn.Linear(input_size, 1)
        self.f_u = nn.ReLU()
        self.W_h = nn.Linear(memory_size + input_size, hidden_size)
        self.f_h = nn.ReLU()
        q = np.arange(memory_size, dtype=np.float64).reshape(-1, 1)
        r = (2 * q + 1) / THETA
        i, j = np.meshgrid(q, q, indexing="ij")
        a = r * np.where(i < j, -1, (-1.0) ** (i - j + 1))
        b = r * ((-1.0) ** q)
        a, b, *_ = cont2discrete((a, b, np.ones((1, memory_size)), np.zeros((1,))), dt=1.0,
                                 method="zoh")
        self.register_buffer("A", torch.from_numpy(a).float())
        self.register_buffer("B", torch.from_numpy(b).float())
        h, ai = [], torch.eye(memory_size)
        for _ in range(SEQ_LEN):  # float32 powers, as upstream
            h.append(ai @ self.B)
            ai = self.A @ ai
        h = torch.cat(h, -1)
        self.register_buffer("H", h)
        self.register_buffer("fft_H", torch.fft.rfft(h, n=2 * SEQ_LEN, dim=-1))

    def memory(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, N, 1) -> m (B, M, N), float32 FFT against the stored fft_H."""
        n = u.shape[1]
        fu = torch.fft.rfft(u.permute(0, 2, 1), n=2 * n, dim=-1)
        return torch.fft.irfft(fu * self.fft_H.unsqueeze(0), n=2 * n, dim=-1)[:, :, :n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.f_u(self.W_u(x))
        m = self.memory(u).permute(0, 2, 1)
        return self.f_h(self.W_h(torch.cat((m, x), -1)))


class SpikingLMUFFTCell(LMUFFTCell):
    def __init__(self, input_size: int, hidden_size: int, memory_size: int):
        super().__init__(input_size, hidden_size, memory_size)
        self.bn_u = nn.BatchNorm1d(1)
        self.f_u = MultiStepLIF()
        self.bn_m = nn.BatchNorm1d(memory_size)
        self.f_m = MultiStepLIF()
        self.bn_h = nn.BatchNorm1d(hidden_size)
        self.f_h = MultiStepLIF()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.f_u(self.bn_u(self.W_u(x).transpose(-1, -2)).permute(2, 0, 1)).permute(1, 0, 2)
        m = self.memory(u)
        m = _bcn_lif(self.f_m, self.bn_m(m)).permute(0, 2, 1)
        h = self.f_h(self.bn_h(self.W_h(torch.cat((m, x), -1)).transpose(-1, -2)).permute(2, 0, 1))
        return h.permute(1, 0, 2)


class LMU(nn.Module):
    def __init__(self, dim: int, spiking: bool):
        super().__init__()
        self.lmu = (SpikingLMUFFTCell(dim, dim, 2 * dim) if spiking
                    else LMUFFTCell(dim, dim, dim))
        self.proj_conv = nn.Conv1d(dim, dim, kernel_size=1, stride=1)
        self.proj_bn = nn.BatchNorm1d(dim)
        if spiking:
            self.proj_lif = MultiStepLIF()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lmu(x.transpose(-1, -2)).transpose(-1, -2)
        y = self.proj_bn(self.proj_conv(h))
        return _bcn_lif(self.proj_lif, y) if hasattr(self, "proj_lif") else y


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, spiking: bool):
        super().__init__()
        self.fc1_conv = nn.Conv1d(dim, hidden, kernel_size=1, stride=1)
        self.fc1_bn = nn.BatchNorm1d(hidden)
        self.fc1_lif = MultiStepLIF() if spiking else nn.GELU()
        self.fc1_dp = nn.Identity()
        self.fc2_conv = nn.Conv1d(hidden, dim, kernel_size=1, stride=1)
        self.fc2_bn = nn.BatchNorm1d(dim)
        self.fc2_lif = MultiStepLIF() if spiking else nn.ReLU()
        self.fc2_dp = nn.Identity()

    def _act(self, f: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _bcn_lif(f, x) if isinstance(f, MultiStepLIF) else f(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self.fc1_lif, self.fc1_bn(self.fc1_conv(x)))
        return self._act(self.fc2_lif, self.fc2_bn(self.fc2_conv(x)))


class Block(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, spiking: bool):
        super().__init__()
        self.attn = LMU(dim, spiking)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), spiking)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


def _conv3(i: int, o: int) -> nn.Conv1d:
    return nn.Conv1d(i, o, kernel_size=3, stride=1, padding=1, bias=False)


class Tokenizer(nn.Module):
    def __init__(self, in_channels: int, embed_dims: int, n_conv_layers: int = 4):
        super().__init__()
        chans = [in_channels] + [embed_dims] * n_conv_layers
        self.conv_layers = nn.Sequential(*[
            nn.Sequential(_conv3(chans[i], chans[i + 1]), nn.ReLU(), nn.Identity(),
                          nn.BatchNorm1d(chans[i + 1])) for i in range(n_conv_layers)])
        self.rpe_conv = _conv3(embed_dims, embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_layers(x.squeeze(1).permute(0, 2, 1))
        return x + self.rpe_conv(x)


class Conv1d4EB(nn.Module):
    def __init__(self, in_channels: int, embed_dims: int, quirk: bool = True):
        super().__init__()
        # upstream's super().__init__() takes its defaults (128, 256) whatever it is given;
        # quirk=False builds the same tree at the sizes asked for (a smaller test model)
        i, e = (128, 256) if quirk else (in_channels, embed_dims)
        self.proj_conv, self.proj_bn, self.proj_lif = _conv3(i, e), nn.BatchNorm1d(e), MultiStepLIF()
        for k in (1, 2, 3):
            setattr(self, f"proj_conv{k}", _conv3(e, e))
            setattr(self, f"proj_bn{k}", nn.BatchNorm1d(e))
            setattr(self, f"proj_lif{k}", MultiStepLIF())
        self.rpe_conv = _conv3(e, e)
        self.rpe_bn = nn.BatchNorm1d(embed_dims)
        self.rpe_lif = MultiStepLIF()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.squeeze(1).permute(0, 2, 1)
        for k in ("", "1", "2", "3"):
            conv, bn, lif = (getattr(self, f"proj_{n}{k}") for n in ("conv", "bn", "lif"))
            x = _bcn_lif(lif, bn(conv(x)))
        return x + _bcn_lif(self.rpe_lif, self.rpe_bn(self.rpe_conv(x)))


class ConvLMU(nn.Module):
    """``lmu_rnn_conv1d`` (spiking False) / ``slmu_rnn_conv1d`` (True) with ``test_mode='all_seq'``
    available as ``running``: (B, N, C) -> (B, N, classes)."""

    def __init__(self, spiking: bool, in_channels: int = 128, embed_dims: int = 256,
                 mlp_ratios: float = 4, depths: int = 1, num_classes: int = 35,
                 quirk: bool = True):
        super().__init__()
        self.patch_embed = (Conv1d4EB(in_channels, embed_dims, quirk) if spiking
                            else Tokenizer(in_channels, embed_dims))
        self.block = nn.ModuleList(Block(embed_dims, mlp_ratios, spiking) for _ in range(depths))
        self.head = nn.Linear(embed_dims, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x.unsqueeze(1))
        for blk in self.block:
            x = blk(x)
        return x  # B, C, N

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).permute(0, 2, 1)).mean(1)

    def running(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).permute(2, 0, 1)
        f = torch.cumsum(f, 0) / torch.arange(1, f.shape[0] + 1).view(-1, 1, 1).float()
        return self.head(f).permute(1, 0, 2)


def randomize(model: nn.Module, seed: int, spiking: bool) -> nn.Module:
    """Random weights with batch-norm statistics that keep spiking layers firing (a trained
    model's do; default ones would leave most neurons silent)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv1d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / fan_in ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
            if isinstance(mod, nn.BatchNorm1d):
                n = mod.num_features
                mod.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
                if spiking:
                    mod.weight.copy_(2.0 + 0.3 * torch.randn(n, generator=g))
                    mod.bias.copy_(0.8 + 0.5 * torch.randn(n, generator=g))
                else:
                    mod.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=g))
                    mod.bias.copy_(0.1 * torch.randn(n, generator=g))
                mod.num_batches_tracked.fill_(1000)
    return model.eval()


def save_as_upstream(model: nn.Module, path) -> None:
    """What src/traintest.py writes: ``torch.save(model.state_dict(), ".../best_model.pth")``
    with the model wrapped in ``nn.DataParallel``."""
    torch.save(nn.DataParallel(model).state_dict(), path)
