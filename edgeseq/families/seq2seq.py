"""Encoder-decoder Transformers (T5, BART, Marian, Whisper) as streaming graphs with explicit caches.

Small encoder-decoders are the practical language models of the edge: the input is encoded once
and a light decoder then runs one token at a time (Return of the Encoder; Encoder-Decoder Gemma).
Two graphs carry a model:

- ``encoder``: the source (token ids + mask, or log-mel features) -> the cross-attention K/V of
  every decoder layer, ``cross.{i}.key`` (b, h, k, s) and ``cross.{i}.value`` (b, h, s, k).
  They are computed once per input, never per token; the keys are stored transposed, as the
  scores ``q @ K^T`` read them, so no step transposes them (a Whisper decoder step at 1 thread,
  fp32: 12.8 -> 11.3 ms; ONNX Runtime's transposing MatMul packs the 1500-frame keys per call).
- ``decoder_step``: ``input_ids`` (b,), ``cache_position`` (1,), [``encoder_attention_mask``
  (b, s)], the cross K/V, and the self-attention cache ``state_in.self.{i}.key|value`` ->
  ``logits`` (b, v) and ``state_out.self.{i}.key|value``.

Two more serve speculative decoding (``edgeseq.runtime.speculative``):

- ``decoder_chunk``: ``decoder_step`` over c tokens (a draft, chain or tree; see
  ``DecoderChunk``) -> ``logits`` (b, c, v) and the caches with c more positions.
- ``exit_step`` (``--early-exit N``): ``decoder_step`` through the first N layers only.

Two cache layouts (``StateSpec.kind == "kv"``):

- ``dynamic``: the cache has ``past`` positions and each step returns it with one more
  (concatenation), as optimum's ``decoder_with_past`` does.
- ``fixed`` (``--max-target-len N``): static shapes; the step writes its K/V at
  ``cache_position`` (a select, so the write is in place wherever the runtime aliases the buffer)
  and masks positions beyond it. Static shapes are what NPUs and ExecuTorch's planned memory want.

The modules below re-express the decoder step in plain tensor ops over the *same* parameters as
the transformers model (no copies), one adapter per architecture; encoders reuse the library's
own encoder where it exports as is.

Glossary of dimension letters::

    b  batch (rows: sources x beams)   s  source positions (encoder output length)
    t  cache positions (past + 1, or the fixed capacity)
    h  attention heads   k  head dim   d  d_model   v  vocab   f  mel frames   m  mel bins
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edgeseq.bundle import BundleError, StateSpec, StreamingGraph, TensorSpec
from edgeseq.convert.stages import Stage, arg, out, run_stages
from edgeseq.checkpoint import checkpoint_folder, load_into, load_state_dict, read_config
from edgeseq.families.base import Family
from edgeseq.generation import GENERATION_FIELDS
# the longest source an encoder without a position table (T5) is exported for; the runtime
# refuses longer ones with the same number
from edgeseq.limits import DEFAULT_MAX_SOURCE

LAYOUTS = ("dynamic", "fixed")
# Most tokens the ``decoder_chunk`` graph verifies in one call (a draft chain or tree, plus the
# last decided token); ExecuTorch plans memory for it.
VERIFY_CHUNK = 32
# Real text for parity through the checkpoint's own tokenizer (a typo or two, punctuation).
PARITY_TEXT = "Retrun the numbr of itmes in teh lsit, and stop."


def split_heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(b, t, h*k) -> (b, h, t, k)"""
    b, t, hk = x.shape
    return x.reshape(b, t, h, hk // h).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(b, h, t, k) -> (b, t, h*k)"""
    b, h, t, k = x.shape
    return x.transpose(1, 2).reshape(b, t, h * k)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention. q (b, h, 1, k), k/v (b, h, t, k), bias broadcastable to (b, h, 1, t)."""
    return attend_t(q, k.transpose(-1, -2), v, scale, bias)


def attend_t(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, scale: float,
             bias: torch.Tensor | None) -> torch.Tensor:
    """``attend`` with the keys given transposed: k_t (b, h, k, t) (the stored cross keys)."""
    scores = torch.matmul(q, k_t)
    if scale != 1.0:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, s) 1/0 attention mask -> additive bias (b, 1, 1, s)."""
    neg = torch.finfo(dtype).min
    return ((1 - mask.to(dtype)) * neg)[:, None, None, :]


class DecoderStep(nn.Module):
    """The shared decoder-step contract; subclasses supply one architecture's maths.

    ``forward(input_ids (b,), cache_position (1,), [encoder_attention_mask (b, s)],
    *cross (2 per layer), *cache (2 per layer)) -> (logits (b, v), *cache')``.
    """

    # whether ``self_bias`` gives a position bias (T5) rather than None
    has_self_bias = False

    def __init__(self, n_layers: int, layout: str, has_mask: bool):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown cache layout {layout!r}; known: {', '.join(LAYOUTS)}")
        self.n_layers = n_layers
        self.layout = layout
        self.has_mask = has_mask

    # -- what an architecture provides ---------------------------------------------------
    def embed(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """(b,) ids -> (b, 1, d) decoder input embeddings at ``cache_position``."""
        raise NotImplementedError

    def self_bias(self, cache_position: torch.Tensor, t: int) -> torch.Tensor | None:
        """Position bias (1, h, 1, t) for the self-attention over t cache slots (T5), or None."""
        return None

    def layer(self, lay: nn.Module, x: torch.Tensor, self_attn: Callable, cross_attn: Callable
              ) -> torch.Tensor:
        """One layer (``layer_module(i)``) over x; ``self_attn(q, k, v, scale)`` and
        ``cross_attn(q, scale)`` attend with the layer's caches."""
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 1, d) -> (b, v) logits."""
        raise NotImplementedError

    # -- the same, for a chunk of c tokens (the ``decoder_chunk`` graph) ---------------------
    def embed_chunk(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(b, c) ids at logical ``positions`` (c,) -> (b, c, d)."""
        raise NotImplementedError

    def chunk_bias(self, positions: torch.Tensor, key_positions: torch.Tensor
                   ) -> torch.Tensor | None:
        """Position bias (1, h, c, t) of c queries over t keys at these logical positions."""
        return None

    def head_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, d) -> (b, c, v) logits."""
        raise NotImplementedError

    # -- the step itself -----------------------------------------------------------------
    def layer_module(self, i: int) -> nn.Module:
        """The i-th decoder layer's module: what ``layer`` reads its weights from."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor, *rest: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        return run_stages(self.stages(), (input_ids, cache_position, *rest))

    def stages(self) -> list[Stage]:
        return decoder_stages(self, chunk=False)


