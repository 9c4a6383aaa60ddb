"""Limits on what untrusted inputs may cost, and readers that check them before allocating.

Bundles, checkpoints, prompts, audio and ``.npy`` files come from users: a header or config that
claims a huge size must be refused before anything that size is allocated, and a non-finite
number must stop a run rather than turn into token 0 or a NaN probability. Every limit's default
lives here, once; each can be raised with its environment variable, which the error names.
"""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any, Mapping

import numpy as np


class LimitError(ValueError):
    """An input exceeds a limit or is not the kind of thing it should be; one line naming the
    file (or option) and the limit."""


class NumericError(RuntimeError):
    """A graph produced NaN or inf: the run stops instead of emitting a meaningless token."""


#: name -> (environment variable, default, what it bounds)
LIMITS: dict[str, tuple[str, int, str]] = {
    # a 1 MB prompt is an unusual but legitimate input; 64 MiB of text is not a prompt
    "input_bytes": ("EDGESEQ_MAX_INPUT_BYTES", 64 << 20, "bytes of a text input file"),
    "npy_bytes": ("EDGESEQ_MAX_NPY_BYTES", 256 << 20, "bytes of a .npy array"),
    # tokenizer files are parsed whole by the tokenizers/sentencepiece libraries (a JSON file
    # costs several times its size in memory); the largest published ones are ~35 MB (Gemma)
    "tokenizer_bytes": ("EDGESEQ_MAX_TOKENIZER_BYTES", 64 << 20, "bytes of a tokenizer file"),
    # one hour of 48 kHz stereo 16-bit PCM is 0.7 GB
    "wav_bytes": ("EDGESEQ_MAX_WAV_BYTES", 1 << 30, "bytes of a WAV file"),
    # float64 samples decoded or resampled from a WAV (and the resampler's filter): one hour of
    # 48 kHz stereo decodes to 1.4 GB; a header claiming a 1 Hz rate would upsample to terabytes
    "audio_bytes": ("EDGESEQ_MAX_AUDIO_BYTES", 2 << 30, "bytes of decoded audio"),
    # checkpoint sizes at convert time; the largest published models the families support
    # (whisper-large: 32 layers, d_model 1280, vocab 51866; t5-11b: d_ff 65536) pass with room
    "layers": ("EDGESEQ_MAX_LAYERS", 1024, "layers in a checkpoint config"),
    "hidden": ("EDGESEQ_MAX_HIDDEN", 1 << 16, "width (hidden/intermediate size) in a config"),
    "vocab": ("EDGESEQ_MAX_VOCAB", 1 << 22, "vocabulary size in a config"),
    "positions": ("EDGESEQ_MAX_POSITIONS", 1 << 20, "positions in a config"),
    "heads": ("EDGESEQ_MAX_HEADS", 1024, "attention heads in a config"),
}


#: longest source an encoder without a position table of its own (T5's relative positions) is
#: exported for: ExecuTorch plans its memory for it, and the runtime refuses longer sources
#: (encoder attention is quadratic in the source: 10 KB of bytes to the zoo T5 took 9.5 GB)
DEFAULT_MAX_SOURCE = 512


def max_source(config: Mapping[str, Any]) -> int:
    """The most source tokens an encoder-decoder bundle takes: its position table
    (``max_source_positions``), else the length it was exported for."""
    table = config.get("max_source_positions")
    return int(table) if isinstance(table, int) and table > 0 else DEFAULT_MAX_SOURCE


def check_source(n: int, config: Mapping[str, Any], what: str = "source") -> None:
    """Refuse a source of ``n`` tokens longer than the encoder takes (refused, not run: encoder
    attention is quadratic in the source). ``what`` names the input (an option, a file)."""
    cap = max_source(config)
    if n > cap:
        raise LimitError(f"{what}: {n} tokens, over this encoder's limit of {cap} (its "
                         f"position table, or the length it was exported for); shorten the "
                         f"text or split it")


def limit(name: str) -> int:
    """The current value of limit ``name``: its environment variable, else its default."""
    env, default, _ = LIMITS[name]
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip(), 0)
    except ValueError:
        raise LimitError(f"{env}: expected a positive integer, got {raw!r}") from None
    if value <= 0:
        raise LimitError(f"{env}: expected a positive integer, got {raw!r}")
    return value


def how_to_raise(name: str) -> str:
    """``limit N; raise it with ENV=...``: the tail every limit error ends with."""
    env, _, _ = LIMITS[name]
    return f"limit {limit(name)}; raise it with {env}=..."


