"""Safe checkpoint reading shared by every family: the weight layouts published checkpoints use.

- a folder with ``config.json`` and one weights file (``model.safetensors``, ``pytorch_model.bin``,
  ``model.bin``, ``model.pt``, or a single ``*.pth`` / ``*.pt``);
- a sharded folder: ``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``, whose
  ``weight_map`` names the shard of every tensor (checked against the shards: nothing missing,
  nothing extra, nothing outside the folder);
- a single weights file given as the path itself (``best_model.pth``): its config is the
  ``config.json`` beside it, if any, and the family infers the rest (``Family.load``).

``.bin`` / ``.pt`` / ``.pth`` files go through PyTorch's weights-only unpickler: a pickle that would
import or call anything is refused, never executed. A training script's wrapper dict
(``{"state_dict": ..., "epoch": ...}``) is unwrapped. fp16 and bf16 weights are upcast to float32
on load (exactly); ``stored_dtype`` says what the checkpoint held, for the manifest.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from edgeseq import limits
from edgeseq.errors import BundleError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.bin", "model.pt")
#: sharded layouts: index file -> the glob its shards follow (transformers' ``save_pretrained``)
INDEX_FILES = {"model.safetensors.index.json": "model-*-of-*.safetensors",
               "pytorch_model.bin.index.json": "pytorch_model-*-of-*.bin"}
#: what a single weights file given as the checkpoint path may be
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
#: where training scripts put the weights inside a saved dict, in the order they are looked for
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
#: floating dtypes that are upcast to float32 on load
_UPCAST = ("float16", "bfloat16")


def checkpoint_folder(path: Path) -> Path:
    """The folder holding a checkpoint's side files (config, generation config, tokenizer)."""
    path = Path(path)
    return path.parent if path.is_file() else path


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder; for a single weights file, the ``config.json``
    beside it, or ``{}`` when there is none. A config without ``model_type`` is offered to the
    families' ``config_from_weights`` (a family that recognises the weights claims it)."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise BundleError(f"{path}: expected a checkpoint folder (config.json + weights) or "
                              f"a weights file ({', '.join(FILE_SUFFIXES)})")
        cfg = path.parent / "config.json"
        raw = read_json(cfg) if cfg.is_file() else {}
    else:
        cfg = path / "config.json"
        # a config.json that is a FIFO or a device gets the reader's own refusal
        if not cfg.exists() and not cfg.is_symlink():
            raise BundleError(f"{path}: no config.json, so the architecture is unknown")
        raw = read_json(cfg)
    _check_config(raw, cfg)
    if "model_type" not in raw:
        from edgeseq.registry import families

        # a family that recognises the config itself (a mamba_ssm config) claims it before
        # any family reads the weights to recognise them (a 130M-parameter read per call)
        if raw and any(cls().can_load(raw) for cls in families().values()):
            return raw
        for fam in families().values():
            claim = getattr(fam, "config_from_weights", None)
            got = claim(path, raw) if claim else None
            if got is not None:
                _check_config(got, path)
                return got
        if path.is_file() and not raw:
            raise BundleError(f"{path}: weights of an unknown architecture and no config.json "
                              f"beside them")
    return raw


def _check_config(raw: Any, where: Path) -> None:
    """Sizes within the limits before any family builds a model from them: a config claiming
    10^6 layers would otherwise build them, with memory growing all the while."""
    try:
        limits.check_config(raw, str(where))
    except limits.LimitError as e:
        raise BundleError(str(e)) from None


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file (config, weights index), size-capped, one-line errors."""
    try:
        # a config or index is small: the reader refuses devices, FIFOs and oversized files
        return json.loads(limits.read_text_file(path, "JSON"))
    except limits.LimitError as e:
        raise BundleError(str(e)) from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise BundleError(f"{path}: not valid JSON (nested too deeply)") from None


def source_files(path: Path) -> list[Path]:
    """The files that make up a checkpoint (config, index, weights): what its hash covers."""
    path = Path(path)
    folder = checkpoint_folder(path)
    side = [folder / n for n in ("config.json", *INDEX_FILES) if (folder / n).is_file()]
    if path.is_file():
        side = [f for f in side if f.name == "config.json"]
    return side + weight_files(path)


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder (every shard of a sharded one), or the file."""
    path = Path(path)
    if path.is_file():
        return [path]
    for index in INDEX_FILES:
        if (path / index).is_file():
            return sorted(set(_weight_map(path / index).values()))
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    if shards:
        raise BundleError(f"{path}: sharded weights ({shards[0].name}, ...) without "
                          f"model.safetensors.index.json, so which tensor is where is unknown")
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    pth = sorted([*path.glob("*.pth"), *path.glob("*.pt")])
    if len(pth) == 1:
        return pth
    if pth:
        raise BundleError(f"{path}: several weight files ({', '.join(p.name for p in pth)}); "
                          f"give the one to convert as the path")
    raise BundleError(f"{path}: no weights found (looked for {', '.join(WEIGHT_FILES)}, "
                      f"a sharded index, *.pth, *.pt)")


