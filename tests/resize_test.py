"""Tests of mm_tf.resize: the gather crop-and-resize against tf.image.crop_and_resize."""

import numpy as np
import pytest
import tensorflow as tf

from mm_tf import resize


def _random_case(seed, batch=2, height=23, width=31, channels=3, count=30):
    """Unit-range images [B,H,W,C], float pixel boxes [N,4] (some partly out), ids [N]."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(batch, height, width, channels)).astype(np.float32)
    sides = rng.uniform(2.0, 30.0, size=count)
    cy = rng.uniform(-8.0, height + 8.0, size=count)
    cx = rng.uniform(-8.0, width + 8.0, size=count)
    boxes = np.stack([cy - sides / 2, cx - sides / 2, cy + sides / 2, cx + sides / 2], 1)
    indices = rng.integers(0, batch, size=count).astype(np.int32)
    return images, boxes.astype(np.float32), indices


@pytest.mark.parametrize("crop_size", [1, 2, 7])
def test_matches_tf_crop_and_resize(crop_size):
    images, boxes, indices = _random_case(0)
    assert ((boxes[:, 0] < 0) | (boxes[:, 2] > 23)).any()  # some boxes leave the image
    ours = resize.crop_and_resize(images, boxes, indices, crop_size)
    ref = resize.crop_and_resize_reference(images, boxes, indices, crop_size)
    assert ours.shape == (30, crop_size, crop_size, 3)
    # The reference normalises then de-normalises coordinates (~1 ulp of a coordinate);
    # on unit-range images that moves values by a few 1e-6.
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-5, rtol=0)


def test_box_of_crop_side_copies_pixels_and_pads_with_zeros():
    """The sampling convention: a side-S box at integer pixels is an exact pixel copy."""
    images, _, _ = _random_case(1, batch=1, height=10, width=12)
    boxes = np.array([[-3, 5, 5, 13], [2, 2, 10, 10]], np.float32)  # side 8, end-exclusive
    out = resize.crop_and_resize(images, boxes, np.zeros(2, np.int32), 8).numpy()
    padded = np.zeros((1, 20, 22, 3), np.float32)
    padded[:, 5:15, 5:17] = images  # image pixel (y, x) sits at (y + 5, x + 5)
    np.testing.assert_array_equal(out[0], padded[0, 2:10, 10:18])
    np.testing.assert_array_equal(out[1], images[0, 2:10, 2:10])


def test_compiles_with_xla_and_matches_eager():
    images, boxes, indices = _random_case(2)
    # Inputs are arguments: constants built inside would be folded before XLA sees them.
    compiled = tf.function(lambda i, b, n: resize.crop_and_resize(i, b, n, 7),
                           jit_compile=True)
    out = compiled(tf.constant(images), tf.constant(boxes), tf.constant(indices))
    eager = resize.crop_and_resize(images, boxes, indices, 7)
    np.testing.assert_allclose(out.numpy(), eager.numpy(), atol=1e-5, rtol=0)


def test_gradient_matches_tf_crop_and_resize():
    images, boxes, indices = _random_case(3)
    weights = np.random.default_rng(4).normal(size=(30, 5, 5, 3)).astype(np.float32)

    def gradient(crop):
        x = tf.constant(images)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(crop(x, boxes, indices, 5) * weights)
        return tf.convert_to_tensor(tape.gradient(y, x)).numpy()

    ours = gradient(resize.crop_and_resize)
    assert np.abs(ours).sum() > 0
    np.testing.assert_allclose(ours, gradient(resize.crop_and_resize_reference),
                               atol=1e-4, rtol=0)
