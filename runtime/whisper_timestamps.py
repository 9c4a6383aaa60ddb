"""Whisper's timestamps and sequential long-form decoding, in numpy, as transformers 4.57 does them.

- :class:`TimestampRules` is transformers' ``WhisperTimeStampLogitsProcessor``: timestamps come in
  pairs (a segment's end, then the next one's start) except right before EOS, never decrease,
  the first one is at most ``max_initial_timestamp_index`` (from the generation config) and, when
  the probability mass of all timestamps beats the most likely text token, a timestamp is chosen.
  It plugs into ``Seq2SeqSession.generate/stream(..., processors=[rules])`` with the decoder prompt
  *without* ``<|notimestamps|>``.
- :func:`split_segments` is ``WhisperGenerationMixin._retrieve_segment``: one window's tokens ->
  segments (start and end seconds, tokens) and how far to seek.
- :func:`decode_window` decodes one window; :func:`long_form` is the loop of
  ``WhisperForConditionalGeneration.generate`` around it: 30 s windows (the encoder's window)
  over the whole clip's features, each zero-padded to the window, seeking to the end of the last
  complete segment, or by the whole window when it ends on a single timestamp or has no complete
  segment. transformers 4.57 runs this same loop for short audio too (features padded to 30 s):
  a short clip can take several windows, the later ones starting inside it.

Not done (transformers does them only when asked): temperature fallback and its thresholds
(``compression_ratio_threshold``, ``logprob_threshold``, ``no_speech_threshold``), conditioning on
the previous window's tokens (``condition_on_prev_tokens``) and ``prompt_ids``. A manifest that
records one of them is refused by :meth:`TimestampConfig.from_config`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from edgeseq.bundle import BundleError
from edgeseq.runtime.processors import NEG_INF, log_softmax

#: seconds per timestamp token (transformers' ``time_precision``)
TIME_PRECISION = 0.02
#: mel frames per encoder position (the stride of Whisper's two convolutions)
INPUT_STRIDE = 2
#: seconds per mel frame (transformers' ``time_precision_features``: hop 160 at 16 kHz)
FRAME_SECONDS = 0.01
#: generation-config fields that switch on transformers' fallback/conditioning, not done here
UNSUPPORTED = ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold",
               "condition_on_prev_tokens")


@dataclass(frozen=True)
class TimestampConfig:
    """What the timestamp rules need from a Whisper bundle's manifest config."""

    eos: int
    no_timestamps: int
    max_initial_timestamp_index: int | None = None

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "manifest.json") -> "TimestampConfig":
        """From ``config["whisper"]`` (if the family wrote one) over ``config["generation"]``."""
        gen = dict(config.get("generation") or {})
        gen.update(config.get("whisper") or {})
        nt = gen.get("no_timestamps_token_id")
        if nt is None:
            raise BundleError(f"{where}: the generation config has no no_timestamps_token_id, so "
                              "this Whisper checkpoint cannot give timestamps")
        for f in UNSUPPORTED:
            if gen.get(f) not in (None, False):
                raise BundleError(f"{where}: generation config field {f} (temperature fallback/"
                                  "conditioning) is not supported with timestamps")
        eos = gen.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        if eos is None:
            eos = gen.get("bos_token_id")   # as transformers' processor falls back
        mi = gen.get("max_initial_timestamp_index")
        return cls(int(eos), int(nt), None if mi is None else int(mi))


class TimestampRules:
    """transformers' ``WhisperTimeStampLogitsProcessor``: ``(seqs (rows, cur_len) with the decoder
    prompt, scores (rows, v)) -> scores``; ``begin_index`` is the decoder prompt's length."""

    def __init__(self, cfg: TimestampConfig, begin_index: int):
        self.cfg = cfg
        self.begin_index = begin_index

    def __call__(self, seqs: np.ndarray, scores: np.ndarray) -> np.ndarray:
        tb, eos = self.cfg.timestamp_begin, self.cfg.eos
        s = np.array(scores, dtype=np.float32, copy=True)
        s[:, self.cfg.no_timestamps] = NEG_INF
        for k in range(seqs.shape[0]):
            seq = [int(t) for t in seqs[k, self.begin_index:]]
            last_ts = len(seq) >= 1 and seq[-1] >= tb
            penult_ts = len(seq) < 2 or seq[-2] >= tb
            if last_ts:
                if penult_ts:           # a pair (or the first timestamp): text or EOS next
                    s[k, tb:] = NEG_INF
                else:                   # a segment's end: its partner timestamp or EOS next
                    s[k, :eos] = NEG_INF
            stamps = [t for t in seq if t >= tb]
            if stamps:
                # never decreasing; after a pair, not the same timestamp again
                floor = stamps[-1] if (last_ts and not penult_ts) else stamps[-1] + 1
                s[k, tb:floor] = NEG_INF
        if seqs.shape[1] == self.begin_index:
            s[:, :tb] = NEG_INF
            if self.cfg.max_initial_timestamp_index is not None:
                s[:, tb + self.cfg.max_initial_timestamp_index + 1:] = NEG_INF
        logp = log_softmax(s)
        for k in range(seqs.shape[0]):
            with np.errstate(divide="ignore"):
                ts_mass = _logsumexp(logp[k, tb:])
            if ts_mass > logp[k, :tb].max():
                s[k, :tb] = NEG_INF
        return s


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    if not np.isfinite(m):
        return m
    return m + float(np.log(np.exp(x - m).sum()))


