"""The model being sped up, behind the three calls a speculative loop makes.

``verify(root, draft)`` feeds the last decided token (``root``, not yet consumed) and a draft
(a chain, or a tree in topological order) in one call of a chunked graph and returns the target's
next-token logits after the root and after every draft node. ``commit(path)`` makes the state
consume the root and the accepted nodes only. ``exit_draft`` is the self-speculative drafter
(Kangaroo) that reads the target's own state.

How a state rolls back depends on its kind (``StateSpec.kind``) and on the memory plan:

- KV caches (encoder-decoders) are cropped, or the accepted path's slots gathered (trees): free.
- Recurrent state (state-space models):
  - ``trace``: the ``verify`` graph returns the state after every position; the accepted prefix's
    state is a slice (memory: chunk x state per path, no extra compute);
  - ``replay``: a snapshot is kept and the accepted tokens are fed again when a draft is cut
    short (memory: one state; compute: one more call).
  A tree is verified one path per batch row, each row with its own copy of the state (STree
  keeps one state per path for the same reason: a recurrence cannot share a prefix in place).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from edgeseq.bundle import BundleError
from edgeseq.runtime.speculative.drafts import Draft


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _shallow_chain(model: Any, state: Any, inputs: Any, root: int, k: int, threshold: float
                   ) -> Draft:
    """Draft greedily with ``exit_step`` from the first layers' part of the target's ``state``
    (a prefix of its list), stopping at a token the shallow head gives less than ``threshold``.
    ``inputs(token, i)`` builds the i-th call's feeds."""
    n = len(model.runners["exit_step"].entry.state)
    h = model.from_numpy(model.to_numpy(state)[:n])
    tok, out = root, []
    for i in range(k):
        res, h = model.run("exit_step", inputs(tok, i), h)
        p = _softmax(res["logits"][0].astype(np.float64))
        tok = int(p.argmax())
        if p[tok] < threshold:
            break
        out.append(tok)
    return Draft.chain(out)


@functools.lru_cache(maxsize=None)
def _chain_mask(c: int) -> tuple[np.ndarray, np.ndarray]:
    """A chain of c nodes: the causal mask and each node's depth (shared: not to be written;
    left writeable because torch.from_numpy warns on read-only arrays)."""
    return np.tril(np.ones((c, c), dtype=np.int64)), np.arange(c)


def _row_of_nodes(draft: Draft, paths: list[list[int]]) -> list[tuple[int, int]]:
    """(path row, position in the row) of every node: position 0 is the root."""
    where: dict[int, tuple[int, int]] = {}
    for r, p in enumerate(paths):
        for pos, node in enumerate(p, start=1):
            where.setdefault(node, (r, pos))
    return [where[i] for i in range(len(draft))]


class CausalTarget:
    """A state-space (causal LM) session: ``verify`` or ``prefill`` chunks, ``step`` singles."""

    def __init__(self, session: Any, rollback: str = "trace"):
        self.s = session
        self.model = session.model
        self.vocab = int(session.manifest.config["vocab_size"])
        graphs = session.manifest.graphs
        self.graph = "verify" if "verify" in self.model.runners else "prefill"
        if rollback == "trace" and self.graph != "verify":
            rollback = "replay"   # this family's bundle has no per-position states
        self.rollback = rollback
        self.max_chunk = int(graphs[self.graph].max_chunk or 16)
        self.exit_layers = session.manifest.config.get("early_exit_layers")
        self.seq2seq = False
        # a plan short of memory loads no step graph: single tokens go through the chunk graph
        self.has_step = "step" in self.model.runners

    # -- a generation ------------------------------------------------------------------------
    def start(self, context: Sequence[int], source: Any = None) -> int:
        """Consume all of ``context`` but its last token, which becomes the first root."""
        self.s.reset(1)
        if len(context) > 1:
            self.s.prefill(np.asarray([context[:-1]], dtype=np.int64))
        return int(context[-1])

    def capacity_left(self) -> int:
        return 1 << 30

    def max_nodes(self, depth: int, width: int) -> int:
        """Draft nodes one verification takes: one batch row (path) per leaf, each as long as
        the chunk allows."""
        return max(0, depth * width)

    # -- verification ----------------------------------------------------------------------
    def verify(self, root: int, draft: Draft) -> np.ndarray:
        self._draft, self._out, self._snap, self._root = draft, None, None, root
        if len(draft) == 0:
            return self._feed(np.array([[root]], dtype=np.int64))
        paths = [draft.paths()[0]] if draft.is_chain else draft.paths()
        self._paths = paths
        width = len(paths)
        length = 1 + max(len(p) for p in paths)
        ids = np.zeros((width, length), dtype=np.int64)
        ids[:, 0] = root
        for r, p in enumerate(paths):
            ids[r, 1:1 + len(p)] = draft.tokens[p]
        if width == 1 and self.rollback == "trace":
            state = self.s._state          # advanced in place; commit slices the trace
        else:
            self._snap = self.model.to_numpy(self.s._state)
            state = self.s._state if width == 1 else self.model.from_numpy(
                [np.repeat(a, width, axis=0) for a in self._snap])
        out, state = self.model.run(self.graph, {"input_ids": ids}, state)
        if width == 1:
            self.s._state = state
        self._out = out
        logits = out["logits"]                                   # (w, length, v)
        if draft.is_chain:
            return logits[0]                 # node i sits at position i + 1 of the one row
        rows = [logits[0, 0]] + [logits[r, pos] for r, pos in _row_of_nodes(draft, paths)]
        return np.stack(rows)

    def commit(self, path: list[int]) -> None:
        """The state consumes the root and the accepted nodes ``path`` (node indices)."""
        draft = self._draft
        if len(draft) == 0:
            return
        m = len(path)
        row = 0
        if path:
            row = next(r for r, p in enumerate(self._paths) if p[:m] == path)
        if self.rollback == "trace":
            if len(self._paths) == 1 and m == len(self._paths[0]):
                return      # all accepted: the state the call left is the one after the chunk
            self.s._state = self.model.assign(self.s._state, [
                s.from_trace(self._out[f"trace.{s.name}"][row:row + 1], m)
                for s in self.model.specs])
            return
        full = len(self._paths) == 1 and m == len(self._paths[0])
        if full:
            return                                               # the chunk was all accepted
        self.s._state = self.model.from_numpy(self._snap)
        self._feed(np.array([[self._root, *draft.tokens[path]]], dtype=np.int64))

    def _feed(self, ids: np.ndarray) -> np.ndarray:
        """Advance the state over ``ids`` (1, n); return the logits of the last position (1, v).
        A single token goes through ``step`` where it is loaded: a one-token call of the
        static-length ``verify`` costs 3-4 steps."""
        if ids.shape[1] == 1 and self.has_step:
            out, self.s._state = self.model.run("step", {"input_ids": ids[:, 0]}, self.s._state)
            return out["logits"]
        out, self.s._state = self.model.run(self.graph, {"input_ids": ids}, self.s._state)
        return out["logits"][0, -1:]

    # -- self-speculation ------------------------------------------------------------------
    def exit_draft(self, root: int, k: int, threshold: float) -> Draft:
        """Kangaroo: draft with the first layers (``exit_step``) from the target's own state,
        stopping when the shallow head's confidence falls below ``threshold``."""
        return _shallow_chain(self.model, self.s._state, lambda tok, pos: {
            "input_ids": np.array([tok])}, root, k, threshold)


