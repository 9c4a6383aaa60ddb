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

The PyTorch modules (the Legendre system, LIF neurons, LMU cells, LMUFormer) are in
``lmu_model.py``; this module builds the streaming graphs, reads checkpoints and registers the
family.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeseq.bundle import BundleError, StateSpec, StreamingGraph, TensorSpec
from edgeseq.checkpoint import load_into, load_state_dict, read_config
from edgeseq.families.base import Family
from edgeseq.families.lmu_model import (PARITY_SCALES, SPIKING_BLOCK_STATES, Block, LMUFormer,
                                        LMUFormerConfig, legendre_discrete, spike_rates)
from edgeseq.registry import register_family

DEFAULT_CHUNK = 8


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
