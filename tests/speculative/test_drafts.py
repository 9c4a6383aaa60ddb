"""Model-free draft sources: the draft tree helpers, prompt lookup, input-guided drafting and
token recycling, on small hand-written sequences (no model)."""
import numpy as np
import pytest

from edgeseq.runtime.speculative.drafts import (
    Draft, DraftSource, InputGuided, PromptLookup, TokenRecycling, make_source,
)


def tree():
    #        root
    #      /      \
    #     0(10)   1(11)
    #    /   \       \
    #  2(20) 3(21)   4(22)
    #  |
    #  5(30)
    return Draft(np.array([10, 11, 20, 21, 22, 30]), np.array([-1, -1, 0, 0, 1, 2]))


def step(src: DraftSource, ctx: list, k: int, target: list) -> list:
    """One greedy verification against a target output: accept the matching draft prefix, append
    it and the target's next token; returns the new context."""
    d = src.propose(ctx, k)
    assert d.is_chain
    i = len(ctx)
    acc = 0
    while acc < len(d) and i + acc < len(target) and d.tokens[acc] == target[i + acc]:
        acc += 1
    src.feedback(ctx, d, acc, np.array([ctx[-1], *d.tokens]), None)
    return target[:i + acc + 1]


# --- Draft -----------------------------------------------------------------------------------


def test_chain_helpers():
    d = Draft.chain([5, 6, 7])
    assert len(d) == 3 and d.is_chain and d.tokens.dtype == np.int64
    assert d.parents.tolist() == [-1, 0, 1]
    assert d.depth().tolist() == [1, 2, 3]
    assert d.paths() == [[0, 1, 2]]
    assert (d.ancestors_mask() == np.tril(np.ones((3, 3), bool))).all()
    e = Draft.empty()
    assert len(e) == 0 and e.is_chain and e.paths() == [] and e.ancestors_mask().shape == (0, 0)
    # past 62 nodes the ancestor bits no longer fit an int64
    for n in (62, 63, 70):
        assert (Draft.chain(np.arange(n)).ancestors_mask() == np.tril(np.ones((n, n), bool))).all()


def test_tree_helpers():
    t = tree()
    assert not t.is_chain
    assert t.depth().tolist() == [1, 1, 2, 2, 2, 3]
    assert t.paths() == [[0, 2, 5], [0, 3], [1, 4]]  # longest first, then leaf order
    m = t.ancestors_mask()
    assert m[5].tolist() == [True, False, True, False, False, True]
    assert m[4].tolist() == [False, True, False, False, True, False]
    assert m.sum() == sum(t.depth())  # each node sees itself and its ancestors only


def test_bad_parents_rejected():
    with pytest.raises(ValueError):
        Draft(np.array([1, 2]), np.array([-1, 1]))  # a node cannot be its own parent
    with pytest.raises(ValueError):
        Draft(np.array([1, 2]), np.array([-1]))


def test_truncate():
    t = tree()
    full = t.truncate(100, 100, 100)
    assert full.tokens.tolist() == t.tokens.tolist() and full.parents.tolist() == t.parents.tolist()
    d2 = t.truncate(100, 2, 100)
    assert d2.tokens.tolist() == [10, 11, 20, 21, 22] and d2.depth().max() == 2
    w1 = t.truncate(100, 100, 1)  # one leaf: the first path in topological order
    assert w1.is_chain and w1.tokens.tolist() == [10, 20, 30]
    w2 = t.truncate(100, 100, 2)  # node 3 (21) would make a third leaf
    assert w2.tokens.tolist() == [10, 11, 20, 22, 30]
    assert w2.parents.tolist() == [-1, -1, 0, 1, 2]  # re-indexed
    assert len(w2.paths()) == 2
    n3 = t.truncate(3, 100, 100)
    assert n3.tokens.tolist() == [10, 11, 20] and n3.parents.tolist() == [-1, -1, 0]
    assert len(t.truncate(0, 5, 5)) == 0 and len(t.truncate(5, 0, 5)) == 0


# --- prompt lookup ---------------------------------------------------------------------------


def test_prompt_lookup_copies_the_continuation():
    src = PromptLookup()
    ctx = [1, 2, 3, 4, 5, 6, 9, 3, 4]
    src.start(ctx)
    assert src.propose(ctx, 3).tokens.tolist() == [5, 6, 9]
    assert src.propose(ctx, 1).tokens.tolist() == [5]
    assert len(src.propose([1, 2, 3, 7], 3)) == 0  # 7 never occurred before
    assert src.name == "ngram" and not src.tree


