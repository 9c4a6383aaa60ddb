"""Speech transcription with a Whisper-style bundle: offline (any length) and streaming.

Long audio is cut into windows no longer than the encoder's (30 s for Whisper). Each cut is
placed at the quietest 100 ms in the last part of the window, so a word is never split between
two windows and no word is lost or transcribed twice at a seam; a window with no quiet point is
cut at its end. The cut depends only on the audio inside the window, so streaming and offline
transcription cut at the same places.

Streaming feeds the audio in chunks (default 1 s). After each chunk the open window is decoded
again; the words on which two consecutive decodes agree are *stable* and printed (the
LocalAgreement policy of streaming Whisper systems). When a window is complete its final decode
is the offline one, so the streamed transcript equals the offline transcript but for the rare
stable word a final decode revises.

Silence: a window whose RMS level is below ``SILENCE_DBFS`` is not decoded (Whisper-style models
invent text on silence); it transcribes to nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from edgeseq import audio as A

SILENCE_DBFS = -50.0
QUIET_FRAME_S = 0.1
SEARCH_FRACTION = 0.4   # look for the cut in the last 40% of a full window


@dataclass
class ChunkReport:
    index: int
    audio_s: float           # audio received so far
    latency_ms: float        # processing time for this chunk
    stable_text: str         # words that became stable with this chunk
    partial_text: str        # the whole current hypothesis of the open window


@dataclass
class Transcript:
    text: str
    segments: list[tuple[float, float, str]] = field(default_factory=list)
    audio_s: float = 0.0
    compute_s: float = 0.0
    chunks: list[ChunkReport] = field(default_factory=list)

    @property
    def rtf(self) -> float:
        """Real-time factor: compute time / audio duration (below 1 is faster than real time)."""
        return self.compute_s / self.audio_s if self.audio_s else 0.0


class Transcriber:
    """Decodes windows of 16 kHz mono audio with a speech seq2seq session."""

    def __init__(self, session: Any, window_s: float | None = None, num_beams: int = 1,
                 max_new_tokens: int | None = None):
        cfg = session.config.get("audio") or {}
        if not session.speech:
            raise ValueError("this bundle is not a speech model (no audio front end)")
        self.sess = session
        self.full_window_s = float(cfg.get("window_seconds", A.CHUNK_SECONDS))
        self.window_s = min(window_s or self.full_window_s, self.full_window_s)
        self.n_mels = int(cfg.get("n_mels", 80))
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens or session.max_new_tokens_cap()

    @property
    def window_samples(self) -> int:
        return A.samples_for(self.full_window_s)

    def decode(self, segment: np.ndarray) -> str:
        """Transcribe one segment (at most a window long)."""
        if segment.size == 0 or _dbfs(segment) < SILENCE_DBFS:
            return ""
        # Encode a window of window_s (or the segment, if longer): shorter windows are faster,
        # at an accuracy the benchmark measures against the model's full window.
        n = max(A.frames_for(self.window_s), A.frames_for(segment.size / A.SAMPLE_RATE) + 2)
        n = min(n + (n % 2), A.frames_for(self.full_window_s))
        feats = A.log_mel_spectrogram(segment, n_mels=self.n_mels, n_frames=n)
        toks = self.sess.generate(feats, self.max_new_tokens, num_beams=self.num_beams)
        return " ".join(self.sess.decode(toks).split())

    def cut(self, audio: np.ndarray, start: int) -> int:
        """Where the window starting at ``start`` ends (its next window starts there)."""
        w = self.window_samples
        if audio.size - start <= w:
            return audio.size
        frame = int(QUIET_FRAME_S * A.SAMPLE_RATE)
        hop = frame // 4
        lo = start + int(w * (1 - SEARCH_FRACTION))
        region = audio[lo:start + w]
        n = (region.size - frame) // hop + 1
        if n <= 0:
            return start + w
        energy = np.array([np.mean(region[i * hop:i * hop + frame] ** 2) for i in range(n)])
        best = int(np.argmin(energy))
        return lo + best * hop + frame // 2

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Offline: window the whole clip at quiet points and decode each window."""
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
        """Streaming: feed chunks as they arrive; report stable words after each chunk."""
        buf = np.zeros(0, dtype=np.float32)   # audio of the open window and beyond
        done_s = 0.0                          # audio already committed to closed windows
        words: list[str] = []                 # printed (stable) words, all windows
        open_words = 0                        # how many of them belong to the open window
        prev: list[str] | None = None
        segs: list[tuple[float, float, str]] = []
        reports: list[ChunkReport] = []
        compute = 0.0
        total = 0

        def close(end: int) -> str:
            nonlocal buf, done_s, open_words, prev
            final = self.decode(buf[:end]).split()
            new = final[open_words:] if final[:open_words] == words[len(words) - open_words:] \
                else final[min(open_words, len(final)):]
            words.extend(new)
            segs.append((done_s, done_s + end / A.SAMPLE_RATE, " ".join(final)))
            done_s += end / A.SAMPLE_RATE
            buf = buf[end:]
            open_words, prev = 0, None
            return " ".join(new)

        for i, chunk in enumerate(chunks):
            t = time.perf_counter()
            buf = np.concatenate([buf, np.asarray(chunk, dtype=np.float32)])
            total += len(chunk)
            out = []
            while buf.size > self.window_samples:
                end = self.cut(buf, 0)
                out.append(close(end))
            hyp = self.decode(buf).split() if buf.size else []
            if prev is not None:
                agree = 0
                while agree < min(len(prev), len(hyp)) and prev[agree] == hyp[agree]:
                    agree += 1
                if agree > open_words:
                    out.append(" ".join(hyp[open_words:agree]))
                    words.extend(hyp[open_words:agree])
                    open_words = agree
            prev = hyp
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


def chunked(audio: np.ndarray, seconds: float = 1.0) -> Iterator[np.ndarray]:
    n = max(1, A.samples_for(seconds))
    for i in range(0, audio.size, n):
        yield audio[i:i + n]


def _dbfs(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return 20 * np.log10(max(rms, 1e-10))
