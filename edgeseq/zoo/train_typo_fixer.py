"""Train the embedded default encoder-decoder model ``edgeseq/zoo/t5-typo-bytes``: a tiny byte-level T5 typo fixer.

Why: edgeseq needs a real (not randomly initialised) encoder-decoder model to exercise conversion,
cross-attention caching and streaming decoding end to end without a model hub, and one whose
output is easy to judge by eye. This script trains a transformers ``T5ForConditionalGeneration``
from scratch with ByT5's byte vocabulary (token id = UTF-8 byte + 3; pad 0, eos 1, unk 2;
decoding starts from pad) to turn text with keyboard typos back into the clean text.

Data: the docstrings of the Python standard library, which ships with every Python install, so
anyone can reproduce it offline on a CPU. Docstrings are read with ``ast`` from the sorted stdlib
``.py`` files (tests, idlelib, lib2to3, turtledemo, site-packages excluded), whitespace is
collapsed, paragraphs are split into sentences, sentences over 80 bytes are cut at word
boundaries, and ASCII pieces of 20-80 bytes that are mostly letters and spaces are kept. Modules
are split by a hash of their path (crc32 % 10 == 0 -> validation); validation sentences that also
occur in a training module are dropped, so the held-out metrics measure unseen text.

Noise model (input only; the target is always the clean text), fresh every time a sentence is
drawn: a fifth of the inputs stay clean (the model must learn to copy); in the others each word of
2+ letters is hit with probability ``--p-word`` by one of: substitution with a QWERTY neighbour
key, deletion of a letter (words of 3+ letters), insertion of a neighbour of a letter, swap of
two adjacent letters, or a doubled letter. Half of the inputs end with EOS (ByT5's tokenizer
appends one; edgeseq's ByteTokenizer does not), so the model works either way.

Training: teacher forcing (labels = target bytes + EOS, -100 at padding), AdamW, linear warmup
then cosine decay, fixed number of steps. A fixed seed, step count and thread count make runs
repeatable. As in ``train_mamba_bytes.py``: one intra-op thread (``--threads``) and flushed
denormals were fastest on the 2-core shared CPU this was trained on.

Evaluation: 200 held-out sentences with typos (fixed noise seed), greedy ``generate`` with
``max_new_tokens = len + 8``; character error rate (Levenshtein distance, `edgeseq.quant.gates.edit_distance`, / clean length) of the
noisy input and of the model's output against the clean text, exact-match rate, and examples.
All of it, with the step/loss log and hyperparameters, goes to ``train_log.txt``.

Measured: the default 3000 steps took 750 s (12.5 min) of wall time with 1 thread on that machine.
Held-out, greedy: exact match 38.0% (input) -> 52.5% (output); 80 sentences improved, 29 made worse;
character error rate 2.9% -> 3.4%, because a few outputs go badly wrong (a word garbled or a
runaway at the end); with 4 beams (the shipped generation config) 53.5% exact, 83 better / 25 worse,
CER 3.1%. A tiny model's limits; ``train_log.txt`` has the exact figures and examples.

Usage: python -m edgeseq.zoo.train_typo_fixer --out edgeseq/zoo/t5-typo-bytes [--steps N] [--threads 1] [--seed 0]
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import random
import re
import sysconfig
import time
import zlib
from pathlib import Path

import torch
from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration
from transformers.utils import logging as hf_logging

from edgeseq.quant.gates import edit_distance

EXCLUDE = {"test", "tests", "idle_test", "site-packages", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
OFFSET, PAD, EOS = 3, 0, 1  # ByT5 byte vocabulary: id = byte + 3; pad 0, eos 1, unk 2
MIN_LEN, MAX_LEN = 20, 80
# Position-bias init (init_weights): relative-position buckets that heads 0, 1, ... start out favouring.
# Encoder (bidirectional buckets): offset -k -> bucket k, +k -> 16 + k; decoder (causal): -k -> k.
# Each head of the first layer starts out favouring one group of buckets: single nearby bytes for
# the first heads, then widening windows, so heads see a word's neighbourhood from the first step.
HEAD_INITS = {
    "near": ([(1,), (2,), (3,), (4,), (17,), (18,)], [(0,), (1,), (2,), (3,), (4,)]),
    "window": ([(1,), (2,), (3,), (4, 5, 6, 7), (8, 9), (10, 11), (17,), (12, 13, 14, 15)],
               [(0,), (1,), (2,), (3, 4, 5, 6), tuple(range(7, 15)), tuple(range(15, 21)), tuple(range(21, 32))]),
}
KEY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
KEY_STAGGER = (0.0, 0.25, 0.75)  # horizontal offset of each row on a QWERTY keyboard


def keyboard_neighbours() -> dict[str, str]:
    """Letter -> the letters on the keys touching it (same row +-1, rows above/below within 1 key)."""
    pos = {k: (c + KEY_STAGGER[r], r) for r, row in enumerate(KEY_ROWS) for c, k in enumerate(row)}
    return {a: "".join(b for b, (xb, yb) in pos.items() if b != a and abs(yb - ya) <= 1 and abs(xb - xa) <= 1)
            for a, (xa, ya) in pos.items()}


NEIGHBOURS = keyboard_neighbours()


def _near(ch: str, rng: random.Random) -> str:
    """A neighbouring key of a letter, in the same case."""
    n = rng.choice(NEIGHBOURS[ch.lower()])
    return n.upper() if ch.isupper() else n


def typo(word: str, rng: random.Random) -> str:
    """One keyboard error in a word of 2+ ASCII letters."""
    i = rng.randrange(len(word))
    kind = rng.choice(("sub", "del", "ins", "swap", "double") if len(word) >= 3 else ("sub", "ins", "swap", "double"))
    if kind == "sub":
        return word[:i] + _near(word[i], rng) + word[i + 1:]
    if kind == "del":
        return word[:i] + word[i + 1:]
    if kind == "ins":  # a neighbour of the letter, typed just before or just after it
        j = i + rng.randrange(2)
        return word[:j] + _near(word[i], rng) + word[j:]
    if kind == "swap":
        i = min(i, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + word[i] + word[i:]  # doubled letter


def add_typos(text: str, rng: random.Random, p_word: float, p_clean: float) -> str:
    if rng.random() < p_clean:
        return text
    return re.sub(r"[A-Za-z]{2,}", lambda m: typo(m.group(), rng) if rng.random() < p_word else m.group(), text)


def _pieces(sentence: str) -> list[str]:
    """The sentence itself if short enough, else consecutive word-boundary chunks of <= MAX_LEN bytes."""
    if len(sentence) <= MAX_LEN:
        return [sentence]
    out, cur = [], ""
    for w in sentence.split(" "):
        if cur and len(cur) + 1 + len(w) > MAX_LEN:
            out.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    return out + [cur]


def _keep(s: str) -> bool:
    return (s.isascii() and MIN_LEN <= len(s) <= MAX_LEN and ">>>" not in s
            and sum(c.isalpha() or c == " " for c in s) >= 0.85 * len(s))


def load_sentences() -> tuple[list[str], list[str], int, int]:
    """Deterministic (train, val) sentence lists from stdlib docstrings; val = modules with crc32 % 10 == 0."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not EXCLUDE & set(p.relative_to(root).parts))
    train: dict[str, None] = {}  # dicts: deduplicated, in first-seen order
    val: dict[str, None] = {}
    n_val_files = 0
    for p in files:
        rel = p.relative_to(root).as_posix()
        is_val = zlib.crc32(rel.encode()) % 10 == 0
        n_val_files += is_val
        try:
            tree = ast.parse(p.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            for para in re.split(r"\n\s*\n", doc):
                for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(para.split())):
                    for piece in _pieces(sent):
                        if _keep(piece):
                            (val if is_val else train)[piece] = None
    return list(train), [s for s in val if s not in train], len(files), n_val_files


