"""Losses of mm-tf.

Triplet ranking loss of the match step (paper Eq. 1 and 2):
    L = 1/N sum_i max(D(a_i, p_i) - D(a_i, n_i) + alpha, 0),
    D(x, y) = || x/||x|| - y/||y|| ||^2 on flattened (pool5) features, alpha = 2.1.
The mean runs over the valid triplets only (masked rows of `mm_tf.match` are left
out). The release's Caffe TripletLoss layer divides the sum by 2N instead of N; its
gradients are therefore half of these (a learning-rate factor, not a different loss).
Every distance is computed in float32, whatever the embedding dtype.

Supervised contrastive loss over the graph's patches (Khosla et al. 2020, "L_out"; beyond
the paper): every valid node is an anchor, all other same-class nodes its positives,
every other valid node in its denominator, on L2-normalised features with temperature
tau. Anchors without a positive (singleton classes) are left out of the mean.

Soft triplet loss over the graph's triplets (beyond the paper): the hinge replaced by
softplus((D(a, p) - D(a, n)) / (2 tau)). On unit vectors D = 2 - 2 cos, so each term is
-log softmax over {p, n} of cos(a, .) / tau: SupCon with one positive and one negative,
the ones the triplet selection (graph or random) picked. Unlike the margin 2.1 it can
always be lowered, and unlike SupCon it reads only the selected pairs, so the graph and
random triplets train different losses.

Pixel cross-entropy of segmentation fine-tuning: per-pixel terms with the ignore label
excluded from both the sum and the count, reduced explicitly (0, not NaN, when a batch
has no labelled pixel).
"""

import tensorflow as tf

from mm_tf import common

# ----- Triplet ranking loss of the match step -----

# Triplet margin alpha of the paper and the release (`threshold_param { threshold: 2.1 }`).
MARGIN = 2.1

# Squared norms at or below this count as a zero vector.
_NORM_SQ_EPSILON = 1e-12


def l2_normalize_flat(x):
    """Flatten x [N, ...] to float32 [N, D] and L2-normalise each row.

    Rows with a (near) zero norm are passed through unscaled, as the release's Caffe
    Normalize layer does, so a zero vector stays zero and its gradient is finite.
    """
    x = tf.cast(x, tf.float32)
    x = tf.reshape(x, [tf.shape(x)[0], -1])
    norm_sq = tf.reduce_sum(tf.square(x), axis=1, keepdims=True)
    nonzero = norm_sq > _NORM_SQ_EPSILON
    # Double where: rsqrt never sees 0, so no inf/NaN flows into the gradient.
    inv_norm = tf.where(nonzero, tf.math.rsqrt(tf.where(nonzero, norm_sq, 1.0)), 1.0)
    return x * inv_norm


def pairwise_sq_dist_rows(x, i, j):
    """Squared distances float32 [K] between rows x[i] and x[j]: x [N, D], i, j int [K]."""
    diff = tf.gather(x, i) - tf.gather(x, j)
    return tf.reduce_sum(tf.square(diff), axis=1)


def triplet_terms(embeddings, indices, mask, margin=MARGIN):
    """Per-triplet hinge terms of embeddings [N, ...] for indices int [N, 3] and mask [N].

    Returns dict(per_triplet [N] = max(d_ap - d_an + margin, 0), d_ap [N], d_an [N]),
    all float32 and 0 where mask is False.
    """
    x = l2_normalize_flat(embeddings)
    indices = tf.cast(indices, tf.int32)
    mask = tf.cast(mask, tf.bool)
    d_ap = pairwise_sq_dist_rows(x, indices[:, 0], indices[:, 1])
    d_an = pairwise_sq_dist_rows(x, indices[:, 0], indices[:, 2])
    hinge = tf.nn.relu(d_ap - d_an + margin)
    zero = tf.zeros_like(hinge)
    # tf.where (not a multiply) so a masked row contributes no gradient at all.
    return {
        "per_triplet": tf.where(mask, hinge, zero),
        "d_ap": tf.where(mask, d_ap, zero),
        "d_an": tf.where(mask, d_an, zero),
    }


def triplet_loss(embeddings, indices, mask, margin=MARGIN, anchors=None):
    """Masked-mean triplet loss of embeddings [N, ...], indices [N, 3], mask [N].

    Returns float32 scalars: loss (mean over valid triplets, 0 when there is none),
    active_fraction (share of valid triplets with a positive hinge), d_ap and d_an
    (mean distances over valid triplets).

    anchors: optional (start, size) int scalars; then also `anchor_share`, the hinge terms
    of the anchors in rows [start, start + size) summed and divided by the count of ALL
    valid triplets. When replicas split a graph's anchors among them, their shares sum to
    `loss` exactly, so each replica differentiates only its own share.
    """
    terms = triplet_terms(embeddings, indices, mask, margin)
    result, count = _masked_mean(terms["per_triplet"], mask, anchors)
    active = tf.cast(terms["per_triplet"] > 0, tf.float32) * tf.cast(mask, tf.float32)
    result.update(active_fraction=tf.reduce_sum(active) / count,
                  d_ap=tf.reduce_sum(terms["d_ap"]) / count,
                  d_an=tf.reduce_sum(terms["d_an"]) / count)
    return result


def _masked_mean(per_row, mask, anchors=None):
    """per_row float32 [N] (0 where mask [N] is False) -> ({"loss": sum / count[,
    "anchor_share"]}, count), count = max(#mask, 1) so an all-masked batch gives 0."""
    count = tf.maximum(tf.reduce_sum(tf.cast(mask, tf.float32)), 1.0)
    result = {"loss": tf.reduce_sum(per_row) / count}
    if anchors is not None:
        result["anchor_share"] = _anchor_share(per_row, anchors, count)
    return result, count


