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

from edgeseq.bundle import BundleError, StateSpec, StreamingGraph
from edgeseq.checkpoint import checkpoint_folder, load_into, load_state_dict, read_config
from edgeseq.families.base import TransformersCausalLM, lm_graph_specs, trace_specs, exit_graph_from_step
from edgeseq.registry import register_family

# Longest prefill chunk. The static scan (ExecuTorch's prefill, every backend's ``verify``) runs
# over this length (a chunk is padded to it), so a longer bound costs every call more; ONNX
# Runtime's prefill scans the chunk's own length (``MambaPrefill.scan_op``). Measured with the
# static scan on mamba-bytes (ORT, 1 thread): 32 tokens take 2.6 ms (0.08 ms a token, against
# 0.37 for a step) and one token 1.6 ms; a bound of 64 took 5.7 ms (no cheaper a token).
# ExecuTorch plans memory for it.
MAX_CHUNK = 32
# Longest chunk of the ``verify`` graph (speculative decoding: the last token plus a draft of up
# to 15). A ``draft_loop`` drafter's acceptance comes in long runs (the zoo drafter accepted all
# 7 of 7 tokens in 97 of 159 rounds): 16 kept 10.7 tokens a round at 1.5 ms, against 6.4 at
# 1.0 ms for 8; 12, 20, 24 and 32 were slower end to end (benchmarks/speculative.py, code).
VERIFY_CHUNK = 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' MambaRMSNorm, in float32 as it computes it."""
    var = x.pow(2).mean(-1, keepdim=True)
    return (x / torch.sqrt(var + eps)) * weight


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) as max(x, 0) + log1p(e^-|x|): the same values as ``F.softplus`` (whose
    threshold of 20 returns x where this adds less than 2e-9), in elementwise ops that ONNX
    Runtime vectorises; its Softplus kernel took 32 us for 3k elements."""
    return torch.relu(x) + torch.log1p(torch.exp(-torch.abs(x)))


def _a_t(mix: nn.Module) -> torch.Tensor:
    """A as (n, e), channels last (a constant the exporters fold).

    The graphs keep the SSM state as (b, n, e), not transformers' (b, e, n): the scan's
    elementwise ops then broadcast over rows of e = 384 floats instead of rows of n = 16, which
    ONNX Runtime's broadcasting kernels run ~3x faster (a (1, 1, 384, 1) x (1, 1, 1, 16) Mul:
    5.0 us; (1, 16, 1) x (1, 1, 384): 1.6 us, measured on this host)."""
    return -torch.exp(mix.A_log).transpose(0, 1)


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
            conv_state, ssm_state = state[2 * i], state[2 * i + 1]  # (b, e, k-1), (b, n, e)
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
            dt = softplus(mix.dt_proj(dt))  # (b, e)
            ssm = ssm_state * torch.exp(dt.unsqueeze(1) * _a_t(mix)) \
                + B.unsqueeze(-1) * (dt * x).unsqueeze(1)  # (b, n, e)
            y = torch.matmul(C.unsqueeze(1), ssm).squeeze(1) + mix.D * x  # (b, e)
            h = h + mix.out_proj(y * F.silu(z))
            new_state += [window[:, :, 1:], ssm]
        return (self._head(h), *new_state)


class MambaPrefill(_MambaGraph):
    """A chunk of l <= ``max_chunk`` tokens from a given state, without a loop in the graph.

    The selective scan h_t = a_t h_{t-1} + u_t (a_t = exp(dt_t A), u_t = dt_t B_t x_t) runs
    sequentially over the static length ``max_chunk``, the chunk padded with dt = 0 (decay 1,
    input 0), each position's decay and input formed on the spot from its (b, 1, e) and
    (b, 1, n) slices. On a CPU this small-op form beat the parallel forms it replaced: a
    chunked scan (sequential in 8-token blocks, Hillis-Steele across them, as Mamba-2's SSD
    chunks a sequence) took 4.3 ms for 32 tokens where this takes 2.6 ms, and a log-depth scan
    over the whole chunk 15.6 ms. Their full (l, n, e) passes go through memory; these ops
    touch one (n, e) state at a time, which stays in cache. Only decays <= 1 are multiplied,
    so it is stable for any dt.

    Static lengths also keep export free of guards on the dynamic l.

    ONNX Runtime gets the ``scan_op`` form instead (``StreamingGraph.control_flow``): one ONNX
    ``Scan`` per layer, whose body is one position's update. Measured on ONNX Runtime at the
    Mamba-130M shape (one layer's scan, 1 thread): 40 us for one token against 1.35 ms for the
    static form, 0.46 against 1.03 ms for 16, 0.75 against 0.88 ms for 32; the session holds
    ~5,000 fewer nodes (resident after load, weights aside: 45 -> 20 MB), and a chunk of one
    costs about 1.4 steps, so the prefill can serve steps where memory matters more than step
    speed (``StreamingGraph.serves``; docs/benchmarks.md). ExecuTorch's delegates take no
    control flow: they keep the static form.
    """

    def __init__(self, model: nn.Module, max_chunk: int, trace: bool = False,
                 scan_op: bool = False):
        super().__init__(model)
        self.length = max_chunk
        # With ``trace`` the graph also returns the state after *every* position (the ``verify``
        # graph): a speculative verifier then rolls back to any accepted prefix by slicing,
        # with no replay (STree keeps one state per path for the same reason).
        self.trace = trace
        # With ``scan_op`` the scan is torch's ``scan`` operator, which exports as one ONNX
        # ``Scan`` per layer: its cost follows the chunk's length (one token costs a step's
        # scan, not ``max_chunk``'s), so the graph serves decode steps too, and a runtime that
        # runs it for both holds one session (one packed copy of quantized weights; see
        # ``StreamingGraph.control_flow``). Not every backend runs control flow.
        self.scan_op = scan_op and not trace

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if isinstance(input_ids.shape[1], int) and input_ids.shape[1] > self.length:
            return self._in_chunks(input_ids, state)
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
            x = F.silu(self._depthwise(window, mix, x.shape[1]))  # (b, l, e)
            dt, B, C = torch.split(mix.x_proj(x), [mix.time_step_rank, mix.ssm_state_size,
                                                   mix.ssm_state_size], dim=-1)
            dt = softplus(mix.dt_proj(dt))  # (b, l, e)
            A = _a_t(mix)  # (n, e)
            y, hs, last = self._scan(dt, dt * x, B, C, A, ssm_state)
            h = h + mix.out_proj((y + mix.D * x) * F.silu(z))
            new_state += [window[:, :, window.shape[-1] - (k - 1):], last]
            if self.trace:
                # the window after position t is window[..., t+1 : t+k] (StateSpec.from_trace)
                traces += [window, hs]  # (b, e, k-1+l), (b, l, n, e)
        return (self._head(h), *traces, *new_state)

    @staticmethod
    def _depthwise(window: torch.Tensor, mix: nn.Module, l: int) -> torch.Tensor:
        """The causal depthwise convolution as k shifted multiply-adds over the window turned
        channels last, (b, e, k-1+l) -> (b, l, e): each product then broadcasts a row of e
        weights (ONNX Runtime's grouped Conv with one group per channel took 33 us on a (384, 11)
        window; channels first, each product broadcast columns of one weight)."""
        w = mix.conv1d.weight[:, 0, :].transpose(0, 1)  # (k, e)
        k = w.shape[0]
        win = window.transpose(1, 2)  # (b, k-1+l, e)
        out = win[:, 0:l] * w[0]
        for j in range(1, k):
            out = out + win[:, j:j + l] * w[j]
        return out + mix.conv1d.bias if mix.conv1d.bias is not None else out

    def _in_chunks(self, input_ids: torch.Tensor, state: tuple[torch.Tensor, ...]
                   ) -> tuple[torch.Tensor, ...]:
        """Eager calls longer than the static length (a reference over a whole sequence): in
        chunks. An exported graph never gets here: its chunk dim is bounded by ``max_chunk``."""
        n_trace = 2 * self.n_layers if self.trace else 0
        parts = []
        for i in range(0, input_ids.shape[1], self.length):
            ids = input_ids[:, i:i + self.length]
            out = self.forward(ids, *state)
            state = out[1 + n_trace:]
            # a part's SSM traces (every other trace) hold the static length: cut to the part
            parts.append([o[:, :ids.shape[1]] if j > 0 and j % 2 == 0 else o
                          for j, o in enumerate(out[:1 + n_trace])])
        return (*(torch.cat(p, 1) for p in zip(*parts)), *state)

    def _scan(self, dt: torch.Tensor, dtx: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              A: torch.Tensor, h0: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(y (b, l, e) = C_t . h_t, every position's state (b, l, n, e) with ``trace`` else
        None, the last state (b, n, e)) from h0 (b, n, e). split() keeps the position axis: no
        squeeze/unsqueeze pair per position (each a node of its own in the graph)."""
        if self.scan_op:
            return self._scanned(dt, dtx, B, C, A, h0)
        return self._static_scan(dt, dtx, B, C, A, h0)

    @staticmethod
    def _scanned(dt: torch.Tensor, dtx: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 A: torch.Tensor, h0: torch.Tensor
                 ) -> tuple[torch.Tensor, None, torch.Tensor]:
        """The scan as torch's ``scan`` operator (an ONNX ``Scan``): one body over the chunk's
        l positions, whatever l is."""
        from torch._higher_order_ops.scan import scan

        def body(h: torch.Tensor, xs: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
            dt_t, u_t, b_t, c_t = xs  # (b, e), (b, e), (b, n), (b, n)
            h = torch.exp(dt_t.unsqueeze(1) * A) * h + b_t.unsqueeze(-1) * u_t.unsqueeze(1)
            # fresh, dense tensors out: the body's outputs may not alias its inputs, and the
            # carry must keep the initial state's layout
            # (a matmul here would capture the dynamic batch size into the body, which the
            # exporter's decomposition of ``scan`` then mistakes for a tensor)
            return (h.clone(memory_format=torch.contiguous_format),
                    (c_t.unsqueeze(-1) * h).sum(1))

        A = A.contiguous()  # a transposed view (``_a_t``): products would take its strides
        # positions first (scan's ``dim`` would insert ``movedim``, which the ONNX exporter
        # only decomposes, and its decomposition fails on scan); the transposes also keep B
        # and C, views of one split, from aliasing each other as scan's operands must not
        xs = tuple(t.transpose(0, 1).contiguous() for t in (dt, dtx, B, C))  # (l, b, ...)
        last, y = scan(body, h0.contiguous(), xs, dim=0)
        return y.transpose(0, 1), None, last

    def _static_scan(self, dt: torch.Tensor, dtx: torch.Tensor, B: torch.Tensor,
                     C: torch.Tensor, A: torch.Tensor, h0: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The scan over the static length ``self.length``."""
        l = dt.shape[1]
        pad = (0, 0, 0, self.length - l)
        # to rank 4 before splitting, so the pieces broadcast as they are
        dt = F.pad(dt, pad).unsqueeze(2)  # (b, L, 1, e)
        dtx = F.pad(dtx, pad).unsqueeze(2)  # (b, L, 1, e)
        Bp = F.pad(B, pad).unsqueeze(-1)  # (b, L, n, 1)
        Cp = F.pad(C, pad).unsqueeze(2)  # (b, L, 1, n)
        h, hs, ys = h0.unsqueeze(1), [], []  # (b, 1, n, e)
        for dt_t, u_t, b_t, c_t in zip(dt.split(1, 1), dtx.split(1, 1), Bp.split(1, 1),
                                       Cp.split(1, 1)):
            h = torch.exp(dt_t * A) * h + b_t * u_t
            if self.trace:
                hs.append(h)
            else:
                # y per position from the state at hand: no (b, L, n, e) tensor of all states
                # (a concat and a gather of 786 kB each per layer at 32 tokens)
                ys.append(torch.matmul(c_t, h))  # (b, 1, 1, e)
        # padded positions (dt = 0) leave the state as it was: h is the state after l tokens.
        # A gather, not a slice: slicing [:l] off the static length makes export guard on l == L
        keep = torch.arange(l, device=dt.device)
        if self.trace:
            # the trace keeps all L positions (those past l repeat the last state): the concat
            # is the graph's output itself, which a runtime writes into a buffer it keeps, where
            # a gather to l would copy it out of a fresh (b, L, n, e) buffer on every call
            states = torch.cat(hs, 1)
            y = torch.matmul(Cp, states).squeeze(2).index_select(1, keep)  # one batched C.h
            return y, states, h[:, 0]
        return torch.cat(ys, 1).squeeze(2).index_select(1, keep), None, h[:, 0]


@register_family("mamba")
class MambaFamily(TransformersCausalLM):
    """transformers ``MambaForCausalLM`` checkpoint folders, and the original ``mamba_ssm``
    layout (state-spaces/mamba-*: ``ssm_cfg`` without a Mamba2 layer, ``backbone.embedding``)."""
    # x_proj/dt_proj produce the step size dt that scales the whole state update (exp(dt A));
    # errors there compound along the stream: float under int8, int8 under int4 (the gate
    # agreement of the zoo Mamba did not drop against float)
    quant_sensitive = ("*x_proj*", "*dt_proj*")
    quant_sensitive_floor = "int8"

    task = "causal_lm"
    model_types = ("mamba",)

    def model_config(self, model: Any) -> dict[str, Any]:
        # the prefill scan runs over its static bound whatever the chunk: a shorter chunk
        # saves no memory and costs a full call (the memory plan keeps the bound)
        return {**super().model_config(model), "prefill_static_chunk": True}

    def can_load(self, config: dict[str, Any]) -> bool:
        return super().can_load(config) or mamba_ssm_layer(config) == "Mamba1"

    def load(self, path: Path) -> nn.Module:
        from transformers import MambaConfig, MambaForCausalLM

        return load_transformers_lm(Path(path), MambaConfig, MambaForCausalLM, "Mamba1")

    def state_specs(self, model: nn.Module) -> list[StateSpec]:
        c = model.config
        e, n, k = c.intermediate_size, c.state_size, c.conv_kernel
        specs = []
        for i in range(c.num_hidden_layers):
            specs.append(StateSpec(f"layers.{i}.conv", ("batch", e, k - 1), "float32", "window"))
            # channels last (``_a_t``): (b, n, e), not transformers' (b, e, n)
            specs.append(StateSpec(f"layers.{i}.ssm", ("batch", n, e), "float32", "recurrent"))
        return specs

    def graphs(self, model: nn.Module) -> dict[str, StreamingGraph]:
        c = model.config
        state = self.state_specs(model)
        p_in, p_out, s_in, s_out = lm_graph_specs(c.vocab_size, state)
        return {
            "prefill": StreamingGraph("prefill", MambaPrefill(model, MAX_CHUNK).eval(), p_in,
                                      p_out, state, max_chunk=MAX_CHUNK,
                                      control_flow=MambaPrefill(model, MAX_CHUNK,
                                                                scan_op=True).eval(),
                                      serves="step"),
            "step": StreamingGraph("step", MambaStep(model).eval(), s_in, s_out, state),
            "verify": StreamingGraph("verify", MambaPrefill(model, VERIFY_CHUNK, trace=True).eval(),
                                     p_in, p_out + trace_specs(state, VERIFY_CHUNK), state,
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


# -- checkpoints as published --------------------------------------------------------------
# Two layouts of the same weights are published: transformers folders (``*-hf``: config.json
# with ``model_type``, model.safetensors) and the original ``mamba_ssm`` package's
# (state-spaces/mamba-130m, state-spaces/mamba2-130m: config.json in mamba_ssm's MambaConfig
# terms, no ``model_type``, pytorch_model.bin). transformers' own conversion scripts map the
# second onto the first; the maps below are theirs, and what has no transformers equivalent is
# refused by name rather than loaded into a model that computes something else.

#: mamba_ssm's MambaConfig (mamba_ssm/models/config_mamba.py), the keys of its config.json
MAMBA_SSM_KEYS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                  "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
                  "pad_vocab_size_multiple", "tie_embeddings")
#: mamba_ssm's defaults for what a config.json may leave out
MAMBA_SSM_DEFAULTS: dict[str, Any] = {"n_layer": 64, "vocab_size": 50277, "d_intermediate": 0,
                                      "ssm_cfg": {}, "attn_layer_idx": [],
                                      "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
                                      "fused_add_norm": True, "pad_vocab_size_multiple": 8,
                                      "tie_embeddings": True}
#: ssm_cfg keys -> transformers config keys, per mixer (mamba_ssm's Mamba and Mamba2 __init__
#: arguments). ``None``: the key only chooses an initialisation or a kernel, so any value loads.
SSM_CFG_KEYS: dict[str, dict[str, str | None]] = {
    "Mamba1": {"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand",
               "dt_rank": "time_step_rank", "dt_min": "time_step_min", "dt_max": "time_step_max",
               "dt_init": "time_step_init_scheme", "dt_scale": "time_step_scale",
               "dt_init_floor": "time_step_floor", "conv_bias": "use_conv_bias",
               "bias": "use_bias", "use_fast_path": None, "layer_idx": None},
    "Mamba2": {"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand",
               "headdim": "head_dim", "ngroups": "n_groups", "chunk_size": "chunk_size",
               "dt_min": "time_step_min", "dt_max": "time_step_max",
               "dt_init_floor": "time_step_floor", "dt_limit": "time_step_limit",
               "conv_bias": "use_conv_bias", "bias": "use_bias", "conv_init": None,
               "A_init_range": None, "use_mem_eff_path": None, "layer_idx": None,
               # checked below: only the values transformers' Mamba-2 computes load
               "d_ssm": None, "D_has_hdim": None, "rmsnorm": None, "norm_before_gate": None},
}
# GPT-NeoX's <|endoftext|>: bos, eos and pad of every state-spaces checkpoint (transformers'
# conversion scripts write 0 for all three; the mamba_ssm config has no token ids)
MAMBA_SSM_SPECIAL_ID = 0


def mamba_ssm_layer(config: dict[str, Any]) -> str | None:
    """``Mamba1`` or ``Mamba2`` for a mamba_ssm config.json (no ``model_type``, an ``ssm_cfg``;
    mamba_ssm's default layer is Mamba1), else None."""
    if "model_type" in config or not isinstance(config.get("ssm_cfg"), dict) \
            or "d_model" not in config:
        return None
    return config["ssm_cfg"].get("layer", "Mamba1")


def mamba_ssm_to_transformers(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """transformers ``MambaConfig`` / ``Mamba2Config`` arguments for a mamba_ssm config.json."""
    def refuse(key: str, why: str) -> BundleError:
        return BundleError(f"{where}: {key}: {why}; transformers' Mamba cannot express it, so "
                           f"edgeseq does not load it")

    unknown = sorted(set(cfg) - set(MAMBA_SSM_KEYS))
    if unknown:
        raise BundleError(f"{where}: unknown mamba_ssm config key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(MAMBA_SSM_KEYS)})")
    c = {**MAMBA_SSM_DEFAULTS, **cfg}
    ssm = dict(c["ssm_cfg"])
    layer = ssm.pop("layer", "Mamba1")
    if layer not in SSM_CFG_KEYS:
        raise refuse("ssm_cfg.layer", f"{layer!r} is not Mamba1 or Mamba2")
    if c["d_intermediate"]:
        raise refuse("d_intermediate", f"{c['d_intermediate']} adds an MLP after every mixer")
    if c["attn_layer_idx"]:
        raise refuse("attn_layer_idx", f"{c['attn_layer_idx']} makes a hybrid with attention "
                                       f"layers")
    if not c["rms_norm"]:
        raise refuse("rms_norm", "false means LayerNorm blocks (transformers' Mamba uses RMSNorm)")
    # residual_in_fp32 and fused_add_norm change precision and kernels, not the function:
    # edgeseq computes in float32 throughout, which is what residual_in_fp32 asks of the residual
    keys = SSM_CFG_KEYS[layer]
    out: dict[str, Any] = {}
    for k, v in ssm.items():
        if k not in keys:
            raise BundleError(f"{where}: unknown ssm_cfg key {k!r} for {layer} "
                              f"(known: {', '.join(sorted(keys))})")
        if keys[k]:
            out[keys[k]] = list(v) if k == "dt_limit" else v
    d = int(c["d_model"])
    if layer == "Mamba2":
        expand = int(ssm.get("expand", 2))
        if ssm.get("d_ssm") not in (None, expand * d):
            raise refuse("ssm_cfg.d_ssm", f"{ssm['d_ssm']} leaves part of the mixer outside "
                                          f"the SSM")
        if ssm.get("D_has_hdim", False):
            raise refuse("ssm_cfg.D_has_hdim", "true gives D one value per channel, not per head")
        if not ssm.get("rmsnorm", True):
            raise refuse("ssm_cfg.rmsnorm", "false drops the gated norm before out_proj")
        if ssm.get("norm_before_gate", False):
            raise refuse("ssm_cfg.norm_before_gate", "true normalises before the gate")
        head_dim = int(out.setdefault("head_dim", 64))
        out.setdefault("state_size", 128)  # mamba_ssm's Mamba2 default (Mamba1's is 16)
        out.setdefault("n_groups", 1)
        out["num_heads"] = expand * d // head_dim
    vocab = int(c["vocab_size"])
    vocab += -vocab % int(c["pad_vocab_size_multiple"])  # mamba_ssm pads the embedding rows
    return {**out, "hidden_size": d, "num_hidden_layers": int(c["n_layer"]), "vocab_size": vocab,
            "tie_word_embeddings": bool(c["tie_embeddings"]),
            "residual_in_fp32": bool(c["residual_in_fp32"]),
            "bos_token_id": MAMBA_SSM_SPECIAL_ID, "eos_token_id": MAMBA_SSM_SPECIAL_ID,
            "pad_token_id": MAMBA_SSM_SPECIAL_ID}


def load_transformers_lm(path: Path, config_cls: Any, model_cls: Any, ssm_layer: str
                         ) -> nn.Module:
    """A transformers Mamba / Mamba-2 causal LM, fp32 and in eval mode, from a transformers
    folder or a mamba_ssm one (config translated, ``backbone.embedding`` renamed as
    transformers' conversion scripts do). fp16/bf16 weights are upcast on load."""
    cfg = read_config(path)
    folder = checkpoint_folder(path)
    if mamba_ssm_layer(cfg) == ssm_layer:
        kw = mamba_ssm_to_transformers(cfg, folder / "config.json")
    else:
        kw = {k: v for k, v in cfg.items() if k != "transformers_version"}
    try:
        config = config_cls(**kw)
    except (TypeError, ValueError) as e:
        raise BundleError(f"{folder / 'config.json'}: {e}") from None
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to_empty(device="cpu")
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v
          for k, v in load_state_dict(path).items()}
    if "lm_head.weight" not in sd and config.tie_word_embeddings:
        sd["lm_head.weight"] = sd.get("backbone.embeddings.weight")
        if sd["lm_head.weight"] is None:
            del sd["lm_head.weight"]
    load_into(model, sd, path)
    if config.tie_word_embeddings:
        model.tie_weights()
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.float().eval()
