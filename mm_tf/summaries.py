"""Pictures for TensorBoard: undo the input normalisation and tile patches or
image | label | prediction rows into one uint8 grid."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mm_tf import common


def denormalize(images: tf.Tensor, input_mode: str) -> tf.Tensor:
    """Network input float32 [..., H, W, C] -> displayable uint8 [..., H, W, 3]."""
    images = tf.convert_to_tensor(images, tf.float32)
    if input_mode == common.INPUT_GREY:
        grey = (images + common.GREY_SHIFT) * 255.0
        rgb = tf.concat([grey] * 3, axis=-1)
    else:
        rgb = images + tf.constant(common.RGB_MEAN, tf.float32)
    return tf.cast(tf.clip_by_value(tf.round(rgb), 0.0, 255.0), tf.uint8)


def colorize(labels, palette, ignore_color=(255, 255, 255)) -> np.ndarray:
    """Label ids int [..., H, W] -> uint8 [..., H, W, 3] in the data set's palette; the
    ignore label (and any id outside the palette) is drawn in `ignore_color`."""
    palette = np.asarray(palette, np.uint8)
    table = np.tile(np.asarray(ignore_color, np.uint8), (256, 1))
    table[: len(palette)] = palette
    return table[np.clip(np.asarray(labels), 0, 255).astype(np.int64)]


def patch_grid(patches, labels, valid, palette, input_mode, max_patches=36,
               border=4) -> np.ndarray:
    """Patches float32 [N,S,S,C] + labels [N] -> one uint8 [1, rows*(S+2b), cols*(S+2b), 3]
    grid; each patch is framed in its class colour, invalid patches are greyed out."""
    patches = denormalize(patches[:max_patches], input_mode).numpy()
    labels = np.asarray(labels)[:max_patches]
    valid = np.asarray(valid)[:max_patches]
    count, size = patches.shape[0], patches.shape[1]
    cols = int(np.ceil(np.sqrt(max(count, 1))))
    rows = int(np.ceil(count / cols)) if count else 1
    cell = size + 2 * border
    grid = np.zeros((rows * cell, cols * cell, 3), np.uint8)
    frames = colorize(labels, palette)
    for i in range(count):
        r, c = divmod(i, cols)
        tile = np.empty((cell, cell, 3), np.uint8)
        tile[:] = frames[i] if valid[i] else 64
        tile[border:border + size, border:border + size] = patches[i]
        grid[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = tile
    return grid[None]


def segmentation_rows(images, labels, predictions, palette, input_mode,
                      max_rows=4) -> np.ndarray:
    """Images [B,H,W,C], labels and predictions [B,H,W] -> uint8 [1, rows*H, 3*W, 3]:
    each row is image | ground truth | prediction in the data set's colours."""
    shown = denormalize(images[:max_rows], input_mode).numpy()
    gt = colorize(np.asarray(labels)[:max_rows], palette)
    pred = colorize(np.asarray(predictions)[:max_rows], palette)
    rows = [np.concatenate([shown[i], gt[i], pred[i]], axis=1) for i in range(shown.shape[0])]
    return np.concatenate(rows, axis=0)[None]