@dataclass
class Segment:
    start: float            # seconds from the start of the clip
    end: float
    tokens: list[int]       # timestamp tokens included, as transformers' segments hold them
    text: str = ""


def split_segments(tokens: Sequence[int], time_offset: float, window_frames: int,
                   cfg: TimestampConfig) -> tuple[list[Segment], int]:
    """One window's new tokens (EOS removed) -> its segments and how many mel frames to seek.

    ``window_frames`` is the number of real (not padded) frames the window covered.
    """
    tb = cfg.timestamp_begin
    toks = [int(t) for t in tokens]
    is_ts = [t >= tb for t in toks]
    single_ending = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(toks) - 1) if is_ts[i] and is_ts[i + 1]]
    if cuts:
        if single_ending:
            cuts.append(len(toks))
        else:
            cuts[-1] += 1       # the last segment keeps both of its closing timestamps
        segs, last = [], 0
        for i, cut in enumerate(cuts):
            piece = toks[last:cut]
            end_idx = -1 if (i < len(cuts) - 1 or single_ending) else -2
            segs.append(Segment(time_offset + (piece[0] - tb) * TIME_PRECISION,
                                time_offset + (piece[end_idx] - tb) * TIME_PRECISION, piece))
            last = cut
        if single_ending:       # no speech after the last timestamp: the whole window is done
            return segs, window_frames
        # the tokens after the last complete segment are dropped: seek to its end
        return segs, (toks[last - 2] - tb) * INPUT_STRIDE
    stamps = [t for t in toks if t >= tb]
    # in float32, as transformers computes it from a frame count tensor (float64 truncates
    # differently for 146 of the 3000 possible counts)
    end = float(int(np.float32(window_frames) * np.float32(FRAME_SECONDS)
                    / np.float32(TIME_PRECISION)))
    if stamps and stamps[-1] != tb:
        end = float(stamps[-1] - tb)
    return [Segment(time_offset, time_offset + end * TIME_PRECISION, toks)], window_frames


def timestamp_prompt(prompt: Sequence[int], cfg: TimestampConfig) -> list[int]:
    """The decoder prompt with timestamps: the same, without a trailing ``<|notimestamps|>``."""
    p = [int(t) for t in prompt]
    return p[:-1] if p and p[-1] == cfg.no_timestamps else p


def strip_eos(tokens: Sequence[int], cfg: TimestampConfig) -> list[int]:
    toks = [int(t) for t in tokens]
    return toks[:-1] if toks and toks[-1] == cfg.eos else toks


def decode_window(session: Any, features: np.ndarray, seek: int, prompt: Sequence[int],
                  cfg: TimestampConfig, window_frames: int, max_new: int | None = None,
                  num_beams: int = 1, decode_text: Callable[[list[int]], str] | None = None
                  ) -> tuple[list[Segment], int]:
    """Decode one window: ``features`` (mel bins, n <= window_frames) are the clip's frames from
    frame ``seek`` on, zero-padded here to the window as transformers pads them. Returns the
    window's segments (times from the clip's start) and how many frames to seek."""
    prompt = [int(t) for t in prompt]
    n = min(features.shape[1], window_frames)
    window = np.zeros((features.shape[0], window_frames), dtype=np.float32)
    window[:, :n] = features[:, :n]
    toks = session.generate(window, max_new, num_beams=num_beams, prompt=prompt,
                            processors=[TimestampRules(cfg, len(prompt))])
    segs, advance = split_segments(strip_eos(toks, cfg), seek * TIME_PRECISION / INPUT_STRIDE,
                                   n, cfg)
    if decode_text is not None:
        for sg in segs:
            sg.text = decode_text([t for t in sg.tokens if t < cfg.timestamp_begin])
    return segs, advance


def long_form(session: Any, features: np.ndarray, prompt: Sequence[int], cfg: TimestampConfig,
              window_frames: int, max_new: int | None = None, num_beams: int = 1,
              start_frame: int = 0, decode_text: Callable[[list[int]], str] | None = None
              ) -> Iterator[tuple[list[Segment], int]]:
    """Sequential decoding over the clip's ``features`` (mel bins, frames) from
    ``start_frame``: yields each window's segments and the frame the next window starts at.
    ``max_new`` None: the generation config's limit per window (``max_length`` counts the
    prompt), as transformers."""
    seek = start_frame
    while seek < features.shape[1]:
        segs, advance = decode_window(session, features[:, seek:seek + window_frames], seek,
                                      prompt, cfg, window_frames, max_new, num_beams,
                                      decode_text)
        seek += advance
        yield segs, seek