class DecoderChunk(nn.Module):
    """Verification of c draft tokens in one call: a chain, or a tree flattened in topological order.

    ``forward(input_ids (b, c), cache_position (1,), positions (c,), tree_mask (c, c),
    [encoder_attention_mask (b, s)], *cross, *cache) -> (logits (b, c, v), *cache')``.
    ``positions`` are the nodes' logical positions (the cache position plus depth - 1 in a tree),
    ``tree_mask[i, j] = 1`` where node j is node i or one of its ancestors (SpecInfer / Medusa
    tree attention). Node i's K/V go to slot ``cache_position + i``: appended to a dynamic cache,
    written in place in a fixed one. The verifier then keeps the accepted path's slots (a crop
    for a chain). The per-architecture maths is the step module's (``embed_chunk``,
    ``chunk_bias``, ``layer``, ``head_chunk``); its weights are shared, not copied.
    """

    def __init__(self, step: DecoderStep):
        super().__init__()
        self.step = step

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor,
                positions: torch.Tensor, tree_mask: torch.Tensor, *rest: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        return run_stages(self.stages(), (input_ids, cache_position, positions, tree_mask, *rest))

    def stages(self) -> list[Stage]:
        return decoder_stages(self.step, chunk=True)


def decoder_stages(step: DecoderStep, chunk: bool) -> list[Stage]:
    """The decoder step (or chunk) as prologue, one stage per layer, epilogue
    (``edgeseq.convert.stages``): the layers share one template."""
    n = step.n_layers
    first_cross = (4 if chunk else 2) + int(step.has_mask)
    first_cache = first_cross + 2 * n
    fixed = step.layout == "fixed"
    ctx = ["bias"] if (chunk or fixed or step.has_self_bias) else []
    if step.has_mask:
        ctx.append("enc_bias")
    if fixed:
        ctx += ["write", "idx"] if chunk else ["hit"]
    pro_in = [arg(j) for j in range(first_cross)] + [arg(first_cache)]
    stages = [Stage(_DecoderPrologue(step, chunk, tuple(ctx)), tuple(pro_in), ("x0", *ctx))]
    for i in range(n):
        kv = (arg(first_cache + 2 * i), arg(first_cache + 2 * i + 1),
              arg(first_cross + 2 * i), arg(first_cross + 2 * i + 1))
        stages.append(Stage(_DecoderLayer(step, i, chunk, tuple(ctx)), (f"x{i}", *ctx, *kv),
                            (f"x{i + 1}", out(1 + 2 * i), out(2 + 2 * i)),
                            template="decoder_layer"))
    stages.append(Stage(_DecoderEpilogue(step, chunk), (f"x{n}",), (out(0),)))
    return stages