def test_prompt_lookup_prefers_longer_ngrams_and_the_latest_match():
    src = PromptLookup(ngram_max=3)
    # "3" alone last occurred before 8, but "2 3" occurred only before 5
    ctx = [2, 3, 5, 6, 3, 8, 7, 2, 3]
    assert src.propose(ctx, 2).tokens.tolist() == [5, 6]
    assert PromptLookup(ngram_max=1).propose(ctx, 2).tokens.tolist() == [8, 7]
    # two occurrences of "1 2": the latest wins
    ctx = [1, 2, 7, 0, 1, 2, 8, 0, 1, 2]
    assert src.propose(ctx, 2).tokens.tolist() == [8, 0]
    # ngram_min bounds the fallback
    assert len(PromptLookup(3, 2).propose([4, 5, 6, 5], 2)) == 0
    assert PromptLookup(3, 1).propose([4, 5, 6, 5], 2).tokens.tolist() == [6, 5]


def test_prompt_lookup_repeats_a_loop_to_k():
    # the latest match of "a b" is right before the tail: the text repeats with period 3
    ctx = [9, 1, 2, 3, 1, 2]
    assert PromptLookup().propose(ctx, 5).tokens.tolist() == [3, 1, 2, 3, 1]


def test_prompt_lookup_searches_the_source_after_the_context():
    src = PromptLookup()
    src.start([0], source=[11, 12, 13, 14, 1])
    assert src.propose([0, 12, 13], 2).tokens.tolist() == [14, 1]
    # the context wins for the same n-gram length, a longer n-gram in the source beats both
    assert src.propose([0, 13, 5, 7, 13], 2).tokens.tolist() == [5, 7]
    assert src.propose([0, 13, 5, 12, 13], 2).tokens.tolist() == [14, 1]
    src.start([0], source=None)
    assert len(src.propose([0, 12, 13], 2)) == 0


# --- input-guided ----------------------------------------------------------------------------
S7 = [11, 12, 13, 14, 15, 16, 17, 1]


def test_input_guided_copies_the_source_and_advances_on_feedback():
    src = InputGuided()
    source = [11, 12, 13, 14, 15, 16, 1]
    src.start([0], source=source)
    d = src.propose([0], 3)
    assert d.tokens.tolist() == [11, 12, 13] and src.name == "input" and src.tree
    # the target accepts 2 and then says 13 itself: the pointer moves past all three
    src.feedback([0], d, 2, np.array([0, 11, 12, 13]), None)
    assert src.pointer == 2
    assert src.propose([0, 11, 12, 13], 3).tokens.tolist() == [14, 15, 16]
    # without feedback the pointer still follows the context
    src.start([0], source=source)
    assert src.propose([0, 11, 12], 2).tokens.tolist() == [13, 14]


@pytest.mark.parametrize("source, target, recovers_at", [
    # the correction is the next input token: a transposition is guessed first ...
    (S7, [0, 11, 12, 14, 13, 15, 16, 17, 1], 3),   # 13 14 swapped
    (S7, [0, 11, 12, 14, 15, 16, 17, 1], 4),       # 13 dropped: the second guess
    # ... and after a doubled token, that the token was extra
    ([11, 12, 12, 13, 14, 15, 16, 1], [0, 11, 12, 13, 14, 15, 16, 1], 3),
    (S7, [0, 11, 12, 99, 13, 14, 15, 16, 17, 1], 3),   # 99 inserted: the first guess
    (S7, [0, 11, 12, 99, 14, 15, 16, 17, 1], 4),       # 13 -> 99: the second guess
    (S7, [0, 11, 12, 98, 99, 13, 14, 15, 16, 17, 1], 6),   # no single edit: n-gram re-alignment
])
def test_input_guided_realigns_after_an_edit(source, target, recovers_at):
    src = InputGuided()
    src.start([0], source=source)
    ctx = [0]
    while len(ctx) < len(target):
        ctx = step(src, ctx, 3, target)
        if len(ctx) > recovers_at:
            break
    # from here on the draft is exactly the rest of the target
    rest = target[len(ctx):]
    assert src.propose(ctx, len(rest)).tokens.tolist() == rest


