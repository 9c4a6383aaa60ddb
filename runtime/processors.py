"""Logits processors a checkpoint's generation config asks for, in numpy.

They reproduce transformers' processors of the same names, in the order its ``generate`` applies
them (``GenerationMixin._get_logits_processor``), so a bundle decodes as the source model does:
repetition penalty, no-repeat n-grams, encoder no-repeat n-grams, bad words (single- and
multi-token), minimum length (``min_length`` / ``min_new_tokens``), forced BOS, forced EOS,
suppressed tokens, suppressed tokens at the first position, then the family's own, then
renormalisation. Each takes the decoder tokens so far (rows, cur_len) — the decoder prompt
included, as transformers counts them — and scores (rows, v), and returns new scores. Which
generation fields exist and which are honoured: ``edgeseq.generation``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from edgeseq.limits import check_finite

NEG_INF = -np.inf


@dataclass
class Processors:
    eos: list[int] = field(default_factory=list)
    max_length: int = 0                 # decoder prompt + max new tokens
    prompt_len: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    encoder_ngram_size: int = 0
    source: list[int] = field(default_factory=list)   # encoder input ids (encoder n-grams)
    bad_tokens: list[int] = field(default_factory=list)
    bad_sequences: list[list[int]] = field(default_factory=list)   # bad words of 2+ tokens
    min_length: int = 0
    forced_bos: int | None = None
    forced_eos: int | None = None
    suppress: list[int] = field(default_factory=list)
    begin_suppress: list[int] = field(default_factory=list)
    begin_index: int = 1
    renormalize: bool = False
    # processors of one model family (Whisper's timestamp rules), applied after the rest in
    # the order given, as transformers appends them
    extra: list[Callable[[np.ndarray, np.ndarray], np.ndarray]] = field(default_factory=list)

    @classmethod
    def from_config(cls, gen: dict[str, Any], prompt_len: int, max_new_tokens: int,
                    ignore_eos: bool = False, speech: bool = False,
                    source: Sequence[int] | None = None) -> "Processors":
        """The processors ``gen`` (a manifest's ``config["generation"]``) asks for.
        ``source``: the encoder's input ids (encoder n-grams; speech has none)."""
        eos = gen.get("eos_token_id")
        eos_list = [] if eos is None or ignore_eos else list(eos if isinstance(eos, list) else [eos])
        bad, bad_seqs = [], []
        for seq in gen.get("bad_words_ids") or []:
            seq = [int(t) for t in seq]
            if len(seq) == 1 and seq[0] in eos_list:
                continue  # transformers never bans an EOS id given alone
            if len(seq) == 1:
                bad.append(seq[0])
            else:
                bad_seqs.append(seq)
        forced_bos = gen.get("forced_bos_token_id")
        # transformers starts begin-suppression one step later when it forces a BOS after a
        # one-token prompt; Whisper's own generate suppresses at the first new position
        begin = prompt_len if (prompt_len > 1 or forced_bos is None or speech) else prompt_len + 1
        min_new = gen.get("min_new_tokens")
        # transformers turns min_new_tokens into min_length (it takes precedence)
        min_length = prompt_len + int(min_new) if min_new else int(gen.get("min_length") or 0)
        enc_n = int(gen.get("encoder_no_repeat_ngram_size") or 0)
        return cls(eos=eos_list, max_length=prompt_len + max_new_tokens, prompt_len=prompt_len,
                   repetition_penalty=check_finite("repetition_penalty",
                                                   gen.get("repetition_penalty") or 1.0),
                   no_repeat_ngram_size=int(gen.get("no_repeat_ngram_size") or 0),
                   encoder_ngram_size=0 if speech or source is None else enc_n,
                   source=[] if speech or source is None else [int(t) for t in source],
                   bad_tokens=bad, bad_sequences=bad_seqs,
                   min_length=0 if ignore_eos else min_length,
                   forced_bos=forced_bos,
                   forced_eos=gen.get("forced_eos_token_id"),  # transformers keeps it too
                   suppress=list(gen.get("suppress_tokens") or []),
                   begin_suppress=list(gen.get("begin_suppress_tokens") or []),
                   begin_index=begin, renormalize=bool(gen.get("renormalize_logits")))

    def passthrough(self, cur: int, n: int) -> bool:
        """True if no rule changes the argmax of sequences ``cur`` to ``cur + n - 1`` long (a
        speculative verifier then takes the argmax of all its rows at once; renormalising
        moves every score of a row by one constant)."""
        last = cur + n - 1
        return (not self.extra and self.repetition_penalty == 1.0 and not self.no_repeat_ngram_size
                and not self.encoder_ngram_size
                and not self.bad_tokens and not self.bad_sequences and not self.suppress
                and not (self.eos and cur < self.min_length)
                and not (self.forced_bos is not None and cur <= 1 <= last)
                and not (self.forced_eos is not None and cur <= self.max_length - 1 <= last)
                and not (self.begin_suppress and cur <= self.begin_index <= last))

    def __call__(self, seqs: np.ndarray, scores: np.ndarray) -> np.ndarray:
        s = scores.copy()
        cur = seqs.shape[1]
        if self.repetition_penalty != 1.0:
            for r in range(s.shape[0]):
                ids = np.unique(seqs[r])
                x = s[r, ids]
                s[r, ids] = np.where(x < 0, x * self.repetition_penalty, x / self.repetition_penalty)
        n = self.no_repeat_ngram_size
        if n and cur + 1 >= n:
            for r in range(s.shape[0]):
                s[r, _banned_ngram_tokens(seqs[r].tolist(), n)] = NEG_INF
        n = self.encoder_ngram_size
        if n and cur + 1 >= n:
            for r in range(s.shape[0]):
                s[r, _encoder_ngram_tokens(self.source, seqs[r].tolist(), n)] = NEG_INF
        if self.bad_tokens:
            s[:, self.bad_tokens] = NEG_INF
        for seq in self.bad_sequences:
            # transformers looks only at sequences the context is long enough to complete
            if len(seq) <= cur:
                rows = (seqs[:, cur - len(seq) + 1:] == np.asarray(seq[:-1])).all(1)
                s[rows, seq[-1]] = NEG_INF
        if self.eos and cur < self.min_length:
            s[:, self.eos] = NEG_INF
        if self.forced_bos is not None and cur == 1:
            s[:] = NEG_INF
            s[:, self.forced_bos] = 0
        if self.forced_eos is not None and cur == self.max_length - 1:
            s[:] = NEG_INF
            s[:, self.forced_eos] = 0
        if self.suppress:
            s[:, self.suppress] = NEG_INF
        if self.begin_suppress and cur == self.begin_index:
            s[:, self.begin_suppress] = NEG_INF
        for proc in self.extra:
            s = proc(seqs, s)
        if self.renormalize:
            s = log_softmax(s)
        return s


def _banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in ``seq``."""
    prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    banned = []
    for i in range(len(seq) - n + 1):
        if tuple(seq[i:i + n - 1]) == prefix:
            banned.append(seq[i + n - 1])
    return banned


def _encoder_ngram_tokens(source: list[int], seq: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram of the encoder's input (transformers'
    ``EncoderNoRepeatNGramLogitsProcessor``)."""
    prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    return [source[i + n - 1] for i in range(len(source) - n + 1)
            if tuple(source[i:i + n - 1]) == prefix]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
