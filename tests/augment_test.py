"""Tests of mm_tf.data.augment, each run eagerly, inside tf.function and inside tf.data.map.

The test image is made of 8x8 blocks whose red channel encodes the block's class
(red = 32 * class + 16) and whose green channel is 255 in a block's interior and 0 on its
two-pixel rim. The label is therefore a function of the pixels (class = red // 32), and
after bilinear rescaling it must still hold wherever green stayed 255 (every source pixel
that contributed was inside one block).
"""

import numpy as np
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf.data import augment

MODES = ("eager", "function", "dataset")
BLOCK = 8


def run(mode, fn, *args):
    """Call fn(*args) eagerly, under tf.function, or as a tf.data map; return numpy outputs."""
    args = tuple(tf.convert_to_tensor(a) for a in args)
    if mode == "eager":
        out = fn(*args)
    elif mode == "function":
        out = tf.function(fn)(*args)
    else:
        ds = tf.data.Dataset.from_tensors(args).map(lambda *a: fn(*a))
        out = next(iter(ds))
    return tuple(np.asarray(o) for o in out)


def block_example(height=32, width=48, seed=0):
    """Return (image float32 [H,W,3], label uint8 [H,W]) built from 8x8 blocks of random classes."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 7, size=(height // BLOCK, width // BLOCK)).astype(np.uint8)
    label = np.kron(classes, np.ones((BLOCK, BLOCK), np.uint8))
    interior = np.zeros((BLOCK, BLOCK), np.float32)
    interior[2:-2, 2:-2] = 255.0
    image = np.stack(
        [
            label.astype(np.float32) * 32 + 16,
            np.tile(interior, (height // BLOCK, width // BLOCK)),
            rng.uniform(0, 255, size=(height, width)).astype(np.float32),
        ],
        axis=-1,
    )
    return image, label


def assert_aligned(image, label, interior_only):
    """Check label == red // 32 on labelled pixels (only block interiors after rescaling)."""
    check = label != common.IGNORE_LABEL
    if interior_only:
        check &= image[..., 1] > 254.5
    assert check.sum() > 0
    np.testing.assert_array_equal(label[check], (image[..., 0][check] // 32).astype(label.dtype))


SEED = np.array([3, 7], np.int32)


@pytest.mark.parametrize("mode", MODES)
def test_random_scale_keeps_alignment_and_range(mode):
    image, label = block_example()
    for s in range(4):
        seed = np.array([s, 1], np.int32)
        out_image, out_label = run(
            mode, lambda i, lab, sd: augment.random_scale(i, lab, sd, 0.5, 2.0), image, label, seed
        )
        assert out_image.dtype == np.float32 and out_label.dtype == np.uint8
        assert out_image.shape[:2] == out_label.shape
        ratio = out_image.shape[0] / image.shape[0]
        assert 0.5 - 1 / 32 <= ratio <= 2.0 + 1 / 32
        assert set(np.unique(out_label)) <= set(np.unique(label))  # Nearest never invents a class.
        assert_aligned(out_image, out_label, interior_only=True)


@pytest.mark.parametrize("mode", MODES)
def test_pad_uses_ignore_label_and_fill(mode):
    image, label = block_example(16, 24)
    out_image, out_label = run(
        mode, lambda i, lab: augment.pad_to_size(i, lab, 20, 30, "mean"), image, label
    )
    assert out_image.shape == (20, 30, 3) and out_label.shape == (20, 30)
    np.testing.assert_array_equal(out_image[:16, :24], image)
    np.testing.assert_array_equal(out_label[:16, :24], label)
    assert (out_label[16:] == 255).all() and (out_label[:, 24:] == 255).all()
    np.testing.assert_allclose(out_image[16:, 0], np.tile(common.RGB_MEAN, (4, 1)), rtol=1e-6)
    zeros_image, _ = run(
        mode, lambda i, lab: augment.pad_to_size(i, lab, 20, 30, "zeros"), image, label
    )
    assert (zeros_image[:, 24:] == 0).all()
    same_image, same_label = run(
        mode, lambda i, lab: augment.pad_to_size(i, lab, 8, 8), image, label
    )
    assert same_image.shape == image.shape and same_label.shape == label.shape  # Never crops.


@pytest.mark.parametrize("mode", MODES)
def test_crop_and_flip_keep_exact_alignment(mode):
    image, label = block_example()
    flipped = set()
    for s in range(6):
        seed = np.array([s, 2], np.int32)
        out_image, out_label = run(
            mode, lambda i, lab, sd: augment.random_crop(i, lab, sd, 24, 24), image, label, seed
        )
        assert out_image.shape == (24, 24, 3) and out_label.shape == (24, 24)
        assert_aligned(out_image, out_label, interior_only=False)
        out_image, out_label = run(mode, augment.random_flip, image, label, seed)
        assert_aligned(out_image, out_label, interior_only=False)
        is_flipped = not np.array_equal(out_label, label)
        np.testing.assert_array_equal(out_image, image[:, ::-1] if is_flipped else image)
        flipped.add(is_flipped)
    assert flipped == {True, False}  # Both outcomes happen over a few seeds.


@pytest.mark.parametrize("mode", MODES)
def test_augment_output_shape_alignment_and_padding(mode):
    image, label = block_example()
    fn = lambda i, lab, sd: augment.augment(i, lab, sd, crop_size=40, min_scale=0.5, max_scale=1.5)  # noqa: E731
    saw_padding = False
    for s in range(5):
        out_image, out_label = run(mode, fn, image, label, np.array([s, 4], np.int32))
        assert out_image.shape == (40, 40, 3) and out_label.shape == (40, 40)
        assert_aligned(out_image, out_label, interior_only=True)
        padded = np.all(np.isclose(out_image, common.RGB_MEAN, atol=1e-3), axis=-1)
        assert (out_label[padded] == 255).all()
        saw_padding |= bool(padded.any())
    assert saw_padding  # A 32x48 image scaled <= 1.5 is always padded to 40x40 somewhere.


@pytest.mark.parametrize("mode", MODES)
def test_augment_is_deterministic_per_seed(mode):
    image, label = block_example()
    fn = lambda i, lab, sd: augment.augment(i, lab, sd, crop_size=24)  # noqa: E731
    first = run(mode, fn, image, label, SEED)
    again = run(mode, fn, image, label, SEED)
    other = run(mode, fn, image, label, SEED + 1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_augment_same_result_in_every_mode():
    image, label = block_example()
    fn = lambda i, lab, sd: augment.augment(i, lab, sd, crop_size=24)  # noqa: E731
    results = [run(mode, fn, image, label, SEED) for mode in MODES]
    for other in results[1:]:
        np.testing.assert_allclose(results[0][0], other[0], atol=1e-4)
        np.testing.assert_array_equal(results[0][1], other[1])


def test_fill_values_rejects_unknown_names():
    with pytest.raises(ValueError, match="fill"):
        augment.fill_values("median", 3)
    np.testing.assert_allclose(
        augment.fill_values("mean", 1).numpy(), [np.mean(common.RGB_MEAN)], rtol=1e-6
    )


def _normalised_batch(seed=0, n=6):
    rng = np.random.default_rng(seed)
    raw = rng.uniform(0, 255, size=(n, 8, 8, 3)).astype(np.float32)
    return raw, raw - np.array(common.RGB_MEAN, np.float32)


def test_photometric_jitter_off_is_identity_and_stays_in_range():
    raw, images = _normalised_batch()
    seed = tf.constant([1, 2], tf.int32)
    np.testing.assert_array_equal(
        augment.photometric_jitter(images, seed, 0.0, 0.0).numpy(), images)
    jittered = augment.photometric_jitter(images, seed, 1.0, 0.0).numpy()
    unit = (jittered + np.array(common.RGB_MEAN, np.float32)) / 255.0
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    assert np.abs(jittered - images).max() > 1.0
    # Each image gets its own draw: the change is not one shared map.
    ratio = (unit.reshape(6, -1).mean(1) + 1e-3) / ((raw / 255).reshape(6, -1).mean(1) + 1e-3)
    assert np.ptp(ratio) > 0.01


def test_photometric_jitter_grey_and_seeded_and_equal_in_tf_function():
    _, images = _normalised_batch(1)
    seed = tf.constant([3, 4], tf.int32)
    grey = augment.photometric_jitter(images, seed, 0.0, 1.0).numpy()
    unit = grey + np.array(common.RGB_MEAN, np.float32)
    np.testing.assert_allclose(unit[..., 0], unit[..., 1], atol=1e-3)
    np.testing.assert_allclose(unit[..., 1], unit[..., 2], atol=1e-3)
    eager = augment.photometric_jitter(images, seed, 0.5, 0.3).numpy()
    graph = tf.function(lambda x, s: augment.photometric_jitter(x, s, 0.5, 0.3))(
        tf.constant(images), seed).numpy()
    np.testing.assert_allclose(eager, graph, atol=1e-3)
    other = augment.photometric_jitter(images, tf.constant([3, 5], tf.int32), 0.5, 0.3)
    assert np.abs(other.numpy() - eager).max() > 1.0
    grey_input = images.mean(-1, keepdims=True) / 255.0
    out = augment.photometric_jitter(grey_input - common.GREY_SHIFT, seed, 0.5, 0.0,
                                     common.INPUT_GREY).numpy()
    assert out.shape == grey_input.shape
    assert (out + common.GREY_SHIFT).min() >= -1e-6 and (out + common.GREY_SHIFT).max() <= 1 + 1e-6
