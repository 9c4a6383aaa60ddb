"""Speech transcription with a Whisper-style bundle: offline (any length) and streaming.

Long audio is cut into windows no longer than the encoder's (30 s for Whisper). A window ends at
the first pause after 60% of it, or, when it has none, at the quietest 100 ms of its last 40%, so a
word is never split between two windows and no word is lost or transcribed twice at a seam. A pause
is judged only from the audio before it, so a stream finds every cut as soon as it has heard the
pause, at the same place as the offline transcription.

Streaming feeds the audio in chunks (default 1 s). After each chunk the open window is decoded up
to its last pause (words cut by the chunk edge are not decoded); the words on which the last n
decodes agree are *stable* and printed (LocalAgreement-n, as in Machacek et al.'s streaming
Whisper; n = 3 by default). When a window closes its final decode is the offline one, and the words
it adds after the last printed word it shares are printed, so the streamed transcript equals the
offline one but for the rare stable word the final decode revises.

Silence: a window whose RMS level is below ``SILENCE_DBFS`` is not decoded (Whisper-style models
invent text on silence); it transcribes to nothing.

With ``timestamps=True`` none of the above applies: the clip is decoded as transformers'
``generate(return_timestamps=True)`` does (``edgeseq.runtime.whisper_timestamps``: the timestamp
rules, segments, seeking to the last complete segment's end), and a stream decodes each window as
soon as it has been heard, reporting its segments.
"""
from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from edgeseq import audio as A
from edgeseq.runtime import whisper, whisper_timestamps as W

SILENCE_DBFS = -50.0
QUIET_FRAME_S = 0.1
SEARCH_FRACTION = 0.4   # look for the cut in the last 40% of a full window
PAUSE_RATIO = 1e-3      # -30 dB: a streaming pause, relative to the loudest frame so far


@dataclass
class ChunkReport:
    index: int
    audio_s: float           # audio received so far
    latency_ms: float        # processing time for this chunk
    stable_text: str         # words that became stable with this chunk
    partial_text: str        # the whole current hypothesis of the open window
    # with timestamps: the segments (start s, end s, text) that this chunk closed
    segments: list[tuple[float, float, str]] = field(default_factory=list)


@dataclass
class Transcript:
    text: str
    segments: list[tuple[float, float, str]] = field(default_factory=list)
    audio_s: float = 0.0
    compute_s: float = 0.0
    chunks: list[ChunkReport] = field(default_factory=list)
    # with timestamps: every segment's tokens, concatenated (transformers' ``sequences``)
    tokens: list[int] = field(default_factory=list)

    @property
    def rtf(self) -> float:
        """Real-time factor: compute time / audio duration (below 1 is faster than real time)."""
        return self.compute_s / self.audio_s if self.audio_s else 0.0


