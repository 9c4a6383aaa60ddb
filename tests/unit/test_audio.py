"""edgeseq.audio: WAV parsing (hand-built headers), resampling, Whisper log-mel parity."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from edgeseq.audio import (CHUNK_SECONDS, HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE,
                           AudioError, frames_for, log_mel_spectrogram, mel_filters, read_wav,
                           resample, samples_for, write_wav)
from edgeseq.bundle import BundleError

KS_SUFFIX = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
VALUES = np.array([0.0, 0.5, -0.5, 0.25, -1.0, 0.75])


# ----------------------------------------------------------------------------- WAV builders

def _chunk(cid: bytes, body: bytes, declared: int | None = None) -> bytes:
    size = len(body) if declared is None else declared
    return cid + struct.pack("<I", size) + body + (b"\0" if len(body) % 2 else b"")


def _fmt(tag: int, channels: int, rate: int, bits: int, sub: int | None = None,
         valid_bits: int | None = None) -> bytes:
    block = channels * bits // 8
    body = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    if sub is not None:  # WAVE_FORMAT_EXTENSIBLE tail: cbSize, validBits, channelMask, GUID
        body += struct.pack("<HHI", 22, valid_bits or bits, (1 << channels) - 1)
        body += struct.pack("<H", sub) + KS_SUFFIX
    return _chunk(b"fmt ", body)


def _riff(*chunks: bytes, kind: bytes = b"WAVE") -> bytes:
    body = kind + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _encode(values: np.ndarray, bits: int, float_: bool = False) -> bytes:
    if float_:
        return values.astype("<f4" if bits == 32 else "<f8").tobytes()
    if bits == 8:
        return np.clip(np.round(values * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    scale = 2.0 ** (bits - 1)
    ints = np.clip(np.round(values * scale), -scale, scale - 1).astype(np.int64)
    return b"".join(int(i).to_bytes(bits // 8, "little", signed=True) for i in ints)


def _write(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ----------------------------------------------------------------------------- reading

def test_roundtrip_write_read(tmp_path):
    rng = np.random.default_rng(0)
    grid = rng.integers(-32768, 32768, 4001) / 32768.0  # on the 16-bit grid: exact round trip
    p = write_wav(tmp_path / "a.wav", grid)
    back = read_wav(p)
    assert back.dtype == np.float32 and back.shape == grid.shape
    np.testing.assert_array_equal(back, grid.astype(np.float32))
    x = rng.uniform(-1, 1, 1000)
    back = read_wav(write_wav(tmp_path / "b.wav", x))
    assert np.abs(back - x).max() <= 0.5 / 32768 + 1e-7


@pytest.mark.parametrize("bits,float_,tol", [(8, False, 0), (16, False, 0), (24, False, 0),
                                             (32, False, 0), (32, True, 0), (64, True, 0)])
def test_each_sample_format_with_odd_chunks(tmp_path, bits, float_, tol):
    tag = 3 if float_ else 1
    data = _encode(VALUES, bits, float_)
    # An odd-sized LIST chunk (pad byte) before data and another chunk after it must be skipped.
    wav = _riff(_fmt(tag, 1, 16000, bits), _chunk(b"LIST", b"INFOx"), _chunk(b"data", data),
                _chunk(b"junk", b"abc"))
    got = read_wav(_write(tmp_path, f"f{bits}{float_}.wav", wav))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, VALUES, atol=tol + 1e-7)


def test_8bit_odd_data_chunk_padding(tmp_path):
    # 3 one-byte samples: the data chunk is odd-sized and followed by a pad byte; fmt comes after.
    wav = _riff(_chunk(b"data", bytes([128, 255, 0])), _fmt(1, 1, 16000, 8))
    np.testing.assert_allclose(read_wav(_write(tmp_path, "odd.wav", wav)), [0, 127 / 128, -1])


@pytest.mark.parametrize("sub,bits,valid,float_", [(1, 16, 16, False), (1, 32, 24, False),
                                                   (1, 24, 24, False), (3, 32, 32, True)])
def test_wave_format_extensible(tmp_path, sub, bits, valid, float_):
    if valid < bits:  # 24 valid bits left-justified in a 32-bit container
        ints = np.round(VALUES * 2 ** 23).clip(-2 ** 23, 2 ** 23 - 1).astype("<i4") << 8
        data = ints.tobytes()
    else:
        data = _encode(VALUES, bits, float_)
    wav = _riff(_fmt(0xFFFE, 1, 16000, bits, sub=sub, valid_bits=valid), _chunk(b"data", data))
    np.testing.assert_allclose(read_wav(_write(tmp_path, "ext.wav", wav)), VALUES, atol=1e-7)


def test_extensible_with_unsupported_subformat(tmp_path):
    wav = _riff(_fmt(0xFFFE, 1, 16000, 8, sub=6), _chunk(b"data", b"\x00" * 10))
    with pytest.raises(AudioError, match=r"ext_alaw\.wav.*0x0006 \(A-law\)"):
        read_wav(_write(tmp_path, "ext_alaw.wav", wav))


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = VALUES, -0.5 * VALUES[::-1]
    inter = np.stack([left, right], axis=1).ravel()
    wav = _riff(_fmt(1, 2, 16000, 16), _chunk(b"data", _encode(inter, 16)))
    got = read_wav(_write(tmp_path, "st.wav", wav))
    np.testing.assert_allclose(got, (left + right) / 2, atol=1e-7)
    # 6 channels of 24-bit too.
    six = np.tile(VALUES[:, None], (1, 6)).ravel()
    wav = _riff(_fmt(1, 6, 16000, 24), _chunk(b"data", _encode(six, 24)))
    np.testing.assert_allclose(read_wav(_write(tmp_path, "six.wav", wav)), VALUES, atol=1e-7)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: no such audio file") as e:
        read_wav(tmp_path / "nope.wav")
    assert isinstance(e.value, BundleError)


@pytest.mark.parametrize("head,name", [
    (b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\0" * 20, "MP3"),
    (b"\xff\xfb\x90\x64" + b"\0" * 20, "MP3"),
    (b"\xff\xf1\x50\x80" + b"\0" * 20, "AAC"),
    (b"fLaC\x00\x00\x00\x22" + b"\0" * 20, "FLAC"),
    (b"OggS\x00\x02" + b"\0" * 22 + b"OpusHead" + b"\0" * 8, "Ogg Opus"),
    (b"OggS\x00\x02" + b"\0" * 40, "Ogg"),
    (b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00" + b"\0" * 16, "MP4/M4A"),
    (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81" + b"\0" * 20, "WebM/Matroska"),
])
def test_non_wav_formats_are_named(tmp_path, head, name):
    p = _write(tmp_path, "clip.wav", head)
    with pytest.raises(AudioError) as e:
        read_wav(p)
    msg = str(e.value)
    assert str(p) in msg and name in msg and "not a WAV" in msg
    assert "ffmpeg -i" in msg and "-ar 16000 -ac 1" in msg


def test_unknown_bytes_and_empty_file(tmp_path):
    with pytest.raises(AudioError, match=r"junk\.wav: not a WAV file"):
        read_wav(_write(tmp_path, "junk.wav", b"hello world, this is text"))
    with pytest.raises(AudioError, match=r"empty\.wav: file is empty"):
        read_wav(_write(tmp_path, "empty.wav", b""))


def test_truncated_and_corrupt_headers(tmp_path):
    with pytest.raises(AudioError, match=r"t1\.wav: truncated WAV header"):
        read_wav(_write(tmp_path, "t1.wav", b"RIFF\x24\x00\x00"))
    # fmt chunk declares 16 bytes, 6 are there.
    cut = b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80\x3e"
    with pytest.raises(AudioError, match=r"t2\.wav: truncated WAV header: 'fmt '"):
        read_wav(_write(tmp_path, "t2.wav", cut))
    with pytest.raises(AudioError, match=r"t3\.wav: truncated or corrupt WAV header: no 'fmt '"):
        read_wav(_write(tmp_path, "t3.wav", b"RIFF\x04\x00\x00\x00WAVE"))
    with pytest.raises(AudioError, match=r"t4\.wav: .*no 'data' chunk"):
        read_wav(_write(tmp_path, "t4.wav", _riff(_fmt(1, 1, 16000, 16))))
    bad_align = _riff(_chunk(b"fmt ", struct.pack("<HHIIHH", 1, 2, 16000, 64000, 3, 16)),
                      _chunk(b"data", b"\0" * 8))
    with pytest.raises(AudioError, match=r"t5\.wav: corrupt WAV header: block_align is 3"):
        read_wav(_write(tmp_path, "t5.wav", bad_align))
    with pytest.raises(AudioError, match=r"t6\.wav: RIFF file of type b'AVIX'"):
        read_wav(_write(tmp_path, "t6.wav", _riff(kind=b"AVIX")))


@pytest.mark.parametrize("tag,name", [(6, "A-law"), (7, "mu-law"), (2, "Microsoft ADPCM"),
                                      (0x11, "IMA ADPCM"), (0x1234, "unknown codec")])
def test_unsupported_codec_names_the_tag(tmp_path, tag, name):
    wav = _riff(_fmt(tag, 1, 8000, 8), _chunk(b"data", b"\x55" * 100))
    with pytest.raises(AudioError, match=rf"codec\.wav: unsupported WAV codec: format tag "
                                         rf"0x{tag:04X} \({name}\)"):
        read_wav(_write(tmp_path, "codec.wav", wav))


def test_empty_data_chunk(tmp_path):
    wav = _riff(_fmt(1, 1, 16000, 16), _chunk(b"data", b""))
    with pytest.raises(AudioError, match=r"nodata\.wav: WAV file contains no samples"):
        read_wav(_write(tmp_path, "nodata.wav", wav))
    # Less than one frame (1 byte of a 2-byte sample) is no samples either.
    wav = _riff(_fmt(1, 1, 16000, 16), _chunk(b"data", b"\x01"))
    with pytest.raises(AudioError, match="contains no samples"):
        read_wav(_write(tmp_path, "onebyte.wav", wav))


def test_truncated_data_chunk_reads_what_is_there(tmp_path):
    x = np.linspace(-0.5, 0.5, 100)
    pcm = _encode(x, 16)
    # Declares 2000 bytes; 201 follow (100 samples and half of one more, which is dropped).
    wav = _riff(_fmt(1, 1, 16000, 16)) + b"data" + struct.pack("<I", 2000) + pcm + b"\x07"
    got = read_wav(_write(tmp_path, "cut.wav", wav))
    assert got.shape == (100,)
    np.testing.assert_allclose(got, x, atol=1 / 32768)


def test_non_finite_float_wav(tmp_path):
    wav = _riff(_fmt(3, 1, 16000, 32), _chunk(b"data", np.array([0.1, np.nan], "<f4").tobytes()))
    with pytest.raises(AudioError, match=r"nan\.wav: float WAV contains non-finite"):
        read_wav(_write(tmp_path, "nan.wav", wav))


# ----------------------------------------------------------------------------- resampling

def _tone(freq: float, sr: int, seconds: float = 1.5, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)


def _spectrum_db(y: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """dB (re full-scale sine) of a 1 s Hann-windowed slice from the middle: 1 Hz bins."""
    mid = y[len(y) // 2 - sr // 2: len(y) // 2 + sr // 2].astype(np.float64)
    w = np.hanning(sr + 1)[:-1]
    mag = np.abs(np.fft.rfft(mid * w)) * 2 / w.sum()
    return np.fft.rfftfreq(sr, 1 / sr), 20 * np.log10(mag + 1e-20)


@pytest.mark.parametrize("orig", [44100, 8000])
def test_resample_keeps_frequency_and_amplitude(orig):
    y = resample(_tone(1000.0, orig), orig, 16000)
    assert y.dtype == np.float32 and len(y) == int(np.ceil(1.5 * orig * 16000 / orig))
    f, db = _spectrum_db(y, 16000)
    assert f[np.argmax(db)] == 1000.0
    mid = y[2000:-2000].astype(np.float64)
    assert abs(np.sqrt(2 * np.mean(mid ** 2)) - 0.5) < 0.005   # amplitude within 1%
    # Everything away from the tone (leakage of the Hann window aside) is below -80 dB: no images
    # (8k -> 16k would put one at 7 kHz) and no aliases.
    assert db[np.abs(f - 1000) > 10].max() < -80


def test_resample_rejects_aliases_and_keeps_passband():
    # 12 kHz at 44.1 kHz is above the new 8 kHz Nyquist: it would alias to 4 kHz.
    y = resample(_tone(1000.0, 44100) + _tone(12000.0, 44100, amp=0.4), 44100, 16000)
    f, db = _spectrum_db(y, 16000)
    assert db[np.abs(f - 4000) < 10].max() < -80
    assert db[np.abs(f - 1000) > 10].max() < -80
    # 7 kHz (0.875 of the new Nyquist) is passed at full level.
    y = resample(_tone(7000.0, 44100), 44100, 16000)
    assert abs(np.sqrt(2 * np.mean(y[2000:-2000].astype(np.float64) ** 2)) - 0.5) < 0.005


def test_resample_edge_cases():
    np.testing.assert_array_equal(resample(np.ones(5), 16000, 16000), np.ones(5, np.float32))
    assert resample(np.zeros(0), 44100, 16000).shape == (0,)
    assert resample(np.ones(3), 48000, 16000).shape == (1,)
    dc = resample(np.full(4000, 0.25), 22050, 16000)
    np.testing.assert_allclose(dc[200:-200], 0.25, atol=1e-4)  # unit DC gain
    with pytest.raises(ValueError):
        resample(np.ones(4), 0, 16000)
    with pytest.raises(ValueError):
        resample(np.ones((2, 4)), 8000, 16000)


def test_read_wav_resamples_or_refuses(tmp_path):
    p = write_wav(tmp_path / "cd.wav", _tone(440.0, 44100, seconds=1.0), sample_rate=44100)
    y = read_wav(p)
    assert len(y) == 16000
    f, db = _spectrum_db(np.concatenate([y, y]), 16000)
    assert f[np.argmax(db)] == 440.0
    with pytest.raises(AudioError, match=r"cd\.wav: sample rate is 44100 Hz, expected 16000 Hz"):
        read_wav(p, resample=False)
    assert len(read_wav(p, sample_rate=44100, resample=False)) == 44100


# ----------------------------------------------------------------------------- log-mel

@pytest.fixture(scope="module")
def extractor():
    from transformers import WhisperFeatureExtractor

    cache = {}

    def get(n_mels):
        if n_mels not in cache:
            cache[n_mels] = WhisperFeatureExtractor(feature_size=n_mels)
        return cache[n_mels]
    return get


def _noise() -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal(16000 * 7)).astype(np.float32)


def _chirp() -> np.ndarray:
    t = np.arange(16000 * 10) / 16000
    return (0.5 * np.sin(2 * np.pi * (50 * t + (7900 - 50) / 20 * t ** 2))).astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("signal", [_noise, _chirp])
def test_log_mel_matches_whisper_feature_extractor(extractor, n_mels, signal):
    audio = signal()
    ref = extractor(n_mels)(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    got = log_mel_spectrogram(audio, n_mels=n_mels, n_frames=N_FRAMES)
    assert got.shape == ref.shape == (n_mels, 3000) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-4
    # Unpadded: the extractor with padding="longest" keeps the length, as n_frames=None does.
    cut = audio[:16000 * 3 + 77]
    ref = extractor(n_mels)(cut, sampling_rate=16000, return_tensors="np",
                            padding="longest").input_features[0]
    got = log_mel_spectrogram(cut, n_mels=n_mels)
    assert got.shape == ref.shape == (n_mels, len(cut) // HOP_LENGTH)
    assert np.abs(got - ref).max() < 1e-4


def test_mel_filters_match_transformers():
    from transformers.audio_utils import mel_filter_bank

    for n_mels in (80, 128):
        ref = mel_filter_bank(N_FFT // 2 + 1, n_mels, 0.0, 8000.0, SAMPLE_RATE, norm="slaney",
                              mel_scale="slaney")
        got = mel_filters(n_mels, N_FFT, SAMPLE_RATE)
        assert got.shape == (201, n_mels)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
        assert not got.flags.writeable
    with pytest.raises(ValueError):
        mel_filters(80, 400, 8000, 0.0, 8000.0)  # fmax above Nyquist


def test_frame_count_rule():
    rng = np.random.default_rng(1)
    for n in (160, 161, 319, 320, 16000, 16159, 48077):
        assert log_mel_spectrogram(rng.standard_normal(n) * 0.1).shape == (80, n // HOP_LENGTH)
    with pytest.raises(ValueError, match="shorter than one hop"):
        log_mel_spectrogram(np.zeros(159))
    # n_frames pads short audio and trims long audio.
    assert log_mel_spectrogram(np.zeros(100), n_frames=7).shape == (80, 7)
    long = rng.standard_normal(N_SAMPLES + 5000).astype(np.float32) * 0.1
    np.testing.assert_array_equal(log_mel_spectrogram(long, n_frames=N_FRAMES),
                                  log_mel_spectrogram(long[:N_SAMPLES], n_frames=N_FRAMES))
    assert (samples_for(CHUNK_SECONDS), frames_for(CHUNK_SECONDS)) == (480000, 3000) \
        == (N_SAMPLES, N_FRAMES)
    assert frames_for(1.0) == 100 and samples_for(0.5) == 8000


def test_silence_gives_finite_features():
    for feats in (log_mel_spectrogram(np.zeros(16000, np.float32), n_frames=N_FRAMES),
                  log_mel_spectrogram(np.zeros(16000)), log_mel_spectrogram(np.zeros(16000),
                                                                             n_mels=128)):
        assert np.isfinite(feats).all()
        np.testing.assert_allclose(feats, -1.5)  # (log10(1e-10) + 4) / 4
    with pytest.raises(ValueError, match="NaN or inf"):
        log_mel_spectrogram(np.array([0.0, np.inf] * 200))


def test_read_wav_to_features(tmp_path):
    p = write_wav(tmp_path / "c.wav", _chirp())
    feats = log_mel_spectrogram(read_wav(p), n_frames=N_FRAMES)
    ref = log_mel_spectrogram(_chirp(), n_frames=N_FRAMES)
    # 16-bit quantisation noise (~-100 dBFS) only lifts the quietest bands near the 80 dB floor.
    assert np.abs(feats - ref).max() < 0.02
    assert np.abs(feats - ref).mean() < 1e-3


def test_rf64(tmp_path):
    pcm = _encode(VALUES, 16)
    ds64 = _chunk(b"ds64", struct.pack("<QQQI", 0, len(pcm), len(VALUES), 0))
    data = b"data" + struct.pack("<I", 0xFFFFFFFF) + pcm  # 32-bit size deferred to ds64
    wav = b"RF64" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + ds64 + _fmt(1, 1, 16000, 16) + data
    np.testing.assert_allclose(read_wav(_write(tmp_path, "big.wav", wav)), VALUES, atol=1e-7)
