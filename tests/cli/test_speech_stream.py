"""Streaming transcription of a 60 s WAV with the zoo's whisper-tonespeech, through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from .test_cli import edgeseq

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tonespeech_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("wts") / "bundle"
    edgeseq("convert", "zoo:whisper-tonespeech", "-o", str(out), "--format", "onnx")
    return out


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    from edgeseq import audio as A
    from edgeseq.zoo import tonespeech as ts

    audio, ref, _ = ts.make_long_clip(np.random.default_rng(4), 60.0)
    path = tmp_path_factory.mktemp("wav") / "long.wav"
    A.write_wav(path, audio)
    return path, ref


def test_stream_matches_offline_on_60s(tonespeech_bundle, long_wav):
    from edgeseq.zoo import tonespeech as ts

    path, ref = long_wav
    off = json.loads(edgeseq("run", tonespeech_bundle, "--audio", path, "--json").stdout)
    st = json.loads(edgeseq("run", tonespeech_bundle, "--audio", path, "--stream", "--json").stdout)
    assert off["audio_s"] == pytest.approx(60.0, abs=0.01)
    edits, n = ts.word_errors(off["text"], st["text"])
    assert n > 50 and edits <= 2, (off["text"], st["text"])
    # the model really transcribes (not a degenerate empty / constant output)
    assert ts.wer([ref], [off["text"]]) < 0.3
    # one latency per 1 s chunk, all positive; streaming and offline cut at the same places
    assert len(st["chunk_latency_ms"]) >= 60 and min(st["chunk_latency_ms"]) >= 0
    assert [s["end"] for s in st["segments"]] == pytest.approx([s["end"] for s in off["segments"]])
    assert max(s["end"] - s["start"] for s in off["segments"]) <= 10.0 + 1e-6
    assert 0 < st["rtf"] < 1
