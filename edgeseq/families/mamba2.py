"""Mamba-2 (Dao & Gu, 2024: "Transformers are SSMs", structured state space duality / SSD) as
stateful streaming graphs.

The reference is transformers' ``Mamba2ForCausalLM`` (its CPU path ``Mamba2Mixer.torch_forward``).
Its cache object is no graph output and its chunked scan pads to ``chunk_size`` with data-shaped
Python logic, so the modules below re-express one Mamba-2 block in plain tensor ops over the *same*
parameters, with the convolution window and the SSM state as explicit tensors. A is a scalar per
head, so within a chunk the scan is SSD's masked "attention": a (b, h, l, l) decay matrix from a
segment sum.

Glossary of dimension letters::

    b  batch            l  chunk length (tokens fed in one prefill call)
    d  d_model          e  d_inner = expand * d_model = h * p
    h  num_heads        p  head_dim
    g  n_groups         n  d_state (B and C are shared by the h/g heads of a group)
    c  conv_dim = e + 2 g n (x, B and C go through the depthwise conv together)
    k  conv kernel width (the window state keeps k-1 past inputs)
    v  vocab
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeseq.bundle import StateSpec, StreamingGraph
from edgeseq.families.base import TransformersCausalLM, lm_graph_specs, exit_graph_from_step
from edgeseq.families.mamba import load_transformers_lm, mamba_ssm_layer, rms_norm, widen_init
from edgeseq.registry import register_family

# Prefill materialises a few (b, h, l, l) tensors; the runtime keeps chunks under this size.
PREFILL_BYTES_BUDGET = 128 << 20
LIVE_SQUARE_TENSORS = 5  # segsum input, segsum, decay, C.B, masked C.B


class _Mamba2Graph(nn.Module):
    """Holds the reference model's modules (weights are shared, never copied).

    Everything runs in float32 (``load`` casts), so ``residual_in_fp32`` needs no code.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        bb, c = model.backbone, model.config
        self.embeddings = bb.embeddings
        self.layers = bb.layers
        self.norm_f = bb.norm_f
        self.lm_head = model.lm_head
        mix = bb.layers[0].mixer
        self.h, self.p, self.n = mix.num_heads, mix.head_dim, mix.ssm_state_size
        self.g = mix.n_groups
        self.e, self.c, self.k = mix.intermediate_size, mix.conv_dim, mix.conv_kernel_size
        # transformers drops the leading 2*d_mlp in_proj features, if any (0 in its own layout).
        self.skip = mix.in_proj.out_features - (self.e + self.c + self.h)
        lo, hi = (float(t) for t in c.time_step_limit)
        self.dt_min = lo if lo > 0.0 else None  # softplus >= 0: a (0, inf) clamp is the identity
        self.dt_max = hi if hi < math.inf else None

    def _in_proj(self, layer: nn.Module, hs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Block pre-norm and in_proj, split into gate z (.., e), conv input (.., c), dt (.., h)."""
        u = rms_norm(hs, layer.norm.weight, layer.norm.variance_epsilon)
        zxbcdt = layer.mixer.in_proj(u)
        if self.skip:
            zxbcdt = zxbcdt[..., self.skip:]
        return torch.split(zxbcdt, [self.e, self.c, self.h], dim=-1)

    def _dt(self, dt: torch.Tensor, mix: nn.Module) -> torch.Tensor:
        dt = F.softplus(dt + mix.dt_bias)
        if self.dt_min is not None or self.dt_max is not None:
            dt = torch.clamp(dt, self.dt_min, self.dt_max)
        return dt

    def _heads(self, bc: torch.Tensor) -> torch.Tensor:
        """(..., g*n) -> (..., h, n): each group's B or C serves h/g consecutive heads."""
        lead = bc.shape[:-1]
        bc = bc.reshape(*lead, self.g, 1, self.n).expand(*lead, self.g, self.h // self.g, self.n)
        return bc.reshape(*lead, self.h, self.n)

    def _out(self, layer: nn.Module, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """MambaRMSNormGated, then out_proj. As in transformers: the gate multiplies before the
        norm, the norm spans all e features (not per group) and ``config.rms_norm`` is ignored."""
        mix = layer.mixer
        return mix.out_proj(rms_norm(y * F.silu(z), mix.norm.weight, mix.norm.variance_epsilon))

    def _head(self, hs: torch.Tensor) -> torch.Tensor:
        return self.lm_head(rms_norm(hs, self.norm_f.weight, self.norm_f.variance_epsilon))


class Mamba2Step(_Mamba2Graph):
    """One token: ``(input_ids (b,), conv_0, ssm_0, conv_1, ...) -> (logits (b, v), states...)``."""

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hs = self.embeddings(input_ids)  # (b, d)
        bsz = input_ids.shape[0]
        new_state: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            conv_state, ssm_state = state[2 * i], state[2 * i + 1]  # (b, c, k-1), (b, h, p, n)
            mix = layer.mixer
            z, xbc, dt = self._in_proj(layer, hs)  # (b, e), (b, c), (b, h)
            window = torch.cat([conv_state, xbc.unsqueeze(-1)], dim=-1)  # (b, c, k)
            xbc = (window * mix.conv1d.weight[:, 0, :]).sum(-1)
            if mix.conv1d.bias is not None:
                xbc = xbc + mix.conv1d.bias
            x, B, C = torch.split(F.silu(xbc), [self.e, self.g * self.n, self.g * self.n], dim=-1)
            x = x.reshape(bsz, self.h, self.p)  # (b, h, p)
            B, C = self._heads(B), self._heads(C)  # (b, h, n)
            dt = self._dt(dt, mix)  # (b, h)
            dA = torch.exp(dt * -torch.exp(mix.A_log))  # (b, h)
            ssm = ssm_state * dA[:, :, None, None] \
                + (dt.unsqueeze(-1) * x).unsqueeze(-1) * B.unsqueeze(2)  # (b, h, p, n)
            y = (ssm @ C.unsqueeze(-1)).squeeze(-1) + mix.D.unsqueeze(-1) * x  # (b, h, p)
            hs = hs + self._out(layer, y.reshape(bsz, self.e), z)
            new_state += [window[:, :, 1:], ssm]
        return (self._head(hs), *new_state)


def ssd_chunk(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: torch.Tensor, h0: torch.Tensor, causal: torch.Tensor,
              strict: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD's closed form over a chunk (``Mamba2Prefill``'s docstring): x (b, h, l, p), dt
    (b, h, l), A (h,), B, C (b, h, l, n), D (h,), h0 (b, h, p, n); ``causal``/``strict`` the
    (l, l) masks s <= t / s < t. Returns (y (b, h, l, p), the state after the chunk)."""
    l = x.shape[2]
    a = dt * A.unsqueeze(-1)  # (b, h, l)
    seg = torch.cumsum(a.unsqueeze(-1).expand(-1, -1, -1, l).masked_fill(~strict, 0.0),
                       dim=-2)  # (b, h, l, l) [t, s]
    decay = torch.exp(seg.masked_fill(~causal, -math.inf))  # (b, h, l, l)
    xdt = x * dt.unsqueeze(-1)  # (b, h, l, p)
    y = ((C @ B.transpose(-1, -2)) * decay) @ xdt  # (b, h, l, p)
    into = torch.exp(torch.cumsum(a, dim=-1)).unsqueeze(-1)  # (b, h, l, 1): h_0 -> t
    y = y + into * (C @ h0.transpose(-1, -2)) + D[:, None, None] * x
    to_end = decay[:, :, l - 1, :].unsqueeze(-1)  # (b, h, l, 1): s -> last
    ssm = into[:, :, l - 1, :].unsqueeze(-1) * h0 \
        + (xdt * to_end).transpose(-1, -2) @ B  # (b, h, p, n)
    return y, ssm


class Mamba2Prefill(_Mamba2Graph):
    """A chunk of l tokens from a given state, in closed form (no sequential loop in the graph).

    With a_t = dt_t A (scalar per head), seg[t, s] = sum_{s<u<=t} a_u (SSD's segsum) and
    S_t = sum_{u<=t} a_u: y_t = sum_{s<=t} exp(seg[t, s]) (C_t . B_s) dt_s x_s
    + exp(S_t) C_t . h_0 + D x_t, and the new state is h_{l-1} (the same sums at t = l-1).
    The segment sum is a masked cumsum rather than a difference of cumsums, which would cancel
    catastrophically over long chunks.
    """

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hs = self.embeddings(input_ids)  # (b, l, d)
        bsz, l = input_ids.shape[0], input_ids.shape[1]
        t = torch.arange(l, device=input_ids.device)
        causal = t.unsqueeze(1) >= t.unsqueeze(0)  # (l, l) [t, s]: s <= t
        strict = t.unsqueeze(1) > t.unsqueeze(0)  # (l, l) [u, s]: s < u
        new_state: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            conv_state, ssm_state = state[2 * i], state[2 * i + 1]  # (b, c, k-1), (b, h, p, n)
            mix = layer.mixer
            z, xbc, dt = self._in_proj(layer, hs)  # (b, l, e), (b, l, c), (b, l, h)
            window = torch.cat([conv_state, xbc.transpose(1, 2)], dim=-1)  # (b, c, k-1+l)
            xbc = F.conv1d(window, mix.conv1d.weight, mix.conv1d.bias,
                           groups=self.c).transpose(1, 2)  # (b, l, c)
            x, B, C = torch.split(F.silu(xbc), [self.e, self.g * self.n, self.g * self.n], dim=-1)
            x = x.reshape(bsz, l, self.h, self.p).transpose(1, 2)  # (b, h, l, p)
            B = self._heads(B).transpose(1, 2)  # (b, h, l, n)
            C = self._heads(C).transpose(1, 2)  # (b, h, l, n)
            dt = self._dt(dt, mix).transpose(1, 2)  # (b, h, l)
            y, ssm = ssd_chunk(x, dt, -torch.exp(mix.A_log), B, C, mix.D, ssm_state,
                               causal, strict)
            hs = hs + self._out(layer, y.transpose(1, 2).reshape(bsz, l, self.e), z)
            new_state += [window[:, :, window.shape[-1] - (self.k - 1):], ssm]
        return (self._head(hs), *new_state)


@register_family("mamba2")
class Mamba2Family(TransformersCausalLM):
    """transformers ``Mamba2ForCausalLM`` checkpoint folders, and the original ``mamba_ssm``
    layout (state-spaces/mamba2-*: ``ssm_cfg.layer`` Mamba2, ``backbone.embedding``)."""

    task = "causal_lm"
    model_types = ("mamba2",)

    def can_load(self, config: dict[str, Any]) -> bool:
        return super().can_load(config) or mamba_ssm_layer(config) == "Mamba2"

    def load(self, path: Path) -> nn.Module:
        from transformers import Mamba2Config, Mamba2ForCausalLM

        return load_transformers_lm(Path(path), Mamba2Config, Mamba2ForCausalLM, "Mamba2")

    def state_specs(self, model: nn.Module) -> list[StateSpec]:
        c = model.config
        conv_dim = int(c.expand * c.hidden_size) + 2 * c.n_groups * c.state_size
        specs = []
        for i in range(c.num_hidden_layers):
            specs.append(StateSpec(f"layers.{i}.conv", ("batch", conv_dim, c.conv_kernel - 1),
                                   "float32", "window"))
            specs.append(StateSpec(f"layers.{i}.ssm", ("batch", c.num_heads, c.head_dim,
                                                       c.state_size), "float32", "recurrent"))
        return specs

    def graphs(self, model: nn.Module) -> dict[str, StreamingGraph]:
        c = model.config
        state = self.state_specs(model)
        p_in, p_out, s_in, s_out = lm_graph_specs(c.vocab_size, state)
        per_token2 = 4 * LIVE_SQUARE_TENSORS * c.num_heads
        max_chunk = max(1, min(256, int(math.sqrt(PREFILL_BYTES_BUDGET / per_token2))))
        return {
            "prefill": StreamingGraph("prefill", Mamba2Prefill(model).eval(), p_in, p_out, state,
                                      max_chunk=max_chunk),
            "step": StreamingGraph("step", Mamba2Step(model).eval(), s_in, s_out, state),
        }

    def exit_graph(self, model: nn.Module, layers: int, **_: Any) -> StreamingGraph:
        return exit_graph_from_step(Mamba2Step(model).eval(), self.state_specs(model),
                                    model.config.vocab_size, layers)

    def make_test_checkpoint(self, folder: Path, seed: int = 0, **overrides: Any) -> Path:
        from transformers import Mamba2Config, Mamba2ForCausalLM

        torch.manual_seed(seed)
        kw: dict[str, Any] = dict(
            vocab_size=97, hidden_size=64, num_hidden_layers=2, expand=2, head_dim=16,
            n_groups=2, state_size=16, conv_kernel=4, chunk_size=256, eos_token_id=0,
            bos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
        kw.update(overrides)
        kw.setdefault("num_heads", kw["expand"] * kw["hidden_size"] // kw["head_dim"])
        model = Mamba2ForCausalLM(Mamba2Config(**kw))
        widen_init(model, seed=seed)  # skips A_log and dt_bias, as for Mamba
        if model.config.tie_word_embeddings:  # Mamba2 declares no tied keys, so saving refuses
            model.lm_head.weight = nn.Parameter(model.backbone.embeddings.weight.detach().clone())
        model.save_pretrained(folder, safe_serialization=True)
        return Path(folder)
