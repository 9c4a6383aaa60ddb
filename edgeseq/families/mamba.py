"""Mamba (Gu & Dao, 2023: selective state spaces) as stateful streaming graphs.

The reference is transformers' ``MambaForCausalLM``. Its selective scan does not export and its
cache object is no graph output, so the step and prefill modules below re-express one Mamba block
in plain tensor ops over the *same* parameters, with the convolution window and the SSM state as
explicit tensors (mamba-minimal, and mamba's own ``step``).

Glossary of dimension letters::

    b  batch            l  chunk length (tokens fed in one prefill call)
    d  d_model          e  d_inner = expand * d_model
    n  d_state          k  conv kernel width (the window state keeps k-1 past inputs)
    r  dt_rank          v  vocab
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeseq.bundle import StateSpec, StreamingGraph
from edgeseq.checkpoint import load_into, load_state_dict, read_config
from edgeseq.families.base import TransformersCausalLM, lm_graph_specs, trace_specs, exit_graph_from_step
from edgeseq.registry import register_family

# Longest prefill chunk: the scan's depth is fixed at export (log2 of this), and ExecuTorch plans
# memory for it. Longer prompts are fed in several chunks.
MAX_CHUNK = 128
# Longest chunk of the ``verify`` graph (speculative decoding: the last token plus a draft of
# up to 7). A shorter bound means fewer scan rounds: 3 instead of the prefill's 7. Measured on
# mamba-bytes (ORT, 1 thread): an unrolled sequential scan over a fixed 8 and a static-shape
# log scan both cost more than this dynamic one, whose cost follows the draft's length.
VERIFY_CHUNK = 8


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' MambaRMSNorm, in float32 as it computes it."""
    var = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(var + eps))