class Transcriber:
    """Decodes windows of 16 kHz mono audio with a speech seq2seq session."""

    def __init__(self, session: Any, window_s: float | None = None, num_beams: int = 1,
                 max_new_tokens: int | None = None, agreement: int = 3, timestamps: bool = False,
                 prompt: Sequence[int] | None = None, language: str | None = None,
                 task: str | None = None):
        cfg = session.config.get("audio") or {}
        if not session.speech:
            raise ValueError("this bundle is not a speech model (no audio front end)")
        self.sess = session
        self.full_window_s = float(cfg.get("window_seconds", A.CHUNK_SECONDS))
        self.window_s = min(window_s or self.full_window_s, self.full_window_s)
        self.n_mels = int(cfg.get("n_mels", 80))
        self.num_beams = num_beams
        # LocalAgreement-n: a word is printed once n consecutive decodes agree on it.
        self.agreement = max(1, agreement)
        self.max_new_tokens = max_new_tokens or session.max_new_tokens_cap()
        self.window_frames = int(cfg.get("window_frames", A.N_FRAMES))
        # Whisper's language and task (edgeseq.runtime.whisper): None/"auto" detects the language
        # of a multilingual model from the first window, as transformers does, once per clip.
        self.whisper = whisper.settings(session.config)
        whisper.check_options(self.whisper, language, task)
        self.language, self.task = language, task
        self.prompt = [int(t) for t in prompt] if prompt is not None else None
        self.detected: str | None = None
        # Timestamps: Whisper's timestamp rules and transformers' sequential decoding (seek to
        # the end of the last complete segment) instead of windows cut at quiet points.
        self.timestamps = timestamps
        self.ts_cfg = (W.TimestampConfig.from_config(
            session.config, f"{getattr(session, 'root', '.')}/manifest.json")
            if timestamps else None)
        base = self.prompt if self.prompt is not None else (
            None if self._detects else self._prompt(None, False) or session.decoder_prompt)
        # with language detection the prompt is made from the first window (``_windows``)
        self.ts_prompt = (W.timestamp_prompt(base, self.ts_cfg)
                          if self.ts_cfg and base is not None else None)
        self._ts_max_new = max_new_tokens

    @property
    def _detects(self) -> bool:
        return (self.prompt is None and self.detected is None
                and whisper.needs_detection(self.whisper, self.language, self.task))

    @property
    def language_code(self) -> str | None:
        """The language decoded: the one given, the detected one (None until detected), or
        ``en`` for an English-only model (``is_multilingual: false``); None where unknown."""
        w = self.whisper
        if not w:
            return None
        if w.get("is_multilingual") is False:
            return "en"
        if self.language not in (None, whisper.AUTO):
            return whisper.language_code(w, whisper.language_id(w, self.language))
        if w.get("language") and w.get("lang_to_id"):
            return whisper.language_code(w, whisper.language_id(w, w["language"]))
        return self.detected

    def _prompt(self, feats: np.ndarray | None, timestamps: bool, commit: bool = True
                ) -> list[int] | None:
        """The decoder prompt for these features (None: the bundle's stored one). Detecting
        the language leaves ``feats`` encoded in the session; ``commit`` keeps the detected
        language for the rest of the clip (a stream's partial decodes do not)."""
        if self.prompt is not None:
            return self.prompt
        if not self.whisper:
            return None
        detected = self.detected
        if detected is None and whisper.needs_detection(self.whisper, self.language, self.task):
            if feats is None:
                return None
            detected = whisper.detect_language(self.sess, feats)
            if commit:
                self.detected = detected
        return whisper.prompt(self.whisper, self.language, self.task, timestamps,
                              detected=detected)

    @property
    def window_samples(self) -> int:
        return A.samples_for(self.full_window_s)

    def decode(self, segment: np.ndarray, final: bool = True) -> str:
        """Transcribe one segment (at most a window long); ``final=False``: a stream's partial
        decode (a detected language is not kept from it)."""
        if segment.size == 0 or _dbfs(segment) < SILENCE_DBFS:
            return ""
        # Encode a window of window_s (or the segment, if longer): shorter windows are faster,
        # at an accuracy the benchmark measures against the model's full window.
        n = max(A.frames_for(self.window_s), A.frames_for(segment.size / A.SAMPLE_RATE) + 2)
        n = min(n + (n % 2), A.frames_for(self.full_window_s))
        feats = A.log_mel_spectrogram(segment, n_mels=self.n_mels, n_frames=n)
        prompt = self._prompt(feats, False, commit=final)
        toks = self.sess.generate(feats, self.max_new_tokens, num_beams=self.num_beams,
                                  prompt=prompt)
        return " ".join(whisper.text(self.sess, toks).split())

    def cut(self, audio: np.ndarray, start: int, final: bool = True) -> int | None:
        """Where the window starting at ``start`` ends (the next window starts there).

        The first pause after 60% of the window, else the quietest 100 ms in its last 40%. A pause
        is judged only from audio before it (a frame 30 dB below the loudest frame so far), so a
        stream finds the same cut as soon as it has the pause, without waiting for the window to
        fill. With ``final=False`` (a stream, more audio to come) it returns None when the cut is
        not decided yet.
        """
        w = self.window_samples
        frame = int(QUIET_FRAME_S * A.SAMPLE_RATE)
        hop = frame // 4
        seg = audio[start:start + w]
        n = (seg.size - frame) // hop + 1
        if n > 0:
            energy = _frame_energy(seg, frame, hop)
            loudest = np.maximum.accumulate(energy)
            first = int(np.ceil((w * (1 - SEARCH_FRACTION) - frame // 2) / hop))
            pause = np.flatnonzero((energy[first:] < loudest[first:] * PAUSE_RATIO)
                                   & (loudest[first:] > 0))
            if pause.size:
                return start + (first + int(pause[0])) * hop + frame // 2
        if audio.size - start <= w:
            return audio.size if final else None
        lo = int(w * (1 - SEARCH_FRACTION))
        region = seg[lo:]
        m = (region.size - frame) // hop + 1
        if m <= 0:
            return start + w
        return start + lo + int(np.argmin(_frame_energy(region, frame, hop))) * hop + frame // 2

    def last_pause(self, audio: np.ndarray) -> int:
        """End of the last pause (a 100 ms frame 30 dB below the loudest one) that lies at least
        one frame before the end of ``audio``; 0 if there is none."""
        frame = int(QUIET_FRAME_S * A.SAMPLE_RATE)
        hop = frame // 4
        if audio.size < 2 * frame:
            return 0
        energy = _frame_energy(audio[:audio.size - frame], frame, hop)
        quiet = np.flatnonzero(energy < energy.max() * PAUSE_RATIO)
        if quiet.size == 0 or energy.max() <= 0:
            return 0
        return int(quiet[-1]) * hop + frame // 2

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Offline: window the whole clip at quiet points and decode each window (with
        timestamps: transformers' sequential long-form decoding, one segment per timed piece)."""
        if self.timestamps:
            return self._transcribe_timed(audio)
        t0 = time.perf_counter()
        segs, start = [], 0
        while start < audio.size:
            end = self.cut(audio, start)
            segs.append((start / A.SAMPLE_RATE, end / A.SAMPLE_RATE, self.decode(audio[start:end])))
            start = end
        text = " ".join(s for _, _, s in segs if s)
        return Transcript(text, segs, audio.size / A.SAMPLE_RATE, time.perf_counter() - t0)

    def stream(self, chunks: Iterable[np.ndarray], on_chunk: Callable[[ChunkReport], None]
               | None = None) -> Transcript:
        """Streaming: feed chunks as they arrive; report stable words after each chunk (with
        timestamps: the segments of each window as soon as the window is decoded)."""
        if self.timestamps:
            return self._stream_timed(chunks, on_chunk)
        buf = np.zeros(0, dtype=np.float32)   # audio of the open window and beyond
        done_s = 0.0                          # audio already committed to closed windows
        words: list[str] = []                 # printed (stable) words, all windows
        open_words = 0                        # how many of them belong to the open window
        recent: list[list[str]] = []           # the open window's latest decodes
        segs: list[tuple[float, float, str]] = []
        reports: list[ChunkReport] = []
        compute = 0.0
        total = 0

        def close(end: int) -> str:
            nonlocal buf, done_s, open_words
            final = self.decode(buf[:end]).split()
            shown = words[len(words) - open_words:] if open_words else []
            # The words already printed for this window stay; print the final decode's words
            # after the last one it shares with them.
            blocks = [m for m in difflib.SequenceMatcher(a=shown, b=final, autojunk=False)
                      .get_matching_blocks() if m.size]
            new = final[blocks[-1].b + blocks[-1].size:] if blocks else final[min(open_words, len(final)):]
            words.extend(new)
            segs.append((done_s, done_s + end / A.SAMPLE_RATE, " ".join(final)))
            done_s += end / A.SAMPLE_RATE
            buf = buf[end:]
            open_words = 0
            recent.clear()
            return " ".join(new)

        for i, chunk in enumerate(chunks):
            t = time.perf_counter()
            buf = np.concatenate([buf, np.asarray(chunk, dtype=np.float32)])
            total += len(chunk)
            out = []
            while (end := self.cut(buf, 0, final=False)) is not None:
                out.append(close(end))
            # Decode only up to the last pause: the words before it are complete, so a later
            # decode of the whole window rarely revises them (a word cut by the chunk edge would be).
            settled = self.last_pause(buf)
            hyp = self.decode(buf[:settled], final=False).split() if settled else []
            recent.append(hyp)
            del recent[:-self.agreement]
            if len(recent) == self.agreement:
                agree = 0
                while all(agree < len(h) and h[agree] == hyp[agree] for h in recent):
                    agree += 1
                if agree > open_words:
                    out.append(" ".join(hyp[open_words:agree]))
                    words.extend(hyp[open_words:agree])
                    open_words = agree
            dt = time.perf_counter() - t
            compute += dt
            rep = ChunkReport(i, total / A.SAMPLE_RATE, dt * 1e3, " ".join(x for x in out if x),
                              " ".join(hyp))
            reports.append(rep)
            if on_chunk:
                on_chunk(rep)
        t = time.perf_counter()
        if buf.size:
            tail = close(buf.size)
            if on_chunk and tail:
                on_chunk(ChunkReport(len(reports), total / A.SAMPLE_RATE,
                                     (time.perf_counter() - t) * 1e3, tail, ""))
        compute += time.perf_counter() - t
        return Transcript(" ".join(words), segs, total / A.SAMPLE_RATE, compute, reports)

    # -- timestamps ----------------------------------------------------------------------------
    def timed_features(self, audio: np.ndarray) -> np.ndarray:
        """The features transformers decodes with timestamps: a clip that fits the encoder's
        window padded to it (the feature extractor's default), a longer one whole
        (``truncation=False, padding="longest"``); the log-mel floor is the whole clip's."""
        if audio.size <= self.window_frames * A.HOP_LENGTH:
            return A.log_mel_spectrogram(audio, n_mels=self.n_mels, n_frames=self.window_frames)
        return A.log_mel_spectrogram(audio, n_mels=self.n_mels)

    def _timed_prompt(self, first: np.ndarray) -> list[int]:
        """The decoder prompt with timestamps; ``first``: the clip's first window's features
        (the language is detected on them where transformers would)."""
        assert self.ts_cfg is not None
        if self.ts_prompt is None:
            self.ts_prompt = self._prompt(first, True) or W.timestamp_prompt(
                self.sess.decoder_prompt, self.ts_cfg)
        return self.ts_prompt

    def _decode_window(self, feats: np.ndarray, seek: int) -> tuple[list[W.Segment], int]:
        """One window of sequential decoding: ``feats`` are the clip's frames from ``seek``."""
        assert self.ts_cfg is not None
        prompt = self._timed_prompt(feats[:, :self.window_frames])
        return W.decode_window(self.sess, feats, seek, prompt, self.ts_cfg, self.window_frames,
                               self._ts_max_new, self.num_beams, self._segment_text)

    def _segment_text(self, ids: list[int]) -> str:
        return " ".join(whisper.text(self.sess, ids).split())

    def _new_clip(self) -> None:
        """A detected language belongs to one clip: detect again on the next one."""
        if self.prompt is None and whisper.needs_detection(self.whisper, self.language, self.task):
            self.ts_prompt = self.detected = None

    def _timed_segments(self, audio: np.ndarray) -> list[W.Segment]:
        if not audio.size:
            return []
        assert self.ts_cfg is not None
        feats = self.timed_features(audio)
        windows = W.long_form(self.sess, feats, self._timed_prompt(feats[:, :self.window_frames]),
                              self.ts_cfg, self.window_frames, self._ts_max_new, self.num_beams,
                              decode_text=self._segment_text)
        return [seg for window, _ in windows for seg in window]

    def _transcribe_timed(self, audio: np.ndarray) -> Transcript:
        t0 = time.perf_counter()
        self._new_clip()
        segs = self._timed_segments(audio)
        return _timed_transcript(segs, audio.size / A.SAMPLE_RATE, time.perf_counter() - t0)

    def _stream_timed(self, chunks: Iterable[np.ndarray],
                      on_chunk: Callable[[ChunkReport], None] | None) -> Transcript:
        """A window is decoded once all of its frames have been heard (and the STFT's half-frame
        of look-ahead after them), the rest when the stream ends, as offline. Only the audio
        from the next window's start (less two hops of STFT context) is kept. The log-mel floor
        (80 dB below the loudest frame) is the loudest frame heard so far rather than the whole
        clip's, so a stream equals the offline transcription unless a later part is louder than
        everything before and some band lies that far below it (digital silence)."""
        self._new_clip()
        W_ = self.window_frames
        hop = A.HOP_LENGTH
        buf = np.zeros(0, dtype=np.float32)   # the audio from sample ``base`` on
        base = total = seek = 0
        top = -np.inf                          # the loudest feature value so far
        segs: list[W.Segment] = []
        reports: list[ChunkReport] = []
        compute = 0.0

        def features(end: int | None) -> np.ndarray:
            """The clip's frames [seek, end) (None: to the end of the stream)."""
            nonlocal top
            a = max(0, seek - 2)           # two hops of context before: exact centred frames
            hi = None if end is None else (end + 2) * hop - base
            y = A.log_mel_spectrogram(buf[a * hop - base:hi], n_mels=self.n_mels)
            y = y[:, seek - a:None if end is None else end - a]
            # the floor 8 (log10 units) below the loudest frame is 2 below it after (x + 4) / 4
            top = max(top, float(y.max()))
            return np.maximum(y, np.float32(top - 2.0))

        def decode(feats: np.ndarray) -> list[W.Segment]:
            nonlocal seek, buf, base
            window, advance = self._decode_window(feats, seek)
            seek += advance
            keep = max(0, min(seek - 2, total // hop) * hop)
            buf, base = buf[keep - base:], keep
            return window

        def report(i: int, new: list[W.Segment], dt: float) -> None:
            rep = ChunkReport(i, total / A.SAMPLE_RATE, dt * 1e3,
                              " ".join(s.text for s in new if s.text), "",
                              [(s.start, s.end, s.text) for s in new])
            reports.append(rep)
            if on_chunk:
                on_chunk(rep)

        for i, chunk in enumerate(chunks):
            t = time.perf_counter()
            chunk = np.asarray(chunk, dtype=np.float32)
            buf = np.concatenate([buf, chunk])
            total += chunk.size
            new: list[W.Segment] = []
            # frames whose STFT frame lies wholly in the audio heard so far
            while (total - A.N_FFT // 2) // hop >= seek + W_:
                new.extend(decode(features(seek + W_)))
            segs.extend(new)
            dt = time.perf_counter() - t
            compute += dt
            report(i, new, dt)
        t = time.perf_counter()
        tail: list[W.Segment] = []
        if total and total <= W_ * hop:        # a short clip: padded to the window, as offline
            tail = self._timed_segments(buf)
        while total > W_ * hop and seek < total // hop:
            tail.extend(decode(features(None)))
        segs.extend(tail)
        dt = time.perf_counter() - t
        compute += dt
        if tail:
            report(len(reports), tail, dt)
        tr = _timed_transcript(segs, total / A.SAMPLE_RATE, compute)
        tr.chunks = reports
        return tr


def _timed_transcript(segs: list[W.Segment], audio_s: float, compute_s: float) -> Transcript:
    return Transcript(" ".join(s.text for s in segs if s.text),
                      [(s.start, s.end, s.text) for s in segs], audio_s, compute_s,
                      tokens=[t for s in segs for t in s.tokens])


def chunked(audio: np.ndarray, seconds: float = 1.0) -> Iterator[np.ndarray]:
    n = max(1, A.samples_for(seconds))
    for i in range(0, audio.size, n):
        yield audio[i:i + n]


def _frame_energy(x: np.ndarray, frame: int, hop: int) -> np.ndarray:
    """Mean square of each ``frame``-sample frame, every ``hop`` samples."""
    n = (x.size - frame) // hop + 1
    if n <= 0:
        return np.zeros(0)
    win = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), frame)[::hop][:n]
    return np.mean(np.square(win), axis=1)


def _dbfs(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return 20 * np.log10(max(rms, 1e-10))
