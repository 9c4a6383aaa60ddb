"""``edgeseq run`` prints a stream incrementally (constant work per token) and what it prints is
exactly the text of decoding every token at once."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from edgeseq import tokenize
from edgeseq.runtime.streaming import TextStream

TEXTS = ["héllo wörld 😀 ça va? 日本語のテキスト — ok.", "def f(x):\n    return x  # fine .\n",
         "it ' s , they n't go 's ; we 're here !", "ÿþ\u00a0 \t  ÆØÅ ∑∫ 🇩🇪🇫🇷"]


def _streamed(decode, toks):
    st = TextStream(decode)
    pieces = [st.push(t) for t in toks]
    return "".join(pieces) + st.finish(), pieces


def _mutate(ids, rng, vocab):
    ids = list(ids)
    for _ in range(rng.randint(0, 4)):  # stray tokens: lone continuation bytes, specials
        ids[rng.randrange(len(ids))] = rng.randrange(vocab)
    return ids


def _samples(encode, vocab, n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = "".join(rng.choice(TEXTS) for _ in range(rng.randint(1, 12)))
        out.append(_mutate(encode(text), rng, vocab))
    return out


@pytest.mark.parametrize("offset", [0, 3])
def test_byte_tokens_split_across_characters(offset):
    """The zoo's byte tokenizer: every multi-byte character arrives one byte at a time."""
    tok = tokenize.ByteTokenizer(offset)
    for ids in _samples(tok.encode, 256 + offset, 200, seed=offset):
        text, pieces = _streamed(tok.decode, ids)
        assert text == tok.decode(ids)
        # a piece never ends inside a character: no replacement char where the whole has none
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in tok.decode(ids)


def test_byt5_tokens_and_sentinels():
    spec = {"added_tokens": [{"id": 0, "content": "<pad>", "special": True},
                             {"id": 1, "content": "</s>", "special": True},
                             {"id": 2, "content": "<unk>", "special": True},
                             {"id": 259, "content": "<extra_id_0>", "special": False}],
            "eos_token_id": 1, "unk_token_id": 2}
    tok = tokenize.ByT5Tokenizer(spec)  # decodes with errors="ignore": split bytes vanish
    for ids in _samples(tok.encode, 260, 200, seed=5):
        assert _streamed(tok.decode, ids)[0] == tok.decode(ids)


def _hf(tmp_path, kind: str, clean_up: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    corpus = [t * 3 for t in TEXTS] * 20
    if kind == "bytelevel":  # GPT-2 / GPT-NeoX / BART style
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # SentencePiece style (T5): Metaspace, byte fallback
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Metaspace()])
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "</s>"] + [
            f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path / f"{kind}.json"
    tok.save(str(path))
    return tokenize.HFTokenizer(path, clean_up=clean_up), tok.get_vocab_size()


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("clean_up", [False, True])
def test_hf_tokenizers(tmp_path, kind, clean_up):
    tok, vocab = _hf(tmp_path, kind, clean_up)
    for ids in _samples(tok.encode, vocab, 150, seed=len(kind) + clean_up):
        assert _streamed(tok.decode, ids)[0] == tok.decode(ids)


@pytest.mark.parametrize("text", ["".join(TEXTS), "日本語のテキスト", "🇩🇪😀", "ab "])
def test_work_per_token_is_bounded(text):
    """Each token decodes a window of bounded length however long the stream, also in text
    with no ASCII byte (where a byte stream can restart only at a character's first byte)."""
    tok = tokenize.ByteTokenizer(0)
    longest = {}
    for n in (2_000, 20_000):
        seen = 0

        def decode(ids):
            nonlocal seen
            seen = max(seen, len(ids))
            return tok.decode(ids)

        ids = tok.encode(text * (n // len(text.encode()) + 1))[:n]
        assert _streamed(decode, ids)[0] == tok.decode(ids)
        longest[n] = seen
    assert longest[20_000] == longest[2_000] <= TextStream.REACH, longest


def test_cli_stream_equals_json_text(mamba_bytes_bundle):
    """The real command: the streamed stdout is the prompt and then exactly the text that
    ``--json`` reports for the same greedy tokens."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "edgeseq.cli", "run", str(mamba_bytes_bundle), "--prompt",
            "def é(", "-n", "300"]
    streamed = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    js = json.loads(subprocess.run(args + ["--json"], capture_output=True, text=True, env=env,
                                   check=True).stdout)
    assert len(js["tokens"]) > 50
    assert streamed.stdout == "def é(" + js["text"] + "\n"
