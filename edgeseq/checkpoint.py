"""Safe checkpoint reading shared by every family.

Weights come from safetensors, or from ``.bin``/``.pt`` files through PyTorch's weights-only
unpickler: a pickle that would import or call anything is refused, never executed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeseq.bundle import BundleError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.bin", "model.pt")


def read_config(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.exists():
        raise BundleError(f"{folder}: no such file or folder")
    if not folder.is_dir():
        raise BundleError(f"{folder}: expected a checkpoint folder (config.json + weights)")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise BundleError(f"{folder}: no config.json, so the architecture is unknown")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{cfg}: not valid JSON ({e})") from None


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder (sharded safetensors included)."""
    folder = Path(folder)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise BundleError(f"{folder}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def load_state_dict(folder: Path) -> dict[str, Any]:
    """Read every tensor of a checkpoint folder, refusing anything that is not plain weights."""
    import torch

    out: dict[str, Any] = {}
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            out.update(_read_safetensors(path))
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
            except Exception as e:  # noqa: BLE001 - the unpickler raises many kinds
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
                    raise BundleError(f"{path}: refused: this pickle would import or run code "
                                      f"when loaded ({msg[:160]}); convert it to safetensors") from None
                raise BundleError(f"{path}: cannot read weights ({msg[:200]})") from None
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise BundleError(f"{path}: expected a mapping of names to tensors")
            out.update(sd)
    return out


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        size = path.stat().st_size
        raise BundleError(f"{path}: corrupt or truncated safetensors file ({size} bytes; "
                          f"{str(e).splitlines()[0][:160]})") from None


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
