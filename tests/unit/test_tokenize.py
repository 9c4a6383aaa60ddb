"""Published tokenizers: edgeseq's (no transformers at run time) against the checkpoint's own
transformers tokenizer, ``AutoTokenizer.from_pretrained(folder)`` on the fixture folders."""
from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import pytest

from edgeseq import tokenize
from edgeseq.bundle import BundleError

PUBLISHED = Path(__file__).resolve().parents[1] / "fixtures" / "published"
# T5 and T5 v1.1 / Flan (sentencepiece and tokenizer.json), ByT5, BART (vocab.json + merges.txt),
# Marian, Whisper (tokenizer.json) and a causal LM's GPT-NeoX tokenizer.json
MODELS = ["t5-small", "flan-t5-small", "byt5-small", "bart-base", "opus-mt-en-de",
          "whisper-tiny", "whisper-tiny.en", "mamba-130m-hf"]
# the manifest entry's layout, and the published files a tokenizer.json is assembled from
LAYOUT = {"t5-small": ("hf", ["spiece.model"]), "flan-t5-small": ("hf", None),
          "byt5-small": ("byt5", None), "bart-base": ("hf", ["vocab.json", "merges.txt"]),
          "opus-mt-en-de": ("marian", None), "whisper-tiny": ("hf", None),
          "whisper-tiny.en": ("hf", None), "mamba-130m-hf": ("hf", None)}
TEXTS = [
    "Hello world", "translate English to German: The house is wonderful.", "", " ", "\n",
    "  leading, trailing   and    several spaces  ", "tabs\tand\nnew lines\n\n",
    "ünïcödé — “quotes” … 日本語の文 😀 e\u0301", "café naïve façade Œuvre ß",
    "\u00a0no-break\u200bzero-width", "ＡＢＣ full width ｶﾞ", "don't stop , ok . isn't it ?",
    # special-token strings and sentinels in the text
    "Hello <extra_id_0> world <extra_id_1>.", "Hello<extra_id_0>world", "x  <extra_id_99>  y",
    "text that ends with eos</s>", "</s> <pad> <unk> <s> <mask>", "a<mask> b", ">>de<< hello",
    "<|endoftext|> and <|startoftranscript|><|en|>", "<|0.00|> a <|1.50|>",
]


def _available(name: str) -> Path:
    d = PUBLISHED / name
    if not d.is_dir():
        pytest.skip(f"no fixture {d}")
    return d


@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple]:
    from transformers import AutoTokenizer

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODELS:
            d = PUBLISHED / name
            if d.is_dir():
                spec = tokenize.detect(d)
                out[name] = (AutoTokenizer.from_pretrained(d), tokenize.load(d, spec), spec)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_layout_detected(pairs: dict, name: str) -> None:
    _available(name)
    spec = pairs[name][2]
    assert (spec["type"], spec.get("built_from")) == LAYOUT[name]


@pytest.mark.parametrize("name", MODELS)
def test_encode_equals_transformers(pairs: dict, name: str) -> None:
    _available(name)
    ref, ours, _ = pairs[name]
    for text in TEXTS:
        assert ours.encode(text) == ref(text).input_ids, text


@pytest.mark.parametrize("name", MODELS)
def test_encode_array_holds_the_same_ids_compactly(pairs: dict, name: str) -> None:
    _available(name)
    ours = pairs[name][1]
    for text in TEXTS:
        ids = ours.encode(text)
        arr = tokenize.encode_array(ours, text)
        assert arr.ndim == 1 and arr.dtype.itemsize <= 4 and arr.tolist() == ids, text


@pytest.mark.parametrize("offset", [0, 3])
def test_byte_tokenizer_array_is_one_or_two_bytes_a_token(offset: int) -> None:
    tok = tokenize.ByteTokenizer(offset)
    text = "ünïcödé — 日本語 😀 plain ascii \x00\xff"
    arr = tok.encode_array(text)
    assert arr.tolist() == tok.encode(text)
    assert arr.dtype.itemsize == (1 if offset == 0 else 2)


@pytest.mark.parametrize("name", MODELS)
def test_decode_equals_transformers(pairs: dict, name: str) -> None:
    """Random id sequences over the whole vocabulary (special, added and timestamp tokens
    included), and the ids of the texts above, decode as the tokenizer decodes them with
    ``skip_special_tokens=True``."""
    _available(name)
    ref, ours, _ = pairs[name]
    rng = random.Random(0)
    seqs = [ref(t).input_ids for t in TEXTS]
    n = len(ref)  # (slow to compute: once)
    seqs += [[rng.randrange(n) for _ in range(rng.randrange(13))] for _ in range(300)]
    for ids in seqs:
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), ids


