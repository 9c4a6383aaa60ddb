"""BART and Marian (post-LN encoder-decoders with learned or sinusoidal positions).

Both are transformers' BART-style stacks: scaled token embeddings plus absolute positions
(BART: learned, offset by 2, with an embedding LayerNorm; Marian: sinusoidal), post-LN layers
(attention -> add -> norm, cross-attention -> add -> norm, FFN -> add -> norm), and an LM head
with ``final_logits_bias``. The encoder is the library's own module; the decoder step is
re-expressed over the same parameters (see ``seq2seq.py`` for the graph contract and glossary).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edgeseq.convert.stages import Stage, run_stages, stack_stages
from edgeseq.families.seq2seq import CrossKV, DecoderStep, Seq2SeqFamily, split_heads, merge_heads, fit_reversal
from edgeseq.registry import register_family


class BartLikeStep(DecoderStep):
    """Decoder step for BART-style layers; ``pre_ln`` selects Whisper's pre-LN order."""

    def __init__(self, model: nn.Module, decoder: nn.Module, head: nn.Module,
                 logits_bias: torch.Tensor | None, layout: str, *, has_mask: bool,
                 embed_scale: float, pos_offset: int, pre_ln: bool):
        super().__init__(len(decoder.layers), layout, has_mask)
        self.embed_tokens = decoder.embed_tokens
        self.embed_positions = decoder.embed_positions
        self.layernorm_embedding = getattr(decoder, "layernorm_embedding", None)
        self.final_norm = getattr(decoder, "layer_norm", None)
        self.layers = decoder.layers
        self.lm_head = head
        self.logits_bias = logits_bias
        self.embed_scale = embed_scale
        self.pos_offset = pos_offset
        self.pre_ln = pre_ln
        attn = decoder.layers[0].self_attn
        self.heads = attn.num_heads if hasattr(attn, "num_heads") else model.config.decoder_attention_heads
        self.scale = attn.scaling

    def embed(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids[:, None])                       # (b, 1, d)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        pos = self.embed_positions.weight.index_select(0, cache_position + self.pos_offset)
        x = x + pos[None]                                               # (1, 1, d) broadcast
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return x

    def layer_module(self, i: int) -> nn.Module:
        return self.layers[i]

    def layer(self, lay: nn.Module, x: torch.Tensor, self_attn: Callable, cross_attn: Callable
              ) -> torch.Tensor:
        sa, ca, h = lay.self_attn, lay.encoder_attn, self.heads

        def block(x: torch.Tensor, norm: nn.Module, fn: Callable) -> torch.Tensor:
            if self.pre_ln:
                return x + fn(norm(x))
            return norm(x + fn(x))

        def self_fn(y: torch.Tensor) -> torch.Tensor:
            q = split_heads(sa.q_proj(y), h)
            k = split_heads(sa.k_proj(y), h)
            v = split_heads(sa.v_proj(y), h)
            return sa.out_proj(merge_heads(self_attn(q, k, v, self.scale)))

        def cross_fn(y: torch.Tensor) -> torch.Tensor:
            q = split_heads(ca.q_proj(y), h)
            return ca.out_proj(merge_heads(cross_attn(q, self.scale)))

        def ffn(y: torch.Tensor) -> torch.Tensor:
            return lay.fc2(lay.activation_fn(lay.fc1(y)))

        x = block(x, lay.self_attn_layer_norm, self_fn)
        x = block(x, lay.encoder_attn_layer_norm, cross_fn)
        return block(x, lay.final_layer_norm, ffn)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.lm_head(x[:, 0])
        if self.logits_bias is not None:
            logits = logits + self.logits_bias
        return logits

    def embed_chunk(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)                                # (b, c, d)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        x = x + self.embed_positions.weight[positions + self.pos_offset][None]
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return x

    def head_chunk(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.lm_head(x)
        if self.logits_bias is not None:
            logits = logits + self.logits_bias
        return logits


class TextEncoder(nn.Module):
    """The library's BART-style encoder, then every decoder layer's cross K/V projections.

    As stages (``edgeseq.convert.stages``): the library's embedding, positions and mask, its
    layers one by one, the final norm where the architecture has one and the cross projections.
    ``embed_scale``: Marian scales its token embeddings in the encoder (BART's embedding module
    scales itself); ``positions_from_ids``: BART's learned positions take the ids, Marian's
    sinusoidal ones the shape."""

    def __init__(self, encoder: nn.Module, cross: CrossKV, embed_scale: float = 1.0,
                 positions_from_ids: bool = True):
        super().__init__()
        self.encoder = encoder
        self.cross = cross
        self.embed_scale = embed_scale
        self.positions_from_ids = positions_from_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        return run_stages(self.stages(), (input_ids, attention_mask))

    def stages(self) -> list[Stage]:
        return stack_stages(self, self.encoder.layers, 2, ["mask"], 2 * len(self.cross.k),
                            "encoder_layer")

    def prologue(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's hidden states and 4-D additive mask, as the library makes them."""
        enc = self.encoder
        embeds = enc.embed_tokens(input_ids)
        if self.embed_scale != 1.0:
            embeds = embeds * self.embed_scale
        pos = enc.embed_positions(input_ids if self.positions_from_ids else input_ids.shape)
        x = embeds + pos
        if getattr(enc, "layernorm_embedding", None) is not None:
            x = enc.layernorm_embedding(x)
        mask = enc._update_full_mask(attention_mask, embeds)
        if mask is None:  # the library drops an all-ones mask outside tracing
            b, s = attention_mask.shape
            mask = torch.zeros(b, 1, s, s, dtype=x.dtype, device=x.device)
        return x, mask

    def layer_call(self, layer: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return layer(x, mask, layer_head_mask=None)[0]

    def epilogue(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        norm = getattr(self.encoder, "layer_norm", None)
        return tuple(self.cross(norm(x) if norm is not None else x))


class _BartLike(Seq2SeqFamily):
    pos_offset = 0

    def dims(self, model: Any) -> dict[str, int]:
        c = model.config
        return {"n_layers": c.decoder_layers, "heads": c.decoder_attention_heads,
                "head_dim": c.d_model // c.decoder_attention_heads, "vocab": c.vocab_size,
                "max_target": c.max_position_embeddings,
                "max_source": c.max_position_embeddings}

    def encoder_module(self, model: Any) -> nn.Module:
        layers = model.model.decoder.layers
        cross = CrossKV([(lay.encoder_attn.k_proj, lay.encoder_attn.v_proj) for lay in layers],
                        model.config.decoder_attention_heads)
        enc = model.model.encoder
        return TextEncoder(enc, cross, **self.encoder_embedding(enc))

    def encoder_embedding(self, encoder: nn.Module) -> dict[str, Any]:
        """How this architecture's encoder embeds (``TextEncoder``'s keywords)."""
        return {}

    def embed_scale(self, model: Any) -> float:
        return 1.0

    def step_module(self, model: Any, layout: str) -> DecoderStep:
        return BartLikeStep(model, model.model.decoder, model.lm_head, model.final_logits_bias,
                            layout, has_mask=True, embed_scale=self.embed_scale(model),
                            pos_offset=self.pos_offset, pre_ln=False)

    def _test_config(self, **overrides: Any) -> dict[str, Any]:
        kw = dict(vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                  decoder_ffn_dim=128, max_position_embeddings=128, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                  forced_eos_token_id=None, dropout=0.0, init_std=0.2)
        kw.update(overrides)
        return kw


@register_family("bart")
class BartFamily(_BartLike):
    """transformers ``BartForConditionalGeneration`` (BART, and checkpoints fine-tuned from it)."""

    model_types = ("bart",)
    model_class = "BartForConditionalGeneration"
    pos_offset = 2  # BartLearnedPositionalEmbedding's offset

    def config_class(self) -> Any:
        from transformers import BartConfig

        return BartConfig

    def make_test_checkpoint(self, folder: Path, seed: int = 0, **overrides: Any) -> Path:
        from transformers import BartConfig, BartForConditionalGeneration

        torch.manual_seed(seed)
        model = BartForConditionalGeneration(BartConfig(**self._test_config(**overrides)))
        # BART's generation config forces BOS first and EOS at max length: exercise both
        model.generation_config.forced_bos_token_id = 0
        model.generation_config.forced_eos_token_id = 2
        fit_reversal(model, speech=False, seed=seed)
        model.save_pretrained(folder, safe_serialization=True)
        return Path(folder)


@register_family("marian")
class MarianFamily(_BartLike):
    """transformers ``MarianMTModel`` (OPUS-MT translators)."""

    model_types = ("marian",)
    model_class = "MarianMTModel"

    def config_class(self) -> Any:
        from transformers import MarianConfig

        return MarianConfig

    def embed_scale(self, model: Any) -> float:
        return float(model.model.decoder.embed_scale)

    def encoder_embedding(self, encoder: nn.Module) -> dict[str, Any]:
        return {"embed_scale": float(encoder.embed_scale), "positions_from_ids": False}

    def make_test_checkpoint(self, folder: Path, seed: int = 0, **overrides: Any) -> Path:
        from transformers import MarianConfig, MarianMTModel

        torch.manual_seed(seed)
        kw = self._test_config(pad_token_id=95, decoder_start_token_id=95, eos_token_id=0,
                               bos_token_id=None, scale_embedding=True)
        kw.update(overrides)
        model = MarianMTModel(MarianConfig(**kw))
        # Marian never emits its pad token (transformers' own Marian configs say so)
        model.generation_config.bad_words_ids = [[95]]
        fit_reversal(model, speech=False, seed=seed)
        model.save_pretrained(folder, safe_serialization=True)
        return Path(folder)
