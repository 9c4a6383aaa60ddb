"""Whisper timestamps and sequential long-form decoding against transformers 4.57.

The checkpoint has whisper-tiny's multilingual vocabulary and special-token layout (51865 ids:
``<|endoftext|>`` 50257, ``<|startoftranscript|>`` 50258, 99 languages, ``<|notimestamps|>``
50363, 1501 timestamps from 50364), its 30 s window (1500 encoder positions, 80 mel bins), its
published generation config and tokenizer files (``tests/fixtures/published/whisper-tiny/``),
with random weights, one layer each side and d_model 64 (not 384: the tests decode hundreds of
windows' tokens), and ``max_length`` 48 instead of 448 so that windows end quickly. The language
is detected, as for a user who gives none. Random weights seldom close a segment, so the
timestamp tokens' embedding rows (tied to the output projection) are scaled up: the tests assert
that several segments and windows were actually decoded. English-only (``.en``) ids differ by
one; the processor's unit test covers both layouts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ..conftest import _shared_root, shared_build

PUBLISHED = Path(__file__).resolve().parents[1] / "fixtures" / "published"
MODEL = "whisper-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "normalizer.json")
VOCAB = 51865
EOS, SOT, NO_TIMESTAMPS = 50257, 50258, 50363
TIMESTAMP_BEGIN = NO_TIMESTAMPS + 1
#: (eos, no_timestamps) of the two published layouts: multilingual and English-only
LAYOUTS = {"whisper-tiny": (50257, 50363), "whisper-tiny.en": (50256, 50362)}
MAX_LENGTH = 48
TIMESTAMP_GAIN = 2.0


def make_checkpoint(folder: Path) -> Path:
    import shutil

    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                        max_source_positions=1500, max_target_positions=448,
                        pad_token_id=EOS, eos_token_id=EOS, bos_token_id=EOS,
                        decoder_start_token_id=SOT, init_std=0.2, dropout=0.0)
    model = WhisperForConditionalGeneration(cfg).eval()
    gen = json.loads((PUBLISHED / MODEL / "generation_config.json").read_text())
    gen["max_length"] = MAX_LENGTH
    model.generation_config = GenerationConfig.from_dict(gen)
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight[TIMESTAMP_BEGIN:] *= TIMESTAMP_GAIN
    model.save_pretrained(folder, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy2(PUBLISHED / MODEL / f, Path(folder) / f)
    return Path(folder)


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    """A tone that comes and goes over a noise floor (never digital silence)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    gate = np.sin(2 * np.pi * 0.4 * t + seed) > 0
    wave = 0.3 * np.sin(2 * np.pi * (300 + 40 * t) * t) * gate + 0.02 * rng.standard_normal(n)
    return wave.astype(np.float32)