def encode(text: str, eos: bool) -> list[int]:
    return [b + OFFSET for b in text.encode()] + ([EOS] if eos else [])


def decode(ids: list[int]) -> str:
    """Bytes of the ids up to the first EOS; pad/unk skipped (as edgeseq's ByteTokenizer(offset=3))."""
    ids = ids[: ids.index(EOS)] if EOS in ids else ids
    return bytes(i - OFFSET for i in ids if OFFSET <= i < 256 + OFFSET).decode("utf-8", errors="replace")


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(map(len, seqs))
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


def make_batch(pairs: list[tuple[str, str]], rng: random.Random, p_dec: float = 0.0, p_eos: float = 0.0) -> dict[str, torch.Tensor]:
    """(noisy, clean) pairs -> padded input_ids/attention_mask and labels (clean + EOS, -100 at padding).

    With ``p_dec`` > 0 the decoder's teacher-forced inputs (the labels shifted right behind the start
    token) get each byte replaced, with that probability, by another byte of the same sentence, as if
    the model had written a wrong byte; the labels stay clean (see module docstring)."""
    inputs = pad([encode(x, eos=rng.random() < p_eos) for x, _ in pairs], PAD)
    targets = [encode(y, eos=True) for _, y in pairs]
    batch = {"input_ids": inputs, "attention_mask": (inputs != PAD).long(), "labels": pad(targets, -100)}
    if p_dec > 0:
        dec = [[PAD] + [rng.choice(t[:-1]) if rng.random() < p_dec else i for i in t[:-1]] for t in targets]
        batch["decoder_input_ids"] = pad(dec, PAD)
    return batch


