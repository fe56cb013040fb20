"""Colour spaces and colour bins of the colorization proxy task, in graph-mode TensorFlow.

Conversions. sRGB (D65, 2-degree observer) <-> CIE Lab <-> LCh (lightness, chroma,
hue angle), with the constants of scikit-image (`skimage.color.rgb2lab` / `lab2rgb`),
which the tests use as the reference (agreement to 1e-3, eagerly, in `tf.function` and
in `tf.data.map`). `lab_to_rgb` clips like scikit-image: negative Z to 0, RGB to [0, 1].

Colour bins: Larsson et al.'s hue/chroma histograms (not Zhang et al.'s 313 ab bins).
The network predicts two distributions per pixel: chroma C = sqrt(a^2 + b^2) over
`num_chroma_bins` (32) centres evenly spaced on [0, max_chroma] (the sRGB gamut reaches
C ~ 133.8, pure blue), and hue h = atan2(b, a) over `num_hue_bins` (32) centres evenly
spaced on the circle. We chose hue/chroma because the M&M paper's colorization
networks are Larsson et al.'s (whose hypercolumn head we reuse), because lightness
stays a pass-through channel, and because the bins need no gamut table or class
rebalancing statistics from ImageNet (Zhang et al.'s 313 in-gamut bins and their
rebalancing weights come from ImageNet colour statistics).

Soft encoding: a colour's target over each histogram is a Gaussian of its distance to
the bin centres (sigma = `sigma` bin widths, circular distance for hue) kept on the
`neighbours` nearest bins and normalised to 1 (Zhang et al.'s soft encoding, in 1-D).
Decoding a predicted distribution: chroma = expectation over the centres, hue = the
circular mean (the angle of the probability-weighted sum of the unit vectors of the hue
centres); `temperature` < 1 gives Zhang et al.'s annealed mean (p^(1/T) renormalised).
Round trip (tested): encode -> decode recovers chroma within 0.15 bin widths (0.65 Lab
units) everywhere on [0, max_chroma] and hue within 0.05 bin widths (0.6 degrees).

Example:
    lch = lab_to_lch(rgb_to_lab(rgb_uint8 / 255.0))            # [..., 3]
    chroma_t, hue_t = encode_lch(lch, ColorBins())             # [..., 32], [..., 32]
    lab = decode_logits(logits, lch[..., 0], ColorBins())      # logits [..., 64]
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

# sRGB primaries -> XYZ (scikit-image's `xyz_from_rgb`, from the sRGB specification).
XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
# D65 white point, 2-degree observer (scikit-image's default illuminant).
WHITE_D65 = (0.95047, 1.0, 1.08883)
# Largest chroma of an sRGB colour (pure blue: 133.8); higher values land in the last bin.
MAX_CHROMA = 134.0

_EPSILON = 0.008856  # CIE (6/29)^3 threshold of the Lab cube-root branch.
_KAPPA = 7.787  # Slope of the linear branch (scikit-image's constant).
_F_THRESHOLD = 0.2068966  # 6/29: the inverse branch switch.


def srgb_to_linear(rgb) -> tf.Tensor:
    """sRGB in [0, 1] float [..., 3] -> linear RGB [..., 3] (the sRGB transfer curve)."""
    rgb = tf.convert_to_tensor(rgb, tf.float32)
    # The maximum keeps pow's argument positive in the branch tf.where discards.
    curved = tf.pow((tf.maximum(rgb, 0.04045) + 0.055) / 1.055, 2.4)
    return tf.where(rgb > 0.04045, curved, rgb / 12.92)


def linear_to_srgb(linear) -> tf.Tensor:
    """Linear RGB [..., 3] -> sRGB [..., 3] clipped to [0, 1]."""
    linear = tf.convert_to_tensor(linear, tf.float32)
    curved = 1.055 * tf.pow(tf.maximum(linear, 0.0031308), 1.0 / 2.4) - 0.055
    return tf.clip_by_value(tf.where(linear > 0.0031308, curved, linear * 12.92), 0.0, 1.0)


def _matmul_last(x, matrix) -> tf.Tensor:
    """x [..., 3] times a 3x3 numpy matrix applied to the last axis -> [..., 3]."""
    return tf.einsum("...j,ij->...i", x, tf.constant(matrix, tf.float32))


def rgb_to_lab(rgb) -> tf.Tensor:
    """sRGB in [0, 1] float [..., 3] -> CIE Lab float32 [..., 3] (L in [0, 100])."""
    xyz = _matmul_last(srgb_to_linear(rgb), XYZ_FROM_RGB) / tf.constant(WHITE_D65, tf.float32)
    cube_root = tf.pow(tf.maximum(xyz, _EPSILON), 1.0 / 3.0)
    f = tf.where(xyz > _EPSILON, cube_root, _KAPPA * xyz + 16.0 / 116.0)
    fx, fy, fz = tf.unstack(f, axis=-1)
    return tf.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_rgb(lab) -> tf.Tensor:
    """CIE Lab [..., 3] -> sRGB in [0, 1] float32 [..., 3] (out-of-gamut colours clipped)."""
    lab = tf.convert_to_tensor(lab, tf.float32)
    lightness, a, b = tf.unstack(lab, axis=-1)
    fy = (lightness + 16.0) / 116.0
    # scikit-image clips negative Z (very saturated blues beyond the gamut) to zero.
    f = tf.stack([a / 500.0 + fy, fy, tf.maximum(fy - b / 200.0, 0.0)], axis=-1)
    xyz = tf.where(f > _F_THRESHOLD, f * f * f, (f - 16.0 / 116.0) / _KAPPA)
    xyz = xyz * tf.constant(WHITE_D65, tf.float32)
    return linear_to_srgb(_matmul_last(xyz, RGB_FROM_XYZ))


def lab_to_lch(lab) -> tf.Tensor:
    """Lab [..., 3] -> LCh [..., 3]: lightness, chroma >= 0, hue angle in [0, 2 pi)."""
    lab = tf.convert_to_tensor(lab, tf.float32)
    lightness, a, b = tf.unstack(lab, axis=-1)
    hue = tf.math.floormod(tf.atan2(b, a), 2.0 * math.pi)
    return tf.stack([lightness, tf.sqrt(a * a + b * b), hue], axis=-1)


def lch_to_lab(lch) -> tf.Tensor:
    """LCh [..., 3] (hue in radians) -> Lab [..., 3]."""
    lch = tf.convert_to_tensor(lch, tf.float32)
    lightness, chroma, hue = tf.unstack(lch, axis=-1)
    return tf.stack([lightness, chroma * tf.cos(hue), chroma * tf.sin(hue)], axis=-1)


def rgb_uint8_to_lch(rgb) -> tf.Tensor:
    """RGB uint8 (or float 0..255) [..., 3] -> LCh float32 [..., 3]."""
    return lab_to_lch(rgb_to_lab(tf.cast(rgb, tf.float32) / 255.0))


@dataclasses.dataclass(frozen=True)
class ColorBins:
    """The hue and chroma histograms predicted per pixel, and their soft encoding.

    Args:
      num_chroma_bins: chroma centres, evenly spaced on [0, max_chroma] (ends included).
      num_hue_bins: hue centres 2 pi i / num_hue_bins, i = 0 .. num_hue_bins - 1.
      max_chroma: the last chroma centre; larger chroma is encoded as this value.
      sigma: Gaussian width of the soft encoding, in bin widths.
      neighbours: bins (nearest to the colour) that carry target mass.

    Example:
      bins = ColorBins()
      bins.num_bins  # 64 logits per pixel: chroma first, then hue.
    """

    num_chroma_bins: int = 32
    num_hue_bins: int = 32
    max_chroma: float = MAX_CHROMA
    sigma: float = 0.5
    neighbours: int = 5

    def __post_init__(self):
        if self.num_chroma_bins < 2 or self.num_hue_bins < 2:
            raise ValueError(f"need >= 2 chroma and hue bins, got {self.num_chroma_bins}, "
                             f"{self.num_hue_bins}")
        if not 1 <= self.neighbours <= min(self.num_chroma_bins, self.num_hue_bins):
            raise ValueError(f"neighbours must be in [1, number of bins], got {self.neighbours}")
        if self.sigma <= 0 or self.max_chroma <= 0:
            raise ValueError(f"sigma and max_chroma must be > 0, got {self.sigma}, "
                             f"{self.max_chroma}")

    @property
    def num_bins(self) -> int:
        """Logits per pixel: chroma bins then hue bins."""
        return self.num_chroma_bins + self.num_hue_bins

    @property
    def chroma_width(self) -> float:
        """Spacing of the chroma centres in Lab units."""
        return self.max_chroma / (self.num_chroma_bins - 1)

    @property
    def hue_width(self) -> float:
        """Spacing of the hue centres in radians."""
        return 2.0 * math.pi / self.num_hue_bins

    def chroma_centres(self) -> np.ndarray:
        """float32 [num_chroma_bins] chroma of each bin centre."""
        return (np.arange(self.num_chroma_bins) * self.chroma_width).astype(np.float32)

    def hue_centres(self) -> np.ndarray:
        """float32 [num_hue_bins] hue angle (radians) of each bin centre."""
        return (np.arange(self.num_hue_bins) * self.hue_width).astype(np.float32)


def soft_encode(values, centres, width, sigma, neighbours, period=None) -> tf.Tensor:
    """Values [...] -> soft one-hot [..., K] over `centres` [K] (Gaussian on the k nearest).

    Distances are in units of `width` (the bin spacing); with `period` they wrap around
    (hue). Each row sums to 1.
    """
    values = tf.convert_to_tensor(values, tf.float32)
    centres = tf.constant(centres, tf.float32)
    distance = tf.abs(values[..., tf.newaxis] - centres)
    if period is not None:
        distance = tf.math.floormod(distance, period)
        distance = tf.minimum(distance, period - distance)
    distance = distance / width
    # The k-th smallest distance; ties at the boundary keep every tied bin.
    kth = -tf.math.top_k(-distance, k=neighbours).values[..., -1:]
    weights = tf.exp(-0.5 * tf.square(distance / sigma))
    weights = tf.where(distance <= kth, weights, 0.0)
    return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def encode_lch(lch, bins: ColorBins):
    """LCh [..., 3] -> (chroma target [..., Kc], hue target [..., Kh]), each summing to 1.

    The hue target of a grey (chroma ~ 0) is arbitrary; the loss weights it by chroma.
    """
    lch = tf.convert_to_tensor(lch, tf.float32)
    chroma = tf.minimum(lch[..., 1], bins.max_chroma)
    chroma_target = soft_encode(chroma, bins.chroma_centres(), bins.chroma_width, bins.sigma,
                                bins.neighbours)
    hue_target = soft_encode(lch[..., 2], bins.hue_centres(), bins.hue_width, bins.sigma,
                             bins.neighbours, period=2.0 * math.pi)
    return chroma_target, hue_target


def anneal(probs, temperature=1.0) -> tf.Tensor:
    """Probabilities [..., K] -> p^(1/T) renormalised [..., K] (T = 1: unchanged)."""
    probs = tf.convert_to_tensor(probs, tf.float32)
    if temperature == 1.0:
        return probs
    # In log space: p^(1/T) of small p underflows otherwise.
    return tf.nn.softmax(tf.math.log(tf.maximum(probs, 1e-30)) / temperature, axis=-1)


def decode_chroma(probs, bins: ColorBins, temperature=1.0) -> tf.Tensor:
    """Chroma distribution [..., Kc] -> expected (annealed) chroma [...]."""
    probs = anneal(probs, temperature)
    return tf.reduce_sum(probs * tf.constant(bins.chroma_centres()), axis=-1)


def decode_hue(probs, bins: ColorBins, temperature=1.0) -> tf.Tensor:
    """Hue distribution [..., Kh] -> circular mean hue in [0, 2 pi) [...]."""
    probs = anneal(probs, temperature)
    centres = tf.constant(bins.hue_centres())
    # A plain expectation of angles would put the mean of 350 and 10 degrees at 180.
    sin = tf.reduce_sum(probs * tf.sin(centres), axis=-1)
    cos = tf.reduce_sum(probs * tf.cos(centres), axis=-1)
    return tf.math.floormod(tf.atan2(sin, cos), 2.0 * math.pi)


def split_logits(logits, bins: ColorBins):
    """Logits [..., Kc + Kh] -> (chroma logits [..., Kc], hue logits [..., Kh])."""
    return logits[..., :bins.num_chroma_bins], logits[..., bins.num_chroma_bins:]


def decode_logits(logits, lightness, bins: ColorBins, temperature=1.0) -> tf.Tensor:
    """Logits [..., Kc + Kh] and the known lightness [...] -> predicted Lab [..., 3]."""
    chroma_logits, hue_logits = split_logits(tf.cast(logits, tf.float32), bins)
    chroma = decode_chroma(tf.nn.softmax(chroma_logits, axis=-1), bins, temperature)
    hue = decode_hue(tf.nn.softmax(hue_logits, axis=-1), bins, temperature)
    return lch_to_lab(tf.stack([tf.cast(lightness, tf.float32), chroma, hue], axis=-1))
