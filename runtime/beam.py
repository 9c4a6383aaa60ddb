"""Beam search and diverse (group) beam search over a step function that reorders its cache.

Beam search follows transformers' vectorised implementation step for step (top ``2 * beams``
candidates, finished hypotheses scored ``sum log p / len ** length_penalty``, its early-stopping
heuristics), so a bundle returns the same beams as the source model's ``generate``.

Diverse beam search (Vijayakumar et al., 2016, "Diverse Beam Search") splits the beams into
groups decoded in turn at each step; a group's scores are lowered by ``diversity_penalty`` times
the number of times earlier groups picked each token at this step (Hamming diversity). transformers
moved it out of its core library, so this one is checked by its properties, not token for token.

The caller's ``step(tokens (rows,), position) -> logits (rows, v)`` runs the decoder; ``reorder(
index)`` makes row i of the cache a copy of row ``index[i]`` (for a growing cache: crop and gather).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgeseq.runtime.processors import Processors, log_softmax

NEG = -1.0e9


@dataclass
class Hypothesis:
    tokens: list[int]   # new tokens (the decoder prompt excluded), EOS included if it ended so
    score: float


class _Group:
    """One group's running and finished beams (transformers' ``_beam_search`` state, batch 1)."""

    def __init__(self, prompt: list[int], beams: int, max_length: int, eos: list[int],
                 length_penalty: float, early_stopping: bool | str):
        self.beams, self.max_length, self.eos = beams, max_length, eos
        self.lp, self.es = length_penalty, early_stopping
        self.prompt_len = len(prompt)
        self.running = np.full((beams, max_length), -1, dtype=np.int64)
        self.running[:, :len(prompt)] = prompt
        self.run_scores = np.zeros(beams, dtype=np.float32)
        self.run_scores[1:] = NEG
        self.finished = self.running.copy()
        self.fin_scores = np.full(beams, NEG, dtype=np.float32)
        self.fin_flags = np.zeros(beams, dtype=bool)
        self.fin_len = np.zeros(beams, dtype=np.int64)
        self.heuristic_open = True
        self.keep = max(2, 1 + len(eos)) * beams

    def step(self, log_probs: np.ndarray, cur: int) -> tuple[np.ndarray, bool]:
        """log_probs (beams, v) processed; returns (parent of each new running beam, done)."""
        v = log_probs.shape[1]
        acc = (log_probs + self.run_scores[:, None]).reshape(-1)
        top = np.argsort(-acc, kind="stable")[:self.keep]
        top_lp = acc[top].astype(np.float32)
        parent, tok = top // v, top % v
        seqs = self.running[parent].copy()
        seqs[:, cur] = tok
        hits = np.isin(tok, self.eos) | (cur + 1 >= self.max_length)
        # running beams for the next step
        run_lp = top_lp + hits.astype(np.float32) * NEG
        nxt = np.argsort(-run_lp, kind="stable")[:self.beams]
        self.running, self.run_scores = seqs[nxt], run_lp[nxt]
        # finished hypotheses
        just = hits & (np.arange(self.keep) < self.beams)
        fin = top_lp / np.float32((cur + 1 - self.prompt_len) ** self.lp)
        if self.fin_flags.all() and self.es is True:
            fin = fin + NEG
        if not self.heuristic_open:
            fin = fin + NEG
        fin = fin + (~just).astype(np.float32) * NEG
        m_seq = np.concatenate([self.finished, seqs])
        m_sc = np.concatenate([self.fin_scores, fin])
        m_fl = np.concatenate([self.fin_flags, just])
        m_len = np.concatenate([self.fin_len, np.full(self.keep, cur + 1)])
        best = np.argsort(-m_sc, kind="stable")[:self.beams]
        self.finished, self.fin_scores = m_seq[best], m_sc[best]
        self.fin_flags, self.fin_len = m_fl[best], m_len[best]
        cur += 1
        # can a running beam still beat the worst finished one?
        if self.es == "never" and self.lp > 0:
            best_len = self.max_length - self.prompt_len
        else:
            best_len = cur - self.prompt_len
        best_running = self.run_scores[0] / np.float32(best_len ** self.lp)
        worst = np.where(self.fin_flags, self.fin_scores.min(), NEG)
        self.heuristic_open = self.heuristic_open and bool(np.any(best_running > worst))
        open_beam = not (self.fin_flags.all() and self.es is True)
        done = not (self.heuristic_open and open_beam and not hits.all())
        return parent[nxt], done

    def results(self) -> list[Hypothesis]:
        out = []
        for seq, sc, n in zip(self.finished, self.fin_scores, self.fin_len):
            out.append(Hypothesis(seq[self.prompt_len:n].tolist(), float(sc)))
        return out


def beam_search(step: Callable[[np.ndarray, int], np.ndarray],
                reorder: Callable[[np.ndarray], None], prompt: list[int], num_beams: int,
                max_new_tokens: int, processors: Processors, length_penalty: float = 1.0,
                early_stopping: bool | str = False, num_beam_groups: int = 1,
                diversity_penalty: float = 0.0, num_return_sequences: int = 1
                ) -> list[Hypothesis]:
    """Best hypotheses, best first. The caller has fed nothing yet: rows = ``num_beams``, each
    row's cache empty; ``step`` is called with the prompt tokens first (teacher forcing)."""
    if num_beams % num_beam_groups:
        raise ValueError(f"num_beams ({num_beams}) must be divisible by num_beam_groups "
                         f"({num_beam_groups})")
    if num_return_sequences > num_beams:
        raise ValueError("num_return_sequences cannot exceed num_beams")
    per = num_beams // num_beam_groups
    max_length = len(prompt) + max_new_tokens
    groups = [_Group(prompt, per, max_length, processors.eos, length_penalty, early_stopping)
              for _ in range(num_beam_groups)]
    rows = np.full(num_beams, prompt[0], dtype=np.int64)
    logits = step(rows, 0)
    for pos in range(1, len(prompt)):  # the rest of a multi-token decoder prompt
        logits = step(np.full(num_beams, prompt[pos], dtype=np.int64), pos)
    cur = len(prompt)
    while True:
        parents = np.zeros(num_beams, dtype=np.int64)
        tokens = np.zeros(num_beams, dtype=np.int64)
        picked = np.zeros(logits.shape[1], dtype=np.float32)
        done_all = True
        for gi, g in enumerate(groups):
            sl = slice(gi * per, (gi + 1) * per)
            lp = processors(g.running[:, :cur], log_softmax(logits[sl]))
            if num_beam_groups > 1 and diversity_penalty:
                lp = lp - diversity_penalty * picked[None, :]
            parent, done = g.step(lp, cur)
            parents[sl] = parent + gi * per
            tokens[sl] = g.running[:, cur]
            np.add.at(picked, tokens[sl], 1.0)
            done_all &= done
        cur += 1
        if done_all or cur >= max_length:
            break
        reorder(parents)
        logits = step(tokens, cur - 1)
    hyps = [h for g in groups for h in g.results()]
    hyps.sort(key=lambda h: -h.score)
    return hyps[:num_return_sequences]
