"""S4D (diagonal S4) as a causal language model and as stateful streaming graphs.

Gu, Gupta, Goel & Ré, "On the Parameterization and Initialization of Diagonal State Space Models"
(NeurIPS 2022), building on S4 (Gu, Goel & Ré, 2022) and LSSL (Gu et al., 2021). The model is
defined here (no external library): each channel runs a diagonal complex SSM with N/2 modes,
discretised by zero-order hold. Training and reference use the *convolution mode* (the SSM's
kernel applied by FFT, as the S4 repo's ``S4D`` block). Streaming uses the *recurrent mode* in
real arithmetic only (ONNX and ExecuTorch support complex tensors poorly): the complex state is
carried as its real and imaginary parts, and the LTI system lets a whole chunk be prefilled in
closed form.

Glossary of dimension letters::

    b  batch            l  sequence or chunk length (t, s index it)
    h  d_model          n  complex modes = d_state // 2
    v  vocab            2  (real, imag) pair of a complex number held as reals
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from edgeseq.bundle import BundleError, StateSpec, StreamingGraph
from edgeseq.checkpoint import load_into, load_state_dict, read_config
from edgeseq.families.base import Family, config_from_dict, lm_graph_specs, exit_graph_from_step
from edgeseq.registry import register_family

# Prefill materialises a (b, l, l, h) Toeplitz product per layer; the runtime keeps chunks under
# this size.
PREFILL_BYTES_BUDGET = 128 << 20


@dataclass
class S4DConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    d_state: int  # N; the SSM has N // 2 complex modes (conjugate pairs are implicit)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dropout: float = 0.0
    eos_token_id: int = 0
    bos_token_id: int = 0
    pad_token_id: int = 0
    tie_embeddings: bool = False
    model_type: ClassVar[str] = "edgeseq_s4d"

    def __post_init__(self) -> None:
        if self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"d_state must be a positive even number, got {self.d_state}")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "S4DConfig":
        return config_from_dict(cls, d)


def _cmul(ar: torch.Tensor, ai: torch.Tensor, br: torch.Tensor,
          bi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ar + i ai)(br + i bi) in real arithmetic."""
    return ar * br - ai * bi, ar * bi + ai * br