def _regular_file(path: Path, what: str) -> os.stat_result:
    """``stat`` of a regular file, refusing anything else without opening it (a FIFO blocks on
    open, a device such as /dev/zero never ends)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LimitError(f"{path}: no such {what} file") from None
    except OSError as e:
        raise LimitError(f"{path}: cannot read {what} file: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise LimitError(f"{path}: is a directory; expected a {what} file")
    if not stat.S_ISREG(st.st_mode):
        raise LimitError(f"{path}: not a regular file (a device, FIFO or socket); "
                         f"expected a {what} file")
    return st


def _open_regular(path: Path, what: str) -> int:
    """A descriptor on ``path``, opened without blocking and checked again after opening: the
    path may have been swapped for a FIFO between ``stat`` and ``open``."""
    _regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise LimitError(f"{path}: cannot read {what} file: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LimitError(f"{path}: not a regular file (a device, FIFO or socket); "
                         f"expected a {what} file")
    return fd


def check_file(path: str | Path, what: str, limit_name: str) -> int:
    """The size of ``path``, a regular file of at most ``limit(limit_name)`` bytes, for files
    another library opens itself (checked before it does)."""
    p = Path(path)
    size = _regular_file(p, what).st_size
    if size > limit(limit_name):
        raise LimitError(f"{p}: {what} file is {size} bytes ({how_to_raise(limit_name)})")
    return size


def _open_within(p: Path, what: str, limit_name: str) -> tuple[Any, int]:
    """An open binary file on the regular file ``p`` and its size, at most
    ``limit(limit_name)`` bytes (checked before anything is read)."""
    f = os.fdopen(_open_regular(p, what), "rb")
    size = os.fstat(f.fileno()).st_size
    if size > limit(limit_name):
        f.close()
        raise LimitError(f"{p}: {what} file is {size} bytes ({how_to_raise(limit_name)})")
    return f, size


def read_file_bytes(path: str | Path, what: str, limit_name: str) -> bytes:
    """The bytes of a regular file of at most ``limit(limit_name)`` bytes (checked before
    reading)."""
    p = Path(path)
    cap = limit(limit_name)
    f, _ = _open_within(p, what, limit_name)
    with f:
        # one byte past the cap: a file that grew after fstat is still bounded
        data = f.read(cap + 1)
    if len(data) > cap:
        raise LimitError(f"{p}: {what} file is over {cap} bytes ({how_to_raise(limit_name)})")
    return data


def read_text_file(path: str | Path, what: str = "text") -> str:
    """A UTF-8 text file (``--prompt-file``, ``--text-file``), at most ``EDGESEQ_MAX_INPUT_BYTES``.

    Decoded straight from a read-only mapping: reading the bytes first and freeing them after
    decoding raises glibc's mmap threshold to the file's size, after which the runtime's
    mid-sized buffers land on the heap and stay resident (a 1 MB prompt's peak grew 5 MB, not
    the 2 MB its text and ids take)."""
    import codecs
    import mmap

    p = Path(path)
    f, size = _open_within(p, what, "input_bytes")
    with f:
        if size == 0:
            return ""
        try:
            # the mapping is st_size long: a file that grows after fstat is read only that far
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise LimitError(f"{p}: cannot read {what} file: {e}") from None
    try:
        return codecs.utf_8_decode(mm, "strict", True)[0]
    except UnicodeDecodeError as e:
        raise LimitError(f"{p}: {what} file is not UTF-8 text (byte {e.start}: "
                         f"{mm[e.start:e.start + 1]!r})") from None
    finally:
        mm.close()


def read_npy(path: str | Path) -> np.ndarray:
    """A numeric ``.npy`` array, its header checked before the data is allocated: no pickles or
    object arrays, no shape claiming more bytes than the file holds or than
    ``EDGESEQ_MAX_NPY_BYTES``."""
    from numpy.lib import format as npformat

    p = Path(path)
    cap = limit("npy_bytes")
    fd = _open_regular(p, "input")
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            version = npformat.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npformat.read_array_header_1_0(f, max_header_size=10000)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = npformat.read_array_header_2_0(f, max_header_size=10000)
            else:
                raise LimitError(f"{p}: unsupported .npy format version {version}")
        except LimitError:
            raise
        except (ValueError, OSError, SyntaxError, TypeError, EOFError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LimitError(f"{p}: not a valid .npy file ({msg})") from None
        if dtype.hasobject:
            raise LimitError(f"{p}: .npy holds Python objects (a pickle); refused, "
                             f"only numeric arrays are read")
        if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
            raise LimitError(f"{p}: .npy dtype {dtype} is not numeric (need int, uint, bool or "
                             f"float)")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise LimitError(f"{p}: .npy header has an invalid shape {shape}")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if nbytes > cap:
            raise LimitError(f"{p}: .npy header claims shape {shape} of {dtype}, {nbytes} bytes "
                             f"({how_to_raise('npy_bytes')})")
        have = size - f.tell()
        if nbytes > have:
            raise LimitError(f"{p}: truncated .npy: header claims {nbytes} bytes of data, the file "
                             f"holds {have}")
        data = bytearray(nbytes)
        got = f.readinto(data)
    if got != nbytes:
        raise LimitError(f"{p}: truncated .npy: read {got} of {nbytes} bytes")
    a = np.frombuffer(data, dtype=dtype, count=count)
    return a.reshape(shape, order="F" if fortran else "C")


def check_finite(name: str, value: float) -> float:
    """``value`` as a float, refusing NaN and inf (sampling settings: a NaN temperature would
    make every probability NaN and silently pick token 0)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LimitError(f"{name}: must be a finite number, got {value!r}") from None
    if not math.isfinite(v):
        raise LimitError(f"{name}: must be a finite number, got {v}")
    return v