def reference(model: Any, wav: np.ndarray, tokenizer: Any = None, **kw: Any) -> dict[str, Any]:
    """transformers' ``generate(..., return_timestamps=True, return_segments=True)`` on the
    features its own extractor makes: padded to 30 s, or the whole clip with its attention mask
    (long-form)."""
    import torch
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80)
    if wav.size > 30 * 16000:
        f = fe(wav, sampling_rate=16000, truncation=False, padding="longest",
               return_attention_mask=True, return_tensors="pt")
    else:
        f = fe(wav, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(f.input_features, attention_mask=f.get("attention_mask"),
                             return_timestamps=True, return_segments=True, **kw)
    segs = [(float(s["start"]), float(s["end"]), [int(t) for t in s["tokens"]])
            for s in out["segments"][0]]
    if tokenizer is not None:   # each segment's text as the checkpoint's tokenizer decodes it
        segs = [(a, b, toks, tokenizer.decode(toks, skip_special_tokens=True))
                for a, b, toks in segs]
    return {"tokens": [int(t) for t in out["sequences"][0]], "segments": segs}


# -- the processor ---------------------------------------------------------------------------
def _random_case(rng: np.random.Generator, begin: int, eos: int, tb: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of decoded tokens after a ``begin``-token prompt: text, single and paired
    timestamps (increasing or not), ending in each way the rules distinguish."""
    rows, cur = 4, begin + int(rng.integers(0, 7))
    seqs = np.full((rows, cur), eos + 1, dtype=np.int64)
    for r in range(rows):
        t = tb + int(rng.integers(0, 200))
        for j in range(begin, cur):
            if rng.random() < 0.5:
                seqs[r, j] = int(rng.integers(0, eos))
            else:
                t += int(rng.integers(-3, 40))
                seqs[r, j] = min(max(t, tb), tb + 1500)
    # logits whose timestamp mass sometimes beats the best text token, sometimes not
    scores = rng.standard_normal((rows, tb + 1501)).astype(np.float32) * float(rng.choice([1, 3]))
    scores[:, tb:] += np.float32(rng.normal(0, 2))
    return seqs, scores


def test_rules_equal_transformers_processor() -> None:
    import torch
    from transformers import GenerationConfig
    from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

    from edgeseq.runtime.whisper_timestamps import TimestampConfig, TimestampRules

    rng = np.random.default_rng(0)
    forced = {"text": 0, "timestamp": 0, "first": 0}
    for case in range(120):
        eos, nts = LAYOUTS["whisper-tiny" if case % 2 else "whisper-tiny.en"]
        tb = nts + 1
        gen = GenerationConfig(eos_token_id=eos, bos_token_id=eos, no_timestamps_token_id=nts)
        begin = int(rng.choice([1, 3]))
        seqs, scores = _random_case(rng, begin, eos, tb)
        cfg = TimestampConfig.from_config({"generation": {
            "eos_token_id": eos, "no_timestamps_token_id": nts,
            "max_initial_timestamp_index": None if case % 5 == 0 else 50}})
        gen.max_initial_timestamp_index = cfg.max_initial_timestamp_index
        ref = WhisperTimeStampLogitsProcessor(gen, begin_index=begin)(
            torch.from_numpy(seqs), torch.from_numpy(scores.copy())).numpy()
        ours = TimestampRules(cfg, begin)(seqs, scores)
        np.testing.assert_array_equal(ours, ref, err_msg=f"case {case}")
        forced["text"] += int(np.isinf(ours[:, tb:]).all(1).sum())
        forced["timestamp"] += int(np.isinf(ours[:, :tb]).all(1).sum())
        forced["first"] += int(seqs.shape[1] == begin)
    # every rule was exercised: text forced, timestamps forced, the first position
    assert min(forced.values()) > 3, forced


def test_segments_equal_transformers_retrieve_segment() -> None:
    """Segments and seek of one window against transformers' ``_retrieve_segment``, on token
    sequences ending each way (single timestamp, pair, text) and every kind of window length."""
    import torch
    from transformers import WhisperForConditionalGeneration

    from edgeseq.runtime.whisper_timestamps import TimestampConfig, split_segments

    cfg = TimestampConfig(eos=EOS, no_timestamps=NO_TIMESTAMPS)
    rng = np.random.default_rng(1)
    kinds = set()
    for case in range(300):
        n = int(rng.integers(1, 3001))
        seek = int(rng.integers(0, 9000))
        toks, t = [], TIMESTAMP_BEGIN + int(rng.integers(0, 60))
        for _ in range(int(rng.integers(0, 12))):
            if rng.random() < 0.45:
                toks.append(int(rng.integers(0, EOS)))
            else:
                t += int(rng.integers(0, 200))
                toks.append(min(t, VOCAB - 1))
        offset = torch.tensor([seek], dtype=torch.float64) * 0.02 / 2
        ref, ref_seek = WhisperForConditionalGeneration._retrieve_segment(
            seek_sequence=torch.tensor(toks, dtype=torch.long), seek_outputs=[{}],
            time_offset=offset, timestamp_begin=TIMESTAMP_BEGIN,
            seek_num_frames=torch.tensor([n]), time_precision=0.02,
            time_precision_features=0.01, input_stride=2, prev_idx=0, idx=0,
            return_token_timestamps=False, decoder_input_ids=torch.zeros((1, 3)))
        ours, our_seek = split_segments(toks, seek * 0.02 / 2, n, cfg)
        assert our_seek == int(ref_seek), case
        assert [(s.start, s.end, s.tokens) for s in ours] == [
            (float(r["start"]), float(r["end"]), [int(x) for x in r["tokens"]]) for r in ref], case
        kinds.add((len(ours) > 1, our_seek == n))
    assert len(kinds) >= 3, kinds   # pairs and no pairs, seeking a whole window and less


def test_unsupported_fallback_field_is_refused() -> None:
    from edgeseq.bundle import BundleError
    from edgeseq.runtime.whisper_timestamps import TimestampConfig

    with pytest.raises(BundleError, match="logprob_threshold"):
        TimestampConfig.from_config({"generation": {"no_timestamps_token_id": 5,
                                                    "eos_token_id": 1},
                                     "whisper": {"logprob_threshold": -1.0}})
    with pytest.raises(BundleError, match="no_timestamps_token_id"):
        TimestampConfig.from_config({"generation": {"eos_token_id": 1}})


# -- decoding against transformers' generate ---------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    from edgeseq.convert.pipeline import convert

    root = _shared_root(tmp_path_factory)
    ckpt = shared_build(root, "whisper-ts-ckpt", make_checkpoint)
    # No parity check at convert: it compares decoding *without* timestamps, where these
    # timestamp-biased weights still emit timestamp tokens after <|notimestamps|>, upon which
    # transformers 4.57 seeks and decodes the window again (edgeseq does not: a trained model
    # does not say them there). These tests compare timestamped decoding with transformers.
    bundle = shared_build(root, "whisper-ts-bundle",
                          lambda out: convert(ckpt, out, formats=("onnx", "pte"),
                                              skip_parity=True))
    model = WhisperForConditionalGeneration.from_pretrained(ckpt).eval()
    tokenizer = WhisperTokenizerFast.from_pretrained(ckpt)
    return {"ckpt": ckpt, "bundle": bundle, "model": model, "tokenizer": tokenizer, "refs": {}}


def _reference(built: dict[str, Any], seconds: float) -> dict[str, Any]:
    if seconds not in built["refs"]:
        built["refs"][seconds] = reference(built["model"], clip(seconds), built["tokenizer"])
    return built["refs"][seconds]


def _transcribe(built: dict[str, Any], seconds: float, backend: str) -> Any:
    import edgeseq
    from edgeseq.runtime.speech import Transcriber

    sess = edgeseq.load(built["bundle"], backend=backend)
    return Transcriber(sess, timestamps=True).transcribe(clip(seconds))


def _assert_same(ours: Any, ref: dict[str, Any]) -> None:
    assert ours.tokens == ref["tokens"]
    assert len(ours.segments) == len(ref["segments"])
    for (a, b, text), (ra, rb, _, rtext) in zip(ours.segments, ref["segments"]):
        assert a == pytest.approx(ra, abs=1e-9) and b == pytest.approx(rb, abs=1e-9)
        assert text == " ".join(rtext.split())
    assert any(text for _, _, text in ours.segments)


@pytest.mark.parametrize("backend", ["ort", "executorch"])
def test_short_form_segments_equal_transformers(built: dict[str, Any], backend: str) -> None:
    ref = _reference(built, 8.0)
    # the timestamp paths ran: several segments, closed by timestamp pairs
    assert len(ref["segments"]) > 1
    assert sum(t >= TIMESTAMP_BEGIN for t in ref["tokens"]) > 4
    _assert_same(_transcribe(built, 8.0, backend), ref)


@pytest.mark.parametrize("backend", ["ort", "executorch"])
def test_long_form_equals_transformers(built: dict[str, Any], backend: str) -> None:
    ref = _reference(built, 70.0)
    # sequential decoding over several windows, some seeking to a segment's end (not 30 s on)
    starts = [seg[0] for seg in ref["segments"]]
    assert len(ref["segments"]) > 3 and max(starts) > 60.0
    ours = _transcribe(built, 70.0, backend)
    _assert_same(ours, ref)
    assert ours.audio_s == pytest.approx(70.0)


def test_beams_long_form_equal_transformers(built: dict[str, Any]) -> None:
    import edgeseq
    from edgeseq.runtime.speech import Transcriber

    wav = clip(45.0, seed=3)
    ref = reference(built["model"], wav, built["tokenizer"], num_beams=3)
    assert len(ref["segments"]) > 2
    sess = edgeseq.load(built["bundle"], backend="ort")
    _assert_same(Transcriber(sess, timestamps=True, num_beams=3).transcribe(wav), ref)


def test_stream_equals_offline(built: dict[str, Any]) -> None:
    import edgeseq
    from edgeseq.runtime.speech import Transcriber, chunked

    sess = edgeseq.load(built["bundle"], backend="ort")
    wav = clip(70.0, seed=1)
    offline = Transcriber(sess, timestamps=True).transcribe(wav)
    seen: list[tuple[float, list]] = []
    streamer = Transcriber(sess, timestamps=True)
    res = streamer.stream(
        chunked(wav, 1.3), on_chunk=lambda rep: seen.append((rep.audio_s, rep.segments)))
    assert res.tokens == offline.tokens and res.segments == offline.segments
    assert [seg for _, segs in seen for seg in segs] == offline.segments
    # the first windows' segments came while the stream went on, each once its window was heard
    early = [(at, segs) for at, segs in seen if segs and at < 69.0]
    assert early and all(seg[0] < at - 29.0 for at, segs in early for seg in segs[:1])
    # within one window: decoded at the end, padded to 30 s as offline (the same transcriber:
    # the language is detected again on the new clip)
    short = clip(8.0, seed=2)
    res = streamer.stream(chunked(short, 1.0))
    assert res.tokens == Transcriber(sess, timestamps=True).transcribe(short).tokens


def test_cli_stream_timestamps(built: dict[str, Any], tmp_path: Path) -> None:
    import edgeseq
    from edgeseq import audio as A
    from edgeseq.runtime.speech import Transcriber

    # a 16-bit WAV: the stream is compared with the offline transcription of the same file
    wav = A.write_wav(tmp_path / "long.wav", clip(70.0))
    sess = edgeseq.load(built["bundle"], backend="ort")
    offline = Transcriber(sess, timestamps=True).transcribe(A.read_wav(wav))
    assert len(offline.segments) > 3 and offline.segments[-1][0] > 60.0
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "edgeseq.cli", "run", str(built["bundle"]), "--audio", str(wav),
           "--stream", "--timestamps", "--chunk-seconds", "5"]
    p = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    got = [(s["start"], s["end"], s["text"]) for s in out["segments"]]
    assert got == [(round(a, 3), round(b, 3), t) for a, b, t in offline.segments]
    assert len(out["chunk_latency_ms"]) >= 14
    # text: one line per segment, printed as its window closes (stderr merged to see when)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert p.returncode == 0, p.stdout[-2000:]
    lines = p.stdout.splitlines()
    timed = [ln for ln in lines if ln.startswith("[") and not ln.startswith("[chunk")]
    assert timed == [f"[{a:.2f} -> {b:.2f}] {t}" for a, b, t in offline.segments]
    chunks = [i for i, ln in enumerate(lines) if ln.startswith("[chunk")]
    assert lines.index(timed[0]) < chunks[-2], "the first window's segments came only at the end"


def test_cli_timestamps_offline_and_bad_bundle(built: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    import edgeseq
    from edgeseq import audio as A
    from edgeseq.runtime.speech import Transcriber

    wav = A.write_wav(tmp_path / "short.wav", clip(8.0))
    sess = edgeseq.load(built["bundle"], backend="ort")
    offline = Transcriber(sess, timestamps=True).transcribe(A.read_wav(wav))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "edgeseq.cli", "run"]
    p = subprocess.run([*cmd, str(built["bundle"]), "--audio", str(wav), "--timestamps"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines() == [f"[{a:.2f} -> {b:.2f}] {t}" for a, b, t in offline.segments]
    # a bundle whose manifest has no <|notimestamps|> id: one line naming it, exit 2
    bad = shutil.copytree(built["bundle"], tmp_path / "bad")
    man = json.loads((bad / "manifest.json").read_text())
    for part in ("generation", "whisper"):
        (man["config"].get(part) or {}).pop("no_timestamps_token_id", None)
    (bad / "manifest.json").write_text(json.dumps(man))
    p = subprocess.run([*cmd, str(bad), "--audio", str(wav), "--timestamps"],
                       capture_output=True, text=True, env=env)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("edgeseq: error:")]
    assert p.returncode == 2 and p.stdout == "", p.stderr[-2000:]
    assert len(errors) == 1 and "manifest.json" in errors[0]
    assert "no_timestamps_token_id" in errors[0]
