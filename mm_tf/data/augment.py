"""Training augmentations for segmentation: random scale, pad, random crop, random flip.

Pure TensorFlow functions of one example (`image` [H, W, C], `label` [H, W]) that run the
same eagerly, inside `tf.function` and inside `tf.data.Dataset.map`. All randomness is
stateless: every random function takes an int32 [2] `seed`, so a seeded run repeats
exactly whatever the thread schedule of the input pipeline.

The image is float32 in the 0..255 range throughout (bilinear resizing would otherwise
round twice); the label keeps its integer dtype and is only ever resized with nearest
neighbour, so class ids are never blended. Geometric operations are applied to image and
label together with the same random draws, which is what keeps them aligned.
"""

import tensorflow as tf

from mm_tf import common

# The fill values accepted by `pad_to_size` / `augment` besides an explicit number.
FILL_ZEROS = "zeros"
FILL_MEAN = "mean"  # common.RGB_MEAN: padded pixels become 0 after rgb normalisation.


def fill_values(fill, channels: int) -> tf.Tensor:
    """Return the per-channel pad value float32 [C] for `fill` ("zeros", "mean" or a number)."""
    if fill == FILL_ZEROS:
        return tf.zeros([channels], tf.float32)
    if fill == FILL_MEAN:
        mean = tf.constant(common.RGB_MEAN, tf.float32)
        # A one-channel image holds the mean of RGB, so its "mean" is the mean of RGB_MEAN.
        return mean if channels == 3 else tf.fill([channels], tf.reduce_mean(mean))
    if isinstance(fill, str):
        raise ValueError(f"fill must be {FILL_ZEROS!r}, {FILL_MEAN!r} or a number, got {fill!r}")
    return tf.fill([channels], tf.cast(fill, tf.float32))


def random_scale(image, label, seed, min_scale: float, max_scale: float):
    """Resize image [H,W,C] (bilinear, float32) and label [H,W] (nearest) by s ~ U[min, max]."""
    image = tf.convert_to_tensor(image)
    label = tf.convert_to_tensor(label)
    if min_scale == max_scale == 1.0:
        return tf.cast(image, tf.float32), label
    scale = tf.random.stateless_uniform([], seed, min_scale, max_scale, dtype=tf.float32)
    size = tf.shape(image)[:2]
    new_size = tf.maximum(tf.cast(tf.round(tf.cast(size, tf.float32) * scale), tf.int32), 1)
    image = tf.image.resize(tf.cast(image, tf.float32), new_size, method="bilinear")
    # Nearest keeps the label dtype and never invents a class between two neighbours.
    label = tf.image.resize(label[..., tf.newaxis], new_size, method="nearest")[..., 0]
    return image, label


def pad_to_size(image, label, height, width, fill=FILL_MEAN):
    """Pad image [H,W,C] with `fill`, label [H,W] with 255 (bottom/right) to >= [height, width]."""
    image = tf.cast(image, tf.float32)
    label = tf.convert_to_tensor(label)
    shape = tf.shape(image)
    pad_h = tf.maximum(height - shape[0], 0)
    pad_w = tf.maximum(width - shape[1], 0)
    paddings = [[0, pad_h], [0, pad_w]]
    values = fill_values(fill, image.shape[-1])
    # tf.pad takes one scalar per call, so pad a mask and fill per channel where it is 0
    # (shifting by the fill value instead would perturb the kept pixels by float rounding).
    inside = tf.pad(tf.ones(shape[:2], tf.bool), paddings, constant_values=False)
    image = tf.where(inside[..., tf.newaxis], tf.pad(image, paddings + [[0, 0]]), values)
    # Padding is "no label here": the canonical ignore value, so losses and metrics skip it.
    label = tf.pad(label, paddings, constant_values=tf.cast(common.IGNORE_LABEL, label.dtype))
    return image, label


def random_crop(image, label, seed, height, width):
    """Crop image [H,W,C] and label [H,W] at one random offset to [height, width] (H, W >= it)."""
    shape = tf.shape(image)
    with tf.control_dependencies(
        [
            tf.debugging.assert_greater_equal(
                shape[0], height, message="random_crop: image shorter than crop"
            ),
            tf.debugging.assert_greater_equal(
                shape[1], width, message="random_crop: image narrower than crop"
            ),
        ]
    ):
        seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        y = tf.random.stateless_uniform([], seed_y, 0, shape[0] - height + 1, dtype=tf.int32)
        x = tf.random.stateless_uniform([], seed_x, 0, shape[1] - width + 1, dtype=tf.int32)
    image = image[y : y + height, x : x + width]
    label = label[y : y + height, x : x + width]
    # Slicing with tensors loses the static size; restore it so batching sees [S, S].
    if isinstance(height, int) and isinstance(width, int):
        image = tf.ensure_shape(image, [height, width, image.shape[-1]])
        label = tf.ensure_shape(label, [height, width])
    return image, label


