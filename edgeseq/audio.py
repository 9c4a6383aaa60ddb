"""Audio front end for Whisper-style speech models: WAV in, log-mel features out, numpy only.

The runtime must run where torch, transformers, ffmpeg and scipy are not installed (phones, boards),
so everything here is plain numpy and the standard library:

* :func:`read_wav` parses the RIFF/WAVE container itself (PCM 8/16/24/32-bit, IEEE float 32/64,
  ``WAVE_FORMAT_EXTENSIBLE``, RF64), mixes to mono and resamples to the model's rate.
  Compressed formats (MP3, FLAC, Ogg, MP4/M4A, WebM/Matroska, ...) are recognised by their magic
  bytes and refused with the ffmpeg command that converts them: decoding them is out of scope.
* :func:`resample` is a Kaiser-windowed-sinc polyphase resampler (see its docstring for quality).
* :func:`log_mel_spectrogram` reproduces ``transformers.WhisperFeatureExtractor`` numerics
  (equal to its numpy path to ~1e-7, within ~6e-5 of its float32 torch path);
  :func:`mel_filters` is its Slaney mel filter bank.
* :func:`write_wav` writes 16-bit PCM mono, for tests, benchmarks and tools.

File problems raise :class:`AudioError` (a :class:`~edgeseq.bundle.BundleError`, so the CLI
reports it like any other bad input); programming errors (bad arrays, bad rates) raise
``ValueError``.
"""
from __future__ import annotations

import functools
import math
import os
import shlex
import struct
import wave
from pathlib import Path
from typing import Union

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edgeseq import limits
from edgeseq.bundle import BundleError

__all__ = [
    "AudioError", "SAMPLE_RATE", "HOP_LENGTH", "N_FFT", "CHUNK_SECONDS", "N_SAMPLES", "N_FRAMES",
    "read_wav", "write_wav", "resample", "log_mel_spectrogram", "mel_filters", "frames_for",
    "samples_for",
]

PathLike = Union[str, "os.PathLike[str]"]

SAMPLE_RATE = 16000
HOP_LENGTH = 160
N_FFT = 400
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000: one Whisper window
N_FRAMES = N_SAMPLES // HOP_LENGTH      # 3000 mel frames per window

# Whisper's mel bank stops at 8 kHz whatever the rate (WhisperFeatureExtractor hard-codes it).
_WHISPER_FMAX = 8000.0
# The clamp applied before log10 (transformers' mel_floor / torch.clamp(min=1e-10)).
_LOG_FLOOR = 1e-10


class AudioError(BundleError):
    """An audio file cannot be used; the message names the file and the problem."""


