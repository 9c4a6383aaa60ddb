"""Model-free draft sources for speculative decoding.

A draft source guesses the next few tokens cheaply; the target model then checks all of them in one
forward pass and keeps the longest prefix (or tree path) it agrees with. Three sources that need no
draft model:

* ``PromptLookup`` ("ngram"): prompt lookup decoding (Saxena 2023) -- copy what followed the latest
  earlier occurrence of the last n tokens.
* ``InputGuided`` ("input"): input-guided aggressive decoding (Sun et al. 2021, Ge et al. 2022) --
  for outputs that mostly copy their input, follow an alignment pointer into the input.
* ``TokenRecycling`` ("recycle"): Token Recycling (Luo et al. 2024) -- keep the target's top
  candidates after each token in a small adjacency matrix and draft a tree from it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(eq=False)
class Draft:
    """Draft tokens as a tree: node i has token tokens[i] and parent parents[i] (-1 = child of the
    last context token). Nodes are in topological order (parent index < own index). A chain has
    parents == [-1, 0, 1, ..., n-2]."""
    tokens: np.ndarray   # (n,) int64
    parents: np.ndarray  # (n,) int64

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=np.int64).reshape(-1)
        self.parents = np.asarray(self.parents, dtype=np.int64).reshape(-1)
        if self.tokens.shape != self.parents.shape:
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.parents)} parents")
        idx = np.arange(len(self.parents))
        if ((self.parents < -1) | (self.parents >= idx)).any():
            raise ValueError(f"parents must satisfy -1 <= parents[i] < i, got {self.parents}")
        # asked several times a round; parents are not changed after construction
        self._chain = bool(np.array_equal(self.parents, idx - 1))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return self._chain

    @classmethod
    def chain(cls, tokens) -> Draft:
        # valid by construction: no checks (a draft is made every round; they cost ~10 us)
        d = cls.__new__(cls)
        d.tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        d.parents = np.arange(len(d.tokens), dtype=np.int64) - 1
        d._chain = True
        return d

    @classmethod
    def empty(cls) -> Draft:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    # The tree walks below run on Python lists: drafts have a few dozen nodes, where numpy's
    # per-element access costs more than the work.
    def _depths(self) -> list[int]:
        d: list[int] = []
        for p in self.parents.tolist():
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def depth(self) -> np.ndarray:
        """(n,) depth of each node, 1 for children of the root."""
        return np.array(self._depths(), dtype=np.int64)

    def paths(self) -> list[list[int]]:
        """Root-to-leaf node-index paths, one per leaf, longest first (ties: leaf order)."""
        parents = self.parents.tolist()
        has_child = [False] * len(parents)
        for p in parents:
            if p >= 0:
                has_child[p] = True
        out = []
        for leaf, inner in enumerate(has_child):
            if inner:
                continue
            path, i = [], leaf
            while i >= 0:
                path.append(i)
                i = parents[i]
            out.append(path[::-1])
        return sorted(out, key=len, reverse=True)  # sorted() is stable

    def ancestors_mask(self) -> np.ndarray:
        """(n, n) bool: [i, j] = j is i or an ancestor of i (the tree-attention mask)."""
        # each node's ancestors as the bits of a Python int (nodes are in topological order),
        # unpacked once: no numpy call per node
        n = len(self)
        if n > 62:          # the bits would not fit an int64: a row per node instead
            m = np.zeros((n, n), bool)
            for i, p in enumerate(self.parents.tolist()):
                if p >= 0:
                    m[i] = m[p]
                m[i, i] = True
            return m
        bits: list[int] = []
        for i, p in enumerate(self.parents.tolist()):
            bits.append((bits[p] if p >= 0 else 0) | (1 << i))
        return ((np.array(bits, dtype=np.int64)[:, None] >> np.arange(n)) & 1).astype(bool) \
            if n else np.zeros((0, 0), bool)

    def truncate(self, max_nodes: int, max_depth: int, max_width: int) -> Draft:
        """Keep the first nodes in topological order with depth <= max_depth, at most max_width
        leaves and at most max_nodes nodes; a node whose parent was dropped is dropped too, so the
        result stays a valid tree."""
        new_index = [-1] * len(self)
        has_kept_child = [False] * len(self)
        depth = self._depths()
        kept: list[int] = []
        leaves = 0
        for i, p in enumerate(self.parents.tolist()):
            if len(kept) >= max_nodes:
                break
            if depth[i] > max_depth or (p >= 0 and new_index[p] < 0):
                continue
            # a first child replaces its parent as a leaf; any other node adds a leaf
            adds_leaf = p < 0 or has_kept_child[p]
            if adds_leaf and leaves >= max_width:
                continue
            leaves += int(adds_leaf)
            if p >= 0:
                has_kept_child[p] = True
            new_index[i] = len(kept)
            kept.append(i)
        idx = np.asarray(kept, np.int64)
        parents = [new_index[p] if p >= 0 else -1 for p in self.parents[idx].tolist()]
        return Draft(self.tokens[idx], np.asarray(parents, np.int64))


class DraftSource:
    """Base: propose drafts from the context; learn from what the target accepted."""
    name: str = "?"
    tree: bool = False      # True if propose may return a tree (else always a chain)

    def start(self, context: Sequence[int], source: Sequence[int] | None = None) -> None:
        """A new generation: context = tokens so far (a causal LM's prompt, or an
        encoder-decoder's decoder prompt); source = the encoder input ids of an encoder-decoder
        (None for a causal LM: then the prompt is the input)."""

    def propose(self, context: Sequence[int], k: int, width: int = 1) -> Draft:
        """Up to k tokens (depth) continuing context (the full token list so far, whose last
        token is already decided). width > 1 allows a tree with up to width leaves."""
        raise NotImplementedError

    def feedback(self, context: Sequence[int], draft: Draft, accepted: int,
                 tokens: np.ndarray, logits: np.ndarray | None) -> None:
        """After verification. accepted = number of draft tokens the target accepted (along the
        accepted path). tokens (m,) = the tokens the target consumed in that verification (the
        last context token first, then the draft nodes in node order) and logits (m, v) = the
        target's next-token logits after each of them (None if unavailable)."""

    def reset(self) -> None:
        """Forget everything learned (a no-op for sources whose state lives in one generation)."""


def _ids(seq: Sequence[int] | None) -> np.ndarray:
    return np.asarray([] if seq is None else seq, dtype=np.int64).reshape(-1)


def _occurrences(hay: np.ndarray, needle: np.ndarray, end: int) -> np.ndarray:
    """Start positions s (ascending) with hay[s:s+n] == needle and s + n <= end."""
    n = len(needle)
    count = min(end, len(hay)) - n + 1
    if n == 0 or count <= 0:
        return np.zeros(0, np.int64)
    hit = hay[:count] == needle[0]
    for j in range(1, n):
        hit &= hay[j:j + count] == needle[j]
    return np.flatnonzero(hit)


class PromptLookup(DraftSource):
    """Prompt lookup decoding (Saxena 2023; transformers' ``prompt_lookup_num_tokens``): find the
    latest earlier occurrence of the context's last n tokens (n = ngram_max .. ngram_min; for each
    n the context first, then an encoder-decoder's source) and propose what followed it."""
    name = "ngram"

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self._source = _ids(None)

    def start(self, context: Sequence[int], source: Sequence[int] | None = None) -> None:
        self._source = _ids(source)

    def propose(self, context: Sequence[int], k: int, width: int = 1) -> Draft:
        ctx = _ids(context)
        L = len(ctx)
        if k <= 0:
            return Draft.empty()
        for n in range(min(self.ngram_max, L), self.ngram_min - 1, -1):
            tail = ctx[L - n:]
            hits = _occurrences(ctx, tail, L - 1)  # end L-1: at least one token follows
            if len(hits):
                cont = list(ctx[hits[-1] + n:][:k])
                # The copy ran into the context's end: the match says "the text repeats with
                # period p", so keep repeating (degenerate loops draft k tokens, not < p).
                p = len(cont)
                while len(cont) < k:
                    cont.append(cont[len(cont) - p])
                return Draft.chain(cont)
            hits = _occurrences(self._source, tail, len(self._source) - 1)
            if len(hits):
                return Draft.chain(self._source[hits[-1] + n:][:k])
        return Draft.empty()


class InputGuided(DraftSource):
    """Input-guided aggressive decoding (IAD; Sun et al. 2021, Ge et al. 2022): for outputs that
    largely copy their input (typo or grammar correction), draft the continuation of the input
    span aligned with the output so far.

    When the output leaves the input (the target corrected something), the edit is guessed from
    the correction token: one of Damerau's four single edits at the point of divergence p (the
    input had an extra token at p, two tokens transposed, a token missing before p, a token
    substituted; also two extra tokens), each a different continuation of the input. The draft
    follows the first of them that the tokens generated since still agree with, so a wrong guess
    costs one round and the next round takes the next guess; with ``width`` > 1 the guesses are
    a tree. An output that fits no single edit is re-aligned by finding its last ``ngram``, ...,
    1 tokens in the input nearest to where the pointer was. On the typo benchmark (60
    sentences, greedy outputs of the zoo's typo fixer, chains) the edit guesses need 247
    verifications where the n-gram re-alignment alone needed 296."""
    name = "input"
    # The edits, most likely first. Where the correction is the next input token, an extra
    # token and a transposition both fit; an extra one is likelier after a doubled token (a key
    # struck twice). Counted on the typo benchmark's divergences: after a doubled token, extra
    # 16 of 20; otherwise transposed 18, extra 10; elsewhere missing 7, substituted 4.
    EDITS = ("transposed", "extra", "missing", "substituted", "extra2")
    EDITS_DOUBLED = ("extra", "transposed", "missing", "substituted", "extra2")

    def __init__(self, ngram: int = 3):
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        self.ngram = ngram
        self._input = _ids(None)
        self._list: list[int] = []
        self._ptr: int | None = None  # input index of the next expected output token
        self._at = 0                  # context length at which _ptr is valid
        # Where the output was in the input when alignment was lost (input index, context
        # length): edits are guessed there, and re-alignment looks nearest to it, moved on by
        # the tokens generated since.
        self._anchor = (0, 0)
        self._edit = False            # the anchor is a fresh divergence: guess edits there
        # The output has followed the pointer at least one token: only then is a divergence an
        # edit. A pointer the n-gram re-alignment set that fails at once was a wrong alignment
        # (a causal LM's own text matching its prompt by chance): re-align again instead.
        self._sure = False
        self.tree = True

    def start(self, context: Sequence[int], source: Sequence[int] | None = None) -> None:
        self._at, self._anchor, self._edit = len(context), (0, len(context)), False
        self._sure = source is not None
        if source is not None:
            self._input, self._ptr = _ids(source), 0
        else:
            # a causal LM's prompt ends with the instruction, not the text to copy: align from the
            # context's last tokens instead (an earlier occurrence in the prompt)
            self._input, self._ptr = _ids(context), None
        # the pointer checks compare a token or two a round: Python ints beat numpy's call cost
        self._list = self._input.tolist()

    @property
    def pointer(self) -> int | None:
        """Input index of the next expected output token (None while unaligned)."""
        return self._ptr

    def _realign(self, ctx: np.ndarray, n: int = 1) -> list[int]:
        """Up to n input pointers where the context's last ``ngram``, ..., 1 tokens occur (the
        longest that occurs anywhere), nearest first to where the output should be by now."""
        target = self._anchor[0] + len(ctx) - self._anchor[1]
        for m in range(min(self.ngram, len(ctx)), 0, -1):
            # end = len - 1: the aligned span must have something left to draft
            hits = _occurrences(self._input, ctx[len(ctx) - m:], len(self._input) - 1) + m
            if len(hits):
                # ties go forward, as the output advances through the input
                order = np.lexsort((-hits, np.abs(hits - target)))
                return [int(h) for h in hits[order[:n]]]
        return []

    # the output since a divergence is compared with each edit's continuation this far at most;
    # a longer one that still fits an edit has been locked to it long before
    _EDIT_SPAN = 64

    def _edits(self, e: list[int], p: int) -> list[tuple[int, list[int]]]:
        """The single edits at input index p that the output e (the tokens since the divergence,
        the correction first) agrees with, most likely first: (its input pointer after e, or -1
        while e is still inside the edit, and its continuation of e)."""
        inp, n = self._list, len(e)
        if not e or n > self._EDIT_SPAN:
            return []
        c = e[0]
        found = []
        for kind in self.EDITS_DOUBLED if 0 < p < len(inp) and inp[p] == inp[p - 1] else self.EDITS:
            if kind == "extra" or kind == "transposed":      # the input had inp[p] extra, or
                if p + 1 >= len(inp) or inp[p + 1] != c:     # inp[p], inp[p + 1] swapped
                    continue
                head, q = ([c], p + 2) if kind == "extra" else ([c, inp[p]], p + 2)
            elif kind == "missing":                          # c belongs before inp[p]
                head, q = [c], p
            elif kind == "substituted":                      # c replaces inp[p]
                head, q = [c], p + 1
            else:                                            # inp[p], inp[p + 1] extra
                if p + 2 >= len(inp) or inp[p + 2] != c:
                    continue
                head, q = [c], p + 3
            virt = head + inp[q:q + n + self._EDIT_SPAN]
            if virt[:n] == e and len(virt) > n:
                found.append((q + n - len(head) if n >= len(head) else -1, virt[n:]))
        return found

    def propose(self, context: Sequence[int], k: int, width: int = 1) -> Draft:
        n_ctx = len(context)
        inp = self._list
        if self._ptr is not None and n_ctx < self._at:  # the caller rewound the context
            self._anchor, self._ptr, self._edit = (self._ptr, self._at), None, False
        if self._ptr is not None:
            # Check the tokens decided since the pointer was last valid (the target's bonus or
            # correction token; everything when feedback was not called) against the input.
            new = [int(t) for t in context[self._at:]]
            ptr, j = self._ptr, 0  # j: length of the common prefix
            while j < len(new) and ptr + j < len(inp) and inp[ptr + j] == new[j]:
                j += 1
            self._sure = self._sure or j > 0
            if j == len(new):
                self._ptr += j
            else:
                self._anchor = (self._ptr + j, self._at + j)
                self._ptr, self._edit = None, self._sure
        self._at = n_ctx
        guesses: list[tuple[int, list[int]]] = []
        if self._ptr is None and self._edit:
            p, t = self._anchor
            guesses = self._edits([int(x) for x in context[t:]], p)
            if guesses and n_ctx - t > 1 and guesses[0][0] >= 0:
                # the output has gone past the correction (which every edit explains) and
                # past the edit: aligned again
                self._ptr, self._edit, guesses = guesses[0][0], False, []
                self._sure = True
            elif not guesses:
                self._edit = False
        if self._ptr is None and not guesses:
            found = self._realign(_ids(context), width)
            self._ptr, self._sure = (found[0] if found else None), False
            if len(found) > 1:      # a tree: the other occurrences are guesses too
                guesses = [(q, inp[q:q + k]) for q in found]
                self._ptr = None
        if k <= 0:
            return Draft.empty()
        if guesses:
            if width > 1 and len(guesses) > 1:
                kept = guesses[:width]
                return _merge([g[1] for g in kept], max(2, k // len(kept)))
            return Draft.chain(guesses[0][1][:k])
        if self._ptr is None:
            return Draft.empty()
        return Draft.chain(self._input[self._ptr:self._ptr + k])

    def feedback(self, context: Sequence[int], draft: Draft, accepted: int,
                 tokens: np.ndarray, logits: np.ndarray | None) -> None:
        # the accepted tokens were drafted from the input, so the alignment holds through them;
        # a rejection shows up as a mismatching correction token in the next propose (a
        # guessed edit's draft is checked against the output there too)
        if self._ptr is not None and 0 < accepted <= len(draft) and draft.is_chain:
            self._ptr += accepted
            self._at += accepted
            self._sure = True


def _merge(paths: list[list[int]], depth: int) -> Draft:
    """A tree of the first ``depth`` tokens of each path, shared prefixes merged."""
    tokens: list[int] = []
    parents: list[int] = []
    kids: dict[tuple[int, int], int] = {}
    for path in paths:
        node = -1
        for tok in path[:depth]:
            key = (node, tok)
            if key not in kids:
                kids[key] = len(tokens)
                tokens.append(tok)
                parents.append(node)
            node = kids[key]
    return Draft(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64))


class TokenRecycling(DraftSource):
    """Token Recycling (Luo et al. 2024): the target's top candidates after each token, which
    verification computes anyway, are kept in an adjacency matrix M (vocab, top) and reused as
    drafts -- a static-shape tree by BFS from the last token. M survives ``start`` (recycling
    across generations is the point); only ``reset`` clears it."""
    name = "recycle"
    tree = True

    def __init__(self, vocab_size: int, top: int = 8, max_bytes: int = 2 * 1024 * 1024):
        if vocab_size < 1 or top < 1:
            raise ValueError(f"need vocab_size >= 1 and top >= 1, got {vocab_size}, {top}")
        # int16 holds ids < 32768 and the -1 "unknown" marker
        dtype = np.int16 if vocab_size <= 2 ** 15 else np.int32
        column = vocab_size * np.dtype(dtype).itemsize
        fits = max_bytes // column
        if fits < 1:
            raise ValueError(f"vocab_size {vocab_size} needs {column} bytes per candidate column, "
                             f"more than max_bytes={max_bytes}")
        self.vocab_size = vocab_size
        self.top = int(min(top, fits, vocab_size))
        self.M = np.full((vocab_size, self.top), -1, dtype)

    @property
    def nbytes(self) -> int:
        return int(self.M.nbytes)

    def reset(self) -> None:
        self.M.fill(-1)

    def propose(self, context: Sequence[int], k: int, width: int = 1) -> Draft:
        if k <= 0 or width <= 0 or len(context) == 0:
            return Draft.empty()
        row = self.M[int(context[-1])]
        firsts = row[row >= 0][:width]
        tokens, parents = [int(t) for t in firsts], [-1] * len(firsts)
        frontier = list(range(len(tokens)))   # the end node of each still-growing path
        for _ in range(k - 1):
            grown = []
            for node in frontier:
                nxt = int(self.M[tokens[node], 0])
                if nxt >= 0:
                    grown.append(len(tokens))
                    tokens.append(nxt)
                    parents.append(node)
            frontier = grown
        return Draft(np.asarray(tokens, np.int64), np.asarray(parents, np.int64))

    def feedback(self, context: Sequence[int], draft: Draft, accepted: int,
                 tokens: np.ndarray, logits: np.ndarray | None) -> None:
        if logits is None:
            return
        logits = np.asarray(logits)
        tokens = _ids(tokens)
        if logits.ndim != 2 or len(logits) != len(tokens) or logits.shape[1] > self.vocab_size:
            raise ValueError(f"logits {logits.shape} do not fit {len(tokens)} tokens and "
                             f"vocab_size {self.vocab_size}")
        top = min(self.top, logits.shape[1])
        ids = np.argpartition(-logits, top - 1, axis=1)[:, :top]
        order = np.argsort(-np.take_along_axis(logits, ids, axis=1), axis=1, kind="stable")
        rows = np.full((len(tokens), self.top), -1, self.M.dtype)
        rows[:, :top] = np.take_along_axis(ids, order, axis=1)
        self.M[tokens] = rows  # a token consumed twice: the later (deeper) logits win


_SOURCES = {"ngram": PromptLookup, "input": InputGuided, "recycle": TokenRecycling}


def make_source(spec: str, vocab_size: int) -> DraftSource:
    """A draft source by name: "ngram", "input" or "recycle", with default settings."""
    if spec not in _SOURCES:
        raise ValueError(f"unknown draft source {spec!r}; known: {', '.join(_SOURCES)}")
    return TokenRecycling(vocab_size) if spec == "recycle" else _SOURCES[spec]()
