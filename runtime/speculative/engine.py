"""The speculative decoding loop: draft, verify in one call, accept, commit.

Each round feeds the last decided token (the root) plus a draft to the target in one call and
keeps the longest path the target agrees with, plus one token of the target's own (the
correction, or a bonus after a full accept): a round always makes progress, and a draft costs
nothing but time when it is wrong.

- Greedy: a node is accepted iff it is the target's argmax after its parent, so the output is
  token-identical to plain greedy decoding (Leviathan et al., 2023; Chen et al., 2023).
- Sampling: every draft here is a point mass (model-free drafts, and draft models drafting
  greedily), so speculative sampling reduces to: accept node d with probability p(d); on a
  reject, draw from p with d removed and renormalised. The output distribution is exactly the
  target's p at every position. Trees are cut to their first path when sampling.
- Draft length adapts to acceptance. Model drafts follow transformers' assistant "heuristic"
  schedule (+2 after a fully accepted draft, -1 otherwise). Free drafts (input, n-gram,
  recycling) go back to the plan's bound after a full accept and to about twice the accepted
  length otherwise, at least 4: after a correction an input-guided draft is a guess, and a
  short verify chunk is cheaper when it is wrong (each token of a chunk costs ~6% of a
  round's fixed cost on the typo fixer). Replayed on the typo workload's outputs, a floor of 4
  needed 1.5% less verification time than 2 for input-guided drafts and 2% for prompt lookup.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from edgeseq.runtime.decoding import SamplingConfig, next_token, probabilities
from edgeseq.runtime.speculative.drafts import Draft, DraftSource


@dataclass
class SpecStats:
    """Counters of one or more generations."""

    rounds: int = 0          # verification calls (a round with an empty draft is a plain step)
    drafted: int = 0         # draft tokens offered to the target (nodes of trees)
    accepted: int = 0        # draft tokens kept
    emitted: int = 0         # tokens generated
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    k_history: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verify(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "emitted": self.emitted, "acceptance_rate": round(self.acceptance_rate, 4),
                "tokens_per_verify": round(self.tokens_per_verify, 4),
                "draft_seconds": round(self.draft_seconds, 4),
                "verify_seconds": round(self.verify_seconds, 4),
                "mean_k": round(float(np.mean(self.k_history)), 3) if self.k_history else 0.0}


class EarlyExitSource(DraftSource):
    """Kangaroo (Liu et al., 2024): the target's first N layers and its head draft, until the
    shallow head's top probability falls below ``threshold``. No second model is loaded; the
    drafter's state is the first layers' part of the target's."""

    name = "early-exit"

    def __init__(self, target: Any, threshold: float = 0.5):
        self.target = target
        self.threshold = threshold

    def propose(self, context: Sequence[int], k: int, width: int = 1) -> Draft:
        return self.target.exit_draft(int(context[-1]), k, self.threshold)


# Tokens a draft model catches up on with its prefill graph rather than step by step (a chunk
# call costs a few steps: below this, stepping is cheaper)
PREFILL_CATCH_UP = 8