class _DecoderPrologue(nn.Module):
    """Embedding and the masks and biases every layer reads: ``(input_ids, cache_position,
    [positions, tree_mask], [encoder_attention_mask], first layer's cached keys) -> (x, *ctx)``."""

    def __init__(self, step: DecoderStep, chunk: bool, ctx: tuple[str, ...]):
        super().__init__()
        self.step, self.chunk, self.ctx = step, chunk, ctx

    def forward(self, *a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        st = self.step
        if self.chunk:
            input_ids, cache_position, positions, tree_mask = a[:4]
            rest = a[4:]
        else:
            input_ids, cache_position = a[:2]
            rest = a[2:]
        k0 = rest[-1]
        got: dict[str, torch.Tensor | None] = {}
        if st.has_mask:
            got["enc_bias"] = mask_bias(rest[0], torch.float32)
        if self.chunk:
            x = st.embed_chunk(input_ids, positions)                      # (b, c, d)
            c = input_ids.shape[1]
            neg = torch.finfo(torch.float32).min
            tree = torch.where(tree_mask > 0, 0.0, neg)                   # (c, c)
            if st.layout == "dynamic":
                past = k0.shape[2]
                key_pos = torch.cat([torch.arange(past, device=x.device), positions])
                bias = torch.cat([torch.zeros(c, past, device=x.device), tree], dim=1)  # (c, t)
            else:
                slots = torch.arange(k0.shape[2], device=x.device)
                rel = slots - cache_position                              # (t,)
                inside = (rel >= 0) & (rel < c)
                idx = rel.clamp(0, c - 1)
                key_pos = torch.where(inside, positions[idx], slots)
                before = torch.where(rel < 0, 0.0, neg)                   # (t,) the past
                bias = torch.where(inside.unsqueeze(0), tree[:, idx], before.unsqueeze(0))
                got["write"], got["idx"] = inside.view(1, 1, -1, 1), idx
            bias = bias[None, None]                                       # (1, 1, c, t)
            pos_bias = st.chunk_bias(positions, key_pos)
            got["bias"] = bias if pos_bias is None else bias + pos_bias
        else:
            x = st.embed(input_ids, cache_position)                       # (b, 1, d)
            t = k0.shape[2] + 1 if st.layout == "dynamic" else k0.shape[2]
            bias = st.self_bias(cache_position, t)
            if st.layout == "fixed":
                slots = torch.arange(t, device=x.device)
                got["hit"] = (slots == cache_position).view(1, 1, t, 1)  # where this step writes
                future = torch.where(slots <= cache_position, 0.0, torch.finfo(torch.float32).min)
                bias = future.view(1, 1, 1, t) if bias is None else bias + future.view(1, 1, 1, t)
            got["bias"] = bias
        return (x, *[got[name] for name in self.ctx])


class _DecoderLayer(nn.Module):
    """One decoder layer: ``(x, *ctx, k_past, v_past, k_cross, v_cross) -> (x, k, v)``.
    Owns only its layer's weights (the template's parameter names); the maths is the step's."""

    def __init__(self, step: DecoderStep, i: int, chunk: bool, ctx: tuple[str, ...]):
        super().__init__()
        self.lay = step.layer_module(i)
        self.__dict__["_step"] = step         # not a submodule: its other weights are not ours
        self.chunk, self.ctx = chunk, ctx

    def forward(self, x: torch.Tensor, *a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx = dict(zip(self.ctx, a))
        k_past, v_past, k_x, v_x = a[len(self.ctx):]
        bias, enc_bias = ctx.get("bias"), ctx.get("enc_bias")
        new: list[torch.Tensor] = []

        def self_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                      ) -> torch.Tensor:
            if "hit" in ctx:
                k_all = torch.where(ctx["hit"], k, k_past)
                v_all = torch.where(ctx["hit"], v, v_past)
            elif "write" in ctx:
                k_all = torch.where(ctx["write"], k[:, :, ctx["idx"]], k_past)
                v_all = torch.where(ctx["write"], v[:, :, ctx["idx"]], v_past)
            else:
                k_all = torch.cat([k_past, k], dim=2)                     # (b, h, t, k)
                v_all = torch.cat([v_past, v], dim=2)
            new.extend([k_all, v_all])
            return attend(q, k_all, v_all, scale, bias)

        def cross_attn(q: torch.Tensor, scale: float) -> torch.Tensor:
            return attend_t(q, k_x, v_x, scale, enc_bias)

        x = self._step.layer(self.lay, x, self_attn, cross_attn)
        return (x, *new)


class _DecoderEpilogue(nn.Module):
    def __init__(self, step: DecoderStep, chunk: bool):
        super().__init__()
        self.step, self.chunk = step, chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step.head_chunk(x) if self.chunk else self.step.head(x)


class CrossKV(nn.Module):
    """Encoder output (b, s, d) -> the cross-attention K (b, h, k, s: transposed) and V
    (b, h, s, k) of every decoder layer."""

    def __init__(self, projections: list[tuple[nn.Module, nn.Module]], heads: int):
        super().__init__()
        self.k = nn.ModuleList([k for k, _ in projections])
        self.v = nn.ModuleList([v for _, v in projections])
        self.heads = heads

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for k, v in zip(self.k, self.v):
            out.extend([split_heads(k(h), self.heads).transpose(-1, -2),
                        split_heads(v(h), self.heads)])
        return out


@dataclass
class EncodedSource:
    """A source and one model's encoder output for it (``Seq2SeqFamily.reference_encoded``)."""
    source: Any
    encoder_outputs: Any


class Seq2SeqFamily(Family):
    """Base for the encoder-decoder architectures; subclasses register one ``model_type`` each."""

    task = "seq2seq"
    model_class: str = ""          # transformers class name
    speech = False                 # Whisper: the encoder takes log-mel features

    # -- loading ---------------------------------------------------------------------------
    def config_class(self) -> Any:
        raise NotImplementedError

    def load(self, path: Path) -> Any:
        import transformers

        cfg = read_config(path)
        config = self.config_class()(**{k: v for k, v in cfg.items()
                                        if k not in ("transformers_version", "architectures")})
        # eager attention: plain matmul/softmax ops, which every exporter handles the same way
        config._attn_implementation = "eager"
        model = getattr(transformers, self.model_class)(config)
        sd = load_state_dict(path)
        own = model.state_dict()
        # tied and recomputed tensors (shared embeddings, sinusoidal tables) may be absent
        absent = [k for k in own if k not in sd and self._may_be_absent(k)]
        for k in absent:
            sd[k] = own[k]
        load_into(model, sd, path)
        model.tie_weights()
        self._check_tied(model, absent, set(sd) - set(absent), path)
        folder = checkpoint_folder(path)
        if (folder / "generation_config.json").is_file():
            model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
        return model.float().eval()

    #: tensors a checkpoint may omit because the model ties them to another one
    TIED_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "proj_out.weight")

    def _may_be_absent(self, key: str) -> bool:
        return key.endswith((*self.TIED_SUFFIXES, "embed_positions.weight", "final_logits_bias"))

    def _check_tied(self, model: Any, absent: list[str], loaded: set[str], path: Path) -> None:
        """An absent tied-kind tensor must now share storage with a loaded one: an untied
        ``lm_head`` (Flan-T5, ``tie_word_embeddings: false``) missing from the checkpoint is an
        incomplete checkpoint, never the embedding (nor a random matrix) in its place."""
        sd = model.state_dict()
        ptrs = {sd[k].data_ptr() for k in loaded if k in sd}
        for k in absent:
            if k.endswith(self.TIED_SUFFIXES) and sd[k].data_ptr() not in ptrs:
                tie = getattr(model.config, "tie_word_embeddings", None)
                raise BundleError(f"{path}: {k} is missing, and config.json does not tie it to "
                                  f"the embedding (tie_word_embeddings: {str(tie).lower()})")

    # -- graphs ----------------------------------------------------------------------------
    def dims(self, model: Any) -> dict[str, int]:
        """n_layers (decoder), heads, head_dim, vocab, max_target (position table), max_source."""
        raise NotImplementedError

    def encoder_module(self, model: Any) -> nn.Module:
        raise NotImplementedError

    def step_module(self, model: Any, layout: str) -> DecoderStep:
        raise NotImplementedError

    def graphs(self, model: Any, max_target_len: int | None = None, **_: Any
               ) -> dict[str, StreamingGraph]:
        d = self.dims(model)
        n, h, k, v = d["n_layers"], d["heads"], d["head_dim"], d["vocab"]
        layout = "fixed" if max_target_len else "dynamic"
        if max_target_len and d.get("max_target") and max_target_len > d["max_target"]:
            raise BundleError(f"--max-target-len {max_target_len} exceeds the model's "
                              f"{d['max_target']} decoder positions")
        cap = max_target_len or d.get("max_target") or 1024
        max_source = d.get("max_source") or DEFAULT_MAX_SOURCE
        cross = [TensorSpec(f"cross.{i}.{kv}",
                            ("batch", h, k, "source") if kv == "key" else ("batch", h, "source", k))
                 for i in range(n) for kv in ("key", "value")]
        t_dim: str | int = "past" if layout == "dynamic" else max_target_len
        state = [StateSpec(f"self.{i}.{kv}", ("batch", h, t_dim, k), "float32", "kv")
                 for i in range(n) for kv in ("key", "value")]
        if self.speech:
            enc_in = [TensorSpec("input_features", ("batch", d["n_mels"], "frames"))]
            # even frames (the stride-2 convolution halves them), >= 2 encoder positions
            enc_bounds = {"frames": (4, 2 * max_source, 2)}
        else:
            enc_in = [TensorSpec("input_ids", ("batch", "source"), "int64"),
                      TensorSpec("attention_mask", ("batch", "source"), "int64")]
            enc_bounds = {"source": (1, max_source)}
        step_in = [TensorSpec("input_ids", ("batch",), "int64"),
                   TensorSpec("cache_position", (1,), "int64")]
        if not self.speech:
            step_in.append(TensorSpec("encoder_attention_mask", ("batch", "source"), "int64"))
        step_in += cross
        step_bounds = {"source": (1, max_source)}
        if layout == "dynamic":
            step_bounds["past"] = (0, cap - 1)
        ex = {"batch": 2, "source": 7, "frames": 14, "past": 3}
        speech = self.speech

        def enc_example(dims: dict[str, int], seed: int) -> list[torch.Tensor]:
            g = torch.Generator().manual_seed(seed)
            b = dims["batch"]
            if speech:
                return [torch.randn(b, d["n_mels"], dims["frames"], generator=g)]
            s = dims["source"]
            return [torch.randint(0, v, (b, s), generator=g), torch.ones(b, s, dtype=torch.int64)]

        def step_example(dims: dict[str, int], seed: int) -> list[torch.Tensor]:
            g = torch.Generator().manual_seed(seed)
            b, s = dims["batch"], dims["source"]
            t = dims["past"] if layout == "dynamic" else max_target_len
            out = [torch.randint(0, v, (b,), generator=g), torch.tensor([min(3, t - 1)])]
            if not speech:
                out.append(torch.ones(b, s, dtype=torch.int64))
            out += [0.1 * torch.randn(*((b, h, k, s) if j % 2 == 0 else (b, h, s, k)),
                                      generator=g) for j in range(2 * n)]  # K transposed, V
            out += [0.1 * torch.randn(b, h, t, k, generator=g) for _ in range(2 * n)]
            return out

        chunk_in = [step_in[0].__class__("input_ids", ("batch", "chunk"), "int64"), step_in[1],
                    TensorSpec("positions", ("chunk",), "int64"),
                    TensorSpec("tree_mask", ("chunk", "chunk"), "int64"), *step_in[2:]]

        def chunk_example(dims: dict[str, int], seed: int) -> list[torch.Tensor]:
            base = step_example(dims, seed)
            c = dims["chunk"]
            t = dims["past"] if layout == "dynamic" else max_target_len
            start = 0 if layout == "dynamic" else min(3, t - c)
            ids = torch.randint(0, v, (dims["batch"], c), generator=torch.Generator().manual_seed(seed))
            # a small tree: node 2 branches off node 0
            parents = [-1] + [max(0, j - 1) if j != 2 else 0 for j in range(1, c)]
            mask = torch.eye(c, dtype=torch.int64)
            depth = [1] * c
            for j in range(1, c):
                mask[j] |= mask[parents[j]]
                depth[j] = depth[parents[j]] + 1
            pos = torch.tensor(depth) - 1 + (t if layout == "dynamic" else start)
            return [ids, torch.tensor([start if layout == "fixed" else t]), pos, mask, *base[2:]]

        step = self.step_module(model, layout).eval()
        return {
            "encoder": StreamingGraph("encoder", self.encoder_module(model).eval(), enc_in, cross,
                                      [], example_dims=ex, dim_bounds=enc_bounds,
                                      make_example=enc_example),
            "decoder_step": StreamingGraph(
                "decoder_step", step, step_in,
                [TensorSpec("logits", ("batch", v))], state, example_dims=ex,
                dim_bounds=step_bounds, make_example=step_example),
            "decoder_chunk": StreamingGraph(
                "decoder_chunk", DecoderChunk(step).eval(), chunk_in,
                [TensorSpec("logits", ("batch", "chunk", v))], state, example_dims=ex,
                max_chunk=VERIFY_CHUNK, dim_bounds=step_bounds, make_example=chunk_example),
        }

    def exit_graph(self, model: Any, layers: int, max_target_len: int | None = None,
                   **_: Any) -> StreamingGraph:
        """``exit_step``: the decoder step through the first ``layers`` layers, then the head
        (Kangaroo's shallow sub-network as a self-speculative drafter)."""
        full = self.graphs(model, max_target_len)["decoder_step"]
        n = self.dims(model)["n_layers"]
        if not 1 <= layers < n:
            raise BundleError(f"--early-exit {layers}: the decoder has {n} layers; "
                              f"give 1 to {n - 1}")
        step = self.step_module(model, "fixed" if max_target_len else "dynamic").eval()
        step.n_layers = layers
        keep = {f"cross.{i}.{kv}" for i in range(layers) for kv in ("key", "value")}
        inputs = [s for s in full.inputs if not s.name.startswith("cross.") or s.name in keep]
        n_fixed = len(full.inputs) - 2 * n  # ids, position, [mask]

        def example(dims: dict[str, int], seed: int) -> list[torch.Tensor]:
            ex = full.make_example(dims, seed)
            return [*ex[:n_fixed], *ex[n_fixed:n_fixed + 2 * layers],
                    *ex[n_fixed + 2 * n:n_fixed + 2 * n + 2 * layers]]

        return StreamingGraph("exit_step", step, inputs, full.outputs, full.state[:2 * layers],
                              example_dims=full.example_dims, dim_bounds=full.dim_bounds,
                              make_example=example)

    # -- what the runtime needs --------------------------------------------------------------
    def model_config(self, model: Any, max_target_len: int | None = None, **_: Any
                     ) -> dict[str, Any]:
        d = self.dims(model)
        c = model.config
        gen = {f: _jsonable(getattr(model.generation_config, f, None)) for f in GENERATION_FIELDS}
        for f in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
            if gen.get(f) is None:
                gen[f] = getattr(c, f, None)
        return {"vocab_size": d["vocab"], "n_layers": d["n_layers"], "heads": d["heads"],
                "head_dim": d["head_dim"], "d_model": c.d_model,
                "eos_token_id": gen["eos_token_id"], "pad_token_id": gen["pad_token_id"],
                "decoder_start_token_id": gen["decoder_start_token_id"],
                "max_source_positions": d.get("max_source"),
                "max_target_positions": d.get("max_target"),
                "cache_layout": "fixed" if max_target_len else "dynamic",
                "max_target_len": max_target_len or d.get("max_target"),
                "decoder_prompt": self.decoder_prompt(model, gen),
                "generation": self.effective_generation(gen), "architecture": self.name,
                # named tasks (T5's translation/summarization prefixes): edgeseq run --task
                "task_specific_params": _jsonable(getattr(c, "task_specific_params", None))}

    def decoder_prompt(self, model: Any, gen: dict[str, Any]) -> list[int]:
        """The tokens the decoder starts from (Whisper adds its forced language/task tokens)."""
        return [int(gen["decoder_start_token_id"])]

    def reference_prompt(self, model: Any, source: Any) -> list[int]:
        """The decoder prompt transformers' ``generate`` starts from for this source: the
        static ``decoder_prompt`` unless the family's depends on the source (Whisper detects
        the language from it)."""
        return self.decoder_prompt(model, self.model_config(model)["generation"])

    # -- the reference -------------------------------------------------------------------------
    def reference_encoded(self, model: Any, source: Any) -> Any:
        """``source`` with ``model``'s encoder output attached, for the reference calls on that
        model only: a speech window's encoder is most of a reference run (Whisper-tiny, 30 s,
        one thread: ~0.8 s, run by the prompt, greedy, beam and logits calls each). Text
        sources are returned as they are (their encoder costs little)."""
        if not self.speech:
            return source
        with torch.no_grad():
            out = model.get_encoder()(**self.reference_encode_inputs(source))
        return EncodedSource(source, out)

    def reference_encode_inputs(self, source: Any) -> dict[str, Any]:
        """Keyword arguments for the transformers model given one source (ids or features)."""
        if isinstance(source, EncodedSource):
            return {"encoder_outputs": source.encoder_outputs}
        if self.speech:
            return {"input_features": torch.as_tensor(source, dtype=torch.float32)[None]}
        ids = torch.as_tensor(source, dtype=torch.int64)[None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def reference_generate(self, model: Any, source: Any, max_new_tokens: int, num_beams: int = 1,
                           ignore_eos: bool = False, **kw: Any) -> list[int]:
        """New tokens from transformers' own ``generate`` (the decoder prompt stripped)."""
        from transformers import GenerationConfig

        gen = GenerationConfig.from_dict(model.generation_config.to_dict())
        gen.max_new_tokens = max_new_tokens
        gen.max_length = None
        gen.num_beams = num_beams
        gen.do_sample = False
        for k2, val in kw.items():
            setattr(gen, k2, val)
        saved = model.generation_config
        eos = saved.eos_token_id
        if ignore_eos:  # generate() would refill it from the model's own config
            gen.eos_token_id = None
        # generate() replaces every field of the given config that holds transformers' global
        # default with the model's own value ("model-specific defaults"): num_beams=1 became
        # the checkpoint's num_beams=4, so the "greedy" reference of a checkpoint that beams
        # by default was a beam search. With the given config as the model's own, nothing is
        # replaced.
        model.generation_config = gen
        try:
            with torch.no_grad():
                out = model.generate(**self.reference_encode_inputs(source), generation_config=gen)
        finally:
            model.generation_config = saved
        toks = out[0].tolist()
        n_prompt = 0 if self.speech else 1  # Whisper's generate strips its prompt itself
        return _trim_after_eos(toks[n_prompt:], None if ignore_eos else eos)

    def reference_logits(self, model: Any, source: Any, decoder_ids: list[int]) -> Any:
        """Teacher-forced decoder logits (len(decoder_ids), v) of the reference."""
        dec = torch.tensor([decoder_ids], dtype=torch.int64)
        with torch.no_grad():
            out = model(**self.reference_encode_inputs(source), decoder_input_ids=dec,
                        use_cache=False)
        return out.logits[0].float()

    def parity_source(self, model: Any, tokenizer: Any, seed: int = 0) -> Any:
        """A source for parity checks: a sentence through the tokenizer, else random ids."""
        import numpy as np

        d = self.dims(model)
        eos = model.config.eos_token_id
        if tokenizer is not None:
            from edgeseq.tokenize import source_ids

            ids = source_ids(tokenizer, PARITY_TEXT, {"eos_token_id": eos})
            if ids and max(ids) < d["vocab"]:
                return ids
        # without a tokenizer: a short random source from a small id range above the usual
        # special ids (the range the tiny test models are trained on)
        rng = np.random.default_rng(seed)
        lo = min(8, d["vocab"] // 4)
        return (rng.integers(lo, min(d["vocab"], lo + 16), size=8).tolist()
                + ([eos] if eos is not None else []))


def _trim_after_eos(toks: list[int], eos: Any) -> list[int]:
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    for i, t in enumerate(toks):
        if t in eos_ids:
            return toks[:i + 1]
    return toks


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(i) for i in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def widen_init(model: nn.Module, seed: int = 0, gain: float = 1.0) -> None:
    """Re-draw linear and embedding weights with a wide range so a tiny random model's outputs
    depend on its inputs and caches (default-init tiny models repeat one token, which would hide
    a wrong cache). Norms and biases keep their init."""
    import math

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed_positions" not in name:
                std = 1.0 if "embed" in name or "shared" in name else gain / math.sqrt(p.shape[1])
                p.copy_(torch.randn(p.shape, generator=g) * std)


def fit_reversal(model: nn.Module, *, speech: bool, steps: int = 800, seed: int = 0,
                 n_mels: int = 80, frames: int = 100) -> None:
    """Train a tiny test model briefly to copy its source (tokens from a 16-symbol alphabet, or the tokens that
    a speech model's features spell), so its outputs depend on the source, on the position and
    on what it has already emitted (the cache). Default-init tiny models repeat one token, which
    would let a wrong cache pass parity.
    """
    c = model.config
    g = torch.Generator().manual_seed(seed)
    v = c.vocab_size
    start, eos = c.decoder_start_token_id, c.eos_token_id
    lo = 8  # ids below this are specials in the test configs
    bos = getattr(model.generation_config, "forced_bos_token_id", None)
    # a speech "pronunciation": each token is a random mel pattern 4 frames long
    sounds = torch.randn(v, n_mels, 4, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        b, n = 16, int(torch.randint(3, 10, (1,), generator=g))
        src = torch.randint(lo, min(v, lo + 16), (b, n), generator=g)
        tgt = torch.cat([src, torch.full((b, 1), eos)], 1)
        if bos is not None:
            tgt = torch.cat([torch.full((b, 1), bos), tgt], 1)
        dec_in = torch.cat([torch.full((b, 1), start), tgt[:, :-1]], 1)
        if speech:
            feats = torch.zeros(b, n_mels, frames)
            feats[:, :, :4 * n] = sounds[src].permute(0, 2, 1, 3).reshape(b, n_mels, 4 * n)
            inputs = {"input_features": feats}
        else:
            inputs = {"input_ids": torch.cat([src, torch.full((b, 1), eos)], 1)}
        logits = model(**inputs, decoder_input_ids=dec_in).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, v), tgt.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
