"""Tests of mm_tf.losses: triplet and pixel cross-entropy values worked out by hand,
masking and the ignore label, dtypes, gradients and compilation."""

import numpy as np
import scipy.special
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf import losses

# Four 2-D features whose normalised versions are simple:
#   x0 = (3, 4) -> (0.6, 0.8)   x1 = (1, 0) -> (1, 0)
#   x2 = (0, 2) -> (0, 1)       x3 = (-5, 0) -> (-1, 0)
# Squared distances of the normalised rows:
#   D01 = 0.4^2 + 0.8^2 = 0.8   D02 = 0.6^2 + 0.2^2 = 0.4   D03 = 1.6^2 + 0.8^2 = 3.2
#   D12 = 1 + 1 = 2             D13 = 2^2 = 4               D23 = 1 + 1 = 2
_X = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [-5.0, 0.0]], np.float32)
_INDICES = np.array([[0, 1, 3], [0, 2, 1], [1, 2, 3], [3, 1, 2]], np.int32)
_MASK = np.array([True, True, True, False])
# With margin 2.1:
#   (0, 1, 3): 0.8 - 3.2 + 2.1 = -0.3 -> 0      (margin inactive)
#   (0, 2, 1): 0.4 - 0.8 + 2.1 = 1.7            (active)
#   (1, 2, 3): 2.0 - 4.0 + 2.1 = 0.1            (active)
#   (3, 1, 2): 4.0 - 2.0 + 2.1 = 4.1, masked -> 0
_PER_TRIPLET = [0.0, 1.7, 0.1, 0.0]
_D_AP = [0.8, 0.4, 2.0, 0.0]
_D_AN = [3.2, 0.8, 4.0, 0.0]


def test_margin_constant():
    assert losses.MARGIN == 2.1


def test_l2_normalize_flat_shapes_and_zero_rows():
    x = np.zeros((3, 2, 2, 1), np.float32)
    x[0, 0, 0, 0], x[0, 1, 1, 0] = 3.0, 4.0
    x[2] = -1.0
    y = losses.l2_normalize_flat(tf.constant(x)).numpy()
    assert y.shape == (3, 4) and y.dtype == np.float32
    np.testing.assert_allclose(y[0], [0.6, 0.0, 0.0, 0.8], atol=1e-6)
    np.testing.assert_array_equal(y[1], 0.0)  # a zero row stays zero
    np.testing.assert_allclose(y[2], [-0.5] * 4, atol=1e-6)


def test_pairwise_sq_dist_rows():
    x = losses.l2_normalize_flat(tf.constant(_X))
    d = losses.pairwise_sq_dist_rows(x, tf.constant([0, 0, 0, 1, 1, 2]),
                                     tf.constant([1, 2, 3, 2, 3, 3])).numpy()
    np.testing.assert_allclose(d, [0.8, 0.4, 3.2, 2.0, 4.0, 2.0], atol=1e-6)


def test_triplet_terms_by_hand():
    terms = losses.triplet_terms(tf.constant(_X), tf.constant(_INDICES), tf.constant(_MASK))
    np.testing.assert_allclose(terms["per_triplet"].numpy(), _PER_TRIPLET, atol=1e-6)
    np.testing.assert_allclose(terms["d_ap"].numpy(), _D_AP, atol=1e-6)
    np.testing.assert_allclose(terms["d_an"].numpy(), _D_AN, atol=1e-6)


def test_triplet_loss_by_hand():
    out = losses.triplet_loss(tf.constant(_X), tf.constant(_INDICES), tf.constant(_MASK))
    np.testing.assert_allclose(out["loss"].numpy(), (0.0 + 1.7 + 0.1) / 3, atol=1e-6)
    np.testing.assert_allclose(out["active_fraction"].numpy(), 2 / 3, atol=1e-6)
    np.testing.assert_allclose(out["d_ap"].numpy(), (0.8 + 0.4 + 2.0) / 3, atol=1e-6)
    np.testing.assert_allclose(out["d_an"].numpy(), (3.2 + 0.8 + 4.0) / 3, atol=1e-6)
    # Margin 0.5: only (0, 2, 1) stays active: 0.4 - 0.8 + 0.5 = 0.1.
    out = losses.triplet_loss(_X, _INDICES, _MASK, margin=0.5)
    np.testing.assert_allclose(out["loss"].numpy(), 0.1 / 3, atol=1e-6)
    np.testing.assert_allclose(out["active_fraction"].numpy(), 1 / 3, atol=1e-6)