class Seq2SeqTarget:
    """An encoder-decoder session: ``decoder_chunk`` verifies, the KV cache is cropped."""

    def __init__(self, session: Any):
        self.s = session
        self.model = session.model
        self.vocab = int(session.config["vocab_size"])
        if "decoder_chunk" not in self.model.runners:
            raise BundleError(f"{session.root}: no decoder_chunk graph (converted by an older "
                              f"edgeseq); convert again to speculate")
        self.max_chunk = int(session.manifest.graphs["decoder_chunk"].max_chunk or 16)
        self.fixed = session.config.get("cache_layout") == "fixed"
        self.exit_layers = session.config.get("early_exit_layers")
        self.rollback = "crop"
        self.seq2seq = True

    def start(self, context: Sequence[int], source: Any = None) -> int:
        if source is not None:
            self.s.encode(source)
        self.s.start(1)
        for tok in context[:-1]:
            self.s.step(np.array([tok]))
        return int(context[-1])

    def capacity_left(self) -> int:
        """Positions the cache can still take (the root included)."""
        cap = self.s.capacity
        table = self.s.config.get("max_target_positions")
        if table:
            cap = min(cap, int(table))
        return cap - self.s.position

    def max_nodes(self, depth: int, width: int) -> int:
        """A tree is flattened into one chunk: nodes plus the root fit ``max_chunk``."""
        return max(0, min(depth * width, self.max_chunk - 1, self.capacity_left() - 1))

    def verify(self, root: int, draft: Draft) -> np.ndarray:
        self._draft = draft
        if len(draft) == 0:
            return self.s.step(np.array([root]))
        c = len(draft) + 1
        if draft.is_chain:
            mask, depth = _chain_mask(c)
        else:
            # the root (position 0) is every node's ancestor
            mask = np.zeros((c, c), dtype=np.int64)
            mask[:, 0] = 1
            mask[1:, 1:] = draft.ancestors_mask()
            depth = mask.sum(1) - 1
        ids = np.empty((1, c), dtype=np.int64)
        ids[0, 0] = root
        ids[0, 1:] = draft.tokens
        return self.s.run_chunk(ids, depth, mask)[0]

    def commit(self, path: list[int]) -> None:
        draft = self._draft
        if len(draft) == 0:
            return                                   # step() already advanced the position
        pos = self.s.position
        keep = [0] + [1 + i for i in path]
        prefix = keep == list(range(len(keep)))
        if prefix and (self.fixed or len(keep) == len(draft) + 1):
            # fixed: later slots are masked, then overwritten; all accepted: the grown cache
            # holds just the kept positions
            pass
        elif prefix:
            # a chain: drop the rejected tail of the grown cache
            self.s._state = self.model.assign(self.s._state, [
                a[:, :, :pos + len(keep)] for a in self.model.view_numpy(self.s._state)])
        else:
            arrays = self.model.view_numpy(self.s._state)
            new = []
            for a in arrays:
                kept = a[:, :, [pos + j for j in keep]]
                if self.fixed:
                    a = a.copy()
                    a[:, :, pos:pos + len(keep)] = kept
                    new.append(a)
                else:
                    new.append(np.concatenate([a[:, :, :pos], kept], axis=2))
            self.s._state = self.model.from_numpy(new)
        self.s.position = pos + len(keep)

    def exit_draft(self, root: int, k: int, threshold: float) -> Draft:
        """Kangaroo's shallow drafter over the first layers' cache (a prefix of the state)."""
        names = {s.name for s in self.model.runners["exit_step"].entry.inputs}
        feeds = {k2: v for k2, v in self.s._feeds.items() if k2 in names}
        start = self.s.position

        def inputs(tok: int, i: int) -> dict[str, np.ndarray]:
            return {**feeds, "input_ids": np.array([tok], dtype=np.int64),
                    "cache_position": np.array([start + i], dtype=np.int64)}

        return _shallow_chain(self.model, self.s._state, inputs, root,
                              min(k, self.capacity_left() - 1), threshold)
