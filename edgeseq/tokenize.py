"""Tokenizers a bundle carries, so that ``edgeseq run`` needs no transformers.

``detect`` reads a checkpoint folder's tokenizer files as published and returns the manifest's
``tokenizer`` entry (a layout and its files); ``copy_files`` puts those files into the bundle;
``load`` opens them with the ``tokenizers`` and ``sentencepiece`` libraries. Text in and text out
equal the checkpoint's own transformers tokenizer (``AutoTokenizer.from_pretrained(folder)``):
``encode`` adds the tokenizer's special tokens as it does (T5 and Marian append ``</s>``, BART
wraps ``<s> … </s>``) and splits its added tokens out of the text; ``decode`` skips special
tokens.

Layouts (``type`` in the manifest entry):

- ``bytes``: raw UTF-8 bytes + ``offset`` (the zoo's byte-level models, ``edgeseq_tokenizer.json``).
- ``hf``: a ``tokenizer.json`` (any fast tokenizer: T5, Flan-T5, BART, Whisper, GPT-NeoX, ...).
  Published files without one are assembled into one at convert time, as ``AutoTokenizer``
  does (``built_from``, also carried): a byte-level BPE as ``vocab.json`` + ``merges.txt``
  (BART, RoBERTa), and T5's ``spiece.model`` (its ``<extra_id_N>`` sentinels at the top of the
  vocabulary, ``</s>`` appended), converted by transformers' own converter.
- ``byt5``: ByT5 (bytes + 3, sentinels above the bytes, ``</s>`` appended), recognised from its
  ``tokenizer_config.json`` / ``special_tokens_map.json``.
- ``marian``: OPUS-MT: ``source.spm`` cuts the source text, ``target.spm`` joins the output, the
  ids of both come from ``vocab.json``.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from edgeseq.errors import BundleError
from edgeseq.checkpoint import read_json
from edgeseq.limits import LimitError, check_file

MARKER = "edgeseq_tokenizer.json"  # a checkpoint declares a non-HF tokenizer with this file
SPIECE_UNDERLINE = "\u2581"
_WHISPER_TIMESTAMP = re.compile(r"<\|(\d+\.\d+)\|>")
# Defaults of transformers' tokenizer classes (used when a published folder does not state them).
BYT5_EXTRA_IDS = 125
BYT5_OFFSET = 3  # pad 0, eos 1, unk 2, then the 256 byte values


class Tokenizer(Protocol):
    adds_special_tokens: bool  # encode() applies the tokenizer's own special-token template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


# -- text -> source ids: the one place ------------------------------------------------------
def source_ids(tok: Tokenizer, text: str, config: dict[str, Any]) -> list[int]:
    """Encoder source ids for ``text``, as the model was trained to read them.

    A published tokenizer adds its own special tokens (T5/Marian ``</s>``, BART ``<s> … </s>``),
    exactly as ``tokenizer(text).input_ids``. A bare byte tokenizer knows none: EOS is appended
    from the model's config (``append_eos_to_source``, default true), as the zoo models were
    trained.
    """
    if getattr(tok, "adds_special_tokens", False):
        return tok.encode(text)
    ids = tok.encode(text)
    eos = config.get("eos_token_id")
    if config.get("append_eos_to_source", True) and eos is not None:
        ids = ids + [int(eos)]
    return ids


# -- added tokens, split out of the text as transformers' slow tokenizers do ----------------
class AddedTokens:
    """Tokens matched verbatim in the text before the model's own tokenization (leftmost, then
    longest match, as transformers' trie), with their ``lstrip``/``rstrip`` flags: a token with
    ``rstrip`` eats the whitespace after it, one with ``lstrip`` the whitespace before it."""

    def __init__(self, entries: Sequence[dict[str, Any]]):
        self.by_content = {e["content"]: e for e in entries}
        self.special_ids = {int(e["id"]) for e in entries if e.get("special", True)}
        self.by_id = {int(e["id"]): e["content"] for e in entries}
        alts = sorted(self.by_content, key=len, reverse=True)
        self._re = re.compile("|".join(re.escape(a) for a in alts)) if alts else None

    def split(self, text: str) -> list[str | int]:
        """Text chunks (str) and added-token ids (int), in order; empty chunks dropped."""
        if self._re is None:
            return [text] if text else []
        parts: list[Any] = []
        pos = 0
        for m in self._re.finditer(text):
            parts.append(text[pos:m.start()])
            parts.append(self.by_content[m.group()])
            pos = m.end()
        parts.append(text[pos:])
        for i, p in enumerate(parts):
            if isinstance(p, dict):
                if p.get("rstrip") and i + 1 < len(parts) and isinstance(parts[i + 1], str):
                    parts[i + 1] = parts[i + 1].lstrip()
                if p.get("lstrip") and i > 0 and isinstance(parts[i - 1], str):
                    parts[i - 1] = parts[i - 1].rstrip()
        return [int(p["id"]) if isinstance(p, dict) else p for p in parts
                if isinstance(p, dict) or p]


# -- the layouts ------------------------------------------------------------------------------
class ByteTokenizer:
    """Token id = UTF-8 byte value + ``offset``; decoding replaces bytes that do not form valid
    UTF-8. Ids below ``offset`` are special tokens (ByT5's convention with offset 3: pad 0, eos 1,
    unk 2), which decoding skips. Knows no special-token template (see ``source_ids``)."""

    adds_special_tokens = False

    def __init__(self, offset: int = 0):
        self.offset = offset

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def encode_array(self, text: str) -> np.ndarray:
        # 1-2 bytes a token where the list costs 8: a long prompt's ids are most of its memory
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        if not self.offset:
            return raw
        ids = raw.astype(np.uint16)
        ids += self.offset
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        o = self.offset
        return bytes(i - o for i in ids if o <= i < 256 + o).decode("utf-8", errors="replace")


class ByT5Tokenizer:
    """transformers' ``ByT5Tokenizer``: bytes + 3, added tokens (pad/eos/unk and the
    ``<extra_id_N>`` sentinels), ``</s>`` appended unless the text already ends with it; decoding
    drops special tokens and bytes that do not form UTF-8 (``errors="ignore"``)."""

    adds_special_tokens = True

    def __init__(self, spec: dict[str, Any]):
        self.added = AddedTokens(spec["added_tokens"])
        self.eos = int(spec["eos_token_id"])
        self.unk = int(spec["unk_token_id"])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for part in self.added.split(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(b + BYT5_OFFSET for b in part.encode("utf-8"))
        if add_special_tokens and not (ids and ids[-1] == self.eos):
            ids.append(self.eos)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in (int(i) for i in ids):
            if i in self.added.special_ids:
                continue
            if i in self.added.by_id:
                out += self.added.by_id[i].encode("utf-8")
            elif BYT5_OFFSET <= i < 256 + BYT5_OFFSET:
                out.append(i - BYT5_OFFSET)
        return out.decode("utf-8", errors="ignore")


class HFTokenizer:
    """A ``tokenizer.json`` through the ``tokenizers`` library (what transformers' fast
    tokenizers run), with the decode-time clean-up the checkpoint's ``tokenizer_config.json``
    asks for."""

    adds_special_tokens = True
    whisper = False

    def __init__(self, path: Path, clean_up: bool = False):
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # the library's own error names no file
            raise BundleError(f"{path}: not a readable tokenizer.json "
                              f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
                              ) from None
        self.clean_up = clean_up
        self._whisper_ids()

    def _whisper_ids(self) -> None:
        # Whisper's tokenizer (WhisperTokenizerFast.decode) drops a previous-text prompt up to
        # <|startoftranscript|> and the timestamp tokens' text, which are not special tokens
        self.prev = self._tok.token_to_id("<|startofprev|>")
        self.sot = self._tok.token_to_id("<|startoftranscript|>")
        self.whisper = self.sot is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.whisper and ids and ids[0] == self.prev:
            ids = ids[ids.index(self.sot):] if self.sot in ids else []
        text = self._tok.decode(ids, skip_special_tokens=True)
        if self.clean_up:
            text = clean_up_tokenization(text)
        return _WHISPER_TIMESTAMP.sub("", text) if self.whisper else text


class MarianTokenizer:
    """transformers' ``MarianTokenizer``: the source text is cut by ``source.spm``, its pieces
    looked up in ``vocab.json`` (unknown pieces -> ``<unk>``), ``</s>`` appended; output ids are
    looked up in the same ``vocab.json`` and joined by ``target.spm``."""

    adds_special_tokens = True

    def __init__(self, root: Path, spec: dict[str, Any]):
        self.source = _load_spm(_inside(root, spec["source"]))
        self.target = _load_spm(_inside(root, spec["target"]))
        vocab_path = _inside(root, spec["vocab"])
        try:
            self.vocab: dict[str, int] = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BundleError(f"{vocab_path}: not a JSON vocabulary ({e})") from None
        self.pieces = {v: k for k, v in self.vocab.items()}
        self.added = AddedTokens(spec["added_tokens"])
        self.specials = {e["content"] for e in spec["added_tokens"]}
        self.eos = int(spec["eos_token_id"])
        self.unk = self.vocab[spec["unk_token"]]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for part in self.added.split(text):
            if isinstance(part, int):
                ids.append(part)
                continue
            code = []
            if part.startswith(">>") and (end := part.find("<<")) != -1:  # a target language tag
                code, part = [part[:end + 2]], part[end + 2:]
            pieces = code + self.source.encode(part, out_type=str)
            ids.extend(self.vocab.get(p, self.unk) for p in pieces)
        return ids + [self.eos] if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        pieces = [self.pieces.get(int(i)) for i in ids if int(i) not in self.added.special_ids]
        pieces = [p for p in pieces if p is not None and p not in self.specials]
        return self.target.decode_pieces(pieces).replace(SPIECE_UNDERLINE, " ").strip()


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (spaces before punctuation and contractions)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def encode_array(tok: Tokenizer, text: str) -> np.ndarray:
    """``tok.encode(text)`` as a 1-D array of the narrowest unsigned type that holds its ids
    (the tokenizer's own ``encode_array`` where it has one, which skips the list)."""
    own = getattr(tok, "encode_array", None)
    if own is not None:
        return own(text)
    ids = tok.encode(text)
    top = max(ids, default=0)
    return np.array(ids, dtype=np.uint16 if top < 1 << 16 else np.uint32)


#: the files of a published tokenizer folder that transformers (and so this module) may read
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "spiece.model", "source.spm", "target.spm",
                   "vocab.json", "merges.txt", MARKER)


