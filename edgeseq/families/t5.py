"""T5 (and its byte-level and v1.1 variants) as an encoder graph and a cached decoder step.

T5 differs from BART-style models in three ways the step reproduces: RMS LayerNorm before each
block (pre-LN), no 1/sqrt(k) attention scaling, and a learned *relative* position bias (bucketed
``key - query`` distances; computed by the first layer and shared by all) instead of absolute
positions. With a tied output embedding the last hidden state is scaled by d_model^-1/2 first.
See ``seq2seq.py`` for the graph contract and glossary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edgeseq.families.bart import TextEncoder
from edgeseq.convert.stages import Stage, stack_stages
from edgeseq.families.seq2seq import CrossKV, DecoderStep, Seq2SeqFamily, merge_heads, split_heads, fit_reversal
from edgeseq.registry import register_family


class T5Step(DecoderStep):
    has_self_bias = True

    def __init__(self, model: nn.Module, layout: str):
        dec = model.decoder
        super().__init__(len(dec.block), layout, has_mask=True)
        c = model.config
        self.embed_tokens = dec.embed_tokens
        self.blocks = dec.block
        self.final_layer_norm = dec.final_layer_norm
        self.lm_head = model.lm_head
        self.heads = c.num_heads
        self.rel_bias = dec.block[0].layer[0].SelfAttention.relative_attention_bias
        self.num_buckets = c.relative_attention_num_buckets
        self.max_distance = c.relative_attention_max_distance
        self.out_scale = c.d_model ** -0.5 if c.tie_word_embeddings else 1.0

    def embed(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids[:, None])                     # (b, 1, d)

    def self_bias(self, cache_position: torch.Tensor, t: int) -> torch.Tensor:
        from transformers.models.t5.modeling_t5 import T5Attention

        rel = torch.arange(t, device=cache_position.device) - cache_position    # key - query
        buckets = T5Attention._relative_position_bucket(
            rel, bidirectional=False, num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.rel_bias(buckets).transpose(0, 1)[None, :, None, :]  # (1, h, 1, t)

    def layer_module(self, i: int) -> nn.Module:
        return self.blocks[i]

    def layer(self, lay: nn.Module, x: torch.Tensor, self_attn: Callable, cross_attn: Callable
              ) -> torch.Tensor:
        sa_layer, ca_layer, ff_layer = lay.layer
        sa, ca, h = sa_layer.SelfAttention, ca_layer.EncDecAttention, self.heads
        y = sa_layer.layer_norm(x)
        a = self_attn(split_heads(sa.q(y), h), split_heads(sa.k(y), h), split_heads(sa.v(y), h), 1.0)
        x = x + sa.o(merge_heads(a))
        y = ca_layer.layer_norm(x)
        x = x + ca.o(merge_heads(cross_attn(split_heads(ca.q(y), h), 1.0)))
        return x + ff_layer.DenseReluDense(ff_layer.layer_norm(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_layer_norm(x[:, 0])
        if self.out_scale != 1.0:
            x = x * self.out_scale
        return self.lm_head(x)

    def embed_chunk(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)                              # (b, c, d)

    def chunk_bias(self, positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        from transformers.models.t5.modeling_t5 import T5Attention

        rel = key_positions.unsqueeze(0) - positions.unsqueeze(1)        # (c, t) key - query
        buckets = T5Attention._relative_position_bucket(
            rel, bidirectional=False, num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.rel_bias(buckets).permute(2, 0, 1).unsqueeze(0)      # (1, h, c, t)

    def head_chunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_layer_norm(x)
        if self.out_scale != 1.0:
            x = x * self.out_scale
        return self.lm_head(x)


class T5TextEncoder(TextEncoder):
    """T5's stack: the first layer's relative position bias (plus the padding mask) is made
    once in the prologue and handed to every layer, as the library's stack hands it on."""

    def stages(self) -> list[Stage]:
        return stack_stages(self, self.encoder.block, 2, ["bias"], 2 * len(self.cross.k),
                            "encoder_layer")

    def prologue(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder
        x = enc.dropout(enc.embed_tokens(input_ids))
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        s = input_ids.shape[1]
        attn = enc.block[0].layer[0].SelfAttention
        return x, attn.compute_bias(s, s, device=x.device) + mask

    def layer_call(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return layer(x, None, bias)[0]

    def epilogue(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        enc = self.encoder
        return tuple(self.cross(enc.dropout(enc.final_layer_norm(x))))


@register_family("t5")
class T5Family(Seq2SeqFamily):
    """transformers ``T5ForConditionalGeneration`` (T5, T5 v1.1, ByT5, Flan-T5)."""

    model_types = ("t5",)
    model_class = "T5ForConditionalGeneration"

    def config_class(self) -> Any:
        from transformers import T5Config

        return T5Config

    def _may_be_absent(self, key: str) -> bool:
        return key.endswith(("embed_tokens.weight", "lm_head.weight"))

    def dims(self, model: Any) -> dict[str, int]:
        c = model.config
        # relative positions: no table limits the lengths; bound them for planning
        return {"n_layers": c.num_decoder_layers, "heads": c.num_heads, "head_dim": c.d_kv,
                "vocab": c.vocab_size, "max_target": None, "max_source": None}

    def encoder_module(self, model: Any) -> nn.Module:
        cross = CrossKV([(b.layer[1].EncDecAttention.k, b.layer[1].EncDecAttention.v)
                         for b in model.decoder.block], model.config.num_heads)
        return T5TextEncoder(model.encoder, cross)

    def step_module(self, model: Any, layout: str) -> DecoderStep:
        return T5Step(model, layout)

    def make_test_checkpoint(self, folder: Path, seed: int = 0, **overrides: Any) -> Path:
        from transformers import T5Config, T5ForConditionalGeneration

        torch.manual_seed(seed)
        kw = dict(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                  num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=16,
                  relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=0, dropout_rate=0.0)
        kw.update(overrides)
        model = T5ForConditionalGeneration(T5Config(**kw))
        fit_reversal(model, speech=False, seed=seed)
        model.save_pretrained(folder, safe_serialization=True)
        return Path(folder)
