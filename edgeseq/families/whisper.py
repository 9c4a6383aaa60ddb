"""Whisper (speech -> text) with an encoder that accepts any window up to 30 s.

transformers' Whisper encoder insists on exactly ``2 * max_source_positions`` mel frames (30 s):
every clip is padded to 30 s, so the encoder costs as much for 3 s of speech as for 30 s. The
encoder graph here takes a dynamic number of frames and adds the first ``frames / 2`` positional
embeddings, so a runtime may encode a shorter window (``edgeseq run --window``); its accuracy
against the full window is what ``benchmarks/encdec_decode.py`` measures. The decoder step is
BART's pre-LN variant (see ``bart.py``); the decoder starts from Whisper's prompt tokens
(start of transcript, then the forced language/task/no-timestamps tokens of the generation config).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeseq.families.bart import BartLikeStep
from edgeseq.families.seq2seq import CrossKV, DecoderStep, Seq2SeqFamily, fit_reversal
from edgeseq.registry import register_family


class WhisperEncoder(nn.Module):
    """``input_features`` (b, m, f) -> cross K/V per decoder layer, for any even f <= 2 * s_max."""

    def __init__(self, model: nn.Module):
        super().__init__()
        enc = model.model.encoder
        self.conv1, self.conv2 = enc.conv1, enc.conv2
        self.embed_positions = enc.embed_positions
        self.layers = enc.layers
        self.layer_norm = enc.layer_norm
        dec_layers = model.model.decoder.layers
        self.cross = CrossKV([(lay.encoder_attn.k_proj, lay.encoder_attn.v_proj)
                              for lay in dec_layers], model.config.decoder_attention_heads)

    def forward(self, input_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = F.gelu(self.conv1(input_features))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)                      # (b, s, d)
        x = x + self.embed_positions.weight[:x.shape[1]]
        for layer in self.layers:
            x = layer(x, None, layer_head_mask=None)[0]
        return tuple(self.cross(self.layer_norm(x)))


@register_family("whisper")
class WhisperFamily(Seq2SeqFamily):
    """transformers ``WhisperForConditionalGeneration``."""

    task = "speech_seq2seq"
    model_types = ("whisper",)
    model_class = "WhisperForConditionalGeneration"
    speech = True

    def config_class(self) -> Any:
        from transformers import WhisperConfig

        return WhisperConfig

    def dims(self, model: Any) -> dict[str, int]:
        c = model.config
        return {"n_layers": c.decoder_layers, "heads": c.decoder_attention_heads,
                "head_dim": c.d_model // c.decoder_attention_heads, "vocab": c.vocab_size,
                "max_target": c.max_target_positions, "max_source": c.max_source_positions,
                "n_mels": c.num_mel_bins}

    def encoder_module(self, model: Any) -> nn.Module:
        return WhisperEncoder(model)

    def step_module(self, model: Any, layout: str) -> DecoderStep:
        return BartLikeStep(model, model.model.decoder, model.proj_out, None, layout,
                            has_mask=False, embed_scale=1.0, pos_offset=0, pre_ln=True)

    def model_config(self, model: Any, max_target_len: int | None = None, **kw: Any
                     ) -> dict[str, Any]:
        cfg = super().model_config(model, max_target_len, **kw)
        c = model.config
        cfg["audio"] = {"sample_rate": 16000, "n_mels": c.num_mel_bins, "hop_length": 160,
                        "n_fft": 400, "window_frames": 2 * c.max_source_positions,
                        "window_seconds": 2 * c.max_source_positions * 160 / 16000}
        return cfg

    def decoder_prompt(self, model: Any, gen: dict[str, Any]) -> list[int]:
        prompt = [int(gen["decoder_start_token_id"])]
        forced = getattr(model.generation_config, "forced_decoder_ids", None) or []
        for pos, tok in sorted(forced):
            if pos == len(prompt) and tok is not None:
                prompt.append(int(tok))
        return prompt

    def parity_source(self, model: Any, tokenizer: Any, seed: int = 0) -> Any:
        """A full window of log-mel features of a deterministic chirp with noise."""
        import numpy as np

        from edgeseq import audio

        c = model.config
        n = 2 * c.max_source_positions * audio.HOP_LENGTH
        t = np.arange(n) / audio.SAMPLE_RATE
        rng = np.random.default_rng(seed)
        wave = 0.3 * np.sin(2 * np.pi * (300 + 400 * t) * t) + 0.05 * rng.standard_normal(n)
        return audio.log_mel_spectrogram(wave.astype(np.float32), n_mels=c.num_mel_bins,
                                         n_frames=2 * c.max_source_positions)

    def make_test_checkpoint(self, folder: Path, seed: int = 0, **overrides: Any) -> Path:
        from transformers import WhisperConfig, WhisperForConditionalGeneration

        torch.manual_seed(seed)
        kw = dict(vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                  decoder_ffn_dim=128, num_mel_bins=80, max_source_positions=50,
                  max_target_positions=96, pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=2, bos_token_id=2, suppress_tokens=[5, 6],
                  begin_suppress_tokens=[7], dropout=0.0, init_std=0.2)
        kw.update(overrides)
        model = WhisperForConditionalGeneration(WhisperConfig(**kw))
        fit_reversal(model, speech=True, seed=seed)
        model.save_pretrained(folder, safe_serialization=True)
        return Path(folder)