def test_all_masked_gives_zero_not_nan():
    x = tf.constant(_X)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = losses.triplet_loss(x, _INDICES, np.zeros(4, bool))
    for value in out.values():
        assert float(value) == 0.0
    grad = tape.gradient(out["loss"], x).numpy()
    np.testing.assert_array_equal(grad, 0.0)


def test_masked_rows_get_no_gradient():
    x = tf.constant(_X)
    with tf.GradientTape() as tape:
        tape.watch(x)
        # Only (0, 2, 1) is live; the masked (3, 1, 2) would be active (4.1) if it were.
        terms = losses.triplet_terms(x, [[3, 1, 2], [0, 2, 1]], [False, True])
        loss = tf.reduce_sum(terms["per_triplet"])
    grad = tape.gradient(loss, x).numpy()
    np.testing.assert_array_equal(grad[3], 0.0)
    assert np.all(np.abs(grad[:3]).sum(axis=1) > 0)


def test_gradients_finite_for_zero_vectors():
    x = tf.constant(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], np.float32))
    indices = tf.constant([[0, 2, 1], [1, 3, 0], [2, 0, 3], [3, 1, 2]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = losses.triplet_loss(x, indices, tf.ones([4], tf.bool))["loss"]
    grad = tape.gradient(loss, x).numpy()
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype(np.float64)
    indices = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 4], [3, 2, 0], [4, 0, 1]], np.int32)
    mask = np.array([True, True, False, True, True])

    def loss_fn(v):
        return losses.triplet_loss(v, indices, mask, margin=3.0)["loss"]

    analytic, numeric = tf.test.compute_gradient(loss_fn, [tf.constant(x, tf.float32)],
                                                 delta=1e-3)
    np.testing.assert_allclose(analytic[0], numeric[0], atol=2e-2)


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16])
def test_low_precision_embeddings_are_measured_in_float32(dtype):
    x = tf.cast(tf.constant(_X), dtype)
    out = losses.triplet_loss(x, _INDICES, _MASK)
    assert all(v.dtype == tf.float32 for v in out.values())
    # _X is exact in both formats, so the hand values hold to float32 round-off.
    np.testing.assert_allclose(out["loss"].numpy(), 0.6, atol=1e-5)


def test_rank4_features_and_xla():
    rng = np.random.default_rng(1)
    feats = tf.constant(rng.normal(size=(6, 2, 2, 3)), tf.float32)
    indices = tf.constant(rng.integers(0, 6, size=(6, 3)), tf.int32)
    mask = tf.constant([True, False, True, True, False, True])
    eager = losses.triplet_loss(feats, indices, mask)
    compiled = tf.function(losses.triplet_loss, jit_compile=True)(feats, indices, mask)
    flat = losses.triplet_loss(tf.reshape(feats, [6, -1]), indices, mask)
    for key in eager:
        np.testing.assert_allclose(compiled[key].numpy(), eager[key].numpy(), rtol=1e-5)
        np.testing.assert_allclose(flat[key].numpy(), eager[key].numpy(), rtol=1e-6)


# Pixel cross-entropy (segmentation).

IGNORE = common.IGNORE_LABEL