def samples_for(seconds: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Number of samples in ``seconds`` of audio at ``sample_rate`` (rounded to nearest).

    Args:
        seconds: duration in seconds.
        sample_rate: samples per second.

    Returns:
        ``round(seconds * sample_rate)``; e.g. ``samples_for(30) == 480000``.
    """
    return int(round(seconds * sample_rate))


def frames_for(seconds: float, sample_rate: int = SAMPLE_RATE, hop_length: int = HOP_LENGTH) -> int:
    """Number of log-mel frames :func:`log_mel_spectrogram` gives for ``seconds`` of audio.

    Args:
        seconds: duration in seconds.
        sample_rate: samples per second.
        hop_length: STFT hop in samples.

    Returns:
        ``samples_for(seconds) // hop_length``; e.g. ``frames_for(30) == 3000``.
    """
    return samples_for(seconds, sample_rate) // hop_length


# --------------------------------------------------------------------------------------------
# WAV reading
# --------------------------------------------------------------------------------------------

_FMT_PCM = 0x0001
_FMT_FLOAT = 0x0003
_FMT_EXTENSIBLE = 0xFFFE
# The 14 bytes that follow the 2-byte format tag in a KSDATAFORMAT_SUBTYPE_* GUID (as stored in
# the file, little-endian Data1..Data3 then Data4): {0000xxxx-0000-0010-8000-00AA00389B71}.
_KSDATAFORMAT_SUFFIX = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"

# Names for the format tags people actually meet, so an unsupported one is recognisable.
_FORMAT_NAMES = {
    0x0000: "unknown",
    0x0001: "PCM",
    0x0002: "Microsoft ADPCM",
    0x0003: "IEEE float",
    0x0006: "A-law",
    0x0007: "mu-law",
    0x0011: "IMA ADPCM",
    0x0016: "ITU G.723 ADPCM",
    0x0031: "GSM 6.10",
    0x0040: "ITU G.721 ADPCM",
    0x0050: "MPEG",
    0x0055: "MPEG Layer 3 (MP3)",
    0x0092: "Dolby AC3 SPDIF",
    0x00FF: "AAC",
    0x0160: "Windows Media Audio",
    0x0161: "Windows Media Audio 2",
    0x1610: "MPEG-4 AAC (HE-AAC)",
    0x2000: "Dolby AC3",
    0xF1AC: "FLAC",
    0xFFFE: "extensible",
}


def _ffmpeg_hint(path: Path, sample_rate: int) -> str:
    # A new name next to the input: ffmpeg refuses to overwrite its own input (x.wav -> x.wav).
    tag = f"{sample_rate // 1000}k" if sample_rate % 1000 == 0 else str(sample_rate)
    out = path.with_name(f"{path.stem}_{tag}.wav")
    return (f"convert it with: ffmpeg -i {shlex.quote(str(path))} -ar {sample_rate} -ac 1 "
            f"{shlex.quote(str(out))}")


def _sniff(head: bytes) -> str | None:
    """Name the (non-WAV) audio/container format of a file from its first bytes, if known."""
    if head.startswith(b"ID3"):
        return "MP3 (ID3 tag)"
    if head.startswith(b"fLaC"):
        return "FLAC"
    if head.startswith(b"OggS"):
        # The first Ogg page carries the codec's identification header at offset 28.
        if head[28:36] == b"OpusHead":
            return "Ogg Opus"
        if head[28:35] == b"\x01vorbis":
            return "Ogg Vorbis"
        if head[28:33] == b"\x7fFLAC":
            return "Ogg FLAC"
        return "Ogg"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12].decode("latin-1").strip()
        return f"MP4/M4A (ftyp brand '{brand}')"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "WebM/Matroska"
    if head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    if head.startswith(b".snd"):
        return "Sun/NeXT AU"
    if head.startswith(b"#!AMR"):
        return "AMR"
    if head.startswith(b"caff"):
        return "Apple CAF"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:
        # 11-bit frame sync. Layer bits 00 mean ADTS AAC (sync 0xFFF, layer 0); MPEG audio
        # (MP1/2/3) never uses layer 00.
        if (head[1] & 0xF6) == 0xF0:
            return "AAC (ADTS)"
        return "MP3 (MPEG audio frame)"
    return None


def _not_wav(path: Path, data: bytes, sample_rate: int) -> AudioError:
    fmt = _sniff(data[:64])
    if fmt is not None:
        return AudioError(f"{path}: is {fmt}, not a WAV file; {_ffmpeg_hint(path, sample_rate)}")
    return AudioError(f"{path}: not a WAV file (starts with bytes {data[:12].hex(' ')}, expected "
                      f"'RIFF....WAVE'); if it is audio, {_ffmpeg_hint(path, sample_rate)}")


def _format_name(tag: int) -> str:
    return f"format tag 0x{tag:04X} ({_FORMAT_NAMES.get(tag, 'unknown codec')})"


def _parse_fmt(path: Path, body: bytes, sample_rate: int) -> tuple[int, int, int, int, int]:
    """Decode a ``fmt `` chunk into (codec tag (PCM or float), channels, rate, block_align, bits)."""
    if len(body) < 16:
        raise AudioError(f"{path}: corrupt WAV header: 'fmt ' chunk is {len(body)} bytes, "
                         "needs at least 16")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", body, 0)
    if tag == _FMT_EXTENSIBLE:
        # WAVEFORMATEXTENSIBLE: cbSize(2) validBits(2) channelMask(4) subFormat GUID(16).
        if len(body) < 40:
            raise AudioError(f"{path}: corrupt WAV header: WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk is "
                             f"{len(body)} bytes, needs 40")
        guid = body[24:40]
        sub = struct.unpack_from("<H", guid, 0)[0]
        if guid[2:] != _KSDATAFORMAT_SUFFIX:
            raise AudioError(f"{path}: unsupported WAV codec: WAVE_FORMAT_EXTENSIBLE with sub-format "
                             f"GUID {guid.hex()} (only PCM and IEEE float are supported); "
                             f"{_ffmpeg_hint(path, sample_rate)}")
        if sub not in (_FMT_PCM, _FMT_FLOAT):
            raise AudioError(f"{path}: unsupported WAV codec: WAVE_FORMAT_EXTENSIBLE with sub-format "
                             f"{_format_name(sub)} (only PCM and IEEE float are supported); "
                             f"{_ffmpeg_hint(path, sample_rate)}")
        # wBitsPerSample is the container width; validBits may be smaller (e.g. 24 in 32), but the
        # samples are left-justified in the container, so reading the container is exact.
        tag = sub
    elif tag not in (_FMT_PCM, _FMT_FLOAT):
        raise AudioError(f"{path}: unsupported WAV codec: {_format_name(tag)}; only PCM "
                         f"(0x0001), IEEE float (0x0003) and WAVE_FORMAT_EXTENSIBLE (0xFFFE) are "
                         f"supported; {_ffmpeg_hint(path, sample_rate)}")
    if channels == 0:
        raise AudioError(f"{path}: corrupt WAV header: 0 channels")
    if rate == 0:
        raise AudioError(f"{path}: corrupt WAV header: sample rate 0 Hz")
    if tag == _FMT_FLOAT and bits not in (32, 64):
        raise AudioError(f"{path}: unsupported WAV sample format: {bits}-bit IEEE float "
                         "(only 32 and 64 are supported)")
    if tag == _FMT_PCM and not 1 <= bits <= 32:
        raise AudioError(f"{path}: unsupported WAV sample format: {bits}-bit PCM "
                         "(only 8, 16, 24 and 32 are supported)")
    width = (bits + 7) // 8  # container bytes; 12/20-bit PCM are left-justified in 16/24 bits
    if block_align != channels * width:
        raise AudioError(f"{path}: corrupt WAV header: block_align is {block_align}, expected "
                         f"{channels * width} for {channels} channel(s) of {bits}-bit samples")
    return tag, channels, rate, block_align, width * 8


def _decode(raw: bytes | memoryview, tag: int, channels: int, bits: int) -> np.ndarray:
    """Interleaved sample bytes -> float64 mono in [-1, 1] (channels averaged; floats unclipped)."""
    if tag == _FMT_FLOAT:
        x = np.frombuffer(raw, dtype="<f4" if bits == 32 else "<f8").astype(np.float64)
    elif bits == 8:
        # 8-bit WAV is the one unsigned width: silence is 128.
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif bits == 16:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
    elif bits == 24:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        # Put the 3 bytes in the top of an int32 and shift back arithmetically: sign-extends.
        wide = np.zeros((b.shape[0], 4), dtype=np.uint8)
        wide[:, 1:] = b
        x = (wide.view("<i4").ravel() >> 8).astype(np.float64) / 8388608.0
    else:  # 32
        x = np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return x


def _check_decode_cost(p: Path, frames: int, channels: int, rate: int, target: int) -> None:
    """Refuse, before decoding, a header whose sizes would need more memory than
    ``EDGESEQ_MAX_AUDIO_BYTES``: the float64 samples decoded, the resampled output, and the
    resampler's filter bank (a prime rate far above the target makes it huge)."""
    cap = limits.limit("audio_bytes")
    need = {"decoded samples": frames * channels * 8}
    if rate != target:
        g = math.gcd(rate, target)
        up, down = target // g, rate // g
        need["resampled samples"] = -(-frames * up // down) * 8
        k = int(np.ceil(_RS_ZEROS / (_RS_ROLLOFF * min(1.0, up / down)))) + 1
        need[f"resampling filter ({rate} -> {target} Hz)"] = up * 2 * k * 8
    what, nbytes = max(need.items(), key=lambda kv: kv[1])
    if nbytes > cap:
        raise AudioError(f"{p}: WAV header ({frames} frames x {channels} channel(s) at {rate} Hz) "
                         f"needs {nbytes} bytes for its {what} "
                         f"({limits.how_to_raise('audio_bytes')})")


def read_wav(path: PathLike, sample_rate: int = SAMPLE_RATE, resample: bool = True) -> np.ndarray:
    """Read a WAV file as float32 mono samples in [-1, 1] at ``sample_rate``.

    Supported: RIFF/WAVE (and RF64) with PCM 8-bit unsigned, 16/24/32-bit signed (and other
    widths up to 32 left-justified in whole bytes), IEEE float 32/64 (format tag 3), and
    WAVE_FORMAT_EXTENSIBLE (0xFFFE) with the PCM or float sub-format GUID. Chunks other than
    ``fmt `` and ``data`` (LIST, fact, cue, ...) are skipped, honouring the pad byte after
    odd-sized chunks. Several channels are averaged to mono. Float samples outside [-1, 1] are
    clipped, as is the (rare, tiny) overshoot of the resampler. A ``data`` chunk that declares more
    bytes than the file holds (a recording that was streamed and cut off before its header was
    patched) is read as far as it goes, dropping a trailing partial frame.

    Args:
        path: the .wav file.
        sample_rate: rate the caller needs (Hz); 16000 for Whisper.
        resample: if the file's rate differs, resample it with :func:`resample` (True) or raise
            (False).

    Returns:
        1-D float32 array of samples at ``sample_rate``.

    Raises:
        AudioError: the file is missing or unreadable; is not a WAV file (MP3, FLAC, Ogg, MP4/M4A,
            WebM/Matroska and a few others are named, with the ffmpeg command that converts them);
            its header is truncated or corrupt; its codec is not PCM/float (e.g. A-law, ADPCM: the
            format tag is named); its floats are not finite; it contains no samples; or its rate
            differs from ``sample_rate`` and ``resample`` is False.
    """
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise AudioError(f"{p}: no such audio file")
    if p.is_dir():
        raise AudioError(f"{p}: is a directory, not an audio file")
    try:
        # a regular file under the size cap: a FIFO or /dev/zero would never end
        data = limits.read_file_bytes(p, "audio", "wav_bytes")
    except limits.LimitError as e:
        raise AudioError(str(e)) from None
    n = len(data)
    if n == 0:
        raise AudioError(f"{p}: file is empty (0 bytes), not a WAV file")
    if data[:4] in (b"RIFF", b"RF64") and n < 12:
        raise AudioError(f"{p}: truncated WAV header: file is {n} bytes, a RIFF header needs 12")
    if data[:4] == b"RIFX":
        raise AudioError(f"{p}: big-endian WAV (RIFX) is not supported; "
                         f"{_ffmpeg_hint(p, sample_rate)}")
    if data[:4] not in (b"RIFF", b"RF64"):
        raise _not_wav(p, data, sample_rate)
    if data[8:12] != b"WAVE":
        if data[8:12] == b"AVI ":
            raise AudioError(f"{p}: is an AVI video (RIFF 'AVI '), not a WAV file; "
                             f"{_ffmpeg_hint(p, sample_rate)}")
        raise AudioError(f"{p}: RIFF file of type {data[8:12]!r}, not 'WAVE'; not a WAV file")

    fmt = None
    data_off = data_len = None
    rf64_data_size = None
    off = 12
    # Walk the chunks. fmt normally precedes data, but nothing requires it, so keep walking until
    # both are seen or the file ends.
    while off + 8 <= n and (fmt is None or data_off is None):
        cid = data[off:off + 4]
        size = struct.unpack_from("<I", data, off + 4)[0]
        body = off + 8
        if cid == b"fmt ":
            if body + size > n:
                raise AudioError(f"{p}: truncated WAV header: 'fmt ' chunk declares {size} bytes, "
                                 f"file has {n - body} left")
            fmt = _parse_fmt(p, data[body:body + size], sample_rate)
        elif cid == b"ds64" and data[:4] == b"RF64" and body + 28 <= n:
            # RF64: 64-bit sizes live here; the 32-bit data size is then 0xFFFFFFFF.
            rf64_data_size = struct.unpack_from("<Q", data, body + 8)[0]
        elif cid == b"data":
            if size == 0xFFFFFFFF and rf64_data_size is not None:
                size = rf64_data_size
            data_off, data_len = body, min(size, n - body)
            if body + size > n:
                break  # truncated data runs to the end of the file: nothing can follow it
        elif not all(32 <= c < 127 for c in cid):
            # Chunk ids are printable FourCCs; anything else means we lost the chunk framing.
            if fmt is None or data_off is None:
                raise AudioError(f"{p}: corrupt WAV header: bad chunk id {cid!r} at byte {off}")
            break
        # Chunks are word-aligned: an odd-sized chunk is followed by one pad byte.
        off = body + size + (size & 1)

    if fmt is None:
        raise AudioError(f"{p}: truncated or corrupt WAV header: no 'fmt ' chunk in {n} bytes")
    if data_off is None:
        raise AudioError(f"{p}: truncated or corrupt WAV: no 'data' chunk in {n} bytes")
    tag, channels, rate, block_align, bits = fmt
    frames = data_len // block_align
    if frames == 0:
        raise AudioError(f"{p}: WAV file contains no samples (data chunk of {data_len} bytes)")
    _check_decode_cost(p, frames, channels, rate, sample_rate if resample else rate)
    audio = _decode(memoryview(data)[data_off:data_off + frames * block_align], tag, channels, bits)
    if tag == _FMT_FLOAT:
        if not np.isfinite(audio).all():
            raise AudioError(f"{p}: float WAV contains non-finite samples (NaN or inf)")
    if rate != sample_rate:
        if not resample:
            raise AudioError(f"{p}: sample rate is {rate} Hz, expected {sample_rate} Hz; pass "
                             f"resample=True or {_ffmpeg_hint(p, sample_rate)}")
        audio = _resample64(audio, rate, sample_rate)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def write_wav(path: PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write mono audio as a 16-bit PCM WAV file (for tests, benchmarks and tools).

    Samples are clipped to [-1, 1] and scaled by 32768 (the inverse of :func:`read_wav`, so a
    round trip is exact for samples on the 16-bit grid; +1.0 becomes 32767).

    Args:
        path: the file to write (its folder must exist).
        audio: 1-D float samples in [-1, 1].
        sample_rate: rate to record in the header (Hz).

    Returns:
        The path written.

    Raises:
        ValueError: ``audio`` is not 1-D or has non-finite values, or ``sample_rate`` is not
            positive.
    """
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"write_wav writes mono audio: expected a 1-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("write_wav: audio contains NaN or inf")
    if int(sample_rate) <= 0:
        raise ValueError(f"write_wav: sample_rate must be positive, got {sample_rate}")
    pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2")
    p = Path(path)
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return p


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------

# Filter design, chosen by measurement (tests/unit/test_audio.py checks the claims in resample's
# docstring): 64 zero crossings each side of a Kaiser(beta=8.6) windowed sinc whose cutoff sits at
# 0.945 of the lower Nyquist. The Kaiser transition band (about +-4% of the cutoff, 0.90 -> 0.985)
# then ends just below the lower Nyquist, so nothing folds back above the -87 dB stopband floor,
# while the passband stays flat to 0.9 (7.2 kHz of Whisper's 8 kHz mel range).
_RS_ZEROS = 64
_RS_BETA = 8.6
_RS_ROLLOFF = 0.945


@functools.lru_cache(maxsize=16)
def _polyphase_taps(up: int, down: int) -> tuple[np.ndarray, int]:
    """Taps for each of the ``up`` output phases of an ``up/down`` resampler.

    Returns (taps of shape (up, 2K), K): output sample n sits at input time t = n*down/up; with
    base = floor(t) and phase = (n*down) % up, it is sum_j x[base + j] * taps[phase, j + K - 1]
    for j in [-K+1, K].
    """
    cutoff = _RS_ROLLOFF * min(1.0, up / down)  # in units of the input Nyquist
    half = _RS_ZEROS / cutoff                     # filter half-width in input samples
    k = int(np.ceil(half)) + 1
    frac = np.arange(up) / up                     # phase p: t - floor(t) = p / up
    j = np.arange(-k + 1, k + 1)
    d = frac[:, None] - j[None, :]                # distance from each input sample to t
    u = np.clip(d / half, -1.0, 1.0)
    win = np.i0(_RS_BETA * np.sqrt(1.0 - u * u)) / np.i0(_RS_BETA)
    win[np.abs(d) > half] = 0.0
    taps = cutoff * np.sinc(cutoff * d) * win
    taps.flags.writeable = False
    return taps, k


def _resample64(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """float64 polyphase resampling (see :func:`resample`)."""
    g = np.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    n_in = x.shape[0]
    n_out = -(-n_in * up // down)  # ceil: the last output lies before the last input's end
    if n_in == 0:
        return np.zeros(0, dtype=np.float64)
    taps, k = _polyphase_taps(up, down)
    width = 2 * k
    xp = np.concatenate([np.zeros(k), x, np.zeros(k + down + 1)])
    windows = sliding_window_view(xp, width)  # windows[s] = xp[s : s + 2k]
    y = np.empty(n_out, dtype=np.float64)
    # Outputs n = q*up + r share the phase (r*down) % up and start at input q*down + (r*down)//up,
    # so each residue r is one strided matrix-vector product.
    for r in range(min(up, n_out)):
        q = (n_out - 1 - r) // up + 1
        start = (r * down) // up + 1  # xp index of x[base - k + 1] is base - k + 1 + k
        y[r::up] = windows[start:start + (q - 1) * down + 1:down] @ taps[(r * down) % up]
    return y


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample mono audio from ``orig_sr`` to ``target_sr`` with a band-limited filter.

    A polyphase Kaiser-windowed-sinc resampler at the exact rational ratio (``target/orig`` reduced
    by their gcd, so e.g. 44100 -> 16000 is 160/441 with 160 filter phases): 64 zero crossings each
    side, Kaiser beta 8.6, cutoff (-6 dB) at 0.945 of the lower of the two Nyquist frequencies.
    Measured on the filter prototype, in units of the lower Nyquist (x 8 kHz when the target is
    16 kHz): passband ripple under 0.001 dB up to 0.90 (7.2 kHz), -0.1 dB at 0.916, -3 dB at
    0.937 (7.5 kHz), -80 dB at 0.985; stopband attenuation at least 87 dB from 0.99 (7.92 kHz) on,
    so aliases (downsampling) and images (upsampling) stay below -87 dB. Output sample n lies at
    input time ``n * orig_sr / target_sr`` (no delay) and
    there are ``ceil(len(audio) * target_sr / orig_sr)`` of them; the signal is taken as zero
    outside the input. Cost: about ``2 * 64 / min(1, target/orig)`` multiply-adds per output
    sample (~370 for 44.1 -> 16 kHz: 30 s of audio takes about 0.1 s on one core).

    Args:
        audio: 1-D samples.
        orig_sr: their rate (Hz).
        target_sr: the rate wanted (Hz).

    Returns:
        1-D float32 samples at ``target_sr`` (not clipped: band-limiting can overshoot a full-scale
        square wave by a few percent); a float32 copy when the rates are equal.

    Raises:
        ValueError: ``audio`` is not 1-D, or a rate is not a positive integer.
    """
    x = np.asarray(audio)
    if x.ndim != 1:
        raise ValueError(f"resample expects 1-D mono audio, got shape {x.shape}")
    for name, sr in (("orig_sr", orig_sr), ("target_sr", target_sr)):
        if int(sr) != sr or sr <= 0:
            raise ValueError(f"resample: {name} must be a positive integer, got {sr!r}")
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr == target_sr:
        return x.astype(np.float32, copy=True)
    return _resample64(x.astype(np.float64), orig_sr, target_sr).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Log-mel features
# --------------------------------------------------------------------------------------------

def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    lin = 3.0 * f / 200.0
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lin = 200.0 * m / 3.0
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
    return np.where(m >= 15.0, log, lin)


@functools.lru_cache(maxsize=16)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                fmin: float = 0.0, fmax: float = _WHISPER_FMAX) -> np.ndarray:
    """Slaney-style mel filter bank, as librosa and Whisper use it.

    Equal to ``transformers.audio_utils.mel_filter_bank(n_fft // 2 + 1, n_mels, fmin, fmax,
    sample_rate, norm="slaney", mel_scale="slaney")`` and ``librosa.filters.mel(sr=sample_rate,
    n_fft=n_fft, n_mels=n_mels, fmax=fmax)`` transposed: ``n_mels`` triangles whose corners are
    equally spaced on the Slaney mel scale from ``fmin`` to ``fmax``, each scaled by
    ``2 / (upper corner - lower corner)`` (in Hz) so that every band has about the same energy.
    Cached: the returned array is shared and read-only.

    Args:
        n_mels: number of mel bands (80 for Whisper, 128 for large-v3).
        n_fft: FFT size; the bank covers its ``n_fft // 2 + 1`` one-sided bins.
        sample_rate: audio rate (Hz).
        fmin: lowest band edge (Hz).
        fmax: highest band edge (Hz); at most ``sample_rate / 2``.

    Returns:
        float64 array of shape ``(n_fft // 2 + 1, n_mels)``: ``power_spectrum @ filters`` (with
        the spectrum as (frames, bins)) gives the mel spectrum.

    Raises:
        ValueError: non-positive sizes, or ``not 0 <= fmin < fmax <= sample_rate / 2``.
    """
    if n_mels <= 0 or n_fft <= 1 or sample_rate <= 0:
        raise ValueError(f"mel_filters: need n_mels > 0, n_fft > 1, sample_rate > 0; got "
                         f"{n_mels}, {n_fft}, {sample_rate}")
    if not 0.0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"mel_filters: need 0 <= fmin < fmax <= sample_rate/2 = "
                         f"{sample_rate / 2}; got fmin={fmin}, fmax={fmax}")
    n_freq = n_fft // 2 + 1
    fft_hz = np.linspace(0.0, sample_rate / 2, n_freq)
    corners = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = corners[:-2], corners[1:-1], corners[2:]
    rising = (fft_hz[:, None] - lo) / (mid - lo)
    falling = (hi - fft_hz[:, None]) / (hi - mid)
    bank = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (hi - lo))
    bank.flags.writeable = False
    return bank


