"""The match step: a class-wise connected graph over the patches of a batch -> triplets.

Paper (Zhan et al. 2018, "The Match Step") and the authors' release
(`resources/sampling_layers.py`, `GraphToTripletLayer`): visit the nodes in a random
order; each visited node links to a uniformly random earlier-visited node of its class
(its positive, "attractive" edge) and to a uniformly random earlier-visited node of
another class (its negative, "rejective" edge). Each class's attractive edges form a
spanning tree rooted at its first-visited node, so every class is connected. Release
fallbacks, applied after the whole graph is built:
- no earlier same-class node (first node of its class): a uniformly random same-class
  node of the whole graph other than itself; itself when its class is a singleton;
- no earlier other-class node: a uniformly random other-class node of the whole graph;
- no other-class node at all: the release feeds a zero vector as negative; here the
  triplet is masked out instead (deviation: a zero "negative" only adds the constant
  D(a, 0) = 1 to the hinge and teaches nothing).

The release is a Python loop, O(N^2). Here everything is O(N log N) and loop-free:
1. visiting order = sort of per-node random keys (invalid nodes last);
2. class order = sort by (class, visiting rank): a node's earlier same-class nodes are
   the contiguous run before it, so a uniform earlier positive is
   `run_start + floor(u * rank_in_class)`;
3. node i of class c visited at rank t with rank_in_class r has t - r earlier
   other-class nodes; draw m uniform in [0, t - r) and find the m-th non-c node of the
   visiting order: with P_c the (sorted) visiting ranks of class c, it sits at rank
   m + #{k : P_c[k] - k <= m}, a binary search within the node's class run.
`tf.searchsorted` compiles to an O(N*M) comparison under XLA on CPU (3.6 s at
N=65536), so the search is a branch-free binary search unrolled over log2(N) steps.
Two int64 sorts of N keys dominate; nothing is [N, N] in `graph` and `random` modes.

Randomness is a counter-based integer hash (lowbias32 rounds keyed by the seed):
Philox `stateless_uniform` under XLA on CPU costs ~20 ms for 65536 draws, the hash
0.25 ms, and it gives bit-identical draws in eager, graph and XLA modes. Integers in
[0, n) are `(h * n) >> 32` of a 32-bit hash h (bias <= n / 2^32).

Modes: `graph` (paper), `random` (ablation "random triplets", Table 1: positive and
negative uniform over the whole batch, no connectivity guarantee) and `graph_semihard`
(beyond the paper: graph positives, FaceNet semi-hard negatives among the earlier
visited other-class nodes, O(N^2) time and O(block * N) memory).

Averaged over the visiting order, `graph` and `random` give each anchor the same
distribution of (positive, negative): uniform over (other node of its class) x (node of
another class), because the order is exchangeable and the graph's rules pick by position
in it. So for a loss summed over anchors both have the same expected loss and gradient;
they differ only in how the triplets of one graph are correlated (tree-connected or
not). `graph_semihard` changes the distribution itself (tests/match_test.py).
"""

import keras
import tensorflow as tf

from mm_tf import losses

GRAPH = "graph"
RANDOM = "random"
GRAPH_SEMIHARD = "graph_semihard"
MODES = (GRAPH, RANDOM, GRAPH_SEMIHARD)

# Ranks and node indices are packed below other fields in non-negative int64 sort keys:
# (33-bit class key) << 29 | rank and (1-bit invalid, 32-bit hash) << 29 | index both
# fit in 62 bits, which bounds a graph at 2^29 nodes.
_INDEX_BITS = 29
MAX_NODES = 1 << _INDEX_BITS
_INDEX_MASK = (1 << _INDEX_BITS) - 1
# Class key of invalid nodes: above every int32 label shifted to [0, 2^32).
_INVALID_CLASS_KEY = 1 << 32

# Independent random streams of one seed.
_STREAM_VISIT = 0
_STREAM_POSITIVE = 1
_STREAM_NEGATIVE = 2

# Anchor rows per block of the semi-hard distance matrix ([block, N] float32 at a time).
SEMIHARD_BLOCK = 1024


