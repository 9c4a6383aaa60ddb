"""Bounded inputs and numeric sanity: every limit refuses before allocating, with one line naming
the file (or key, or option) and the limit; NaN never turns into a token or a probability."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npformat

from edgeseq import limits
from edgeseq.audio import AudioError, read_wav, write_wav
from edgeseq.bundle import BundleError
from edgeseq.checkpoint import read_config
from edgeseq.limits import LimitError, NumericError

REPO = Path(__file__).resolve().parents[2]


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# -- text files -------------------------------------------------------------------------------
def test_text_file_round_trip_and_refusals(tmp_path, monkeypatch):
    good = tmp_path / "p.txt"
    good.write_text("héllo\n", encoding="utf-8")
    assert limits.read_text_file(good, "prompt") == "héllo\n"

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(LimitError, match=r"bad\.txt: prompt file is not UTF-8"):
        limits.read_text_file(bad, "prompt")

    monkeypatch.setenv("EDGESEQ_MAX_INPUT_BYTES", "4")
    with pytest.raises(LimitError) as e:
        limits.read_text_file(good, "prompt")
    assert one_line(e.value) == (f"{good}: prompt file is 7 bytes (limit 4; raise it with "
                                 f"EDGESEQ_MAX_INPUT_BYTES=...)")
    monkeypatch.setenv("EDGESEQ_MAX_INPUT_BYTES", "lots")
    with pytest.raises(LimitError, match="EDGESEQ_MAX_INPUT_BYTES: expected a positive integer"):
        limits.read_text_file(good, "prompt")


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "missing", "symlink-to-device"])
def test_text_file_refuses_what_is_not_a_regular_file_without_blocking(tmp_path, kind):
    p = tmp_path / "x"
    if kind == "fifo":
        os.mkfifo(p)  # opening it for reading would block until a writer comes
    elif kind == "device":
        p = Path("/dev/zero")  # never ends
    elif kind == "directory":
        p.mkdir()
    elif kind == "symlink-to-device":
        p.symlink_to("/dev/zero")
    t = time.perf_counter()
    with pytest.raises(LimitError) as e:
        limits.read_text_file(p, "prompt")
    assert time.perf_counter() - t < 2
    assert one_line(e.value).startswith(f"{p}: ")


# -- .npy ----------------------------------------------------------------------------------
def _npy_header(path: Path, shape: tuple, descr: str = "<f4", payload: bytes = b"") -> Path:
    with open(path, "wb") as f:
        npformat.write_array_header_1_0(f, {"descr": descr, "fortran_order": False,
                                            "shape": shape})
        f.write(payload)
    return path


def test_npy_round_trip(tmp_path):
    for a in (np.arange(12, dtype=np.float32).reshape(3, 4),
              np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.array([True, False]),
              np.zeros((0, 3), np.int16)):
        np.save(tmp_path / "a.npy", a)
        got = limits.read_npy(tmp_path / "a.npy")
        assert got.dtype == a.dtype and np.array_equal(got, a)
        assert got.flags.writeable  # as np.load gives it


def test_npy_header_claiming_a_terabyte_is_refused_before_allocating(tmp_path):
    p = _npy_header(tmp_path / "huge.npy", (10 ** 12,), payload=b"\0" * 64)
    with pytest.raises(LimitError) as e:
        limits.read_npy(p)
    assert one_line(e.value) == (f"{p}: .npy header claims shape (1000000000000,) of float32, "
                                 f"4000000000000 bytes (limit {256 << 20}; raise it with "
                                 f"EDGESEQ_MAX_NPY_BYTES=...)")


def test_npy_header_claiming_more_than_the_file_holds(tmp_path):
    p = _npy_header(tmp_path / "short.npy", (1000,), payload=b"\0" * 16)
    with pytest.raises(LimitError, match=r"short\.npy: truncated \.npy: header claims 4000 bytes "
                                         r"of data, the file holds 16"):
        limits.read_npy(p)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_npy_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    p = tmp_path / "evil.npy"
    np.save(p, np.array([_RunsCode(marker)], dtype=object), allow_pickle=True)
    assert not marker.exists()
    with pytest.raises(LimitError, match=r"evil\.npy: \.npy holds Python objects \(a pickle\)"):
        limits.read_npy(p)
    assert not marker.exists()


@pytest.mark.parametrize("descr,why", [("<U4", "not numeric"), ("<c8", "not numeric"),
                                       ([("a", "<f4")], "not numeric")])
def test_npy_non_numeric_dtypes(tmp_path, descr, why):
    p = _npy_header(tmp_path / "s.npy", (2,), descr, b"\0" * 64)
    with pytest.raises(LimitError, match=why):
        limits.read_npy(p)


@pytest.mark.parametrize("data", [b"", b"\x93NUMPY", b"\x93NUMPY\x01\x00\xff\xff{", b"PK\x03\x04zip",
                                  b"\x93NUMPY\x09\x00\x10\x00{'descr': '<f4'}"])
def test_npy_garbage_is_one_line(tmp_path, data):
    p = tmp_path / "g.npy"
    p.write_bytes(data)
    with pytest.raises(LimitError) as e:
        limits.read_npy(p)
    assert one_line(e.value).startswith(f"{p}: ")


def test_npy_refuses_devices_and_fifos(tmp_path):
    os.mkfifo(tmp_path / "f.npy")
    for p in (tmp_path / "f.npy", Path("/dev/zero")):
        with pytest.raises(LimitError, match="not a regular file"):
            limits.read_npy(p)


# -- numbers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -math.inf, "x", None])
def test_check_finite(value):
    with pytest.raises(LimitError) as e:
        limits.check_finite("temperature", value)
    assert one_line(e.value).startswith("temperature: must be a finite number, got ")
    assert limits.check_finite("top_p", 0.5) == 0.5


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_sampling_settings_refuse_nan(field):
    from edgeseq.runtime.decoding import SamplingConfig

    with pytest.raises(ValueError, match=f"{field}: must be a finite number, got nan"):
        SamplingConfig(True, **{field: float("nan")})


def test_processors_refuse_nan_repetition_penalty():
    from edgeseq.runtime.processors import Processors

    with pytest.raises(ValueError, match="repetition_penalty: must be a finite number"):
        Processors.from_config({"repetition_penalty": float("nan")}, 1, 8)
    assert Processors.from_config({"repetition_penalty": 1.2}, 1, 8).repetition_penalty == 1.2


def test_check_finite_array_names_the_graph():
    a = np.zeros((1, 4), np.float32)
    assert limits.check_finite_array(a, "graph step") is a
    a[0, 2] = np.nan
    with pytest.raises(NumericError, match=r"graph step \(position 3\): produced NaN"):
        limits.check_finite_array(a, "graph step (position 3)")


# -- checkpoint configs ----------------------------------------------------------------------
def _ckpt(tmp_path: Path, config) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("config,expect", [
    ([1, 2], "expected a JSON object, got list"),
    ({"model_type": "mamba", "hidden_size": "wide"}, "hidden_size must be a number, got 'wide'"),
    ({"model_type": "mamba", "num_hidden_layers": 10 ** 6},
     "num_hidden_layers is 1000000, over the layers in a checkpoint config (limit 1024; raise "
     "it with EDGESEQ_MAX_LAYERS=...)"),
    ({"model_type": "t5", "d_model": 1 << 20}, "d_model is 1048576"),
    ({"model_type": "t5", "vocab_size": 1 << 30}, "vocab_size is 1073741824"),
    ({"model_type": "mamba", "num_hidden_layers": 2.5}, "must be a whole number"),
    ({"model_type": "mamba", "num_hidden_layers": -1}, "must be a finite number >= 0"),
    ({"ssm_cfg": {"layer": "Mamba2"}, "n_layer": 10 ** 9}, "n_layer is 1000000000"),
    ({"model_type": "edgeseq_lmuformer", "depths": 10 ** 6}, "depths is 1000000"),
    ({"model_type": "mamba", "time_step_rank": "wide"},
     "time_step_rank must be a number or \"auto\", got 'wide'"),
    ({"ssm_cfg": {"dt_rank": [4]}, "n_layer": 2}, "ssm_cfg.dt_rank must be a number or"),
    ({"model_type": "mamba", "time_step_rank": 1 << 40}, "time_step_rank is 1099511627776"),
])
def test_config_limits_refuse_at_once(tmp_path, config, expect):
    d = _ckpt(tmp_path, config)
    t = time.perf_counter()
    with pytest.raises(BundleError) as e:
        read_config(d)
    assert time.perf_counter() - t < 2
    msg = one_line(e.value)
    assert msg.startswith(f"{d / 'config.json'}: ") and expect in msg, msg


def test_auto_dt_rank_passes(tmp_path):
    cfg = {"model_type": "mamba", "time_step_rank": "auto", "ssm_cfg": {"dt_rank": "auto"}}
    assert limits.check_config(cfg, "config.json") == cfg


def test_config_that_is_not_a_regular_file(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").symlink_to("/dev/zero")
    with pytest.raises(BundleError, match="not a regular file"):
        read_config(d)


def test_config_nested_too_deeply_is_one_line(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(BundleError) as e:
        read_config(d)
    assert "not valid JSON" in one_line(e.value)


def test_every_published_and_zoo_config_is_within_the_limits():
    found = [*REPO.glob("tests/fixtures/**/config.json"), *REPO.glob("edgeseq/zoo/**/config.json")]
    assert len(found) >= 5
    for f in found:
        limits.check_config(json.loads(f.read_text()), str(f))
    # the largest published checkpoints the families take
    from transformers import WhisperConfig

    large = WhisperConfig(d_model=1280, encoder_layers=32, decoder_layers=32, vocab_size=51866,
                          encoder_attention_heads=20, decoder_attention_heads=20,
                          encoder_ffn_dim=5120, decoder_ffn_dim=5120)
    limits.check_config(large.to_dict(), "whisper-large-v3")


def test_config_limits_can_be_raised(tmp_path, monkeypatch):
    cfg = {"model_type": "mamba", "num_hidden_layers": 2000}
    with pytest.raises(LimitError):
        limits.check_config(cfg, "c")
    monkeypatch.setenv("EDGESEQ_MAX_LAYERS", "4096")
    limits.check_config(cfg, "c")


def test_config_with_a_million_layers_refused_by_convert_at_once(tmp_path, checkpoints):
    from edgeseq.convert.pipeline import convert

    src = tmp_path / "ckpt"
    shutil.copytree(checkpoints["mamba"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 10 ** 6
    (src / "config.json").write_text(json.dumps(cfg))
    t = time.perf_counter()
    with pytest.raises(BundleError) as e:
        convert(src, tmp_path / "out", formats=("onnx",))
    assert time.perf_counter() - t < 10
    assert f"{src / 'config.json'}: num_hidden_layers is 1000000" in one_line(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_refused_at_convert(tmp_path, checkpoints, bad):
    from safetensors.torch import load_file, save_file

    from edgeseq.convert.pipeline import convert

    src = tmp_path / "ckpt"
    shutil.copytree(checkpoints["mamba"], src)
    sd = load_file(str(src / "model.safetensors"))
    name = sorted(k for k, v in sd.items() if v.is_floating_point())[-1]
    sd[name].view(-1)[0] = bad
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(BundleError) as e:
        convert(src, tmp_path / "out", formats=("onnx",))
    msg = one_line(e.value)
    assert f"tensor {name} holds {'NaN' if math.isnan(bad) else 'inf'}" in msg, msg
    assert not (tmp_path / "out").exists()


# -- WAV -------------------------------------------------------------------------------------
def _wav(path: Path, rate: int, frames: int, channels: int = 1, bits: int = 16,
         declared: int | None = None) -> Path:
    block = channels * bits // 8
    data = b"\0\1" * (frames * block // 2)
    size = len(data) if declared is None else declared
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", size)
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(body) + len(data)) + body + data)
    return path


def test_wav_header_whose_resampling_needs_gigabytes(tmp_path):
    # 100 k frames declared at 3 Hz: 533 M samples at 16 kHz (4.3 GB of float64)
    p = _wav(tmp_path / "slow.wav", 3, 100_000)
    t = time.perf_counter()
    with pytest.raises(AudioError) as e:
        read_wav(p)
    assert time.perf_counter() - t < 2
    msg = one_line(e.value)
    assert msg.startswith(f"{p}: WAV header (100000 frames x 1 channel(s) at 3 Hz) needs ")
    assert "resampled samples" in msg and "EDGESEQ_MAX_AUDIO_BYTES=" in msg


def test_wav_prime_rate_whose_filter_bank_is_huge(tmp_path):
    p = _wav(tmp_path / "prime.wav", 4_294_967_291, 1000)
    with pytest.raises(AudioError, match=r"resampling filter \(4294967291 -> 16000 Hz\)"):
        read_wav(p)


def test_wav_data_size_larger_than_the_file_reads_what_is_there(tmp_path):
    p = _wav(tmp_path / "cut.wav", 16000, 800, declared=0xFFFFFFF0)
    assert read_wav(p).shape == (800,)


def test_wav_file_size_cap_and_devices(tmp_path, monkeypatch):
    p = tmp_path / "ok.wav"
    write_wav(p, np.zeros(16000, np.float32))
    monkeypatch.setenv("EDGESEQ_MAX_WAV_BYTES", "1000")
    with pytest.raises(AudioError, match=r"ok\.wav: audio file is \d+ bytes \(limit 1000; raise "
                                         r"it with EDGESEQ_MAX_WAV_BYTES=\.\.\.\)"):
        read_wav(p)
    monkeypatch.delenv("EDGESEQ_MAX_WAV_BYTES")
    assert read_wav(p).shape == (16000,)
    os.mkfifo(tmp_path / "f.wav")
    for q in (tmp_path / "f.wav", Path("/dev/zero")):
        with pytest.raises(AudioError, match="not a regular file"):
            read_wav(q)


# -- running a causal LM: NaN outputs, prompts, resumed state --------------------------------
@pytest.fixture(scope="module")
def lm(mamba_bytes_bundle):
    import edgeseq

    return edgeseq.load(mamba_bytes_bundle, backend="ort", threads=1)


def test_prompt_ids_outside_the_vocabulary(lm):
    for ids in ([1, 2, 256], [-1, 5]):
        with pytest.raises(ValueError, match=r"input_ids: token id -?\d+ is outside the "
                                             r"vocabulary \[0, 256\)"):
            lm.generate(ids, 2)
    with pytest.raises(ValueError, match="integer token ids"):
        lm.generate([1, "a"], 2)


def test_list_and_array_prompts_agree(lm):
    ids = lm.encode("def main():\n    return ")
    a = lm.generate(ids, 8)
    assert np.array_equal(a, lm.generate(np.asarray(ids), 8))
    # a compact prompt (what ``encode_array`` gives) is widened a chunk at a time, same tokens
    compact = lm.encode_array("def main():\n    return ")
    assert compact.dtype == np.uint8 and compact.tolist() == ids
    assert np.array_equal(a, lm.generate(compact, 8))
    with pytest.raises(ValueError, match=r"token id 300 is outside"):
        lm.generate(np.asarray([1, 300], dtype=np.uint16), 2)
    assert np.array_equal(lm.generate([ids, ids], 8), np.stack([a, a]))
    # the last-position logits of a chunked prefill are those of the full one
    lm.reset()
    full = lm.prefill(np.asarray([ids]))[:, -1]
    lm.reset()
    assert np.allclose(lm.prefill(ids, last_only=True), full, atol=1e-5)


def test_nan_logits_stop_the_run(lm, monkeypatch):
    s = lm.fork()
    real = s.model.run

    def poisoned(graph, inputs, state):
        out, state = real(graph, inputs, state)
        if graph == "step":
            out = {**out, "logits": np.full_like(out["logits"], np.nan)}
        return out, state

    monkeypatch.setattr(s.model, "run", poisoned)
    got = []
    with pytest.raises(NumericError, match=r"graph step \(position \d+\): produced NaN"):
        for tok in s.stream(s.encode("import "), 8):
            got.append(int(tok[0]))
    assert len(got) == 1  # the first token comes from the prefill; no token from NaN


def test_nan_weights_in_a_bundle_stop_the_run(tmp_path, mamba_bytes_bundle):
    import edgeseq

    b = tmp_path / "b"
    shutil.copytree(mamba_bytes_bundle, b)
    data = b / "weights.onnx.data"
    n = data.stat().st_size
    data.write_bytes(np.full(n // 4, np.nan, np.float32).tobytes() + b"\0" * (n % 4))
    # a bundle whose own record says so (its author's NaN, not a tampered file: that is the
    # hash check's case)
    man = json.loads((b / "manifest.json").read_text())
    man["files"]["weights.onnx.data"]["sha256"] = hashlib.sha256(data.read_bytes()).hexdigest()
    (b / "manifest.json").write_text(json.dumps(man))
    s = edgeseq.load(b, backend="ort", threads=1)
    with pytest.raises(NumericError, match=r"graph prefill \(prompt tokens 0\.\.\d+\): produced"):
        s.generate(s.encode("import os"), 4)


def _saved(lm):
    s = lm.fork()
    ids = s.encode("for i in range(")
    first = list(s.stream(ids, 3, do_sample=True, seed=3))
    return s, {k: v.copy() for k, v in s.state_dict().items()}, first


@pytest.mark.parametrize("change,key", [
    (lambda sd, k: sd[k].__setitem__((0,) * sd[k].ndim, np.nan), "state."),
    (lambda sd, k: sd.__setitem__(k, sd[k][..., :1]), "state."),
    (lambda sd, k: sd.__setitem__(k, sd[k].astype(np.float64)), "state."),
    (lambda sd, k: sd.pop(k), "state."),
    (lambda sd, k: sd.__setitem__("pending", np.array([-1])), "pending"),
    (lambda sd, k: sd.__setitem__("pending", np.array([256])), "pending"),
    (lambda sd, k: sd.__setitem__("pending", np.array([1.5])), "pending"),
    (lambda sd, k: sd.__setitem__("pending", np.array([1, 2])), "pending"),
    (lambda sd, k: sd.__setitem__("logits", np.full((1, 256), np.nan, np.float32)), "logits"),
    (lambda sd, k: sd.__setitem__("logits", np.zeros((1, 7), np.float32)), "logits"),
    (lambda sd, k: sd.__setitem__("position", np.array([-4])), "position"),
    (lambda sd, k: sd.__setitem__("rng", np.frombuffer(b"garbage", np.uint8)), "rng"),
    (lambda sd, k: sd.__setitem__("rng", np.frombuffer(b'{"bit_generator": "X"}', np.uint8)),
     "rng"),
    (lambda sd, k: sd.__setitem__("rng", np.zeros(3, np.float32)), "rng"),
])
def test_resumed_state_is_checked(lm, change, key):
    from edgeseq.runtime.session import StateError

    s, sd, _ = _saved(lm)
    k = next(n for n in sd if n.startswith("state.")) if key == "state." else key
    bad = {n: v.copy() for n, v in sd.items()}
    change(bad, k)
    t = lm.fork()
    with pytest.raises(ValueError) as e:
        t.load_state(bad)
    assert isinstance(e.value, StateError) and isinstance(e.value, BundleError)
    assert one_line(e.value).startswith("state_dict ") and k in str(e.value)
    # a refused file leaves the stream as it was: the good file still resumes exactly
    t.load_state(sd)
    assert [int(x[0]) for x in t.stream(None, 5)] == [int(x[0]) for x in s.stream(None, 5)]


# -- classifiers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier(bundle_of):
    import edgeseq

    return edgeseq.load(bundle_of("lmuformer"), backend="ort", threads=1)


def test_classifier_never_returns_nan_probabilities(classifier):
    f = classifier.features
    for big in (1e38, -1e38, 3e38):
        x = np.full((12, f), big, np.float32)
        try:
            r = classifier.classify(x)
        except NumericError as e:
            assert "graph " in one_line(e) and "produced" in str(e)
        else:
            assert all(math.isfinite(p) for p in r.probs), r.probs
            json.dumps(r.probs, allow_nan=False)


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e39])
def test_classifier_refuses_non_finite_frames(classifier, value):
    x = np.zeros((12, classifier.features), np.float64)
    x[3, 0] = value
    with pytest.raises(ValueError, match="frames contain NaN or infinity|float32's range"):
        classifier.classify(x)


# -- tokenizer files -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tokenizer.json", "spiece.model", "merges.txt"])
def test_tokenizer_file_over_the_size_limit_is_refused_before_parsing(tmp_path, monkeypatch,
                                                                      name):
    from edgeseq import tokenize

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / name).write_bytes(b"x" * 4096)
    monkeypatch.setenv("EDGESEQ_MAX_TOKENIZER_BYTES", "1024")
    with pytest.raises(BundleError) as e:
        tokenize.detect(d)
    assert one_line(e.value) == (f"{d / name}: tokenizer file is 4096 bytes (limit 1024; raise "
                                 f"it with EDGESEQ_MAX_TOKENIZER_BYTES=...)")


def test_tokenizer_file_in_a_bundle_over_the_size_limit(tmp_path, monkeypatch):
    from edgeseq import tokenize

    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_bytes(b"{" * 2048)
    monkeypatch.setenv("EDGESEQ_MAX_TOKENIZER_BYTES", "1024")
    with pytest.raises(BundleError, match="tokenizer file is 2048 bytes"):
        tokenize.load(tmp_path, {"type": "hf", "file": "tokenizer.json"})


def test_tokenizer_device_file_is_refused(tmp_path):
    from edgeseq import tokenize

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "tokenizer.json").symlink_to("/dev/zero")
    with pytest.raises(BundleError, match="not a regular file"):
        tokenize.detect(d)
