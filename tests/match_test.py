"""Tests of mm_tf.match: triplet invariants, class-wise connectivity, uniform choices
against the plain-Python oracle (tests/reference_graph.py), XLA, and the layer."""

import random

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from mm_tf import match
import reference_graph  # tests/ is on sys.path (pytest rootdir, prepend import mode)

MODES = match.MODES


def _triplets(labels, valid, seed, mode="graph", embeddings=None):
    """build_triplets on numpy inputs -> numpy (indices [N,3], mask [N], visit_rank [N])."""
    out = match.build_triplets(
        tf.constant(labels, tf.int32), tf.constant(valid, tf.bool),
        tf.constant(seed, tf.int32), mode=mode, embeddings=embeddings, return_order=True)
    return tuple(x.numpy() for x in out)


def _order(visit_rank):
    """Visiting order (list of nodes) from visit_rank [N] (-1 for invalid nodes)."""
    nodes = np.flatnonzero(visit_rank >= 0)
    return [int(i) for i in nodes[np.argsort(visit_rank[nodes])]]


def _check_invariants(labels, valid, indices, mask, visit_rank):
    """Every triplet is well formed; asserts, vectorised so N=4096 is cheap."""
    labels = np.asarray(labels)
    valid = np.asarray(valid, bool)
    n = len(labels)
    assert indices.shape == (n, 3) and mask.shape == (n,)
    assert indices.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(indices[:, 0], np.arange(n))
    # The valid nodes are visited once each, in ranks 0..V-1.
    np.testing.assert_array_equal(np.sort(visit_rank[valid]), np.arange(valid.sum()))
    assert np.all(visit_rank[~valid] == -1)
    # A valid node has a triplet exactly when a valid node of another class exists.
    classes, counts = np.unique(labels[valid], return_counts=True)
    size = dict(zip(classes.tolist(), counts.tolist()))
    has_other = np.array([valid[i] and size.get(labels[i], 0) < valid.sum()
                          for i in range(n)], bool)
    np.testing.assert_array_equal(mask, has_other)
    a, p, q = indices[mask].T
    assert np.all(valid[p]) and np.all(valid[q]), "an invalid node was chosen"
    assert np.all(labels[p] == labels[a]), "positive of another class"
    assert np.all(labels[q] != labels[a]), "negative of the same class"
    # Self-positives only for singleton classes.
    singleton = np.array([size[labels[i]] == 1 for i in a], bool)
    np.testing.assert_array_equal(p == a, singleton)
    # Masked rows point at the anchor, so gathers stay in range.
    np.testing.assert_array_equal(indices[~mask, 1], np.flatnonzero(~mask))
    np.testing.assert_array_equal(indices[~mask, 2], np.flatnonzero(~mask))


