"""Whisper (speech -> text) with an encoder that accepts any window up to 30 s.

transformers' Whisper encoder insists on exactly ``2 * max_source_positions`` mel frames (30 s):
every clip is padded to 30 s, so the encoder costs as much for 3 s of speech as for 30 s. The
encoder graph here takes a dynamic number of frames and adds the first ``frames / 2`` positional
embeddings, so a runtime may encode a shorter window (``edgeseq run --window``); its accuracy
against the full window is what ``benchmarks/encdec_decode.py`` measures. The decoder step is
BART's pre-LN variant (see ``bart.py``). The decoder prompt (start of transcript, language, task,
no-timestamps) is built by the runtime with transformers' rules (``edgeseq.runtime.whisper``) from
what ``whisper_config`` stores in the manifest; parity compares against transformers' own prompt,
language detection included (``reference_prompt``), on a synthesized utterance (``speech_like``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeseq.convert.stages import Stage, run_stages, stack_stages
from edgeseq.families.bart import BartLikeStep
from edgeseq.families.seq2seq import CrossKV, DecoderStep, Seq2SeqFamily, fit_reversal
from edgeseq.generation import SAMPLING
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
        return run_stages(self.stages(), (input_features,))

    def stages(self) -> list[Stage]:
        return stack_stages(self, self.layers, 1, [], 2 * len(self.cross.k), "encoder_layer")

    def prologue(self, input_features: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(input_features))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)                      # (b, s, d)
        return x + self.embed_positions.weight[:x.shape[1]]

    def layer_call(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x, None, layer_head_mask=None)[0]

    def epilogue(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.cross(self.layer_norm(x)))


@register_family("whisper")
class WhisperFamily(Seq2SeqFamily):
    """transformers ``WhisperForConditionalGeneration``."""

    task = "speech_seq2seq"
    model_types = ("whisper",)
    model_class = "WhisperForConditionalGeneration"
    speech = True
    # WhisperForConditionalGeneration.generate reads these itself; the prompt and timestamp
    # rules are implemented here and in edgeseq.runtime.whisper / speech
    generation_own = frozenset({
        "lang_to_id", "task_to_id", "is_multilingual", "alignment_heads",
        "no_timestamps_token_id", "max_initial_timestamp_index", "prev_sot_token_id",
        "forced_decoder_ids", "return_timestamps", "begin_suppress_tokens", "suppress_tokens",
        "language", "task"})
    # its generate sets do_sample from its temperature argument (default: greedy), whatever the
    # config says (WhisperGenerationMixin.generate: do_sample = temperature is not None and
    # temperature > 0)
    generation_overridden = frozenset({"do_sample", *SAMPLING})
    # the long-form fallback (thresholds, conditioning on the previous window) is not implemented
    generation_unsupported = ("logprob_threshold", "compression_ratio_threshold",
                              "no_speech_threshold", "condition_on_prev_tokens")

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
        cfg["whisper"] = whisper_config(model)
        return cfg

    def decoder_prompt(self, model: Any, gen: dict[str, Any]) -> list[int]:
        """The default prompt, stored in the manifest. Where the language would be detected it
        holds English (or the first language): the runtime builds each prompt itself, detection
        included (``edgeseq.runtime.whisper``)."""
        from edgeseq.runtime import whisper as W

        w = whisper_config(model)
        detected = None
        if W.needs_detection(w, None):
            detected = "en" if "<|en|>" in w["lang_to_id"] else next(iter(w["lang_to_id"]))[2:-2]
        return W.prompt(w, detected=detected)

    def reference_prompt(self, model: Any, source: Any, language: str | None = None,
                         task: str | None = None, timestamps: bool | None = None) -> list[int]:
        """transformers' own decoder prompt for this source (``_retrieve_init_tokens``, language
        detection included), for parity and tests."""
        import copy

        gen = copy.deepcopy(model.generation_config)
        given = self.reference_encode_inputs(source)   # features, or the encoder's output
        feats = given.get("input_features")
        model._set_return_timestamps(return_timestamps=timestamps, is_shortform=True,
                                     generation_config=gen)
        model._set_language_and_task(language=language, task=task, is_multilingual=None,
                                     generation_config=gen)
        frames = 2 * model.config.max_source_positions
        with torch.no_grad():
            init = model._retrieve_init_tokens(feats, batch_size=1, generation_config=gen,
                                               config=model.config, num_segment_frames=frames,
                                               kwargs={k: v for k, v in given.items()
                                                       if k != "input_features"})
        return [int(t) for t in init[0].tolist()]

    def reference_generate(self, model: Any, source: Any, max_new_tokens: int, num_beams: int = 1,
                           ignore_eos: bool = False, **kw: Any) -> list[int]:
        """transformers' Whisper ``generate``; with ``ignore_eos`` its padding id is moved off
        EOS (published Whisper pads with EOS, and ``generate`` strips trailing padding, which
        would cut the EOS tokens a run that ignores EOS keeps)."""
        if ignore_eos:
            kw.setdefault("pad_token_id", model.config.vocab_size)
        return super().reference_generate(model, source, max_new_tokens, num_beams, ignore_eos,
                                          **kw)

    def parity_source(self, model: Any, tokenizer: Any, seed: int = 0) -> Any:
        """A full window of log-mel features of a synthesized utterance (``speech_like``)."""
        from edgeseq import audio

        c = model.config
        frames = 2 * c.max_source_positions
        seconds = min(4.0, frames * audio.HOP_LENGTH / audio.SAMPLE_RATE * 0.8)
        return audio.log_mel_spectrogram(speech_like(seconds, seed), n_mels=c.num_mel_bins,
                                         n_frames=frames)

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


# The generation-config fields transformers' Whisper ``generate`` reads to build its prompt and
# timestamp rules; absent ones are stored as None.
WHISPER_FIELDS = ("is_multilingual", "lang_to_id", "task_to_id", "no_timestamps_token_id",
                  "forced_decoder_ids", "language", "task", "return_timestamps",
                  "prev_sot_token_id", "max_initial_timestamp_index")


def whisper_config(model: Any) -> dict[str, Any]:
    """``config["whisper"]``: what ``edgeseq.runtime.whisper`` needs, from the generation config
    (``forced_decoder_ids`` from the model config where the generation config has none, as
    transformers falls back), plus language names -> codes for ``--language french``."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    g = model.generation_config
    w: dict[str, Any] = {f: _plain(getattr(g, f, None)) for f in WHISPER_FIELDS}
    if w["forced_decoder_ids"] is None:
        w["forced_decoder_ids"] = _plain(getattr(model.config, "forced_decoder_ids", None))
    start = getattr(g, "decoder_start_token_id", None)
    w["decoder_start_token_id"] = int(start if start is not None
                                      else model.config.decoder_start_token_id)
    codes = {t[2:-2] for t in (w["lang_to_id"] or {})}
    w["language_names"] = {name: code for name, code in TO_LANGUAGE_CODE.items() if code in codes}
    return w


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(i) for i in x]
    return x