class DraftModelSource(DraftSource):
    """A smaller model from another bundle sharing the tokenizer (Leviathan et al.; Big Little
    Decoder's small model). Its own state follows the context: snapshots taken while drafting
    let it roll back to the accepted prefix without replaying it."""

    name = "draft"

    def __init__(self, session: Any, window: int | None = None):
        from edgeseq.runtime.seq2seq import Seq2SeqSession

        self.s = session
        # A causal drafter reads only the prompt's last ``window`` tokens (0: all of it); by
        # default one call of its prefill graph. A draft only proposes (the target decides), and
        # a one-layer SSM's state forgets far context anyway: on benchmarks/speculative.py's
        # 160-byte code prompts acceptance went from 0.766 to 0.756 while the drafter's prompt
        # cost fell from 5 prefill calls to 1 (end to end 1.34x -> 1.39x on ORT).
        runners = session.model.runners
        if window is None:
            window = int(runners["prefill"].entry.max_chunk or 0) if "prefill" in runners else 0
        self.window = window
        self.seq2seq = isinstance(session, Seq2SeqSession)
        # ``draft_loop`` (``convert --draft-loop K``): K greedy steps in one call, with the state
        # after each as rollback points; else a step call (and a snapshot) per drafted token
        self.loop = "draft_loop" in session.model.runners
        if self.loop:
            entry = session.model.runners["draft_loop"].entry
            self.loop_k = int(entry.outputs[0].shape[1])
            self.loop_names = [f"trace.{st.name}" for st in entry.state]
        # a plan short of memory loads no step graph: single tokens go through prefill
        self.has_step = "step" in runners or self.seq2seq

    def start(self, context: Sequence[int], source: Any = None) -> None:
        if self.seq2seq:
            self.s.encode(source)
            self.s.start(1)
        else:
            self.s.reset(1)
        # a causal drafter reads only the prompt's last ``window`` tokens
        self.skip = 0 if self.seq2seq or not self.window else max(0, len(context) - 1 - self.window)
        self.fed: list[int] = []
        self.snaps: dict[int, tuple[list[np.ndarray], int]] = {}
        self.traced: tuple[int, dict[str, np.ndarray]] | None = None  # (len(fed) before, traces)

    def _run(self, tok: int) -> np.ndarray:
        if not self.has_step:
            return self.s.prefill(np.array([[tok]], dtype=np.int64))[0, -1]
        return self.s.step(np.array([tok]))[0]

    def _can_restore(self, n: int) -> bool:
        if n in self.snaps:
            return True
        return self.traced is not None and 0 < n - self.traced[0] <= self.loop_k

    def _restore(self, n: int) -> None:
        if n in self.snaps:
            arrays, pos = self.snaps[n]
        else:                         # a draft_loop trace: the state after fed[:n]
            n0, traces = self.traced
            arrays = [traces[name][:, n - n0 - 1] for name in self.loop_names]
            pos = self.s.position - (len(self.fed) - n)
        self.s._state = self.s.model.assign(self.s._state, arrays)
        self.s.position = pos
        self.fed = self.fed[:n]

    def _sync(self, consumed: list[int]) -> np.ndarray | None:
        """Bring the drafter to having consumed exactly ``consumed``; return its last logits."""
        common = 0
        for a, b in zip(self.fed, consumed):
            if a != b:
                break
            common += 1
        if common < len(self.fed):
            if self._can_restore(common):
                self._restore(common)
            else:                      # nothing to roll back to: start over
                self.s.reset(1) if not self.seq2seq else self.s.start(1)
                self.fed = []
        logits = None
        todo = consumed[len(self.fed):]
        if todo and (len(todo) >= PREFILL_CATCH_UP or not self.has_step) and not self.seq2seq:
            # a prompt, or a long accepted run: one chunked call instead of a step per token
            logits = self.s.prefill(np.asarray([todo], dtype=np.int64), last_only=True)[0]
            self.fed.extend(todo)
            return logits
        for tok in todo:
            logits = self._run(tok)
            self.fed.append(tok)
        return logits

    def propose(self, context: Sequence[int], k: int, width: int = 1) -> Draft:
        ctx = [int(t) for t in context[self.skip:]]
        self._sync(ctx[:-1])
        self.snaps, self.traced = {}, None
        if self.loop and not self.seq2seq and (k > 1 or not self.has_step):
            # one call drafts loop_k tokens (k of them are offered); it consumed the root and
            # the first loop_k - 1 drafted tokens, and its traces are the states after each
            n0 = len(self.fed)
            self.snaps[n0] = (self.s.model.to_numpy(self.s._state), self.s.position)
            out, self.s._state = self.s.model.run(
                "draft_loop", {"input_ids": np.array([ctx[-1]])}, self.s._state)
            toks = [int(t) for t in out["tokens"][0]]
            self.fed += [ctx[-1], *toks[:-1]]
            self.s.position += self.loop_k
            self.traced = (n0, {n: out[n] for n in self.loop_names})
            return Draft.chain(toks[:k])
        tok, out = ctx[-1], []
        for _ in range(k):
            self.snaps[len(self.fed)] = (self.s.model.to_numpy(self.s._state), self.s.position)
            logits = self._run(tok)
            self.fed.append(tok)
            tok = int(np.argmax(logits))
            out.append(tok)
        return Draft.chain(out)


def _depth(draft: Draft) -> int:
    """Longest root-to-leaf path (a chain: its length)."""
    return len(draft) if draft.is_chain else int(draft.depth().max(initial=0))


