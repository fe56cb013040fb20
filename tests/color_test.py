"""mm_tf.proxy.color: sRGB <-> Lab against scikit-image (eagerly, in tf.function and in
tf.data.map), LCh, and the hue/chroma bins' soft encoding and decoding round trip."""

import math
import warnings

import numpy as np
import pytest
import tensorflow as tf
from skimage import color as skcolor

from mm_tf.proxy import color

BINS = color.ColorBins()


def _rgb_samples(n=2000, seed=0):
    """float64 [n + 9, 3] random sRGB in [0, 1] plus the cube's corners and branch points."""
    rng = np.random.default_rng(seed)
    corners = np.array(np.meshgrid(*[[0.0, 1.0]] * 3)).reshape(3, -1).T
    edges = [[0.04045, 0.0031308, 0.5]]  # The sRGB curve's branch points.
    return np.concatenate([rng.uniform(0, 1, (n, 3)), corners, edges])


def _lab_samples(n=4000, seed=1):
    """float64 [n, 3] Lab values, many outside the sRGB gamut (negative Z included)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, 100, n), rng.uniform(-150, 150, n),
                     rng.uniform(-150, 150, n)], axis=-1)


def _skimage_lab2rgb(lab):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "negative Z values clipped": what we test.
        return skcolor.lab2rgb(lab)


def _eager(fn, x):
    return fn(tf.constant(x, tf.float32)).numpy()


def _graph(fn, x):
    return tf.function(fn)(tf.constant(x, tf.float32)).numpy()


def _data_map(fn, x):
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(x, tf.float32)).batch(256).map(fn)
    return np.concatenate([b.numpy() for b in ds])


@pytest.mark.parametrize("run", [_eager, _graph, _data_map], ids=["eager", "tf.function",
                                                                   "tf.data.map"])
def test_rgb_to_lab_matches_skimage(run):
    rgb = _rgb_samples()
    np.testing.assert_allclose(run(color.rgb_to_lab, rgb), skcolor.rgb2lab(rgb), atol=1e-3)


@pytest.mark.parametrize("run", [_eager, _graph, _data_map], ids=["eager", "tf.function",
                                                                   "tf.data.map"])
def test_lab_to_rgb_matches_skimage_including_clipping(run):
    lab = np.concatenate([skcolor.rgb2lab(_rgb_samples()), _lab_samples()])
    np.testing.assert_allclose(run(color.lab_to_rgb, lab), _skimage_lab2rgb(lab), atol=1e-3)


def test_image_shaped_conversion_and_round_trip():
    rgb = np.random.default_rng(2).integers(0, 256, (2, 5, 7, 3)).astype(np.uint8)
    lch = color.rgb_uint8_to_lch(rgb)
    assert lch.shape == (2, 5, 7, 3)
    np.testing.assert_allclose(lch.numpy()[..., 0], skcolor.rgb2lab(rgb)[..., 0], atol=1e-3)
    back = color.lab_to_rgb(color.lch_to_lab(lch)).numpy() * 255.0
    np.testing.assert_allclose(back, rgb, atol=1e-2)


def test_lch_hue_is_in_range_and_chroma_bound_holds():
    lab = skcolor.rgb2lab(np.array(np.meshgrid(*[np.linspace(0, 1, 33)] * 3)).reshape(3, -1).T)
    lch = color.lab_to_lch(lab).numpy()
    assert lch[:, 2].min() >= 0.0 and lch[:, 2].max() < 2 * math.pi
    # Every sRGB colour's chroma is within the last bin centre (pure blue: 133.8).
    assert 133.0 < lch[:, 1].max() <= color.MAX_CHROMA


def test_soft_encoding_is_normalised_and_local():
    lch = tf.constant([[50.0, 0.0, 0.1], [60.0, 40.3, 6.2], [70.0, 500.0, 3.0]])
    chroma_t, hue_t = color.encode_lch(lch, BINS)
    assert chroma_t.shape == (3, BINS.num_chroma_bins) and hue_t.shape == (3, BINS.num_hue_bins)
    np.testing.assert_allclose(tf.reduce_sum(chroma_t, -1), 1.0, atol=1e-6)
    np.testing.assert_allclose(tf.reduce_sum(hue_t, -1), 1.0, atol=1e-6)
    assert int(tf.reduce_max(tf.math.count_nonzero(chroma_t > 0, -1))) <= BINS.neighbours
    # Above max_chroma: all mass at the top of the range; hue 6.2 rad wraps next to 0.
    assert int(tf.argmax(chroma_t[2])) == BINS.num_chroma_bins - 1
    assert int(tf.argmax(hue_t[1])) == 0


def test_encode_then_decode_recovers_the_colour():
    chroma = np.linspace(0.0, BINS.max_chroma, 4001)
    hue = np.linspace(0.0, 2 * math.pi, 4001, endpoint=False)
    lch = np.stack([np.full_like(chroma, 50.0), chroma, hue], axis=-1)
    chroma_t, hue_t = color.encode_lch(lch, BINS)
    chroma_error = np.abs(color.decode_chroma(chroma_t, BINS).numpy() - chroma)
    hue_error = np.abs((color.decode_hue(hue_t, BINS).numpy() - hue + math.pi)
                       % (2 * math.pi) - math.pi)
    # The stated tolerances (module docstring): the ends of the chroma range lose the
    # Gaussian's mass beyond them, the interior is nearly exact.
    assert chroma_error.max() < 0.15 * BINS.chroma_width
    interior = (chroma > 2 * BINS.chroma_width) & (chroma < BINS.max_chroma - 2 * BINS.chroma_width)
    assert chroma_error[interior].max() < 0.03 * BINS.chroma_width
    assert hue_error.max() < 0.05 * BINS.hue_width


def test_decoded_logits_reproduce_a_lab_colour():
    lab = np.array([[55.0, 30.0, -20.0], [70.0, -40.0, 50.0]])
    lch = color.lab_to_lch(lab)
    chroma_t, hue_t = color.encode_lch(lch, BINS)
    # log of a distribution is a logit vector whose softmax is that distribution.
    logits = tf.math.log(tf.concat([chroma_t, hue_t], axis=-1) + 1e-12)
    decoded = color.decode_logits(logits, lch[:, 0], BINS).numpy()
    np.testing.assert_allclose(decoded, lab, atol=0.6)


def test_circular_mean_and_annealing():
    hue_probs = np.zeros((1, BINS.num_hue_bins), np.float32)
    hue_probs[0, 1], hue_probs[0, -1] = 0.5, 0.5  # Bins at +11.25 and -11.25 degrees.
    decoded = float(color.decode_hue(hue_probs, BINS)[0])  # In [0, 2 pi): 0 is either end.
    assert min(decoded, 2 * math.pi - decoded) < 1e-5
    probs = tf.constant([[0.6, 0.3, 0.1] + [0.0] * (BINS.num_chroma_bins - 3)])
    sharper = color.anneal(probs, 0.38).numpy()
    assert sharper[0, 0] > 0.6 and abs(sharper.sum() - 1.0) < 1e-6
    assert float(color.decode_chroma(probs, BINS, 0.38)[0]) < float(
        color.decode_chroma(probs, BINS)[0])


def test_bins_reject_bad_settings():
    with pytest.raises(ValueError, match="neighbours"):
        color.ColorBins(neighbours=0)
    with pytest.raises(ValueError, match="bins"):
        color.ColorBins(num_hue_bins=1)