def epoch_batches(sentences: list[str], batch: int, rng: random.Random, pool: int = 16) -> list[list[str]]:
    """One shuffled pass in batches of similar length (less padding): pools of ``pool`` batches are
    sorted by length, cut into batches, and the batches shuffled."""
    order = rng.sample(sentences, len(sentences))
    out: list[list[str]] = []
    for i in range(0, len(order) - batch + 1, batch * pool):
        chunk = sorted(order[i : i + batch * pool], key=len)
        out += [chunk[j : j + batch] for j in range(0, len(chunk) - batch + 1, batch)]
    rng.shuffle(out)
    return out


@torch.no_grad()
def correct(model: T5ForConditionalGeneration, texts: list[str], batch: int = 50) -> list[str]:
    """Greedy generate() in batches (inputs as edgeseq's ByteTokenizer encodes them: no EOS)."""
    model.eval()
    out: list[str] = []
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        ids = pad([encode(t, eos=False) for t in chunk], PAD)
        gen = model.generate(input_ids=ids, attention_mask=(ids != PAD).long(), num_beams=1, do_sample=False,
                             max_new_tokens=max(len(t.encode()) for t in chunk) + 8)
        out += [decode(g[1:].tolist()) for g in gen]  # g[0] is the decoder start (pad)
    model.train()
    return out


@torch.no_grad()
def val_loss(model: T5ForConditionalGeneration, pairs: list[tuple[str, str]]) -> float:
    """Teacher-forced loss (nats/byte) on fixed noisy held-out pairs."""
    model.eval()
    rng = random.Random(0)
    losses = [model(**make_batch(pairs[i : i + 64], rng)).loss.item() for i in range(0, len(pairs), 64)]
    model.train()
    return sum(losses) / len(losses)


def init_weights(model: T5ForConditionalGeneration, bias: float, kind: str = "near") -> None:
    """Two changes to transformers' T5 initialisation that only shorten training (see module docstring).

    * Position-bias init: the first self-attention layer of each stack holds T5's relative position
      bias (an [num_buckets, num_heads] table shared by the layers above). Adding ``bias`` to one
      bucket per head makes heads 0-2 start out attending to one fixed neighbour: in the encoder
      the bytes 1, 2 and 3 to the left, in the decoder the current input byte and the 1 and 2 before
      it (the 4th head stays free). A decoder position can then match "the bytes I just wrote"
      against "the bytes before source position j" from the first step, which is how it learns to
      copy; left to find these heads alone it spent ~1000 of the steps below on a loss plateau.
    * An untied ``lm_head`` gets std 1 from transformers, so the first logits have std
      ~sqrt(d_model) and the loss starts near 20 nats; std d_model**-0.5 starts it near ln(259).
    """
    cfg = model.config
    with torch.no_grad():
        if not cfg.tie_word_embeddings:
            torch.nn.init.normal_(model.lm_head.weight, std=cfg.d_model**-0.5)
        # Bucket of relative offset -k is k for small k in both stacks (exact buckets).
        enc = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        dec = model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        n = cfg.num_heads - 1  # the last head starts free
        enc_heads, dec_heads = HEAD_INITS[kind]
        for head, buckets in enumerate(enc_heads[:n]):
            enc[list(buckets), head] += bias
        for head, buckets in enumerate(dec_heads[:n]):
            dec[list(buckets), head] += bias