def speech_like(seconds: float = 4.0, seed: int = 0, sample_rate: int = 16000) -> Any:
    """A deterministic synthetic utterance: voiced syllables (a glottal pulse train with a
    falling-rising pitch contour through formant resonators of five vowels), consonant noise
    bursts before some of them, and pauses between words. It exercises what a speech model's
    front end sees in speech (harmonics, formants, onsets, silence), unlike silence or a chirp."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
              (570, 840, 2410)]
    n = int(seconds * sample_rate)
    out = np.zeros(n, dtype=np.float64)
    t = int(0.15 * sample_rate)
    while t < n - int(0.3 * sample_rate):
        for _ in range(int(rng.integers(1, 4))):          # syllables in a word
            if rng.random() < 0.6:                          # a fricative or plosive onset
                m = int(rng.uniform(0.03, 0.08) * sample_rate)
                burst = rng.standard_normal(m) * np.hanning(m) * 0.15
                out[t:t + m] += np.diff(np.r_[0.0, burst])[:max(0, min(m, n - t))]
                t += m
            m = int(rng.uniform(0.12, 0.25) * sample_rate)
            if t + m >= n:
                break
            k = np.arange(m) / sample_rate
            f0 = rng.uniform(100, 180) * (1 + 0.15 * np.sin(np.pi * k / k[-1] + rng.uniform(0, 1)))
            phase = np.cumsum(f0 / sample_rate)
            pulses = (np.diff(np.floor(np.r_[0.0, phase])) > 0).astype(np.float64)
            voice = np.zeros(m)
            for f, bw in zip(vowels[int(rng.integers(0, 5))], (80, 100, 120)):
                r = np.exp(-np.pi * bw / sample_rate)
                a1, a2 = 2 * r * np.cos(2 * np.pi * f / sample_rate), -r * r
                y1 = y2 = 0.0
                res = np.empty(m)
                for i, x in enumerate(pulses):              # a two-pole formant resonator
                    y = x + a1 * y1 + a2 * y2
                    res[i], y2, y1 = y, y1, y
                voice += res / (np.abs(res).max() + 1e-9)
            out[t:t + m] += 0.3 * voice * np.hanning(m)
            t += m
        t += int(rng.uniform(0.15, 0.4) * sample_rate)     # a pause between words
    out += 1e-3 * rng.standard_normal(n)
    return (0.8 * out / np.abs(out).max()).astype(np.float32)
