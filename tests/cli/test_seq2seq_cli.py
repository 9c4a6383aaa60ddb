"""`edgeseq run` on encoder-decoder and speech bundles, including bad audio input."""
import json

import numpy as np
import pytest

import edgeseq as es

from .test_cli import edgeseq, error_line


@pytest.mark.parametrize("backend", ["ort", "executorch"])
def test_run_json_greedy_and_beams(bundle_of, backend):
    bundle = bundle_of("t5")
    sess = es.load(bundle, backend=backend)
    src = [9, 15, 20, 11, 8, 13, 1]
    p = edgeseq("run", bundle, "--prompt-ids", ",".join(map(str, src)), "-n", "20",
                "--backend", backend, "--json")
    out = json.loads(p.stdout)
    assert out["tokens"] == sess.generate(src, 20)
    assert out["backend"] == backend and out["source_tokens"] == len(src)
    assert out["first_token_ms"] > 0 and out["tokens_per_s"] >= 0
    p = edgeseq("run", bundle, "--prompt-ids", ",".join(map(str, src)), "-n", "20",
                "--backend", backend, "--num-beams", "4", "--json")
    beams = json.loads(p.stdout)
    assert beams["tokens"] == sess.generate(src, 20, num_beams=4)
    assert beams["first_token_ms"] is None and beams["tokens_per_s"] > 0


def _wav(tmp_path, name, audio, rate=16000):
    from edgeseq import audio as A

    return A.write_wav(tmp_path / name, np.asarray(audio, dtype=np.float32), rate)


def test_run_audio_offline_and_stream(bundle_of, tmp_path):
    rng = np.random.default_rng(0)
    clip = _wav(tmp_path, "noise.wav", 0.3 * rng.standard_normal(16000 * 3))
    bundle = bundle_of("whisper")
    off = json.loads(edgeseq("run", bundle, "--audio", clip, "--json").stdout)
    st = json.loads(edgeseq("run", bundle, "--audio", clip, "--stream", "--json").stdout)
    assert off["text"] and st["text"] == off["text"]
    assert len(st["chunk_latency_ms"]) == 3 and st["rtf"] > 0


@pytest.mark.parametrize("kind,msg", [
    ("mp3", "is MP3"), ("empty", "contains no samples"), ("missing", "no such audio file"),
    ("alaw", "A-law")])
def test_run_bad_audio(bundle_of, tmp_path, kind, msg):
    import struct

    path = tmp_path / f"{kind}.wav"
    if kind == "mp3":
        path.write_bytes(b"ID3\x04" + bytes(200))
    elif kind == "empty":
        _wav(tmp_path, path.name, np.zeros(0))
    elif kind == "alaw":
        fmt = struct.pack("<HHIIHH", 6, 1, 16000, 16000, 1, 8)
        data = bytes(1600)
        path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
                         + b"fmt " + struct.pack("<I", len(fmt)) + fmt
                         + b"data" + struct.pack("<I", len(data)) + data)
    p = edgeseq("run", bundle_of("whisper"), "--audio", path, check=False)
    assert p.returncode != 0 and msg in error_line(p) and str(path.name) in error_line(p)


def test_run_audio_silence_and_other_rates(bundle_of, tmp_path):
    bundle = bundle_of("whisper")
    sil = _wav(tmp_path, "sil.wav", np.zeros(16000 * 2))
    out = json.loads(edgeseq("run", bundle, "--audio", sil, "--json").stdout)
    assert out["text"] == ""                       # documented: silence is not decoded
    t = np.arange(44100 * 2) / 44100
    hi = _wav(tmp_path, "44k.wav", 0.3 * np.sin(2 * np.pi * 440 * t), rate=44100)
    out = json.loads(edgeseq("run", bundle, "--audio", hi, "--json").stdout)
    assert out["audio_s"] == pytest.approx(2.0, abs=0.01)   # resampled to 16 kHz


def test_run_text_bundle_refuses_audio_and_long_sources(bundle_of, tmp_path):
    bundle = bundle_of("bart")
    p = edgeseq("run", bundle, "--audio", tmp_path / "x.wav", check=False)
    assert p.returncode != 0 and "speech model" in error_line(p)
    p = edgeseq("run", bundle, "--prompt-ids", ",".join(["9"] * 200), check=False)
    assert p.returncode != 0 and "200 tokens, over this encoder's limit of 128" in error_line(p)


def test_task_with_speculate_is_refused_not_ignored(tmp_path):
    """--task is not applied by the speculative path, so the combination is an error (exit 2,
    one line) rather than a run without the task's prefix."""
    from click.testing import CliRunner

    from edgeseq.cli import main

    res = CliRunner().invoke(main, ["run", str(tmp_path), "--text", "x", "--task",
                                    "translation_en_to_de", "--speculate", "auto"])
    assert res.exit_code == 2
    assert "--task translation_en_to_de" in res.output and "--speculate" in res.output
    assert len(res.output.strip().splitlines()) == 1