def check_finite_array(a: np.ndarray, where: str) -> np.ndarray:
    """``a`` unchanged if every value is finite, else :class:`NumericError` naming ``where``
    (which graph output, which step)."""
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        bad = "NaN" if np.isnan(a).any() else "inf"
        raise NumericError(f"{where}: produced {bad}; the model's weights or inputs are not "
                           f"finite (run stopped)")
    return a


#: config keys checked at convert time, per limit: the names the families' configs use
#: (transformers', mamba_ssm's, edgeseq's LMUFormer and S4D)
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers",
               "encoder_layers", "decoder_layers", "depths", "n_conv_layers"),
    "hidden": ("hidden_size", "d_model", "d_ff", "d_kv", "intermediate_size", "encoder_ffn_dim",
               "decoder_ffn_dim", "state_size", "d_state", "d_inner", "expand", "conv_kernel",
               "d_conv", "head_dim", "num_mel_bins", "n_embd", "in_channels", "embed_dims",
               "memory_size", "num_classes", "time_step_rank", "dt_rank"),
    "vocab": ("vocab_size",),
    "positions": ("max_position_embeddings", "max_source_positions", "max_target_positions",
                  "relative_attention_num_buckets", "relative_attention_max_distance",
                  "n_positions", "seq_len", "input_frames"),
    "heads": ("num_heads", "num_attention_heads", "encoder_attention_heads",
              "decoder_attention_heads", "n_head", "n_groups", "num_key_value_heads"),
}
#: size keys that published configs write as ratios, not counts
FRACTIONAL_KEYS = frozenset({"expand"})
#: size keys that may also say "auto" (Mamba's dt rank: ceil(d_model / 16))
AUTO_KEYS = frozenset({"time_step_rank", "dt_rank"})


def check_config(cfg: Any, where: str) -> dict[str, Any]:
    """A checkpoint config (parsed ``config.json``) whose size fields are integers within the
    limits, so a config with 10^6 layers is refused before anything is built. ``where`` names
    the file. Raises :class:`LimitError` naming the key."""
    if not isinstance(cfg, Mapping):
        raise LimitError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    _check_sizes(cfg, where, "")
    # mamba_ssm configs nest the SSM's sizes
    for sub in ("ssm_cfg", "text_config", "encoder", "decoder"):
        if isinstance(cfg.get(sub), Mapping):
            _check_sizes(cfg[sub], where, f"{sub}.")
    return dict(cfg)


def _check_sizes(cfg: Mapping[str, Any], where: str, prefix: str) -> None:
    for name, keys in CONFIG_KEYS.items():
        cap = limit(name)
        for key in keys:
            if key not in cfg or cfg[key] is None:
                continue
            v = cfg[key]
            if key in AUTO_KEYS and v == "auto":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                what = 'a number or "auto"' if key in AUTO_KEYS else "a number"
                raise LimitError(f"{where}: {prefix}{key} must be {what}, got {v!r}")
            if not math.isfinite(v) or v < 0:
                raise LimitError(f"{where}: {prefix}{key} must be a finite number >= 0, "
                                 f"got {v!r}")
            if key not in FRACTIONAL_KEYS and v != int(v):
                raise LimitError(f"{where}: {prefix}{key} must be a whole number, got {v!r}")
            if v > cap:
                raise LimitError(f"{where}: {prefix}{key} is {v}, over the {LIMITS[name][2]} "
                                 f"({how_to_raise(name)})")