def lr_factor(step: int, total: int) -> float:
    """Linear warmup over 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="edgeseq/zoo/t5-typo-bytes")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--enc-layers", type=int, default=3)
    ap.add_argument("--dec-layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-kv", type=int, default=16)
    ap.add_argument("--head-init", default="window", choices=sorted(HEAD_INITS))
    ap.add_argument("--tie", type=int, default=0, help="tie input embeddings and lm_head (1) or not (0)")
    ap.add_argument("--bias-init", type=float, default=8.0, help="position-bias init (see init_weights); 0 = off")
    ap.add_argument("--p-word", type=float, default=0.2, help="per-word typo probability in noisy inputs")
    ap.add_argument("--p-clean", type=float, default=0.2, help="fraction of inputs left clean")
    ap.add_argument("--p-dec", type=float, default=0.05, help="decoder-input byte replacement rate")
    ap.add_argument("--p-eos", type=float, default=0.5, help="fraction of inputs ending with EOS")
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t_start = time.time()
    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    train, val, n_files, n_val_files = load_sentences()
    eval_rng = random.Random(1_000_003)  # fixed held-out set, independent of --seed
    eval_clean = eval_rng.sample(val, min(args.n_eval, len(val)))
    eval_pairs = [(add_typos(s, eval_rng, args.p_word, args.p_clean), s) for s in eval_clean]
    loss_pairs = [(add_typos(s, eval_rng, args.p_word, args.p_clean), s) for s in val[:256]]

    cfg = T5Config(vocab_size=256 + OFFSET, d_model=args.d_model, d_kv=args.d_kv, d_ff=args.d_ff, num_layers=args.enc_layers,
                   num_decoder_layers=args.dec_layers, num_heads=args.heads, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=bool(args.tie), pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
    model = T5ForConditionalGeneration(cfg)
    init_weights(model, args.bias_init, args.head_init)
    # 4 beams: measured on the held-out set, fewer runaway outputs than greedy (see docs/zoo.md);
    # max_length: room for the longest training target (MAX_LEN bytes) three times over, since
    # transformers (and edgeseq, which honours the config) would otherwise stop at 20 tokens
    model.generation_config = GenerationConfig(decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
                                               num_beams=4, max_length=256)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]  # layer norm scales
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps))
    rng = random.Random(args.seed)
    log = [f"corpus: {n_files} stdlib files ({n_val_files} held out by crc32(path) % 10 == 0), "
           f"train {len(train)} sentences, val {len(val)} sentences",
           f"params: {sum(p.numel() for p in model.parameters())}  args: {vars(args)}"]
    print(*log, sep="\n", flush=True)
    model.train()
    step, ema, batches = 0, None, iter(())
    while step < args.steps:
        clean = next(batches, None)
        if clean is None:
            batches = iter(epoch_batches(train, args.batch, rng))
            clean = next(batches)
        batch = make_batch([(add_typos(s, rng, args.p_word, args.p_clean), s) for s in clean], rng, args.p_dec, args.p_eos)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps:
            msg = f"step {step} loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e} t {time.time() - t_start:.0f}s"
            if step % 200 == 0 or step == args.steps:
                msg += f" val {val_loss(model, loss_pairs):.4f}"
            print(msg, flush=True)
            log.append(msg)
    train_time = time.time() - t_start

    outputs = correct(model, [x for x, _ in eval_pairs])
    n_chars = sum(len(y) for _, y in eval_pairs)
    cer_in = sum(edit_distance(x, y) for x, y in eval_pairs) / n_chars
    cer_out = sum(edit_distance(o, y) for o, (_, y) in zip(outputs, eval_pairs)) / n_chars
    exact_in = sum(x == y for x, y in eval_pairs) / len(eval_pairs)
    exact_out = sum(o == y for o, (_, y) in zip(outputs, eval_pairs)) / len(eval_pairs)
    out = Path(args.out)
    model.save_pretrained(out, safe_serialization=True)
    (out / "edgeseq_tokenizer.json").write_text(json.dumps({"type": "bytes", "offset": OFFSET}) + "\n")
    done = [f"steps {step}, train time {train_time:.0f}s",
            f"held-out ({len(eval_pairs)} sentences, greedy, max_new_tokens=len+8): "
            f"input CER {cer_in:.4f}  output CER {cer_out:.4f}  "
            f"exact match input {exact_in:.3f} output {exact_out:.3f}"]
    shown = [i for i, (x, y) in enumerate(eval_pairs) if x != y][:5]
    for i in shown:
        done += [f"  in:  {eval_pairs[i][0]!r}", f"  out: {outputs[i]!r}", f"  ref: {eval_pairs[i][1]!r}"]
    done.append(f"total wall time {time.time() - t_start:.0f}s")
    done.append(f"config (non-default): {json.dumps(cfg.to_diff_dict(), sort_keys=True)}")
    print(*done, sep="\n", flush=True)
    (out / "train_log.txt").write_text("\n".join(log + done) + "\n")


if __name__ == "__main__":
    main()