def _sized(path: Path, what: str = "tokenizer") -> Path:
    """``path`` if it is a regular file within the tokenizer size limit (the tokenizers and
    sentencepiece libraries read a file whole, with no limit of their own)."""
    try:
        check_file(path, what, "tokenizer_bytes")
    except LimitError as e:
        raise BundleError(str(e)) from None
    return path


# -- detection --------------------------------------------------------------------------------
def _read_json(path: Path, what: str = "tokenizer") -> Any:
    _sized(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None


def _token_text(tok: Any) -> str | None:
    """A special token as ``special_tokens_map.json`` / ``tokenizer_config.json`` write it: a
    string, or an AddedToken dict with ``content``."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _tokenizer_config(src: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` with ``special_tokens_map.json`` over it (what transformers
    reads), or {} when the folder has neither."""
    cfg: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            data = _read_json(src / name)
            if not isinstance(data, dict):
                raise BundleError(f"{src / name}: expected a JSON object")
            cfg.update({k: v for k, v in data.items() if v is not None})
    return cfg


def _added_from_config(cfg: dict[str, Any], defaults: dict[int, dict[str, Any]]
                       ) -> list[dict[str, Any]]:
    """Added tokens: the class defaults, overridden by ``added_tokens_decoder`` when the
    published config states them (newer transformers write it)."""
    entries = {i: dict(e, id=i) for i, e in defaults.items()}
    for k, v in (cfg.get("added_tokens_decoder") or {}).items():
        entries[int(k)] = {"id": int(k), "content": v["content"], "lstrip": v.get("lstrip", False),
                           "rstrip": v.get("rstrip", False), "special": v.get("special", True)}
    return [entries[i] for i in sorted(entries)]


def _is_byt5(cfg: dict[str, Any], model_cfg: dict[str, Any]) -> bool:
    cls = cfg.get("tokenizer_class") or model_cfg.get("tokenizer_class") or ""
    return cls.startswith("ByT5")


def detect(src: Path, model_config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest's tokenizer entry for a checkpoint folder, or None if it has none.

    Published files are read as transformers reads them; a file that is there but unreadable is
    a one-line ``BundleError`` naming it. ``model_config``: the checkpoint's ``config.json`` as
    the caller read it (``checkpoint.read_config``); else it is read here with the same reader.
    """
    src = Path(src)
    for name in TOKENIZER_FILES:  # transformers may read any of them below
        if (src / name).exists():
            _sized(src / name)
    if (src / MARKER).is_file():
        spec = _read_json(src / MARKER)
        if not isinstance(spec, dict) or spec.get("type") != "bytes":
            raise BundleError(f"{src / MARKER}: unknown tokenizer type "
                              f"{spec.get('type') if isinstance(spec, dict) else spec!r}")
        offset = spec.get("offset", 0)
        if not isinstance(offset, int) or offset < 0:
            raise BundleError(f"{src / MARKER}: offset must be a non-negative integer")
        return {"type": "bytes", "offset": offset} if offset else {"type": "bytes"}
    cfg = _tokenizer_config(src)
    if model_config is None:   # read as a checkpoint's config is, not under the tokenizer cap
        model_config = read_json(src / "config.json") if (src / "config.json").is_file() else {}
    model_cfg = model_config if isinstance(model_config, dict) else {}
    clean_up = bool(cfg.get("clean_up_tokenization_spaces", False))
    if (src / "tokenizer.json").is_file():
        spec = {"type": "hf", "file": "tokenizer.json"}
        if clean_up:
            spec["clean_up_tokenization_spaces"] = True
        _check(src, spec)
        return spec
    if _is_byt5(cfg, model_cfg):
        return _byt5_spec(cfg)
    if (src / "source.spm").is_file() or (src / "target.spm").is_file():
        return _marian_spec(src, cfg)
    if (src / "spiece.model").is_file():
        return _t5_spec(src, clean_up)
    if (src / "vocab.json").is_file() or (src / "merges.txt").is_file():
        return _bpe_spec(src, cfg, clean_up)
    if cfg:  # a tokenizer is declared, but its model file is not there
        cls = str(cfg.get("tokenizer_class") or "")
        need = next((f for prefix, f in _MODEL_FILE if cls.startswith(prefix)), "tokenizer.json")
        where = next(n for n in ("tokenizer_config.json", "special_tokens_map.json")
                     if (src / n).is_file())
        raise BundleError(f"{src / need}: missing (the tokenizer {cls or 'declared'} in "
                          f"{where} needs it)")
    return None


# the model file each tokenizer class reads when the folder has no tokenizer.json
_MODEL_FILE = (("T5", "spiece.model"), ("Marian", "source.spm"), ("Bart", "vocab.json"),
               ("Roberta", "vocab.json"), ("GPT2", "vocab.json"), ("Whisper", "vocab.json"))


def _byt5_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    pad = _token_text(cfg.get("pad_token")) or "<pad>"
    eos = _token_text(cfg.get("eos_token")) or "</s>"
    unk = _token_text(cfg.get("unk_token")) or "<unk>"
    n = int(cfg.get("extra_ids", BYT5_EXTRA_IDS))
    # ByT5Tokenizer: pad/eos/unk strip the whitespace around them; sentinels follow the bytes
    defaults = {0: {"content": pad, "lstrip": True, "rstrip": True},
                1: {"content": eos, "lstrip": True, "rstrip": True},
                2: {"content": unk, "lstrip": True, "rstrip": True}}
    extra = [_token_text(t) for t in cfg.get("additional_special_tokens") or []]
    extra = [t for t in extra if t] or [f"<extra_id_{i}>" for i in range(n)]
    for j, t in enumerate(extra):
        defaults[256 + BYT5_OFFSET + j] = {"content": t, "lstrip": False, "rstrip": False}
    added = _added_from_config(cfg, defaults)
    ids = {e["content"]: e["id"] for e in added}
    return {"type": "byt5", "added_tokens": added, "eos_token_id": ids[eos],
            "unk_token_id": ids[unk]}


def _t5_spec(src: Path, clean_up: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "hf", "file": "tokenizer.json", "built_from": ["spiece.model"]}
    if clean_up:
        spec["clean_up_tokenization_spaces"] = True
    _build(src, spec)  # refuses a corrupt file now, at convert time
    return spec


def _converted(src: Path, main: str) -> Any:
    """The slow tokenizer files of ``src`` as the fast tokenizer transformers converts them into
    (what ``AutoTokenizer`` gives for a folder without ``tokenizer.json``; convert time only, the
    bundle then carries the result). T5's normalizer, for one, is sentencepiece's precompiled
    character map applied per character, which differs from sentencepiece itself on a few
    sequences (a half-width kana followed by a voiced mark): the bundle follows transformers."""
    import warnings

    try:
        from transformers import AutoTokenizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast = AutoTokenizer.from_pretrained(str(src), use_fast=True)
    except Exception as e:
        raise BundleError(f"{src / main}: transformers cannot read the tokenizer "
                          f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
                          ) from None
    if not getattr(fast, "is_fast", False):
        raise BundleError(f"{src / main}: transformers gives no fast tokenizer for it")
    return fast.backend_tokenizer


def _marian_spec(src: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    for name in ("source.spm", "target.spm", "vocab.json"):
        if not (src / name).is_file():
            raise BundleError(f"{src / name}: missing (a Marian tokenizer needs source.spm, "
                              "target.spm and vocab.json)")
    if cfg.get("separate_vocabs"):
        raise BundleError(f"{src / 'tokenizer_config.json'}: separate_vocabs (a target_vocab.json) "
                          "is not supported")
    for name in ("source.spm", "target.spm"):
        _load_spm(src / name)
    vocab = _read_json(src / "vocab.json")
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise BundleError(f"{src / 'vocab.json'}: expected a JSON object of piece -> id")
    names = {}
    for name, fallback in (("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "<pad>")):
        names[name] = _token_text(cfg.get(name)) or fallback
        if names[name] not in vocab:
            raise BundleError(f"{src / 'vocab.json'}: has no {names[name]!r} ({name})")
    added = [{"id": vocab[t], "content": t, "lstrip": False, "rstrip": False}
             for t in names.values()]
    return {"type": "marian", "source": "source.spm", "target": "target.spm",
            "vocab": "vocab.json", "added_tokens": added, "eos_token_id": vocab[names["eos_token"]],
            "unk_token": names["unk_token"]}


def _bpe_spec(src: Path, cfg: dict[str, Any], clean_up: bool) -> dict[str, Any]:
    for name in ("vocab.json", "merges.txt"):
        if not (src / name).is_file():
            raise BundleError(f"{src / name}: missing (a byte-level BPE needs vocab.json and "
                              "merges.txt)")
    cls = cfg.get("tokenizer_class") or ""
    if cls.startswith(_CONVERTED):
        # Whisper's / GPT-2's slow files (with added_tokens.json): the fast tokenizer
        # transformers converts them into, assembled at convert time as for T5
        spec: dict[str, Any] = {"type": "hf", "file": "tokenizer.json",
                                "built_from": ["vocab.json", "merges.txt"],
                                "converter": "transformers"}
        if (src / "added_tokens.json").is_file():
            spec["built_from"].append("added_tokens.json")
        if clean_up:
            spec["clean_up_tokenization_spaces"] = True
        _build(src, spec)
        return spec
    if cls and not cls.startswith(("Bart", "Roberta")):
        raise BundleError(f"{src}: a {cls} from vocab.json + merges.txt is not supported; "
                          "give its tokenizer.json")
    spec = {"type": "hf", "file": "tokenizer.json", "built_from": ["vocab.json", "merges.txt"],
            "bpe": {"add_prefix_space": bool(cfg.get("add_prefix_space", False)),
                    **{k: _token_text(cfg.get(k)) or d for k, d in (
                        ("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"),
                        ("pad_token", "<pad>"), ("mask_token", "<mask>"))}}}
    if clean_up:
        spec["clean_up_tokenization_spaces"] = True
    _build(src, spec)  # refuses a corrupt file now, at convert time
    return spec


# tokenizer classes whose slow files are converted with transformers' own converter
_CONVERTED = ("Whisper", "GPT2")


def _build(src: Path, spec: dict[str, Any]) -> Any:
    """The ``tokenizers`` object a ``built_from`` entry is assembled into."""
    if spec["built_from"] == ["spiece.model"]:
        _load_spm(src / "spiece.model")  # a missing or corrupt model named as such
        return _converted(src, "spiece.model")
    if spec.get("converter") == "transformers":
        return _converted(src, "vocab.json")
    return _build_bpe(src, spec["bpe"])


def _build_bpe(src: Path, opts: dict[str, Any]) -> Any:
    """A RoBERTa/BART byte-level BPE from ``vocab.json`` + ``merges.txt``, assembled as
    transformers' ``RobertaConverter`` assembles it (the fast tokenizer ``AutoTokenizer`` gives
    for such a folder)."""
    from tokenizers import AddedToken, Tokenizer as _Tok, decoders, models, pre_tokenizers
    from tokenizers import processors

    vocab = _read_json(src / "vocab.json")
    if not isinstance(vocab, dict):
        raise BundleError(f"{src / 'vocab.json'}: expected a JSON object of token -> id")
    try:
        lines = (src / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{src / 'merges.txt'}: unreadable ({e})") from None
    merges = []
    for n, line in enumerate(lines):
        if n == 0 and line.startswith("#version") or not line.strip():
            continue
        pair = line.split(" ")
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab:
            raise BundleError(f"{src / 'merges.txt'}: line {n + 1} is not a merge of two "
                              f"vocabulary tokens: {line[:60]!r}")
        merges.append((pair[0], pair[1]))
    try:
        tok = _Tok(models.BPE(vocab=vocab, merges=merges, dropout=None,
                              continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    except Exception as e:
        raise BundleError(f"{src / 'vocab.json'}: not a BPE vocabulary ({e})") from None
    aps = opts["add_prefix_space"]
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=aps)
    tok.decoder = decoders.ByteLevel()
    for k in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token"):
        if opts[k] not in vocab:
            raise BundleError(f"{src / 'vocab.json'}: has no {opts[k]!r} ({k})")
    tok.post_processor = processors.RobertaProcessing(
        (opts["eos_token"], vocab[opts["eos_token"]]),
        (opts["bos_token"], vocab[opts["bos_token"]]), add_prefix_space=aps, trim_offsets=True)
    # <mask> eats the space before it (RoBERTa/BART); the others are plain special tokens
    tok.add_special_tokens([AddedToken(opts[k], lstrip=(k == "mask_token"), rstrip=False,
                                       normalized=False, special=True)
                            for k in ("bos_token", "pad_token", "eos_token", "unk_token",
                                      "mask_token")])
    return tok


def _load_spm(path: Path) -> Any:
    import sentencepiece as spm

    if not Path(path).is_file():
        raise BundleError(f"{path}: missing")
    _sized(Path(path))
    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(str(path))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with a C++ message
        raise BundleError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0][:100]})"
                          ) from None
    if not ok:
        raise BundleError(f"{path}: not a sentencepiece model")
    return sp


def _check(src: Path, spec: dict[str, Any]) -> None:
    """Open the tokenizer now so that a corrupt file is refused at convert time."""
    load(src, spec)


# -- files in the bundle ----------------------------------------------------------------------
def files(spec: dict[str, Any] | None) -> list[str]:
    """The bundle-relative files a tokenizer entry names."""
    if not spec:
        return []
    t = spec.get("type")
    if t == "hf":  # and the published files it was assembled from, carried as they are
        return [spec["file"], *spec.get("built_from", [])]
    if t == "marian":
        return [spec["source"], spec["target"], spec["vocab"]]
    return []


def _inside(root: Path, name: Any) -> Path:
    """``root / name``, refusing a name that could leave the bundle: not a plain relative path,
    a ``..`` part, or a symlink pointing outside."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or "\\" in name \
            or any(p in ("..", "") for p in name.split("/")):
        raise BundleError(f"{root}: tokenizer file {name!r} must be a relative path inside the "
                          "bundle")
    path = root / name
    # a checkpoint folder may link its files elsewhere (the Hugging Face cache links snapshot
    # files to blobs); a bundle (it has a manifest) holds its own
    if (root / "manifest.json").is_file():
        try:
            real, base = path.resolve(), root.resolve()
        except OSError as e:
            raise BundleError(f"{path}: {e}") from None
        if base != real and base not in real.parents:
            raise BundleError(f"{path}: tokenizer file leaves the bundle (it resolves to {real})")
    if not path.is_file():
        raise BundleError(f"{path}: tokenizer file missing")
    return _sized(path)


def copy_files(src: Path, spec: dict[str, Any] | None, out: Path) -> None:
    if not spec:
        return
    if spec.get("built_from"):  # published files assembled into a tokenizer.json
        _build(Path(src), spec).save(str(out / spec["file"]))
        for name in spec["built_from"]:  # and carried as published
            shutil.copy2(_inside(Path(src), name), out / name)
        return
    for name in files(spec):
        shutil.copy2(_inside(Path(src), name), out / name)


def load(root: Path, spec: dict[str, Any] | None) -> Tokenizer | None:
    if not spec:
        return None
    root = Path(root)
    t = spec.get("type")
    if t == "bytes":
        return ByteTokenizer(spec.get("offset", 0))
    if t == "hf":
        if spec.get("built_from") and not (root / "manifest.json").is_file():
            return _BuiltHF(_build(root, spec), spec)  # the checkpoint folder, at convert time
        return HFTokenizer(_inside(root, spec["file"]),
                           bool(spec.get("clean_up_tokenization_spaces", False)))
    if t == "byt5":
        return ByT5Tokenizer(spec)
    if t == "marian":
        return MarianTokenizer(root, spec)
    raise BundleError(f"{root}: unknown tokenizer type {t!r}")


class _BuiltHF(HFTokenizer):
    """A BPE assembled in memory (the checkpoint folder at convert time, before the bundle's
    ``tokenizer.json`` exists)."""

    def __init__(self, tok: Any, spec: dict[str, Any]):
        self._tok = tok
        self.clean_up = bool(spec.get("clean_up_tokenization_spaces", False))
        self._whisper_ids()