def _weight_map(index: Path) -> dict[str, Path]:
    """tensor name -> shard file, checked: every shard named exists inside the folder, and every
    shard file of the folder's pattern is named."""
    data = read_json(index)
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise BundleError(f"{index}: no weight_map (a mapping of tensor names to shard files)")
    folder = index.parent
    out: dict[str, Path] = {}
    for name, shard in wm.items():
        p = Path(shard)
        if p.is_absolute() or len(p.parts) != 1 or shard in (".", ".."):
            raise BundleError(f"{index}: shard {shard!r} (of {name}) is outside the checkpoint "
                              f"folder; refused")
        out[name] = folder / shard
    for shard in sorted(set(out.values())):
        if not shard.is_file():
            raise BundleError(f"{shard}: missing shard (named by {index.name})")
    extra = sorted(set(folder.glob(INDEX_FILES[index.name])) - set(out.values()))
    if extra:
        raise BundleError(f"{extra[0]}: a shard that {index.name} does not name (a stale or "
                          f"foreign file); remove it or fix the index")
    return out


def load_state_dict(path: Path) -> dict[str, Any]:
    """Read every tensor of a checkpoint (folder or file), refusing anything that is not plain
    weights; fp16/bf16 tensors come back as float32."""
    path = Path(path)
    index = next((path / i for i in INDEX_FILES if path.is_dir() and (path / i).is_file()), None)
    out: dict[str, Any] = {}
    if index is not None:
        wm = _weight_map(index)
        for shard in sorted(set(wm.values())):
            sd = _read_file(shard)
            want = {k for k, v in wm.items() if v == shard}
            absent = sorted(want - set(sd))
            if absent:
                raise BundleError(f"{shard}: lacks {len(absent)} tensor(s) that {index.name} "
                                  f"places there (e.g. {absent[0]})")
            unlisted = sorted(set(sd) - want)
            if unlisted:
                raise BundleError(f"{shard}: holds {len(unlisted)} tensor(s) that {index.name} "
                                  f"does not place there (e.g. {unlisted[0]})")
            out.update(sd)
    else:
        for f in weight_files(path):
            out.update(_read_file(f))
    out = {k: _upcast(v) for k, v in out.items()}
    _check_finite_weights(out, path)
    return out


def _check_finite_weights(sd: dict[str, Any], path: Path) -> None:
    """Refuse NaN/inf weights at convert time: they would convert and pass parity (NaN against
    NaN) and then emit token 0 for every prompt."""
    import torch

    for name, t in sd.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(
                torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise BundleError(f"{path}: tensor {name} holds {bad} values; refused (a model with "
                              f"non-finite weights produces meaningless tokens)")


def _upcast(t: Any) -> Any:
    import torch

    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _read_file(path: Path) -> dict[str, Any]:
    return _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)


def _read_pickle(path: Path, mmap: bool = False) -> dict[str, Any]:
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - the unpickler raises many kinds
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise BundleError(f"{path}: refused: this pickle would import or run code "
                              f"when loaded ({msg[:160]}); convert it to safetensors") from None
        raise BundleError(f"{path}: cannot read weights ({msg[:200]})") from None
    return unwrap_state_dict(sd, path)


def unwrap_state_dict(sd: Any, path: Path) -> dict[str, Any]:
    """The name -> tensor mapping inside what a training script saved (a bare state dict, or a
    dict holding one under ``WRAPPER_KEYS`` beside epoch counters and the like)."""
    import torch

    def is_weights(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if is_weights(sd):
        return sd
    if isinstance(sd, dict):
        for key in WRAPPER_KEYS:
            if is_weights(sd.get(key)):
                return sd[key]
        if "param_groups" in sd and "state" in sd:
            raise BundleError(f"{path}: an optimizer state (param_groups, state), not model "
                              f"weights; give the model's file (best_model.pth, not "
                              f"best_optim_state.pth)")
        keys = ", ".join(sorted(map(str, sd))[:6])
        raise BundleError(f"{path}: no state dict found: expected a mapping of names to tensors, "
                          f"or one under {'/'.join(WRAPPER_KEYS)} (keys here: {keys})")
    raise BundleError(f"{path}: expected a mapping of names to tensors, found a "
                      f"{type(sd).__name__}")


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        size = path.stat().st_size
        raise BundleError(f"{path}: corrupt or truncated safetensors file ({size} bytes; "
                          f"{str(e).splitlines()[0][:160]})") from None


#: safetensors header dtype codes -> torch names
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def stored_dtype(path: Path) -> str:
    """The floating dtype most of the checkpoint's weights are stored in (by element count):
    ``float32``, ``float16``, ``bfloat16``; what the manifest records (the graphs hold float32)."""
    import math

    counts: dict[str, int] = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            for name, t in _safetensors_header(f).items():
                if name != "__metadata__" and t.get("dtype") in _ST_DTYPES:
                    n = math.prod(t.get("shape", []))
                    counts[_ST_DTYPES[t["dtype"]]] = counts.get(_ST_DTYPES[t["dtype"]], 0) + n
        else:
            # mapped, not read: only dtypes and sizes are looked at (PyTorch's zip format; the
            # legacy format cannot be mapped and is read)
            try:
                tensors = _read_pickle(f, mmap=True)
            except BundleError:
                tensors = _read_pickle(f)
            for t in tensors.values():
                if t.is_floating_point():
                    name = str(t.dtype).removeprefix("torch.")
                    counts[name] = counts.get(name, 0) + t.numel()
    return max(counts, key=counts.get) if counts else "float32"


def _safetensors_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 << 20:
                raise ValueError("header too large")
            return json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def load_into(module: Any, state_dict: dict[str, Any], path: Path,
              ignore: tuple[str, ...] = ()) -> None:
    """Load with strict names, reporting every mismatch at once and naming the checkpoint."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith(ignore or ("\0",))]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:3])}")
    if problems:
        raise BundleError(f"{path}: weights do not match config.json: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=False)