def test_input_guided_realigns_nearest_to_the_old_pointer():
    # 5 occurs twice in the input; after the output has reached the second half, "5" should
    # re-align to the later one
    source = [5, 1, 2, 3, 4, 5, 6, 7, 8]
    src = InputGuided()
    src.start([0], source=source)
    ctx = step(src, [0], 5, [0, 5, 1, 2, 3, 4, 5, 6, 7])
    assert ctx == [0, 5, 1, 2, 3, 4, 5]
    ctx = ctx[:-1] + [9, 5]  # a mismatch, then 5
    assert src.propose(ctx, 3).tokens.tolist() == [6, 7, 8]


def test_input_guided_realigns_where_the_output_should_be_by_now():
    # 7 occurs at input 1 and 7; the output rewrote "7 2 3 4 5 6" into six new tokens, so when 7
    # comes it is the later one (the old pointer moved on with the tokens generated since)
    source = [1, 7, 2, 3, 4, 5, 6, 7, 8, 9]
    src = InputGuided()
    src.start([0], source=source)
    ctx = [0, 1, 90, 91, 92, 93, 94, 95]
    for n in range(2, len(ctx) + 1):
        src.propose(ctx[:n], 3)
    assert src.pointer is None
    assert src.propose(ctx + [7], 3).tokens.tolist() == [8, 9]


def test_input_guided_causal_lm_aligns_from_the_context():
    prompt = [50, 11, 12, 13, 14, 15, 51, 52]  # instruction, text, "answer:" marker
    src = InputGuided()
    src.start(prompt)
    assert len(src.propose(prompt, 3)) == 0  # the prompt's tail occurs nowhere earlier
    assert src.propose(prompt + [11], 3).tokens.tolist() == [12, 13, 14]
    assert src.propose(prompt + [11, 12, 13, 14, 15], 3).tokens.tolist() == [51, 52]


# --- token recycling -------------------------------------------------------------------------


def logits_preferring(rows: list, v: int) -> np.ndarray:
    """(len(rows), v) logits ranking each row's ids first, in the given order."""
    out = np.zeros((len(rows), v), np.float32)
    for i, ids in enumerate(rows):
        out[i, ids] = np.arange(len(ids), 0, -1) + 10.0
    return out


def test_token_recycling_memory_bound():
    small = TokenRecycling(1000, top=8)
    assert small.top == 8 and small.M.dtype == np.int16 and small.nbytes == 1000 * 8 * 2
    big = TokenRecycling(300_000, top=8)
    assert big.M.dtype == np.int32 and big.top < 8 and big.nbytes <= 2 * 1024 * 1024
    assert TokenRecycling(300_000, top=8, max_bytes=64 * 2 ** 20).top == 8
    with pytest.raises(ValueError):
        TokenRecycling(10 ** 9)
    assert (small.M == -1).all()


def test_token_recycling_unknown_rows_give_an_empty_draft():
    src = TokenRecycling(50)
    assert len(src.propose([3, 4], 4, width=3)) == 0
    assert src.name == "recycle" and src.tree


def test_token_recycling_learns_from_feedback_logits_and_builds_the_tree():
    v = 50
    src = TokenRecycling(v, top=4)
    # consumed tokens 4, 7, 8, 9 with their top candidates
    toks = np.array([4, 7, 8, 9])
    src.feedback([4], Draft.empty(), 0, toks,
                 logits_preferring([[7, 8, 9, 1], [20, 21], [30, 31], [40]], v))
    assert src.M[4].tolist() == [7, 8, 9, 1] and src.M[7, :2].tolist() == [20, 21]
    src.feedback([4], Draft.empty(), 0, np.array([20, 30]), logits_preferring([[25], [35]], v))
    d = src.propose([1, 4], 3, width=2)
    assert sorted(map(len, d.paths())) == [3, 3]          # width leaves, depth k
    assert [d.tokens[p].tolist() for p in d.paths()] == [[7, 20, 25], [8, 30, 35]]
    assert d.depth().max() == 3 and len(d) == 6
    chain = src.propose([4], 3)
    assert chain.is_chain and chain.tokens.tolist() == [7, 20, 25]
    assert len(src.propose([4], 2, width=8).paths()) == 4  # at most top children
    # start keeps the matrix, reset clears it
    src.start([1])
    assert len(src.propose([4], 2)) == 2
    src.reset()
    assert len(src.propose([4], 2)) == 0