def test_source_ids_adds_specials_once() -> None:
    """Published tokenizers add their own EOS (no second one); bare byte tokenizers get EOS
    from the model config."""
    d = _available("t5-small")
    tok = tokenize.load(d, tokenize.detect(d))
    ids = tokenize.source_ids(tok, "Hello world", {"eos_token_id": 1})
    assert ids[-1] == 1 and ids[-2] != 1
    b = tokenize.ByteTokenizer(3)
    assert tokenize.source_ids(b, "ab", {"eos_token_id": 1}) == [100, 101, 1]
    assert tokenize.source_ids(b, "ab", {"eos_token_id": 1, "append_eos_to_source": False}) \
        == [100, 101]


def test_bundle_copy_and_load(tmp_path: Path) -> None:
    """What ``copy_files`` puts in a bundle loads there without the checkpoint folder; BART's
    vocab.json + merges.txt become a tokenizer.json."""
    for name in ("t5-small", "bart-base", "opus-mt-en-de", "byt5-small"):
        d = _available(name)
        spec = tokenize.detect(d)
        out = tmp_path / name
        out.mkdir()
        tokenize.copy_files(d, spec, out)
        tok = tokenize.load(out, json.loads(json.dumps(spec)))  # as read from the manifest
        ref = tokenize.load(d, spec)
        for text in TEXTS:
            assert tok.encode(text) == ref.encode(text)
    assert (tmp_path / "bart-base" / "tokenizer.json").is_file()


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.model", "a/../../x", "", 3])
def test_manifest_file_must_stay_inside(tmp_path: Path, bad: object) -> None:
    with pytest.raises(BundleError, match="inside the bundle"):
        tokenize.load(tmp_path, {"type": "hf", "file": bad})


def test_symlink_leaving_the_bundle_is_refused(tmp_path: Path) -> None:
    _available("flan-t5-small")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer.json").symlink_to(PUBLISHED / "flan-t5-small" / "tokenizer.json")
    # a checkpoint folder may link its files (the Hugging Face cache does); a bundle may not
    assert tokenize.load(tmp_path / "b", {"type": "hf", "file": "tokenizer.json"}).encode("a")
    (tmp_path / "b" / "manifest.json").write_text("{}")
    with pytest.raises(BundleError, match="leaves the bundle"):
        tokenize.load(tmp_path / "b", {"type": "hf", "file": "tokenizer.json"})


@pytest.mark.parametrize("name,file,message", [
    ("t5-small", "spiece.model", "not a sentencepiece model"),
    ("flan-t5-small", "tokenizer.json", "not a readable tokenizer.json"),
    ("opus-mt-en-de", "target.spm", "not a sentencepiece model"),
    ("opus-mt-en-de", "vocab.json", "not valid JSON"),
    ("bart-base", "merges.txt", "merges.txt"),
])
def test_corrupt_file_is_named(tmp_path: Path, name: str, file: str, message: str) -> None:
    d = tmp_path / name
    shutil.copytree(_available(name), d)
    (d / file).write_bytes(b"\x00garbage\xff not a model")
    with pytest.raises(BundleError, match=message) as e:
        tokenize.detect(d)
    assert file in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,file", [("opus-mt-en-de", "target.spm"),
                                       ("flan-t5-small", "tokenizer.json"),
                                       ("bart-base", "merges.txt")])
def test_missing_file_is_named(tmp_path: Path, name: str, file: str) -> None:
    d = tmp_path / name
    shutil.copytree(_available(name), d)
    (d / file).unlink()
    with pytest.raises(BundleError) as e:
        tokenize.detect(d)
    msg = str(e.value)
    assert "missing" in msg and "\n" not in msg
    # what is missing is named: the file itself, or the model file the tokenizer config needs
    assert file in msg or "spiece.model" in msg


@pytest.mark.parametrize("name", ["whisper-tiny", "whisper-tiny.en"])
def test_whisper_vocab_and_merges_layout(tmp_path: Path, name: str) -> None:
    """Whisper published as ``vocab.json`` + ``merges.txt`` + ``added_tokens.json`` (no
    tokenizer.json): the bundle carries the fast tokenizer transformers converts them into, and
    it encodes and decodes as ``AutoTokenizer`` on that folder; the bundle copy loads alone."""
    from transformers import AutoTokenizer

    src = _available(name)
    model = json.loads((src / "tokenizer.json").read_text())["model"]
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for f in ("added_tokens.json", "special_tokens_map.json", "tokenizer_config.json",
              "normalizer.json", "config.json"):
        shutil.copy(src / f, d / f)
    spec = tokenize.detect(d)
    assert spec["type"] == "hf" and "vocab.json" in spec["built_from"]
    out = tmp_path / "bundle"
    out.mkdir()
    tokenize.copy_files(d, spec, out)
    (out / "manifest.json").write_text("{}")
    ours = tokenize.load(out, json.loads(json.dumps(spec)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoTokenizer.from_pretrained(d)
    rng = random.Random(1)
    for text in TEXTS:
        ids = ref(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    for _ in range(100):
        ids = [rng.randrange(len(ref)) for _ in range(rng.randrange(12))]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), ids
    (d / "merges.txt").write_text("#version: 0.2\nnot-a-merge\n")
    with pytest.raises(BundleError, match="merges.txt|vocab.json"):
        tokenize.detect(d)
