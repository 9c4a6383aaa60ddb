"""Tokenizers a bundle can carry: raw bytes (the zoo's byte-level models) or a Hugging Face
``tokenizer.json`` (read with the ``tokenizers`` library; no hub access)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

from edgeseq.bundle import BundleError

MARKER = "edgeseq_tokenizer.json"  # a checkpoint declares a non-HF tokenizer with this file


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Token id = UTF-8 byte value + ``offset``; decoding replaces bytes that do not form valid
    UTF-8. Ids below ``offset`` are special tokens (ByT5's convention with offset 3: pad 0, eos 1,
    unk 2), which decoding skips."""

    def __init__(self, offset: int = 0):
        self.offset = offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        o = self.offset
        return bytes(i - o for i in ids if o <= i < 256 + o).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def detect(src: Path) -> dict[str, Any] | None:
    """The manifest's tokenizer entry for a checkpoint folder, or None if it has none."""
    if (src / MARKER).is_file():
        spec = json.loads((src / MARKER).read_text())
        if spec.get("type") != "bytes":
            raise BundleError(f"{src / MARKER}: unknown tokenizer type {spec.get('type')!r}")
        offset = spec.get("offset", 0)
        if not isinstance(offset, int) or offset < 0:
            raise BundleError(f"{src / MARKER}: offset must be a non-negative integer")
        return {"type": "bytes", "offset": offset} if offset else {"type": "bytes"}
    if (src / "tokenizer.json").is_file():
        return {"type": "hf", "file": "tokenizer.json"}
    return None


def copy_files(src: Path, spec: dict[str, Any] | None, out: Path) -> None:
    if spec and spec.get("type") == "hf":
        shutil.copy2(src / spec["file"], out / spec["file"])


def load(root: Path, spec: dict[str, Any] | None) -> Tokenizer | None:
    if not spec:
        return None
    if spec["type"] == "bytes":
        return ByteTokenizer(spec.get("offset", 0))
    if spec["type"] == "hf":
        return HFTokenizer(root / spec["file"])
    raise BundleError(f"{root}: unknown tokenizer type {spec['type']!r}")