def test_token_recycling_keeps_the_best_candidates_first():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 40)).astype(np.float32)
    toks = np.array([1, 5, 9, 13, 17, 21])
    src = TokenRecycling(40, top=5)
    src.feedback([1], Draft.empty(), 0, toks, logits)
    assert (src.M[toks] == np.argsort(-logits, axis=1)[:, :5]).all()
    assert (np.delete(src.M, toks, axis=0) == -1).all()


def test_token_recycling_paths_stop_at_unknown_rows():
    src = TokenRecycling(20, top=2)
    src.feedback([3], Draft.empty(), 0, np.array([3, 5]), logits_preferring([[5, 6], [7]], 20))
    d = src.propose([3], 4, width=2)
    assert [d.tokens[p].tolist() for p in d.paths()] == [[5, 7], [6]]
    src.feedback([3], d, 0, np.array([3]), None)  # no logits: nothing learned, no error
    with pytest.raises(ValueError):
        src.feedback([3], d, 0, np.array([3]), np.zeros((1, 21)))  # wider than vocab_size


def test_make_source():
    assert isinstance(make_source("ngram", 10), PromptLookup)
    assert isinstance(make_source("input", 10), InputGuided)
    r = make_source("recycle", 10)
    assert isinstance(r, TokenRecycling) and r.vocab_size == 10
    with pytest.raises(ValueError, match="bogus.*ngram"):
        make_source("bogus", 10)


def test_input_guided_drafts_a_tree_of_alignments_after_a_correction():
    # source "a b c d e f"; the output replaced c by x: the next draft should hold the
    # substitution alignment (d e f) among its paths, and follow the one the output took
    src = InputGuided()
    source = [10, 11, 12, 13, 14, 15]
    src.start([0], source=source)
    d = src.propose([0], 4, width=3)
    assert d.is_chain and d.tokens.tolist() == [10, 11, 12, 13]
    src.feedback([0], d, 2, np.array([0, 10, 11, 12]), None)
    ctx = [0, 10, 11, 99]                     # the target corrected 12 -> 99
    tree = src.propose(ctx, 9, width=3)
    paths = [tree.tokens[p].tolist() for p in tree.paths()]
    assert [13, 14, 15] in [p[:3] for p in paths] and len(paths) > 1
    # the output continues with the substitution alignment: the pointer follows it
    follow = src.propose(ctx + [13, 14], 2)
    assert follow.tokens.tolist() == [15]


def test_input_guided_tree_holds_every_occurrence_when_no_edit_fits():
    # 5 occurs twice in the input; the output went off the input in a way no single edit
    # explains, then said 5: with width 2 both occurrences' continuations are drafted
    src = InputGuided()
    src.start([0], source=[5, 1, 2, 3, 5, 6, 7])
    tree = src.propose([0, 9, 9, 5], 4, width=2)
    paths = [tree.tokens[p].tolist() for p in tree.paths()]
    assert sorted(paths) == [[1, 2], [6, 7]]
    # a chain takes the one nearest to where the output should be (a tie: the later)
    assert src.propose([0, 9, 9, 5], 4).tokens.tolist() == [6, 7]
    assert src.propose([0, 9, 9, 5, 6], 4).tokens.tolist() == [7]


# --- greedy acceptance ---------------------------------------------------------------------
class _Rules:
    """Logits processors that change nothing but say they might (forces the node-by-node walk)."""

    def passthrough(self, cur: int, n: int) -> bool:
        return False

    def __call__(self, seqs: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return scores


@pytest.mark.parametrize("seed", range(20))
def test_greedy_tree_acceptance_matches_the_node_by_node_walk(seed):
    from edgeseq.runtime.decoding import SamplingConfig
    from edgeseq.runtime.speculative.engine import SpeculativeDecoder

    rng = np.random.default_rng(seed)
    d = tree()
    logits = rng.standard_normal((len(d) + 1, 40)).astype(np.float32)
    # make some paths agree with the argmax: the root's row picks 10 or 11, and so on
    for node, row in ((-1, 0), (0, 1), (1, 2), (2, 3)):
        kids = [i for i, p in enumerate(d.parents) if p == node]
        logits[row, d.tokens[kids[seed % len(kids)]]] += 10 * (seed % 3 > 0)
    dec = SpeculativeDecoder(target=None, source=None)
    cfg = SamplingConfig(False, 1.0, 0, 1.0)
    fast = dec._accept([1, 2], d, logits, cfg, rng, None)
    walk = dec._accept([1, 2], d, logits, cfg, rng, _Rules())
    assert fast == walk