class S4DLayer(nn.Module):
    """One S4D mixer over h channels: y = K * u + D u, then GELU and a GLU output projection."""

    def __init__(self, d_model: int, d_state: int, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dropout: float = 0.0):
        super().__init__()
        h, n = d_model, d_state // 2
        log_dt = torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)  # (h,)
        # S4D-Lin: A_n = -1/2 + i pi n
        self.log_A_real = nn.Parameter(torch.full((h, n), math.log(0.5)))  # (h, n)
        self.A_imag = nn.Parameter(math.pi * torch.arange(n).float().repeat(h, 1))  # (h, n)
        self.C = nn.Parameter(torch.view_as_real(torch.randn(h, n, dtype=torch.cfloat)))
        self.D = nn.Parameter(torch.randn(h))  # (h,)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(h, 2 * h)

    def kernel(self, l: int) -> torch.Tensor:
        """K[t] = 2 Re(sum_n C_n (exp(dt A_n) - 1) / A_n exp(dt A_n t)), (h, l); complex maths."""
        dt = torch.exp(self.log_dt).unsqueeze(-1)  # (h, 1)
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)  # (h, n)
        dtA = dt * A  # (h, n)
        C = torch.view_as_complex(self.C) * (torch.exp(dtA) - 1.0) / A  # (h, n), B folded in
        powers = torch.exp(dtA.unsqueeze(-1) * torch.arange(l, device=A.device))  # (h, n, l)
        return 2 * torch.einsum("hn,hnl->hl", C, powers).real

    def discrete(self) -> tuple[torch.Tensor, ...]:
        """dtA, dB = (exp(dtA) - 1) / A and C as (re, im) pairs, each (h, n); no complex dtype.

        Derived from the parameters on every call so exported graphs keep reading the weights.
        """
        dt = torch.exp(self.log_dt).unsqueeze(-1)  # (h, 1)
        a_re, a_im = -torch.exp(self.log_A_real), self.A_imag  # (h, n)
        dta_re, dta_im = dt * a_re, dt * a_im
        e = torch.exp(dta_re)
        num_re, num_im = e * torch.cos(dta_im) - 1.0, e * torch.sin(dta_im)  # exp(dtA) - 1
        den = a_re * a_re + a_im * a_im
        db_re, db_im = _cmul(num_re, num_im, a_re / den, -a_im / den)  # num * conj(A) / |A|^2
        return dta_re, dta_im, db_re, db_im, self.C[..., 0], self.C[..., 1]

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return F.glu(self.out_proj(self.dropout(F.gelu(y))), dim=-1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Convolution mode over a whole sequence from the zero state: (b, l, h) -> (b, l, h)."""
        l = u.shape[1]
        k = self.kernel(l)  # (h, l)
        uf = torch.fft.rfft(u.transpose(1, 2), n=2 * l)  # (b, h, l+1); n=2l avoids wrap-around
        y = torch.fft.irfft(uf * torch.fft.rfft(k, n=2 * l), n=2 * l)[..., :l]  # (b, h, l)
        return self.output(y.transpose(1, 2) + self.D * u)  # (b, l, h)


class S4DBlock(nn.Module):
    def __init__(self, c: S4DConfig):
        super().__init__()
        self.norm = nn.LayerNorm(c.d_model)
        self.mixer = S4DLayer(c.d_model, c.d_state, c.dt_min, c.dt_max, c.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mixer(self.norm(h))


class S4DForCausalLM(nn.Module):
    """Embedding -> pre-norm S4D blocks with residuals -> LayerNorm -> lm_head (no bias)."""

    def __init__(self, config: S4DConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(S4DBlock(config) for _ in range(config.n_layers))
        self.norm_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(input_ids)  # (b, l, h)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm_f(h))  # (b, l, v)

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            del sd["lm_head.weight"]  # safetensors refuses shared storage; load re-ties it
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder


class _S4DGraph(nn.Module):
    """Holds the reference model's modules (weights are shared, never copied)."""

    def __init__(self, model: S4DForCausalLM):
        super().__init__()
        self.embedding = model.embedding
        self.layers = model.layers
        self.norm_f = model.norm_f
        self.lm_head = model.lm_head


class S4DStep(_S4DGraph):
    """One token: ``(input_ids (b,), ssm_0, ssm_1, ...) -> (logits (b, v), states...)``.

    Each state is the complex mode vector x as (b, h, n, 2); x <- dA x + dB u, y = 2 Re(C x) + D u.
    """

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.embedding(input_ids)  # (b, h)
        new_state: list[torch.Tensor] = []
        for layer, x in zip(self.layers, state):
            mix = layer.mixer
            u = layer.norm(h)  # (b, h)
            dta_re, dta_im, db_re, db_im, c_re, c_im = mix.discrete()  # (h, n) each
            e = torch.exp(dta_re)
            da_re, da_im = e * torch.cos(dta_im), e * torch.sin(dta_im)  # dA = exp(dtA)
            x_re, x_im = _cmul(da_re, da_im, x[..., 0], x[..., 1])  # (b, h, n)
            x_re = x_re + db_re * u.unsqueeze(-1)
            x_im = x_im + db_im * u.unsqueeze(-1)
            y = 2 * (c_re * x_re - c_im * x_im).sum(-1) + mix.D * u  # (b, h)
            h = h + mix.output(y)
            new_state.append(torch.stack([x_re, x_im], dim=-1))  # (b, h, n, 2)
        return (self.lm_head(self.norm_f(h)), *new_state)


class S4DPrefill(_S4DGraph):
    """A chunk of l tokens from a given state, in closed form (the system is LTI).

    With x0 the incoming state: y_t = sum_{s<=t} K[t-s] u_s + 2 Re(C dA^(t+1) x0) + D u_t and the
    final state is dA^l x0 + sum_s dA^(l-1-s) dB u_s, where dA^t = exp(t dtA).
    """

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.embedding(input_ids)  # (b, l, h)
        l = input_ids.shape[1]
        t = torch.arange(l, device=input_ids.device)
        lag = t.unsqueeze(1) - t.unsqueeze(0)  # (l, l), t - s
        causal = (lag >= 0).unsqueeze(-1)  # (l, l, 1)
        steps = torch.arange(l + 1, device=input_ids.device).to(h.dtype)  # exponents 0..l
        new_state: list[torch.Tensor] = []
        for layer, x in zip(self.layers, state):
            mix = layer.mixer
            u = layer.norm(h)  # (b, l, h)
            dta_re, dta_im, db_re, db_im, c_re, c_im = mix.discrete()  # (h, n) each
            mag = torch.exp(dta_re.unsqueeze(-1) * steps)  # (h, n, l+1)
            ang = dta_im.unsqueeze(-1) * steps
            p_re, p_im = mag * torch.cos(ang), mag * torch.sin(ang)  # dA^k, k = 0..l
            cdb_re, cdb_im = _cmul(c_re, c_im, db_re, db_im)  # (h, n)
            k = 2 * (cdb_re.unsqueeze(-1) * p_re[..., :l]
                     - cdb_im.unsqueeze(-1) * p_im[..., :l]).sum(1).t()  # (l, h), K[0..l-1]
            toeplitz = k[lag.clamp(min=0)].masked_fill(~causal, 0.0)  # (l, l, h), K[t-s]
            # Broadcast-and-sum rather than einsum: einsum lowers to bmm between reshapes with two
            # dynamic dims (batch, chunk), which XNNPACK's reshape cannot take.
            y = (toeplitz * u.unsqueeze(1)).sum(2) + mix.D * u  # (b, l, h)
            # Incoming state seen at step t through C dA^(t+1).
            cp_re, cp_im = _cmul(c_re.unsqueeze(-1), c_im.unsqueeze(-1),
                                 p_re[..., 1:], p_im[..., 1:])  # (h, n, l)
            y0 = (cp_re * x[..., 0].unsqueeze(-1)
                  - cp_im * x[..., 1].unsqueeze(-1)).sum(2)  # (b, h, l)
            y = y + 2 * y0.transpose(1, 2)  # (b, l, h)
            h = h + mix.output(y)
            # Final state: dA^(l-1-s) dB u_s summed over s, plus dA^l x0.
            q_re, q_im = _cmul(p_re[..., :l].flip(-1), p_im[..., :l].flip(-1),
                               db_re.unsqueeze(-1), db_im.unsqueeze(-1))  # (h, n, l)
            dal_re, dal_im = _cmul(p_re[..., l], p_im[..., l], x[..., 0], x[..., 1])  # (b, h, n)
            us = u.transpose(1, 2).unsqueeze(2)  # (b, h, 1, l)
            x_re = dal_re + (q_re * us).sum(-1)  # (b, h, n)
            x_im = dal_im + (q_im * us).sum(-1)
            new_state.append(torch.stack([x_re, x_im], dim=-1))  # (b, h, n, 2)
        return (self.lm_head(self.norm_f(h)), *new_state)


@register_family("s4d")
class S4DFamily(Family):
    """edgeseq's own ``S4DForCausalLM`` checkpoint folders (``save_pretrained``)."""

    task = "causal_lm"
    model_types = ("edgeseq_s4d",)

    def load(self, path: Path) -> nn.Module:
        path = Path(path)
        try:
            config = S4DConfig.from_dict(read_config(path))
        except ValueError as e:
            raise BundleError(f"{path / 'config.json'}: {e}") from None
        model = S4DForCausalLM(config)
        sd = load_state_dict(path)
        if config.tie_embeddings and "lm_head.weight" not in sd and "embedding.weight" in sd:
            sd["lm_head.weight"] = sd["embedding.weight"]
        load_into(model, sd, path)
        return model.float().eval()

    def state_specs(self, model: nn.Module) -> list[StateSpec]:
        c = model.config
        return [StateSpec(f"layers.{i}.ssm", ("batch", c.d_model, c.d_state // 2, 2), "float32",
                          "recurrent") for i in range(c.n_layers)]

    def graphs(self, model: nn.Module) -> dict[str, StreamingGraph]:
        c = model.config
        state = self.state_specs(model)
        p_in, p_out, s_in, s_out = lm_graph_specs(c.vocab_size, state)
        per_token2 = 4 * c.d_model  # bytes of the (b, l, l, h) product per l^2, per batch row
        max_chunk = max(1, min(64, int(math.sqrt(PREFILL_BYTES_BUDGET / per_token2))))
        return {
            "prefill": StreamingGraph("prefill", S4DPrefill(model).eval(), p_in, p_out, state,
                                      max_chunk=max_chunk),
            "step": StreamingGraph("step", S4DStep(model).eval(), s_in, s_out, state),
        }

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        c = model.config
        return {"vocab_size": c.vocab_size, "eos_token_id": c.eos_token_id,
                "bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
                "d_model": c.d_model, "n_layers": c.n_layers}

    @torch.no_grad()
    def reference_logits(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids).float()

    @torch.no_grad()
    def reference_greedy(self, model: nn.Module, input_ids: torch.Tensor,
                         max_new_tokens: int) -> torch.Tensor:
        """Re-runs the convolution mode on the whole sequence for every token (no state at all)."""
        ids = input_ids
        for _ in range(max_new_tokens):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)  # (b, 1)
            ids = torch.cat([ids, nxt], dim=1)
        return ids[:, input_ids.shape[1]:]

    def exit_graph(self, model: nn.Module, layers: int, **_: Any) -> StreamingGraph:
        return exit_graph_from_step(S4DStep(model).eval(), self.state_specs(model),
                                    model.config.vocab_size, layers)

    def make_test_checkpoint(self, folder: Path, seed: int = 0, **overrides: Any) -> Path:
        torch.manual_seed(seed)
        kw: dict[str, Any] = dict(vocab_size=97, d_model=64, n_layers=2, d_state=32)
        kw.update(overrides)
        model = S4DForCausalLM(S4DConfig(**kw))
        # Default-init tiny models repeat one token, which would hide a wrong state. Linear
        # weights ~ N(0, 1/fan_in) keep activations O(1); the SSM keeps its S4D-Lin A and dt.
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("weight", ".C", ".D")) and "norm" not in name:
                    p.copy_(torch.randn(p.shape, generator=g))
                    if p.dim() == 2 and not name.startswith("embedding"):
                        p.div_(math.sqrt(p.shape[1]))
        model.save_pretrained(folder)
        return Path(folder)