def test_pixel_cross_entropy_by_hand_excludes_ignore_pixels():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
    labels = np.array([[[0, 1, IGNORE], [3, 2, 1]], [[IGNORE, IGNORE, 0], [2, 3, 3]]])
    per_pixel, num_valid = losses.pixel_cross_entropy(tf.constant(logits, tf.float16), labels)
    assert per_pixel.dtype == tf.float32 and per_pixel.shape == (2, 2, 3)
    logp = scipy.special.log_softmax(logits.astype(np.float16).astype(np.float64), axis=-1)
    valid = labels != IGNORE
    expected = np.where(valid, -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None],
                                                   -1)[..., 0], 0.0)
    np.testing.assert_allclose(per_pixel.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert float(num_valid) == valid.sum() == 9
    np.testing.assert_allclose(float(losses.mean_cross_entropy(per_pixel, num_valid)),
                               expected.sum() / 9, rtol=1e-5)


def test_all_ignore_batch_gives_zero_loss_and_finite_gradients():
    logits = tf.Variable(tf.random.normal([2, 4, 4, 3]))
    labels = tf.fill([2, 4, 4], IGNORE)
    with tf.GradientTape() as tape:
        per_pixel, num_valid = losses.pixel_cross_entropy(logits, labels)
        loss = losses.mean_cross_entropy(per_pixel, num_valid)
    grad = tape.gradient(loss, logits)
    assert float(loss) == 0.0 and float(num_valid) == 0.0
    assert np.all(np.isfinite(grad.numpy())) and np.all(grad.numpy() == 0)


def test_class_weights_scale_each_pixel_by_its_class():
    logits = tf.constant(np.random.default_rng(1).normal(size=(1, 5, 3)), tf.float32)
    labels = tf.constant([[0, 1, 2, IGNORE, 1]])
    plain, count = losses.pixel_cross_entropy(logits, labels)
    weighted, count_w = losses.pixel_cross_entropy(logits, labels, class_weights=[2.0, 0.5, 0.0])
    np.testing.assert_allclose(weighted.numpy(),
                               plain.numpy() * np.array([[2.0, 0.5, 0.0, 0.0, 0.5]]), rtol=1e-6)
    assert float(count) == float(count_w) == 4  # The count is not weighted.


def _supcon_by_hand(x, labels, valid, tau):
    """SupCon L_out with numpy loops, the definition of Khosla et al. 2020 Eq. 2."""
    x = x.reshape(len(x), -1).astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    terms = []
    for i in range(len(x)):
        if not valid[i]:
            continue
        others = [a for a in range(len(x)) if a != i and valid[a]]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(np.exp(x[i] @ x[a] / tau) for a in others)
        terms.append(-np.mean([np.log(np.exp(x[i] @ x[p] / tau) / denominator)
                               for p in positives]))
    return float(np.mean(terms)) if terms else 0.0


def test_supcon_loss_by_hand():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 2, 2, 3)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 1, 2, 0], np.int32)  # class 2 is a singleton
    valid = np.array([True, True, True, True, True, True, False])
    result = losses.supcon_loss(x, labels, valid, temperature=0.3, anchors=(0, 3))
    np.testing.assert_allclose(float(result["loss"]), _supcon_by_hand(x, labels, valid, 0.3),
                               rtol=1e-5)
    rest = losses.supcon_loss(x, labels, valid, temperature=0.3, anchors=(3, 4))
    np.testing.assert_allclose(float(result["anchor_share"] + rest["anchor_share"]),
                               float(result["loss"]), rtol=1e-5)


def test_supcon_is_finite_with_one_class_and_with_singletons():
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=(5, 8)).astype(np.float32))
    one_class = np.zeros(5, np.int32)
    valid = np.ones(5, bool)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = losses.supcon_loss(x, one_class, valid, temperature=0.1)["loss"]
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), _supcon_by_hand(x.numpy(), one_class, valid, 0.1),
                               rtol=1e-5)
    assert np.all(np.isfinite(tape.gradient(loss, x).numpy()))
    singletons = np.arange(5, dtype=np.int32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = losses.supcon_loss(x, singletons, valid)["loss"]
    assert float(loss) == 0.0
    gradient = tape.gradient(loss, x)
    assert gradient is None or np.all(np.isfinite(gradient.numpy()))


def test_soft_triplet_loss_by_hand_is_a_two_way_softmax():
    # Unit rows of _X: the valid triplets (0,1,3), (0,2,1), (1,2,3) have gaps d_ap - d_an
    # of -2.4, -0.4, -2.0 (module comment); each term is softplus(gap / (2 tau)), which
    # equals -log softmax of cos/tau over {positive, negative} (D = 2 - 2 cos).
    tau = 0.25
    gaps = np.array(_D_AP[:3]) - np.array(_D_AN[:3])
    expected = np.mean(np.log1p(np.exp(gaps / (2 * tau))))
    x = _X / np.linalg.norm(_X, axis=1, keepdims=True)
    two_way = [-np.log(scipy.special.softmax([x[a] @ x[p] / tau, x[a] @ x[n] / tau])[0])
               for a, p, n in _INDICES[:3]]
    np.testing.assert_allclose(expected, np.mean(two_way), rtol=1e-6)
    result = losses.soft_triplet_loss(_X, _INDICES, _MASK, temperature=tau, anchors=(0, 2))
    np.testing.assert_allclose(float(result["loss"]), expected, rtol=1e-5)
    # The masked row (3, 1, 2) would add softplus(2 / 0.5): it is left out, not zeroed in.
    rest = losses.soft_triplet_loss(_X, _INDICES, _MASK, temperature=tau, anchors=(2, 2))
    np.testing.assert_allclose(float(result["anchor_share"] + rest["anchor_share"]),
                               expected, rtol=1e-5)


def test_soft_triplet_loss_has_no_gradient_from_masked_rows_and_zero_when_empty():
    x = tf.constant(_X)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = losses.soft_triplet_loss(x, _INDICES, [False, True, False, False])["loss"]
    gradient = tape.gradient(loss, x).numpy()
    assert np.all(gradient[3] == 0) and np.abs(gradient[[0, 1, 2]]).sum() > 0
    empty = losses.soft_triplet_loss(x, _INDICES, np.zeros(4, bool))["loss"]
    assert float(empty) == 0.0
