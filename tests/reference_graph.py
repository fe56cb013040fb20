"""Plain-Python oracle of the release's match step, node by node (O(N^2)).

Written from the behaviour of `GraphToTripletLayer` in the authors' release
(`resources/sampling_layers.py`): visit the nodes in a random order; each visited node
takes a uniformly random earlier-visited node of its class (positive) and of another
class (negative). After the whole graph is built, nodes left without a positive take a
random same-class node other than themselves (themselves for a singleton class), and
nodes left without a negative take a random other-class node of the whole graph.
Differences kept in step with `mm_tf.match`: invalid nodes are left out of the graph,
and a node with no other-class node anywhere has no triplet (negative -1, mask False;
the release feeds a zero vector there).

`expected_supports` replays the same loop but records the candidate lists instead of
drawing, i.e. the oracle's exact distribution for a fixed visiting order (uniform over
each list). Used by tests/match_test.py and bench/graph_bench.py.
"""

import random

GRAPH = "graph"
RANDOM = "random"


def random_visiting_order(valid, rng):
    """A uniformly random visiting order: list of the valid node indices."""
    order = [i for i, ok in enumerate(valid) if ok]
    rng.shuffle(order)
    return order


def _walk(labels, valid, order, choose, mode):
    """The release loop; `choose(node, kind, candidates)` picks or records a candidate.

    Returns (positive, negative): lists [N] of node indices, -1 where there is none.
    """
    n = len(labels)
    positive = [-1] * n
    negative = [-1] * n
    in_graph = []
    if mode == GRAPH:
        for i in order:
            label = labels[i]
            pos_cand = [j for j in in_graph if labels[j] == label]
            neg_cand = [j for j in in_graph if labels[j] != label]
            if pos_cand:
                positive[i] = choose(i, "positive", pos_cand)
            if neg_cand:
                negative[i] = choose(i, "negative", neg_cand)
            in_graph.append(i)
    else:
        in_graph = list(order)
    # Fallbacks over the whole graph, in node-index order as in the release.
    for i in range(n):
        if not valid[i]:
            continue
        label = labels[i]
        if positive[i] == -1:
            pos_cand = [j for j in in_graph if labels[j] == label and j != i]
            positive[i] = choose(i, "positive", pos_cand) if pos_cand else i
        if negative[i] == -1:
            neg_cand = [j for j in in_graph if labels[j] != label]
            if neg_cand:
                negative[i] = choose(i, "negative", neg_cand)
    return positive, negative


def reference_triplets(labels, valid=None, rng=None, order=None, mode=GRAPH):
    """Triplets of the release algorithm for labels [N] (ints) and valid [N] (bools).

    Returns (triplets, mask, order): triplets a list of [N] (anchor, positive, negative)
    with -1 for a missing member, mask a list of [N] bools (valid node with a negative),
    order the visiting order used (random from `rng` unless given).
    """
    labels = [int(x) for x in labels]
    valid = [True] * len(labels) if valid is None else [bool(x) for x in valid]
    rng = rng if rng is not None else random.Random(0)
    if order is None:
        order = random_visiting_order(valid, rng)
    positive, negative = _walk(labels, valid, order, lambda i, kind, c: rng.choice(c), mode)
    triplets = [(i, positive[i], negative[i]) for i in range(len(labels))]
    mask = [valid[i] and negative[i] != -1 for i in range(len(labels))]
    return triplets, mask, order


def expected_supports(labels, valid, order, mode=GRAPH):
    """For a fixed visiting order: (positive_support, negative_support), lists [N] of the
    candidate lists each node draws from uniformly ([node] itself for a singleton
    class's positive, [] where there is no draw)."""
    labels = [int(x) for x in labels]
    valid = [bool(x) for x in valid]
    supports = {"positive": [[] for _ in labels], "negative": [[] for _ in labels]}

    def record(i, kind, candidates):
        supports[kind][i] = sorted(candidates)
        return candidates[0]

    positive, _ = _walk(labels, valid, order, record, mode)
    for i, p in enumerate(positive):
        if valid[i] and p == i and not supports["positive"][i]:
            supports["positive"][i] = [i]
    return supports["positive"], supports["negative"]