class SpeculativeDecoder:
    """Greedy or sampled generation over a target (``targets.CausalTarget`` or
    ``targets.Seq2SeqTarget``) with one draft source, under a memory plan's bounds."""

    def __init__(self, target: Any, source: DraftSource, k: int = 4, k_max: int = 8,
                 width: int = 1, adaptive: bool = True):
        self.target = target
        self.source = source
        self.k0 = max(1, k)
        self.k_max = max(1, k_max)
        self.width = max(1, width)
        self.adaptive = adaptive
        self.stats = SpecStats()

    def stream(self, context: Sequence[int], max_new_tokens: int, cfg: SamplingConfig,
               rng: np.random.Generator, eos: set[int], source: Any = None,
               source_tokens: Sequence[int] | None = None, processors: Any = None
               ) -> Iterator[int]:
        """Yield new tokens. ``context``: the tokens so far (its last one is fed first);
        ``source``: an encoder-decoder's input; ``processors``: logits processors given the
        token sequence (encoder-decoders' generation config)."""
        t = self.target
        seq = [int(x) for x in context]
        root = t.start(seq, source)
        # a draft model encodes the input itself (speech features included); model-free
        # sources read token ids only
        self.source.start(seq, source if isinstance(self.source, DraftModelSource)
                          else source_tokens)
        k = min(self.k0, self.k_max)
        made = 0
        st = self.stats
        while made < max_new_tokens:
            room = min(max_new_tokens - made - 1, t.max_chunk - 1, t.capacity_left() - 1, k)
            t0 = time.perf_counter()
            draft = self.source.propose(seq, room, self.width) if room > 0 else Draft.empty()
            width = self.width if not cfg.do_sample else 1
            chain = draft.is_chain
            if chain:       # the common case, without truncate's walk over the nodes
                if len(draft) > room:
                    draft = Draft.chain(draft.tokens[:max(0, room)])
            else:
                draft = draft.truncate(t.max_nodes(room, width), max(0, room), width)
                chain = draft.is_chain
            t1 = time.perf_counter()
            logits = t.verify(root, draft)                       # (n+1, v)
            path, nxt = self._accept(seq, draft, logits, cfg, rng, processors)
            t.commit(path)
            t2 = time.perf_counter()
            st.draft_seconds += t1 - t0
            st.verify_seconds += t2 - t1
            st.rounds += 1
            st.drafted += len(draft)
            st.accepted += len(path)
            st.k_history.append(len(draft))
            consumed = np.concatenate([np.array([root], dtype=np.int64), draft.tokens])
            self.source.feedback(seq, draft, len(path), consumed, logits)
            new = draft.tokens[path].tolist() + [nxt]
            if len(draft):
                full = len(path) == (len(draft) if chain else len(draft.paths()[0]))
                if self.adaptive:       # model drafts: each token costs a drafter step
                    k = min(self.k_max, k + 2) if full else max(1, k - 1)
                else:                   # free drafts: only the verify chunk's length costs
                    k = self.k_max if full else max(4, min(self.k_max, 2 * len(path) + 2))
            for tok in new:
                seq.append(tok)
                made += 1
                st.emitted += 1
                yield tok
                if tok in eos or made >= max_new_tokens:
                    return
            root = nxt

    def _scores(self, seq: list[int], row: np.ndarray, processors: Any) -> np.ndarray:
        if processors is None:
            return row[None].astype(np.float32)
        return processors(np.array([seq]), row[None].astype(np.float32))

    def _accept(self, seq: list[int], draft: Draft, logits: np.ndarray, cfg: SamplingConfig,
                rng: np.random.Generator, processors: Any) -> tuple[list[int], int]:
        """Walk the tree from the root; return the accepted node path and the next token."""
        greedy_rows = not cfg.do_sample and (
            processors is None or processors.passthrough(len(seq), _depth(draft) + 1))
        if greedy_rows and draft.is_chain:
            # greedy with nothing to process: the argmax of all rows at once
            best = logits.argmax(-1)
            hit = best[:-1] == draft.tokens
            m = int(np.argmin(np.append(hit, False)))
            return list(range(m)), int(best[m])
        # Python ints: a tree has a few dozen nodes, where numpy's per-call cost dominates
        toks = draft.tokens.tolist()
        children: dict[int, list[int]] = {}
        for i, p in enumerate(draft.parents.tolist()):
            children.setdefault(p, []).append(i)
        if greedy_rows:
            # a tree, greedy, nothing to process: follow the child whose token is its
            # parent's argmax, every row's argmax taken at once
            want = logits.argmax(-1).tolist()
            path, node = [], -1
            while True:
                tok = want[node + 1]
                node = next((c for c in children.get(node, ()) if toks[c] == tok), None)
                if node is None:
                    return path, tok
                path.append(node)
        path: list[int] = []
        node, prefix = -1, list(seq)
        while True:
            scores = self._scores(prefix, logits[node + 1], processors)
            kids = children.get(node, [])
            if not cfg.do_sample:
                best = int(next_token(scores, cfg, rng)[0])
                nxt = next((c for c in kids if toks[c] == best), None)
                if nxt is None:
                    return path, best
            else:
                p = probabilities(scores, cfg)[0]
                if not kids:
                    return path, int(min(np.searchsorted(np.cumsum(p), rng.random(), "right"),
                                         len(p) - 1))
                nxt = kids[0]
                d = int(draft.tokens[nxt])
                if rng.random() >= p[d]:
                    p = p.copy()
                    p[d] = 0.0
                    p /= p.sum()
                    return path, int(min(np.searchsorted(np.cumsum(p), rng.random(), "right"),
                                         len(p) - 1))
            path.append(nxt)
            prefix.append(int(draft.tokens[nxt]))
            node = nxt