def _mix32(x):
    """lowbias32 finaliser (C. Wellons): a bijective avalanche of uint32 [...]."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(15, tf.uint32)))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))


def seed_key(seed):
    """uint32 scalar key of a seed int32 [2]; derive it once per call of the match step."""
    seed = tf.bitcast(tf.cast(seed, tf.int32), tf.uint32)
    # Both words go through full avalanche rounds, so consecutive steps
    # (seed = [base, step]) give unrelated keys.
    key = _mix32(tf.bitwise.bitwise_xor(seed[0], tf.constant(0x9E3779B9, tf.uint32)))
    return _mix32(tf.bitwise.bitwise_xor(key, seed[1]))


def hash_bits(key, stream, counters):
    """Random uint32 [K] for int32 counters [K], a seed_key and a stream id (Python int)."""
    salt = tf.constant((stream * 0x632BE5AB + 0x85EBCA6B) & 0xFFFFFFFF, tf.uint32)
    stream_key = _mix32(key + salt)
    x = _mix32(tf.bitwise.bitwise_xor(tf.bitcast(tf.cast(counters, tf.int32), tf.uint32),
                                      stream_key))
    return _mix32(x + stream_key * tf.constant(0x27D4EB2F, tf.uint32))


def random_below(key, stream, counters, n):
    """Uniform int32 [K] in [0, n) (0 where n <= 0) for a seed_key, counters [K], n [K]."""
    bits = tf.cast(hash_bits(key, stream, counters), tf.int64)
    n = tf.maximum(tf.cast(n, tf.int64), 0)
    # (h * n) >> 32: exact multiply-shift, bias at most n / 2^32.
    return tf.cast(tf.bitwise.right_shift(bits * n, tf.constant(32, tf.int64)), tf.int32)


def _pack(high, low, low_bits=_INDEX_BITS):
    """int64 [K]: high << low_bits | low, for non-negative int64 high, low [K]."""
    shifted = tf.bitwise.left_shift(high, tf.constant(low_bits, tf.int64))
    return tf.bitwise.bitwise_or(shifted, low)


def _low_bits(key):
    """The packed index/rank int32 [K] of int64 keys [K] made by _pack."""
    low = tf.bitwise.bitwise_and(key, tf.constant(_INDEX_MASK, tf.int64))
    return tf.cast(low, tf.int32)


def _upper_bound_in_runs(value_at, start, end, queries, size):
    """First index t in [start, end) with value_at(t) > query, else end: int32 [K].

    value_at maps int32 indices [K] to int32 values [K] and is non-decreasing over each
    [start, end) range; start, end, queries are int32 [K]; size is the static length of
    the indexed array (or None). A branch-free binary search unrolled over
    ceil(log2(size + 1)) steps: `tf.searchsorted` lowers to an [N, K] comparison under
    XLA (3.6 s at N=65536), and each step here is one gather and one select.
    """
    steps = size.bit_length() if size is not None else _INDEX_BITS
    # Descend by powers of two from start - 1, keeping `last` = the last index known to
    # hold a value <= query; one state tensor keeps XLA's fusions small.
    last = start - 1
    top = tf.maximum(tf.reduce_max(end) - 1, 0)
    for step in (1 << k for k in reversed(range(steps))):
        probe = last + step
        # Clamp the gather; probes at or past `end` are rejected by the first test.
        ok = (probe < end) & (value_at(tf.minimum(probe, top)) <= queries)
        last = tf.where(ok, probe, last)
    return last + 1


def _visiting_order(valid, key):
    """Random visiting order: int32 [N], the node at each rank.

    Valid nodes take ranks 0..V-1 in uniformly random order; invalid nodes come after.
    """
    node = tf.range(tf.shape(valid)[0], dtype=tf.int32)
    bits = tf.cast(hash_bits(key, _STREAM_VISIT, node), tf.int64)
    invalid = tf.cast(tf.logical_not(valid), tf.int64)
    # One int64 sort of (invalid, random key, node index): the index breaks hash ties
    # and is read back from the low bits, so no argsort is needed.
    return _low_bits(tf.sort(_pack(_pack(invalid, bits, 32), tf.cast(node, tf.int64))))


def _order_from_rank(valid, visit_rank):
    """Visiting order int32 [N] from a given rank [N] of the valid nodes (0..V-1)."""
    n = tf.shape(valid)[0]
    num_valid = tf.reduce_sum(tf.cast(valid, tf.int32))
    # Invalid nodes go after the valid ones, in index order.
    invalid_rank = num_valid + tf.cumsum(tf.cast(~valid, tf.int32), exclusive=True)
    rank = tf.where(valid, tf.cast(visit_rank, tf.int32), invalid_rank)
    return tf.scatter_nd(rank[:, None], tf.range(n, dtype=tf.int32), [n])


def _rank_of(order):
    """Visiting rank int32 [N] of each node from the order [N] (its inverse permutation)."""
    n = tf.shape(order)[0]
    return tf.scatter_nd(order[:, None], tf.range(n, dtype=tf.int32), [n])


def _class_key(labels, valid):
    """int64 [N] in [0, 2^32]: labels shifted to be non-negative; invalid nodes last."""
    shifted = tf.cast(labels, tf.int64) + (1 << 31)
    return tf.where(valid, shifted, tf.constant(_INVALID_CLASS_KEY, tf.int64))


def _triplets_from_order(labels, valid, order, key, mode, embeddings):
    """Triplets for a visiting order [N]: (indices [N,3] int32, mask [N] bool)."""
    n = tf.shape(labels)[0]
    num_valid = tf.reduce_sum(tf.cast(valid, tf.int32))
    position = tf.range(n, dtype=tf.int32)

    # Class order: sort (class, visiting rank), built in visiting order so the rank is
    # just the position; both are read back from the sorted key.
    sorted_key = tf.sort(_pack(tf.gather(_class_key(labels, valid), order),
                               tf.cast(position, tf.int64)))
    k_rank = _low_bits(sorted_key)  # visiting rank of the node at class position k
    k_class = tf.bitwise.right_shift(sorted_key, tf.constant(_INDEX_BITS, tf.int64))
    k_node = tf.gather(order, k_rank)  # node at class position k

    # Runs of equal class in the class order: start and end of each position's run.
    # Compare with the previous key; k_class[:1] - 1 stands in before position 0 (N=0 ok).
    new_run = k_class != tf.concat([k_class[:1] - 1, k_class[:-1]], axis=0)
    run_id = tf.cumsum(tf.cast(new_run, tf.int32)) - 1
    run_start = tf.gather(tf.math.unsorted_segment_min(position, run_id, n), run_id)
    run_end = tf.gather(tf.math.unsorted_segment_max(position, run_id, n), run_id) + 1
    run_size = run_end - run_start
    rank_in_class = position - run_start  # earlier-visited nodes of the same class
    other_earlier = k_rank - rank_in_class  # earlier-visited valid nodes of other classes
    other_total = num_valid - run_size  # valid nodes of other classes
    k_mask = tf.logical_and(k_rank < num_valid, other_total > 0)

    # Positive, as an offset into the run. Counters are node indices, so a node's draws
    # do not depend on where it sits. One draw serves every case (only one is used).
    if mode == RANDOM:
        # Uniform over the run without the node itself.
        u = random_below(key, _STREAM_POSITIVE, k_node, run_size - 1)
        offset = u + tf.cast(u >= rank_in_class, tf.int32)
    else:
        # An earlier member; the first of its class takes one of the later members.
        first = rank_in_class == 0
        u = random_below(key, _STREAM_POSITIVE, k_node,
                         tf.where(first, run_size - 1, rank_in_class))
        offset = u + tf.cast(first, tf.int32)
    k_positive = tf.gather(k_node, tf.where(run_size > 1, run_start + offset, position))

    # Negative: the m-th node of another class in visiting order, among the earlier
    # ones if any (graph), else among all.
    if mode == RANDOM:
        num_cand = other_total
    else:
        num_cand = tf.where(other_earlier > 0, other_earlier, other_total)
    m = random_below(key, _STREAM_NEGATIVE, k_node, num_cand)

    # Within a run, other_earlier (#other-class nodes visited before a member) is sorted;
    # the members visited before the chosen node are those with other_earlier <= m, i.e.
    # k_rank - position <= m - run_start. Searching a function of the sort output (not
    # other_earlier itself) matters under XLA: fusing the producer chain of
    # other_earlier into every gather step made the search 20x slower at N=65536.
    def rank_minus_position(t):
        return _low_bits(tf.gather(sorted_key, t)) - t

    members_before = _upper_bound_in_runs(
        rank_minus_position, run_start, run_end, m - run_start, labels.shape[0]) - run_start
    k_negative = tf.gather(order, tf.minimum(m + members_before, n - 1))

    # Back from class positions to node indices (k_node is a permutation); masked rows
    # point at the anchor so later gathers stay in range.
    rows = tf.stack([tf.where(k_mask, k_positive, k_node),
                     tf.where(k_mask, k_negative, k_node),
                     tf.cast(k_mask, tf.int32)], axis=1)
    # Scatter only an iota (the class position of each node) and gather the rows: under
    # XLA a scatter fused with the row computation was the slowest step at N=65536.
    rows = tf.gather(rows, tf.scatter_nd(k_node[:, None], position, [n]))
    positive, negative, mask = rows[:, 0], rows[:, 1], rows[:, 2] > 0

    if mode == GRAPH_SEMIHARD:
        negative = _semihard_negatives(
            embeddings, labels, valid, _rank_of(order), positive, mask, negative)
    return tf.stack([position, positive, negative], axis=1), mask


def _semihard_negatives(embeddings, labels, valid, rank, positive, mask, default):
    """FaceNet semi-hard negatives int32 [N] among earlier other-class nodes.

    For anchor a: candidates = valid other-class nodes visited before a (all valid
    other-class nodes if none was). Choose the candidate n with the smallest
    D(a, n) > D(a, p); if no candidate is farther than the positive, the candidate with
    the largest D(a, n) (the least violating one, as tfa.losses.triplet_semihard_loss).
    D is the squared distance of L2-normalised flattened embeddings, with no gradient.
    Memory: [SEMIHARD_BLOCK, N] float32 per block of anchors; time O(N^2 D).
    """
    if embeddings is None:
        raise ValueError("mode 'graph_semihard' needs embeddings [N, ...].")
    x = tf.stop_gradient(losses.l2_normalize_flat(embeddings))
    n_static = labels.shape[0]
    n = tf.shape(x)[0]
    d_ap = tf.reduce_sum(tf.square(x - tf.gather(x, positive)), axis=1)
    sq = tf.reduce_sum(tf.square(x), axis=1)
    labels = tf.cast(labels, tf.int32)

    def block(rows):
        """Negatives int32 [B] for anchor rows int32 [B]."""
        xr = tf.gather(x, rows)
        dist = tf.gather(sq, rows)[:, None] + sq[None, :] - 2.0 * tf.matmul(
            xr, x, transpose_b=True)
        dist = tf.maximum(dist, 0.0)
        other = tf.logical_and(
            valid[None, :], tf.gather(labels, rows)[:, None] != labels[None, :])
        earlier = tf.logical_and(other, rank[None, :] < tf.gather(rank, rows)[:, None])
        has_earlier = tf.reduce_any(earlier, axis=1, keepdims=True)
        cand = tf.where(has_earlier, earlier, other)
        semi = tf.logical_and(cand, dist > tf.gather(d_ap, rows)[:, None])
        inf = tf.constant(float("inf"), tf.float32)
        semi_pick = tf.argmin(tf.where(semi, dist, inf), axis=1, output_type=tf.int32)
        loose_pick = tf.argmax(tf.where(cand, dist, -inf), axis=1, output_type=tf.int32)
        return tf.where(tf.reduce_any(semi, axis=1), semi_pick, loose_pick)

    if n_static == 0:  # argmin over an empty axis fails; nothing to choose anyway
        return default
    if n_static is not None and n_static <= SEMIHARD_BLOCK:
        chosen = block(tf.range(n, dtype=tf.int32))
    else:
        num_blocks = (n + SEMIHARD_BLOCK - 1) // SEMIHARD_BLOCK
        rows = tf.range(num_blocks * SEMIHARD_BLOCK, dtype=tf.int32)
        # Padding rows repeat the last node and are cut off below.
        rows = tf.reshape(tf.minimum(rows, n - 1), [num_blocks, SEMIHARD_BLOCK])
        chosen = tf.reshape(
            tf.map_fn(block, rows, fn_output_signature=tf.int32), [-1])[:n]
    return tf.where(mask, chosen, default)


def _check(labels, mode, embeddings):
    """Validate the mode and the static sizes; return labels as int32 [N]."""
    if mode not in MODES:
        raise ValueError(f"Unknown match mode {mode!r}; expected one of {MODES}.")
    if mode == GRAPH_SEMIHARD and embeddings is None:
        raise ValueError("mode 'graph_semihard' needs embeddings [N, ...].")
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank != 1:
        raise ValueError(f"labels must be [N], got shape {labels.shape}.")
    if labels.shape[0] is not None and labels.shape[0] > MAX_NODES:
        raise ValueError(f"At most {MAX_NODES} nodes, got {labels.shape[0]}.")
    return tf.cast(labels, tf.int32)


def build_triplets(labels, valid, seed, mode=GRAPH, embeddings=None, return_order=False):
    """One triplet per node: labels int32 [N], valid bool [N], seed int32 [2] ->
    (indices int32 [N,3] (anchor=i, positive, negative), mask bool [N]).

    Masked rows (invalid nodes, or no valid node of another class) point at the anchor
    itself. With return_order=True also returns visit_rank int32 [N]: the position of
    each valid node in the visiting order (0 = first), -1 for invalid nodes.
    `embeddings` [N, ...] is needed only by mode "graph_semihard".
    """
    labels = _check(labels, mode, embeddings)
    valid = tf.cast(valid, tf.bool)
    key = seed_key(seed)
    order = _visiting_order(valid, key)
    indices, mask = _triplets_from_order(labels, valid, order, key, mode, embeddings)
    if return_order:
        return indices, mask, tf.where(valid, _rank_of(order), -1)
    return indices, mask


def triplets_for_order(labels, valid, visit_rank, seed, mode=GRAPH, embeddings=None):
    """build_triplets with a given visiting order: visit_rank int32 [N] (a permutation of
    0..V-1 over the valid nodes; ignored for invalid ones) -> (indices [N,3], mask [N])."""
    labels = _check(labels, mode, embeddings)
    valid = tf.cast(valid, tf.bool)
    order = _order_from_rank(valid, visit_rank)
    return _triplets_from_order(labels, valid, order, seed_key(seed), mode, embeddings)


@keras.saving.register_keras_serializable(package="mm_tf")
class TripletGraph(keras.layers.Layer):
    """The match step as a layer: patch labels -> one (anchor, positive, negative) per node.

    No weights; a thin wrapper over `build_triplets` so the mode travels in the config.

    Args:
        mode: "graph" (class-wise connected graph, the paper), "random" (random
            triplets, the paper's ablation) or "graph_semihard" (graph positives,
            semi-hard negatives; needs `embeddings` in `call`).
        **kwargs: standard `keras.layers.Layer` arguments (name, dtype, ...).

    Example:
    >>> layer = TripletGraph(mode="graph")
    >>> indices, mask = layer(
    ...     tf.constant([0, 0, 1, 1, 2]), tf.constant([True] * 5), tf.constant([7, 0]))
    >>> indices.shape, mask.shape
    (TensorShape([5, 3]), TensorShape([5]))
    """

    def __init__(self, mode=GRAPH, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"Unknown match mode {mode!r}; expected one of {MODES}.")
        self.mode = mode

    def call(self, labels, valid, seed, embeddings=None):
        """labels int32 [N], valid bool [N], seed int32 [2], embeddings [N, ...] or None
        -> (indices int32 [N, 3], mask bool [N])."""
        return build_triplets(labels, valid, seed, mode=self.mode, embeddings=embeddings)

    def compute_output_shape(self, labels_shape, *args, **kwargs):
        """[N] -> ([N, 3], [N])."""
        n = labels_shape[0]
        return (n, 3), (n,)

    def get_config(self):
        """Layer config with the mode."""
        config = super().get_config()
        config.update({"mode": self.mode})
        return config