def _anchor_share(per_anchor, anchors, count):
    """Sum of per_anchor [N] over rows [start, start + size) of anchors=(start, size),
    divided by `count` (all of the graph's anchors): the shares of replicas holding a
    graph's anchors sum to the graph's mean."""
    start, size = anchors
    own = tf.slice(per_anchor, tf.reshape(tf.cast(start, tf.int32), [1]),
                   tf.reshape(tf.cast(size, tf.int32), [1]))
    return tf.reduce_sum(own) / count


# ----- Supervised contrastive loss over the graph's nodes -----

# SupCon's temperature (Khosla et al. 2020 use 0.1 for their best ImageNet results).
TEMPERATURE = 0.1
TRIPLET = "triplet"
SUPCON = "supcon"
SOFT_TRIPLET = "soft_triplet"
LOSSES = (TRIPLET, SUPCON, SOFT_TRIPLET)


def supcon_terms(embeddings, labels, valid, temperature=TEMPERATURE):
    """Per-anchor SupCon terms of embeddings [N, ...], labels int [N], valid bool [N].

    Returns dict(per_anchor float32 [N]: -1/|P(i)| sum_{p in P(i)} log softmax_i(p) over
    the other valid nodes, 0 where the anchor is invalid or has no positive;
    has_positive bool [N]).
    """
    x = l2_normalize_flat(embeddings)
    labels = tf.cast(labels, tf.int32)
    valid = tf.cast(valid, tf.bool)
    n = tf.shape(x)[0]
    not_self = tf.logical_not(tf.eye(n, dtype=tf.bool))
    pair_valid = valid[:, None] & valid[None, :] & not_self
    positive = pair_valid & tf.equal(labels[:, None], labels[None, :])
    logits = tf.matmul(x, x, transpose_b=True) / temperature
    # Masked entries get a large negative logit, never -inf (0 * -inf would be NaN).
    logits = tf.where(pair_valid, logits, tf.fill(tf.shape(logits), -1e9))
    log_prob = logits - tf.reduce_logsumexp(logits, axis=1, keepdims=True)
    positives = tf.reduce_sum(tf.cast(positive, tf.float32), axis=1)
    has_positive = positives > 0
    summed = tf.reduce_sum(tf.where(positive, log_prob, tf.zeros_like(log_prob)), axis=1)
    per_anchor = -summed / tf.maximum(positives, 1.0)
    return {"per_anchor": tf.where(has_positive, per_anchor, tf.zeros_like(per_anchor)),
            "has_positive": has_positive}


def supcon_loss(embeddings, labels, valid, temperature=TEMPERATURE, anchors=None):
    """SupCon loss (float32 scalar `loss`: mean over anchors with a positive, 0 if none)
    of embeddings [N, ...], labels [N], valid [N]; with anchors=(start, size) also
    `anchor_share`: the terms of rows [start, start + size) over the same count, so
    replicas holding a graph's anchors sum their shares to `loss` (as triplet_loss)."""
    terms = supcon_terms(embeddings, labels, valid, temperature)
    return _masked_mean(terms["per_anchor"], terms["has_positive"], anchors)[0]


def soft_triplet_loss(embeddings, indices, mask, temperature=TEMPERATURE, anchors=None):
    """Masked mean of softplus((d_ap - d_an) / (2 tau)) over the valid triplets of
    embeddings [N, ...], indices [N, 3], mask [N] (float32 scalar `loss`, 0 if none);
    with anchors=(start, size) also `anchor_share`, as `triplet_loss`."""
    terms = triplet_terms(embeddings, indices, mask, margin=0.0)
    mask = tf.cast(mask, tf.bool)
    soft = tf.nn.softplus((terms["d_ap"] - terms["d_an"]) / (2.0 * temperature))
    return _masked_mean(tf.where(mask, soft, tf.zeros_like(soft)), mask, anchors)[0]


# --------------------------------------------------------------------------------------
# Segmentation: pixel cross-entropy that never sees the ignore label.
# --------------------------------------------------------------------------------------

def pixel_cross_entropy(logits, labels, ignore_label=common.IGNORE_LABEL, class_weights=None):
    """Softmax cross-entropy per pixel.

    Args:
      logits: [..., K] (any float dtype; cast to float32 first).
      labels: int [...], class ids in [0, K) or `ignore_label`.
      ignore_label: label value that contributes nothing (loss 0, not counted).
      class_weights: optional float [K]; each pixel's term is multiplied by the weight
        of its class (the count `num_valid` is not weighted, as in SegNet's Caffe loss).

    Returns:
      (per_pixel float32 [...], 0 at ignore pixels; num_valid float32 scalar, the number
      of non-ignore pixels). The loss is `reduce_sum(per_pixel) / num_valid`, see
      `mean_cross_entropy`.
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    # Ignore pixels get a harmless class id so the op neither fails nor yields NaN
    # gradients there; their terms are then zeroed.
    safe = tf.where(valid, labels, tf.zeros_like(labels))
    per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=logits)
    if class_weights is not None:
        per_pixel = per_pixel * tf.gather(tf.cast(class_weights, tf.float32), safe)
    per_pixel = tf.where(valid, per_pixel, tf.zeros_like(per_pixel))
    return per_pixel, tf.reduce_sum(tf.cast(valid, tf.float32))


def mean_cross_entropy(per_pixel, num_valid):
    """per_pixel float32 [...], num_valid scalar -> float32 scalar sum / num_valid (0 if
    no pixel is valid, never NaN)."""
    return tf.math.divide_no_nan(tf.reduce_sum(per_pixel), num_valid)
