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