class _MambaGraph(nn.Module):
    """Holds the reference model's modules (weights are shared, never copied)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        bb = model.backbone
        self.embeddings = bb.embeddings
        self.layers = bb.layers
        self.norm_f = bb.norm_f
        self.lm_head = model.lm_head
        self.eps = bb.norm_f.variance_epsilon
        self.n_layers = len(bb.layers)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(rms_norm(h, self.norm_f.weight, self.eps))


class MambaStep(_MambaGraph):
    """One token: ``(input_ids (b,), conv_0, ssm_0, conv_1, ...) -> (logits (b, v), states...)``."""

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.embeddings(input_ids)  # (b, d)
        new_state: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            conv_state, ssm_state = state[2 * i], state[2 * i + 1]  # (b, e, k-1), (b, e, n)
            mix = layer.mixer
            xz = mix.in_proj(rms_norm(h, layer.norm.weight, layer.norm.variance_epsilon))
            x, z = xz.chunk(2, dim=-1)  # (b, e) each
            window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)  # (b, e, k)
            x = (window * mix.conv1d.weight[:, 0, :]).sum(-1)
            if mix.conv1d.bias is not None:
                x = x + mix.conv1d.bias
            x = F.silu(x)
            dt, B, C = torch.split(mix.x_proj(x), [mix.time_step_rank, mix.ssm_state_size,
                                                   mix.ssm_state_size], dim=-1)
            dt = F.softplus(mix.dt_proj(dt))  # (b, e)
            A = -torch.exp(mix.A_log)  # (e, n)
            ssm = ssm_state * torch.exp(dt.unsqueeze(-1) * A) \
                + (dt * x).unsqueeze(-1) * B.unsqueeze(1)  # (b, e, n)
            y = (ssm * C.unsqueeze(1)).sum(-1) + mix.D * x  # (b, e)
            h = h + mix.out_proj(y * F.silu(z))
            new_state += [window[:, :, 1:], ssm]
        return (self._head(h), *new_state)


class MambaPrefill(_MambaGraph):
    """A chunk of l <= ``max_chunk`` tokens from a given state, without a sequential loop.

    The selective scan h_t = a_t h_{t-1} + b_t (a_t = exp(dt_t A), b_t = dt_t B_t x_t) is
    associative in (a, b); a Hillis-Steele scan computes every prefix in ceil(log2 max_chunk)
    rounds of O(l e n) work. Unlike the quadratic "segsum" form (an (l, l, e, n) decay tensor,
    which Mamba-2 can afford because its A is one scalar per head), this stays linear in l, and it
    only ever multiplies decays <= 1, so it is stable for any dt.
    """

    def __init__(self, model: nn.Module, max_chunk: int, trace: bool = False):
        super().__init__(model)
        self.rounds = max(1, math.ceil(math.log2(max(2, max_chunk))))
        # With ``trace`` the graph also returns the state after *every* position (the ``verify``
        # graph): a speculative verifier then rolls back to any accepted prefix by slicing,
        # with no replay (STree keeps one state per path for the same reason).
        self.trace = trace

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.embeddings(input_ids)  # (b, l, d)
        new_state: list[torch.Tensor] = []
        traces: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            conv_state, ssm_state = state[2 * i], state[2 * i + 1]
            mix = layer.mixer
            k = mix.conv_kernel_size
            xz = mix.in_proj(rms_norm(h, layer.norm.weight, layer.norm.variance_epsilon))
            x, z = xz.chunk(2, dim=-1)  # (b, l, e)
            window = torch.cat([conv_state, x.transpose(1, 2)], dim=-1)  # (b, e, k-1+l)
            x = F.conv1d(window, mix.conv1d.weight, mix.conv1d.bias,
                         groups=mix.intermediate_size).transpose(1, 2)  # (b, l, e)
            x = F.silu(x)
            dt, B, C = torch.split(mix.x_proj(x), [mix.time_step_rank, mix.ssm_state_size,
                                                   mix.ssm_state_size], dim=-1)
            dt = F.softplus(mix.dt_proj(dt))  # (b, l, e)
            a = torch.exp(dt.unsqueeze(-1) * -torch.exp(mix.A_log))  # (b, l, e, n)
            u = (dt * x).unsqueeze(-1) * B.unsqueeze(2)  # (b, l, e, n)
            hs = self._scan(a, u, ssm_state)  # (b, l, e, n)
            y = (hs * C.unsqueeze(2)).sum(-1) + mix.D * x  # (b, l, e)
            h = h + mix.out_proj(y * F.silu(z))
            new_state += [window[:, :, window.shape[-1] - (k - 1):], hs[:, -1]]
            if self.trace:
                # the window after position t is window[..., t+1 : t+k]
                l = x.shape[1]
                idx = (torch.arange(l).unsqueeze(1) + torch.arange(1, k).unsqueeze(0))
                traces += [window[:, :, idx].permute(0, 2, 1, 3), hs]  # (b, l, e, k-1), (b, l, e, n)
        return (self._head(h), *traces, *new_state)

    def _scan(self, a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """All prefixes of h_t = a_t h_{t-1} + u_t from h_{-1} = h0. a, u: (b, l, e, n)."""
        l = a.shape[1]
        for r in range(self.rounds):
            s = 1 << r
            # the element s steps back, or the identity (a=1, u=0) before the chunk start;
            # padding at the front keeps this shape-generic for a dynamic l
            a_prev = F.pad(a, (0, 0, 0, 0, s, 0), value=1.0)[:, :l]
            u_prev = F.pad(u, (0, 0, 0, 0, s, 0))[:, :l]
            u = a * u_prev + u
            a = a * a_prev
        # now a_t = prod_{s<=t} a_s, the decay of the incoming state up to t
        return u + a * h0.unsqueeze(1)


@register_family("mamba")
class MambaFamily(TransformersCausalLM):
    """transformers ``MambaForCausalLM`` checkpoint folders."""

    task = "causal_lm"
    model_types = ("mamba",)

    def load(self, path: Path) -> nn.Module:
        from transformers import MambaConfig, MambaForCausalLM

        path = Path(path)
        cfg = read_config(path)
        config = MambaConfig(**{k: v for k, v in cfg.items() if k != "transformers_version"})
        with torch.device("meta"):
            model = MambaForCausalLM(config)
        model = model.to_empty(device="cpu")
        sd = load_state_dict(path)
        if "lm_head.weight" not in sd and config.tie_word_embeddings:
            sd["lm_head.weight"] = sd["backbone.embeddings.weight"]
        load_into(model, sd, path)
        if config.tie_word_embeddings:
            model.tie_weights()
        return model.float().eval()

    def state_specs(self, model: nn.Module) -> list[StateSpec]:
        c = model.config
        e, n, k = c.intermediate_size, c.state_size, c.conv_kernel
        specs = []
        for i in range(c.num_hidden_layers):
            specs.append(StateSpec(f"layers.{i}.conv", ("batch", e, k - 1), "float32", "window"))
            specs.append(StateSpec(f"layers.{i}.ssm", ("batch", e, n), "float32", "recurrent"))
        return specs

    def graphs(self, model: nn.Module) -> dict[str, StreamingGraph]:
        c = model.config
        state = self.state_specs(model)
        p_in, p_out, s_in, s_out = lm_graph_specs(c.vocab_size, state)
        return {
            "prefill": StreamingGraph("prefill", MambaPrefill(model, MAX_CHUNK).eval(), p_in,
                                      p_out, state, max_chunk=MAX_CHUNK),
            "step": StreamingGraph("step", MambaStep(model).eval(), s_in, s_out, state),
            "verify": StreamingGraph("verify", MambaPrefill(model, VERIFY_CHUNK, trace=True).eval(),
                                     p_in, p_out + trace_specs(state), state,
                                     max_chunk=VERIFY_CHUNK),
        }

    def exit_graph(self, model: nn.Module, layers: int, **_: Any) -> StreamingGraph:
        return exit_graph_from_step(MambaStep(model).eval(), self.state_specs(model),
                                    model.config.vocab_size, layers)

    def make_test_checkpoint(self, folder: Path, seed: int = 0, **overrides: Any) -> Path:
        from transformers import MambaConfig, MambaForCausalLM

        torch.manual_seed(seed)
        kw = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
                  conv_kernel=4, eos_token_id=0, bos_token_id=0, pad_token_id=0,
                  tie_word_embeddings=False)
        kw.update(overrides)
        model = MambaForCausalLM(MambaConfig(**kw))
        widen_init(model)
        model.save_pretrained(folder, safe_serialization=True)
        return Path(folder)


def widen_init(model: nn.Module, seed: int = 0) -> None:
    """Re-draw weights with a wide range: default-init tiny models repeat one token, which hides
    a wrong state. Linear weights ~ N(0, 1/fan_in) keep activations O(1) through the layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log") or "dt_proj.bias" in name or name.endswith(".dt_bias"):
                continue  # keep the SSM's own stable decay parametrisation
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
                if "embed" in name:
                    p.mul_(math.sqrt(p.shape[1]))
            elif name.endswith(".D"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 3:  # depthwise conv (e, 1, k)
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
