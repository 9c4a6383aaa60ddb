"""Tone speech: a synthetic spoken language for testing speech models without a speech dataset.

Each letter a-z is a fixed DTMF-like chord (one tone from a low group, one from a high group,
300-3400 Hz, distinct per letter); a word is its letters played as 70-110 ms chords with 10-20 ms
gaps and 5 ms raised-cosine fades (no clicks); words are separated by 150-500 ms of silence and a
clip starts and ends with 100-600 ms of silence. Each word gets a random amplitude (0.2-0.8) and
the whole clip light white noise (at least 20 dB below the quietest word). Transcripts are the
words, lowercase, joined by single spaces ("" for a silent clip).

Everything is numpy and deterministic given a ``numpy.random.Generator``. The zoo model
``whisper-tonespeech`` (see ``train_tonespeech_whisper.py``) was trained on clips from
``random_clip``.
"""
from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
WORDS = ("zero one two three four five six seven eight nine red green blue stop go yes").split()

LOW_HZ = (350.0, 480.0, 620.0, 780.0, 950.0, 1150.0)
HIGH_HZ = (1450.0, 1800.0, 2200.0, 2700.0, 3300.0)
# letter i -> (LOW_HZ[i % 6], HIGH_HZ[i // 6]): 26 distinct chords out of 30.
LETTER_HZ = {chr(ord("a") + i): (LOW_HZ[i % len(LOW_HZ)], HIGH_HZ[i // len(LOW_HZ)]) for i in range(26)}

LETTER_S = (0.070, 0.110)     # chord length
LETTER_GAP_S = (0.010, 0.020)  # gap between letters of a word
WORD_GAP_S = (0.150, 0.500)    # silence between words
EDGE_S = (0.100, 0.600)        # silence at the start and end of a clip
AMPLITUDE = (0.2, 0.8)         # peak amplitude of a word's chords
FADE_S = 0.005
# A chord of peak amplitude a has RMS a/2 (two tones of a/2 each); the quietest word (a = 0.2)
# therefore has RMS 0.1, and noise RMS <= 0.01 keeps every word at >= 20 dB SNR.
NOISE_RMS = (0.001, 0.01)


def _n(seconds: float, sample_rate: int) -> int:
    return int(round(seconds * sample_rate))


def _chord(letter: str, n: int, amp: float, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    lo, hi = LETTER_HZ[letter]
    t = np.arange(n) / sample_rate
    ph = rng.uniform(0, 2 * np.pi, 2)
    x = 0.5 * amp * (np.sin(2 * np.pi * lo * t + ph[0]) + np.sin(2 * np.pi * hi * t + ph[1]))
    nf = min(_n(FADE_S, sample_rate), n // 2)
    if nf:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(nf) + 0.5) / nf)
        x[:nf] *= ramp
        x[n - nf:] *= ramp[::-1]
    return x


def _word_plan(word: str, rng: np.random.Generator, sample_rate: int) -> tuple[list[int], list[int], float]:
    """Random letter lengths, gaps (samples) and amplitude for one word."""
    if not word or any(c not in LETTER_HZ for c in word):
        raise ValueError(f"tonespeech words use letters a-z only: {word!r}")
    lens = [_n(rng.uniform(*LETTER_S), sample_rate) for _ in word]
    gaps = [_n(rng.uniform(*LETTER_GAP_S), sample_rate) for _ in word[1:]]
    return lens, gaps, float(rng.uniform(*AMPLITUDE))


def _synth(lead: int, plans: list[tuple[str, list[int], list[int], float]], word_gaps: list[int], tail: int,
           rng: np.random.Generator, sample_rate: int) -> tuple[np.ndarray, list[tuple[float, float]], list[tuple[float, float]]]:
    total = lead + tail + sum(sum(l) + sum(g) for _, l, g, _ in plans) + sum(word_gaps)
    audio = np.zeros(total, dtype=np.float64)
    spans, letters, pos = [], [], lead
    for i, (word, lens, gaps, amp) in enumerate(plans):
        if i:
            pos += word_gaps[i - 1]
        start = pos
        for j, (c, n) in enumerate(zip(word, lens)):
            if j:
                pos += gaps[j - 1]
            audio[pos:pos + n] = _chord(c, n, amp, rng, sample_rate)
            letters.append((pos / sample_rate, (pos + n) / sample_rate))
            pos += n
        spans.append((start / sample_rate, pos / sample_rate))
    audio += rng.normal(0.0, rng.uniform(*NOISE_RMS), total)
    return audio.astype(np.float32), spans, letters


def render(words: list[str], rng: np.random.Generator,
           sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Speak ``words``: float32 audio (about -1..1) and each word's (start_s, end_s)."""
    plans = [(w, *_word_plan(w, rng, sample_rate)) for w in words]
    word_gaps = [_n(rng.uniform(*WORD_GAP_S), sample_rate) for _ in words[1:]]
    lead, tail = (_n(rng.uniform(*EDGE_S), sample_rate) for _ in range(2))
    return _synth(lead, plans, word_gaps, tail, rng, sample_rate)[:2]


def random_clip(rng: np.random.Generator, seconds: float,
                sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, str, list[tuple[float, float]]]:
    """Random words filling about ``seconds`` of audio (never longer, as long as seconds >= 0.2).

    Returns (audio, transcript, spans). Words are added while they fit, so a clip too short for
    even one word is silence (noise only) with an empty transcript.
    """
    return random_clip_aligned(rng, seconds, sample_rate)[:3]


def random_clip_aligned(rng: np.random.Generator, seconds: float, sample_rate: int = SAMPLE_RATE
                        ) -> tuple[np.ndarray, str, list[tuple[float, float]], list[tuple[float, float]]]:
    """``random_clip`` plus each letter's (start_s, end_s), in transcript order (spaces excluded);
    the same random draws, so it returns the same clip for the same generator state."""
    limit = _n(seconds, sample_rate)
    lead, tail = (_n(rng.uniform(*EDGE_S), sample_rate) for _ in range(2))
    lead, tail = min(lead, max(limit // 2, 0)), min(tail, max(limit // 2, 0))
    plans: list[tuple[str, list[int], list[int], float]] = []
    word_gaps: list[int] = []
    used = lead + tail
    while True:
        word = WORDS[rng.integers(len(WORDS))]
        lens, gaps, amp = _word_plan(word, rng, sample_rate)
        gap = _n(rng.uniform(*WORD_GAP_S), sample_rate) if plans else 0
        need = sum(lens) + sum(gaps) + gap
        if used + need > limit:
            break
        plans.append((word, lens, gaps, amp))
        if gap:
            word_gaps.append(gap)
        used += need
    if not plans:  # pure silence of the requested length
        lead, tail = limit - limit // 2, limit // 2
    else:  # spread the leftover time over the edges, keeping each within EDGE_S
        spare = limit - used
        edge_max = _n(EDGE_S[1], sample_rate)
        add_lead = min(spare // 2, edge_max - lead) if lead < edge_max else 0
        add_tail = min(spare - add_lead, edge_max - tail) if tail < edge_max else 0
        lead, tail = lead + max(add_lead, 0), tail + max(add_tail, 0)
    audio, spans, letters = _synth(lead, plans, word_gaps, tail, rng, sample_rate)
    return audio, " ".join(p[0] for p in plans), spans, letters


def silence_clip(rng: np.random.Generator, seconds: float,
                 sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, str, list[tuple[float, float]]]:
    """Noise only (the same noise levels as speech clips); transcript ""."""
    n = _n(seconds, sample_rate)
    return rng.normal(0.0, rng.uniform(*NOISE_RMS), n).astype(np.float32), "", []


def make_long_clip(rng: np.random.Generator, seconds: float = 60.0, piece_seconds: tuple[float, float] = (3.0, 8.0),
                   sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, str, list[tuple[float, float]]]:
    """About ``seconds`` of speech made by concatenating ``random_clip`` pieces (for streaming tests).

    Pieces start and end in silence, so no word straddles a piece boundary; between words the
    silence is 150-500 ms inside a piece and 200-1200 ms across pieces.
    """
    limit = _n(seconds, sample_rate)
    parts, words, spans, pos = [], [], [], 0
    while pos < limit:
        want = min(rng.uniform(*piece_seconds), (limit - pos) / sample_rate)
        if want < 0.5:  # too short for a word: pad with silence to the exact length
            audio, text, sp = silence_clip(rng, want, sample_rate)
        else:
            audio, text, sp = random_clip(rng, want, sample_rate)
        parts.append(audio)
        if text:
            words.append(text)
        spans.extend((a + pos / sample_rate, b + pos / sample_rate) for a, b in sp)
        pos += len(audio)
    return np.concatenate(parts), " ".join(words), spans


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(word-level Levenshtein distance, number of reference words)."""
    r, h = ref.split(), hyp.split()
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)], len(r)


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus word error rate: total edits / total reference words."""
    errs = [word_errors(r, h) for r, h in zip(refs, hyps)]
    return sum(e for e, _ in errs) / max(1, sum(n for _, n in errs))


def main() -> None:
    """``python -m edgeseq.zoo.tonespeech OUT.wav [--seconds S] [--seed N]``: write a tone-speech
    clip (16 kHz mono WAV) and print its reference transcript."""
    import argparse

    from edgeseq import audio

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    if args.seconds > 10:
        clip, text, _ = make_long_clip(rng, args.seconds)
    else:
        clip, text, _ = random_clip(rng, args.seconds)
    audio.write_wav(args.out, clip)
    print(text)


if __name__ == "__main__":
    main()