@functools.lru_cache(maxsize=8)
def _hann(n: int) -> np.ndarray:
    # Periodic Hann (torch.hann_window's default): the window of an n-point DFT frame, not the
    # symmetric one np.hanning gives.
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    w.flags.writeable = False
    return w


# Frames per STFT block: bounds memory for long audio (2048 x 400 float64 = 6.5 MB per buffer).
_STFT_BLOCK = 2048


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, n_fft: int = N_FFT,
                        hop_length: int = HOP_LENGTH, sample_rate: int = SAMPLE_RATE,
                        n_frames: int | None = None) -> np.ndarray:
    """Whisper's log-mel features, numerically matching ``transformers.WhisperFeatureExtractor``.

    Steps (as the extractor): cast to float32; pad with zeros or trim to ``n_frames * hop_length``
    samples if ``n_frames`` is given; centred STFT (reflect-pad ``n_fft // 2`` each side, periodic
    Hann window, one frame every ``hop_length``); power spectrum; Slaney mel bank
    (:func:`mel_filters`, 0 Hz to ``min(8000, sample_rate / 2)``); ``log10(max(mel, 1e-10))``;
    drop the last frame; clamp from below at ``max - 8`` (80 dB of dynamic range, the max taken over
    the whole output); ``(x + 4) / 4``. The maths is done in float64: the result equals the
    extractor's numpy path to float32 rounding (~1e-7) and its torch path (the one it takes when
    torch is installed, float32 throughout) to within ~6e-5, the torch path's own float32 FFT
    rounding in bands 70-80 dB below the loudest one.

    Frame count: the centred STFT of ``L`` samples has ``1 + (L + 2*(n_fft//2) - n_fft) //
    hop_length`` frames; dropping the last leaves ``L // hop_length`` for even ``n_fft``. So
    ``n_frames=None`` gives ``len(audio) // hop_length`` frames (a trailing partial hop is not
    a frame), and ``n_frames=3000`` gives the extractor's 30 s window (480000 samples).

    Args:
        audio: 1-D samples at ``sample_rate``, nominally in [-1, 1].
        n_mels: mel bands (80; 128 for Whisper large-v3).
        n_fft: STFT frame and FFT size.
        hop_length: STFT hop in samples.
        sample_rate: rate of ``audio`` (Hz).
        n_frames: pad/trim to exactly this many frames (3000 = :data:`N_FRAMES` for Whisper), or
            None to keep the audio's length.

    Returns:
        float32 array of shape ``(n_mels, frames)``. All zeros (silence) gives a constant
        ``(log10(1e-10) + 4) / 4 = -1.5``, never NaN or inf.

    Raises:
        ValueError: ``audio`` is not 1-D or has NaN/inf; ``n_frames`` is not positive; the audio
            is shorter than one hop when ``n_frames`` is None (no frames).
    """
    x = np.asarray(audio)
    if x.ndim != 1:
        raise ValueError(f"log_mel_spectrogram expects 1-D mono audio, got shape {x.shape}")
    # The extractor works on float32 input; casting first keeps float64 callers bit-compatible.
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError("log_mel_spectrogram: audio contains NaN or inf")
    if n_frames is not None:
        if n_frames <= 0:
            raise ValueError(f"log_mel_spectrogram: n_frames must be positive, got {n_frames}")
        n = n_frames * hop_length
        x = x[:n] if x.shape[0] >= n else np.concatenate([x, np.zeros(n - x.shape[0], np.float32)])
    pad = n_fft // 2
    total = 1 + (x.shape[0] + 2 * pad - n_fft) // hop_length if x.shape[0] + 2 * pad >= n_fft else 0
    frames = total - 1  # the extractor drops the last STFT frame
    if frames <= 0:
        raise ValueError(f"log_mel_spectrogram: {x.shape[0]} samples are shorter than one hop "
                         f"({hop_length}); pass n_frames to pad")
    # np.pad's reflect mode is torch's (the edge sample is not repeated).
    xp = np.pad(x.astype(np.float64), pad, mode="reflect")
    window = _hann(n_fft)
    bank = mel_filters(n_mels, n_fft, sample_rate, 0.0, min(_WHISPER_FMAX, sample_rate / 2))
    framed = sliding_window_view(xp, n_fft)[::hop_length]
    mel = np.empty((frames, n_mels), dtype=np.float64)
    for s in range(0, frames, _STFT_BLOCK):
        e = min(frames, s + _STFT_BLOCK)
        spec = np.fft.rfft(framed[s:e] * window, n=n_fft, axis=-1)
        power = spec.real * spec.real + spec.imag * spec.imag
        np.matmul(power, bank, out=mel[s:e])
    log = np.log10(np.maximum(mel, _LOG_FLOOR))
    log = np.maximum(log, log.max() - 8.0)
    return np.ascontiguousarray(((log + 4.0) / 4.0).T, dtype=np.float32)
