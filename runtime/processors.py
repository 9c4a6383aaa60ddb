"""Logits processors a checkpoint's generation config asks for, in numpy.

They reproduce transformers' processors of the same names, in the order its ``generate`` applies
them, so a bundle decodes as the source model does: repetition penalty, no-repeat n-grams, bad
(single-token) words, minimum length, forced BOS, forced EOS, suppressed tokens, suppressed tokens
at the first position. Each takes the decoder tokens so far (rows, cur_len) — the decoder prompt
included, as transformers counts them — and scores (rows, v), and returns new scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

NEG_INF = -np.inf


@dataclass
class Processors:
    eos: list[int] = field(default_factory=list)
    max_length: int = 0                 # decoder prompt + max new tokens
    prompt_len: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_tokens: list[int] = field(default_factory=list)
    min_length: int = 0
    forced_bos: int | None = None
    forced_eos: int | None = None
    suppress: list[int] = field(default_factory=list)
    begin_suppress: list[int] = field(default_factory=list)
    begin_index: int = 1
    # processors of one model family (Whisper's timestamp rules), applied after the rest in
    # the order given, as transformers appends them
    extra: list[Callable[[np.ndarray, np.ndarray], np.ndarray]] = field(default_factory=list)

    @classmethod
    def from_config(cls, gen: dict[str, Any], prompt_len: int, max_new_tokens: int,
                    ignore_eos: bool = False, speech: bool = False) -> "Processors":
        eos = gen.get("eos_token_id")
        eos_list = [] if eos is None or ignore_eos else list(eos if isinstance(eos, list) else [eos])
        bad = []
        for seq in gen.get("bad_words_ids") or []:
            if len(seq) == 1:  # multi-token bad words are not supported: documented
                bad.append(int(seq[0]))
        forced_bos = gen.get("forced_bos_token_id")
        # transformers starts begin-suppression one step later when it forces a BOS after a
        # one-token prompt; Whisper's own generate suppresses at the first new position
        begin = prompt_len if (prompt_len > 1 or forced_bos is None or speech) else prompt_len + 1
        return cls(eos=eos_list, max_length=prompt_len + max_new_tokens, prompt_len=prompt_len,
                   repetition_penalty=float(gen.get("repetition_penalty") or 1.0),
                   no_repeat_ngram_size=int(gen.get("no_repeat_ngram_size") or 0),
                   bad_tokens=bad,
                   min_length=0 if ignore_eos else int(gen.get("min_length") or 0),
                   forced_bos=forced_bos,
                   forced_eos=gen.get("forced_eos_token_id"),  # transformers keeps it too
                   suppress=list(gen.get("suppress_tokens") or []),
                   begin_suppress=list(gen.get("begin_suppress_tokens") or []),
                   begin_index=begin)

    def passthrough(self, cur: int, n: int) -> bool:
        """True if no rule changes the scores of sequences ``cur`` to ``cur + n - 1`` long (a
        speculative verifier then takes the argmax of all its rows at once)."""
        last = cur + n - 1
        return (not self.extra and self.repetition_penalty == 1.0 and not self.no_repeat_ngram_size
                and not self.bad_tokens and not self.suppress
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
        if self.bad_tokens:
            s[:, self.bad_tokens] = NEG_INF
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
        return s


def _banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in ``seq``."""
    prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    banned = []
    for i in range(len(seq) - n + 1):
        if tuple(seq[i:i + n - 1]) == prefix:
            banned.append(seq[i + n - 1])
    return banned


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