def random_flip(image, label, seed):
    """Mirror image [H,W,C] and label [H,W] left-right together with probability 1/2."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: tf.identity(image))
    label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: tf.identity(label))
    return image, label


def augment(
    image,
    label,
    seed,
    crop_size: int,
    min_scale: float = 0.5,
    max_scale: float = 2.0,
    flip: bool = True,
    fill=FILL_MEAN,
):
    """Scale, pad, crop and flip: image [H,W,C] -> float32 [S,S,C], label [H,W] -> [S,S]."""
    seed = tf.convert_to_tensor(seed)
    scale_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image, label = random_scale(image, label, scale_seed, min_scale, max_scale)
    image, label = pad_to_size(image, label, crop_size, crop_size, fill)
    image, label = random_crop(image, label, crop_seed, crop_size, crop_size)
    if flip:
        image, label = random_flip(image, label, flip_seed)
    return image, label


# ----- Photometric jitter of network-input patches (M&M batches; beyond the paper) -----

# YIQ <-> RGB (NTSC), for hue rotation as a linear map per patch.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _to_unit(images, input_mode):
    """Network input [N,H,W,C] -> the same pixels in [0, 1] (RGB, or grey for C=1)."""
    if input_mode == common.INPUT_RGB:
        return (images + tf.constant(common.RGB_MEAN, tf.float32)) / 255.0
    return images + common.GREY_SHIFT


def _from_unit(images, input_mode):
    """Inverse of `_to_unit`."""
    if input_mode == common.INPUT_RGB:
        return images * 255.0 - tf.constant(common.RGB_MEAN, tf.float32)
    return images - common.GREY_SHIFT


def photometric_jitter(images, seed, strength: float, grey_probability: float,
                       input_mode: str = common.INPUT_RGB):
    """Colour-jitter each image of a normalised batch [N,H,W,C] -> float32 [N,H,W,C].

    Per image, with independent stateless draws (SimCLR's colour distortion, Chen et al.
    2020, applied in this order): brightness x U[1-0.8s, 1+0.8s], contrast about the
    image mean x U[1-0.8s, 1+0.8s], and for RGB saturation x U[1-0.8s, 1+0.8s] and hue
    rotated by U[-0.2s, 0.2s] turns; then, for RGB, grey (luma in all channels) with
    probability `grey_probability`; values clipped to the valid [0, 1] range of the
    input mode. s = `strength`; s = 0 and p = 0 return the images unchanged.
    """
    images = tf.cast(images, tf.float32)
    if strength <= 0 and grey_probability <= 0:
        return images
    n = tf.shape(images)[0]
    draws = tf.random.stateless_uniform([n, 5], seed, dtype=tf.float32)
    spread = 0.8 * strength

    def factor(column):
        return (1.0 + spread * (2.0 * draws[:, column] - 1.0))[:, None, None, None]

    x = _to_unit(images, input_mode) * factor(0)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = (x - mean) * factor(1) + mean
    if input_mode == common.INPUT_RGB:
        yiq = tf.constant(_RGB_TO_YIQ, tf.float32)
        luma = tf.reduce_sum(x * yiq[0], axis=-1, keepdims=True)
        x = luma + (x - luma) * factor(2)
        angle = 2.0 * 3.141592653589793 * 0.2 * strength * (2.0 * draws[:, 3] - 1.0)
        cos, sin = tf.cos(angle), tf.sin(angle)
        one, zero = tf.ones_like(cos), tf.zeros_like(cos)
        # Rotation of the (I, Q) chroma plane, Y kept: [N, 3, 3] in YIQ.
        rotation = tf.stack([tf.stack([one, zero, zero], -1),
                             tf.stack([zero, cos, -sin], -1),
                             tf.stack([zero, sin, cos], -1)], -2)
        to_rgb = tf.linalg.inv(yiq)
        transform = tf.einsum("ij,njk,kl->nil", to_rgb, rotation, yiq)
        x = tf.einsum("nij,nhwj->nhwi", transform, x)
        grey = draws[:, 4] < grey_probability
        luma = tf.reduce_sum(x * yiq[0], axis=-1, keepdims=True)
        x = tf.where(grey[:, None, None, None], tf.broadcast_to(luma, tf.shape(x)), x)
    return _from_unit(tf.clip_by_value(x, 0.0, 1.0), input_mode)