def _find(parent, i):
    """Union-find root with path halving."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _disconnected_classes(labels, valid, indices, min_size=1):
    """(number of classes of >= min_size valid nodes, how many of them are not connected by
    the attractive (anchor-positive) edges), by union-find."""
    labels = np.asarray(labels)
    parent = list(range(len(labels)))
    for a, p, _ in indices[np.asarray(valid, bool)]:
        parent[_find(parent, int(a))] = _find(parent, int(p))
    total = broken = 0
    for c in np.unique(labels[np.asarray(valid, bool)]):
        members = np.flatnonzero((labels == c) & valid)
        if len(members) < min_size:
            continue
        total += 1
        broken += len({_find(parent, int(i)) for i in members}) > 1
    return total, broken


def _check_graph_edges(labels, valid, indices, mask, visit_rank):
    """Graph modes: each positive was visited earlier except for the first node of each
    class, and every class is connected through attractive edges (over the triplets
    that exist: without another class there are none)."""
    labels = np.asarray(labels)
    for i in np.flatnonzero(mask):
        same = np.flatnonzero((labels == labels[i]) & valid)
        first = visit_rank[same].min() == visit_rank[i]
        p = indices[i, 1]
        if first:
            assert p != i or len(same) == 1
        else:
            assert visit_rank[p] < visit_rank[i], f"positive of {i} was not visited earlier"
    assert _disconnected_classes(labels, mask, indices)[1] == 0


def _draws(count, seed):
    """Random (labels, valid) test draws, edge cases first."""
    cases = [
        ([3], [True]),  # N=1
        ([3], [False]),
        ([1, 1, 1, 1], [True] * 4),  # one class only: no triplets
        ([0, 1, 2, 3, 4], [True] * 5),  # all singletons
        ([0, 0, 1, 2, 2, 2, 5], [True] * 7),  # a singleton among others
        ([0, 1, 0, 1, 2], [False] * 5),  # all invalid
        ([0, 1, 0, 1, 2, 2], [True, False, True, True, False, True]),
        ([7, 7, 7, 9], [True, True, True, False]),  # the only other class is invalid
        ([-5, 2**31 - 1, -(2**31), -5, 2**31 - 1], [True] * 5),  # extreme int32 labels
    ]
    rng = np.random.default_rng(seed)
    while len(cases) < count:
        n = int(rng.integers(2, 40))
        num_classes = int(rng.integers(1, 7))
        labels = rng.integers(0, num_classes, n)
        valid = rng.random(n) < rng.choice([1.0, 0.8, 0.4])
        cases.append((labels.tolist(), valid.tolist()))
    return cases


@pytest.mark.parametrize("mode", MODES)
def test_triplets_are_well_formed_and_follow_the_oracle(mode):
    rng = np.random.default_rng(1)
    for k, (labels, valid) in enumerate(_draws(40, seed=MODES.index(mode))):
        emb = rng.normal(size=(len(labels), 3)).astype(np.float32)
        indices, mask, visit_rank = _triplets(labels, valid, [k, 11], mode, emb)
        _check_invariants(labels, valid, indices, mask, visit_rank)
        if mode != "random":
            _check_graph_edges(labels, valid, indices, mask, visit_rank)
        # Every choice lies in the oracle's candidate list for this visiting order
        # (semi-hard negatives too: they are picked among the same candidates).
        oracle_mode = "random" if mode == "random" else "graph"
        pos_sup, neg_sup = reference_graph.expected_supports(
            labels, valid, _order(visit_rank), mode=oracle_mode)
        for i in np.flatnonzero(mask):
            assert indices[i, 1] in pos_sup[i], (labels, valid, i)
            assert indices[i, 2] in neg_sup[i], (labels, valid, i)


def test_edge_case_outputs():
    indices, mask, rank = _triplets([], [], [0, 0])
    assert indices.shape == (0, 3) and mask.shape == (0,) and rank.shape == (0,)
    indices, mask, rank = _triplets([4], [True], [0, 0])
    assert indices.tolist() == [[0, 0, 0]] and mask.tolist() == [False]
    assert rank.tolist() == [0]
    _, mask, rank = _triplets([1, 2, 3], [False] * 3, [0, 0])
    assert not mask.any() and rank.tolist() == [-1, -1, -1]
    _, mask, _ = _triplets([2, 2, 2], [True] * 3, [0, 0])
    assert not mask.any()
    indices, mask, _ = _triplets([0, 1], [True, True], [5, 1])
    assert mask.all() and indices.tolist() == [[0, 0, 1], [1, 1, 0]]


def test_large_graph_under_xla():
    n = 4096
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 21, n).astype(np.int32)
    valid = rng.random(n) < 0.9
    fn = tf.function(lambda l, v, s: match.build_triplets(l, v, s, return_order=True),
                     jit_compile=True)
    indices, mask, visit_rank = (x.numpy() for x in fn(labels, valid, tf.constant([2, 9])))
    _check_invariants(labels, valid, indices, mask, visit_rank)
    _check_graph_edges(labels, valid, indices, mask, visit_rank)


def test_random_triplets_are_often_disconnected():
    rng = np.random.default_rng(4)
    totals = {"graph": [0, 0], "random": [0, 0]}
    for k in range(40):
        labels = rng.integers(0, 4, 60)
        valid = np.ones(60, bool)
        for mode in totals:
            indices, _, _ = _triplets(labels, valid, [k, 0], mode)
            total, broken = _disconnected_classes(labels, valid, indices, min_size=4)
            totals[mode][0] += total
            totals[mode][1] += broken
    assert totals["graph"][1] == 0
    # Measured with the oracle: ~1/3 of such classes (~15 nodes) are disconnected.
    assert totals["random"][1] / totals["random"][0] > 0.2, totals


# ----- Uniformity: chi-square against the oracle's distribution -----

_LABELS = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 0, 1]
_VALID = [True] * 14 + [False] * 2
_ORDER = [6, 0, 10, 1, 7, 13, 2, 11, 3, 8, 4, 12, 9, 5]  # fixed visiting order
_NUM_SEEDS = 3000


def _uniformity_pvalue(choices, supports):
    """Combined chi-square p-value that choices [S, N] are uniform over supports[i].

    Per node with >= 2 candidates: scipy.stats.chisquare of the counts against the
    uniform expectation; statistics and degrees of freedom are summed (independent
    columns). Any choice outside the support fails at once.
    """
    total_stat, total_dof = 0.0, 0
    for i, support in enumerate(supports):
        if len(support) < 2:
            continue
        column = choices[:, i]
        assert np.isin(column, support).all(), f"node {i} chose outside {support}"
        counts = np.array([(column == c).sum() for c in support])
        stat, _ = stats.chisquare(counts)
        total_stat += stat
        total_dof += len(support) - 1
    assert total_dof >= 20  # enough cells for the test to have power
    return stats.chi2.sf(total_stat, total_dof)


def _choices_for_fixed_order(mode):
    """[S, N, 3] triplets of triplets_for_order over S seeds, one compiled map."""
    labels = tf.constant(_LABELS, tf.int32)
    valid = tf.constant(_VALID)
    rank = np.full(len(_LABELS), -1, np.int32)
    rank[_ORDER] = np.arange(len(_ORDER))
    seeds = tf.stack([tf.range(_NUM_SEEDS), tf.fill([_NUM_SEEDS], 77)], axis=1)

    @tf.function
    def run(seeds, labels, valid, rank):
        return tf.map_fn(
            lambda s: match.triplets_for_order(labels, valid, rank, s, mode=mode)[0],
            seeds, fn_output_signature=tf.int32, parallel_iterations=64)

    return run(seeds, labels, valid, tf.constant(rank)).numpy()


@pytest.mark.parametrize("mode", ["graph", "random"])
def test_choices_are_uniform_over_the_oracle_candidates(mode):
    triplets = _choices_for_fixed_order(mode)
    pos_sup, neg_sup = reference_graph.expected_supports(_LABELS, _VALID, _ORDER, mode=mode)
    # A fair sampler fails with probability 1e-4 per check; the biased one below, ~never.
    assert _uniformity_pvalue(triplets[:, :, 1], pos_sup) > 1e-4
    assert _uniformity_pvalue(triplets[:, :, 2], neg_sup) > 1e-4


def test_uniformity_check_detects_a_biased_sampler():
    # The same statistic on a sampler that favours one candidate per node (10% extra
    # mass, like an off-by-one that clamps onto the end of a run) must fail.
    pos_sup, neg_sup = reference_graph.expected_supports(_LABELS, _VALID, _ORDER)
    rng = np.random.default_rng(5)
    for supports in (pos_sup, neg_sup):
        choices = np.zeros((_NUM_SEEDS, len(_LABELS)), np.int64)
        for i, support in enumerate(supports):
            if not support:
                continue
            fair = rng.choice(support, size=_NUM_SEEDS)
            choices[:, i] = np.where(rng.random(_NUM_SEEDS) < 0.1, support[-1], fair)
        assert _uniformity_pvalue(choices, supports) < 1e-6


def test_uniformity_check_fails_on_an_off_by_one_implementation(monkeypatch):
    # The real pipeline with random_below drawing from [0, n] clamped to n - 1 (the last
    # candidate twice as likely): the chi-square must reject it.
    fair = match.random_below

    def off_by_one(seed, stream, counters, n):
        n = tf.cast(n, tf.int32)
        return tf.minimum(fair(seed, stream, counters, n + 1), tf.maximum(n - 1, 0))

    monkeypatch.setattr(match, "random_below", off_by_one)
    triplets = _choices_for_fixed_order("graph")
    pos_sup, neg_sup = reference_graph.expected_supports(_LABELS, _VALID, _ORDER)
    assert _uniformity_pvalue(triplets[:, :, 1], pos_sup) < 1e-6
    assert _uniformity_pvalue(triplets[:, :, 2], neg_sup) < 1e-6


def test_visiting_order_is_a_uniform_permutation():
    seeds = tf.stack([tf.range(2400), tf.fill([2400], 3)], axis=1)
    labels = tf.constant([0, 1, 0, 1, 2], tf.int32)
    valid = tf.constant([True, True, False, True, True])

    @tf.function
    def run(seeds):
        return tf.map_fn(
            lambda s: match.build_triplets(labels, valid, s, return_order=True)[2],
            seeds, fn_output_signature=tf.int32, parallel_iterations=64)

    ranks = run(seeds).numpy()
    assert np.all(ranks[:, 2] == -1)
    _, counts = np.unique(ranks[:, [0, 1, 3, 4]], axis=0, return_counts=True)
    assert len(counts) == 24  # every permutation of the 4 valid nodes occurs
    assert stats.chisquare(counts).pvalue > 1e-3


def _triplets_over_seeds(seeds, mode="graph", embeddings=None):
    """[S, N, 3] numpy triplets of build_triplets(_LABELS, _VALID) for seeds [S, 2], one
    compiled map."""
    @tf.function
    def run(seeds):
        return tf.map_fn(
            lambda s: match.build_triplets(_LABELS, _VALID, s, mode=mode,
                                           embeddings=embeddings)[0],
            seeds, fn_output_signature=tf.int32, parallel_iterations=64)

    return run(seeds).numpy()


def test_graph_pairs_match_the_oracle_end_to_end():
    # Random order and random picks together: the frequency of each (anchor -> positive)
    # and (anchor -> negative) pair agrees with the oracle's (two-sample chi-square).
    labels, valid = _LABELS, _VALID
    seeds = tf.stack([tf.fill([_NUM_SEEDS], 5), tf.range(_NUM_SEEDS)], axis=1)
    ours = _triplets_over_seeds(seeds)
    rng = random.Random(6)
    theirs = np.array([reference_graph.reference_triplets(labels, valid, rng)[0]
                       for _ in range(_NUM_SEEDS)])
    n = len(labels)
    for column in (1, 2):
        for i in np.flatnonzero(valid):
            table = np.array([np.bincount(x[:, i, column], minlength=n)
                              for x in (ours, theirs)])
            table = table[:, table.sum(axis=0) > 0]
            if table.shape[1] > 1:
                assert stats.chi2_contingency(table).pvalue > 1e-4, (column, i, table)


def _pair_supports(labels, valid):
    """Per node, the (positive, negative) codes p * N + q a random triplet may take:
    every other valid node of its class (itself for a singleton) x every valid node of
    another class; empty for masked rows."""
    labels, valid = np.asarray(labels), np.asarray(valid, bool)
    n = len(labels)
    supports = []
    for i in range(n):
        same = [j for j in np.flatnonzero(valid & (labels == labels[i])) if j != i] or [i]
        other = np.flatnonzero(valid & (labels != labels[i]))
        supports.append([] if not valid[i] or not len(other)
                        else [int(j) * n + int(k) for j in same for k in other])
    return supports


def _pair_codes(triplets, n):
    """[S, N, 3] triplets -> [S, N] codes positive * N + negative."""
    return triplets[:, :, 1].astype(np.int64) * n + triplets[:, :, 2]


def test_graph_triplets_are_random_triplets_per_anchor_over_visiting_orders():
    # Averaged over the random visiting order, each anchor's (positive, negative) pair in
    # the graph is uniform over (other node of its class) x (node of another class),
    # which is exactly random mode's distribution (exchangeability of the order). So the
    # two selections give the same expected loss and gradient for any loss summed over
    # anchors; they differ only in how one graph's triplets are correlated
    # (docs/camvid_study.md, "Graph vs random triplets in expectation").
    n = len(_LABELS)
    seeds = tf.stack([tf.fill([_NUM_SEEDS], 9), tf.range(_NUM_SEEDS)], axis=1)
    supports = _pair_supports(_LABELS, _VALID)
    for mode in ("graph", "random"):
        triplets = _triplets_over_seeds(seeds, mode)
        assert _uniformity_pvalue(_pair_codes(triplets, n), supports) > 1e-4, mode
    # Not so for one visiting order (a late node's graph positive is never a later
    # node), nor for semi-hard negatives, which depend on the embeddings, not the order.
    fixed = _pair_codes(_choices_for_fixed_order("graph"), n)
    assert _uniformity_pvalue(fixed, supports) < 1e-6
    embeddings = tf.math.l2_normalize(tf.random.stateless_normal([n, 4], [3, 1]), -1)
    semihard = _triplets_over_seeds(seeds, "graph_semihard", embeddings)
    assert _uniformity_pvalue(_pair_codes(semihard, n), supports) < 1e-6


# ----- Semi-hard negatives -----

def test_semihard_negatives_follow_the_facenet_rule():
    rng = np.random.default_rng(7)
    for k in range(10):
        n = 14
        labels = rng.integers(0, 3, n)
        valid = rng.random(n) < 0.9
        emb = rng.normal(size=(n, 2, 2)).astype(np.float32)
        indices, mask, rank = _triplets(labels, valid, [k, 1], "graph_semihard", emb)
        x = emb.reshape(n, -1)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        dist = ((x[:, None] - x[None]) ** 2).sum(-1)
        for a in np.flatnonzero(mask):
            other = valid & (labels != labels[a])
            earlier = other & (rank < rank[a]) & (rank >= 0)
            cand = np.flatnonzero(earlier if earlier.any() else other)
            d_ap = dist[a, indices[a, 1]]
            semi = cand[dist[a, cand] > d_ap]
            if len(semi):
                expected = semi[np.argmin(dist[a, semi])]
            else:
                expected = cand[np.argmax(dist[a, cand])]
            assert np.isclose(dist[a, indices[a, 2]], dist[a, expected], atol=1e-5)


def test_semihard_needs_embeddings():
    with pytest.raises(ValueError, match="embeddings"):
        match.build_triplets([0, 1], [True, True], [0, 0], mode="graph_semihard")


# ----- Compilation and determinism -----

@pytest.mark.parametrize("mode", MODES)
def test_eager_graph_and_xla_agree(mode, monkeypatch):
    rng = np.random.default_rng(8)
    n = 37
    args = (tf.constant(rng.integers(0, 4, n), tf.int32), tf.constant(rng.random(n) < 0.9),
            tf.constant([3, 4], tf.int32),
            tf.constant(rng.normal(size=(n, 2, 2, 3)), tf.float32))

    def fn(labels, valid, seed, emb):
        return match.build_triplets(labels, valid, seed, mode=mode, embeddings=emb)

    expected = [x.numpy() for x in fn(*args)]
    # A small block also runs the blockwise (map_fn) path of the semi-hard search.
    for block in (match.SEMIHARD_BLOCK, 8):
        monkeypatch.setattr(match, "SEMIHARD_BLOCK", block)
        for jit in (False, True):
            got = tf.function(fn, jit_compile=jit)(*args)
            for g, e in zip(got, expected):
                np.testing.assert_array_equal(g.numpy(), e)


def test_seed_controls_the_graph():
    labels, valid = list(range(5)) * 6, [True] * 30
    a, _, ra = _triplets(labels, valid, [1, 2])
    b, _, rb = _triplets(labels, valid, [1, 2])
    c, _, rc = _triplets(labels, valid, [1, 3])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ra, rb)
    assert not np.array_equal(ra, rc)


def test_random_below_is_in_range():
    n = tf.constant([0, 1, 2, 3, 1000, 2**28])
    counters = tf.range(6)
    for s in range(20):
        key = match.seed_key(tf.constant([s, 0]))
        draw = match.random_below(key, 1, counters, n).numpy()
        assert draw[0] == 0 and draw[1] == 0
        assert np.all(draw[2:] < n.numpy()[2:]) and np.all(draw >= 0)


# ----- Layer -----

def test_layer_shapes_and_config_round_trip():
    layer = match.TripletGraph(mode="random", name="match")
    indices, mask = layer(tf.constant([0, 0, 1, 1, 2]), tf.constant([True] * 5),
                          tf.constant([7, 0]))
    assert indices.shape == (5, 3) and mask.shape == (5,)
    assert layer.compute_output_shape((5,)) == ((5, 3), (5,))
    config = layer.get_config()
    assert config["mode"] == "random" and config["name"] == "match"
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(clone, match.TripletGraph)
    assert clone.get_config() == config
    with pytest.raises(ValueError, match="Unknown match mode"):
        match.TripletGraph(mode="hardest")


def test_layer_semihard_with_embeddings_in_tf_function():
    layer = match.TripletGraph(mode="graph_semihard")
    emb = tf.random.stateless_normal([6, 4], [1, 1])
    fn = tf.function(lambda l, v, s, e: layer(l, v, s, embeddings=e), jit_compile=True)
    indices, mask = fn(tf.constant([0, 0, 1, 1, 2, 2]), tf.constant([True] * 6),
                       tf.constant([1, 2]), emb)
    assert indices.shape == (6, 3) and bool(tf.reduce_all(mask))
