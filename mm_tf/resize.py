"""Bilinear crop-and-resize of pixel boxes, written with gathers so that XLA compiles it.

`tf.image.crop_and_resize` has no XLA kernel (`CropAndResize`), so the mix step, which
runs inside the jit-compiled training step, uses `crop_and_resize` below. Both functions
here sample the same grid, so they agree to float rounding:

Sampling convention. A box is `(y1, x1, y2, x2)` in pixels, end-exclusive, i.e. it covers
the pixel rows `y1 .. y2 - 1` (side `s = y2 - y1`). Pixel `i` has its centre at integer
coordinate `i`. Output row `i` of `S` samples the image at

    y(i) = y1 + i * (y2 - 1 - y1) / (S - 1)          (S > 1)
    y    = (y1 + y2 - 1) / 2                          (S == 1)

so the first and last output rows lie exactly on the centres of the box's first and last
pixel rows (columns alike). This is `tf.image.crop_and_resize`'s own rule for a
normalised box `(y1 / (H - 1), ..., (y2 - 1) / (H - 1), ...)`, which is how
`crop_and_resize_reference` converts. A sample whose coordinate lies outside
`[0, H - 1]` (or `[0, W - 1]`) is 0, as `crop_and_resize(..., extrapolation_value=0)`
does; samples inside interpolate between the two nearest pixels.
"""

import tensorflow as tf


def _sample_coords(start, end, size):
    """Sample coordinates [N, size] along one axis for pixel boxes [start, end) of [N]."""
    if size == 1:
        return ((start + end - 1.0) * 0.5)[:, None]
    step = (end - 1.0 - start) / float(size - 1)
    return start[:, None] + tf.range(size, dtype=tf.float32)[None, :] * step[:, None]


def _axis_taps(coords, extent):
    """Lower/upper pixel indices [N,S] int32, upper weight [N,S] and in-image mask [N,S]."""
    lower = tf.floor(coords)
    frac = coords - lower
    inside = (coords >= 0.0) & (coords <= float(extent - 1))
    lower_i = tf.clip_by_value(tf.cast(lower, tf.int32), 0, extent - 1)
    upper_i = tf.minimum(lower_i + 1, extent - 1)
    return lower_i, upper_i, frac, inside


def crop_and_resize(images, boxes, box_indices, crop_size):
    """Bilinear crops [N,S,S,C] of images [B,H,W,C] at pixel boxes [N,4] of images [N]."""
    images = tf.convert_to_tensor(images)
    boxes = tf.cast(boxes, tf.float32)
    box_indices = tf.cast(box_indices, tf.int32)
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    if height is None or width is None or channels is None:
        raise ValueError(f"crop_and_resize needs static H, W, C; got images {images.shape}")

    ys = _sample_coords(boxes[:, 0], boxes[:, 2], crop_size)  # [N, S]
    xs = _sample_coords(boxes[:, 1], boxes[:, 3], crop_size)  # [N, S]
    y0, y1, wy, in_y = _axis_taps(ys, height)
    x0, x1, wx, in_x = _axis_taps(xs, width)

    # One flat gather per corner: indices [N, S, S] into [B*H*W, C]; its gradient is a
    # scatter-add back onto the image pixels, which XLA handles.
    flat = tf.reshape(images, [-1, channels])
    base = box_indices[:, None, None] * (height * width)

    def corner(yi, xi):
        index = base + yi[:, :, None] * width + xi[:, None, :]
        return tf.gather(flat, index)

    wx = wx[:, None, :, None]
    wy = wy[:, :, None, None]
    # Same interpolation order as the TF kernel (x first, then y) so rounding matches.
    top = corner(y0, x0)
    top = top + (corner(y0, x1) - top) * wx
    bottom = corner(y1, x0)
    bottom = bottom + (corner(y1, x1) - bottom) * wx
    out = top + (bottom - top) * wy
    inside = (in_y[:, :, None] & in_x[:, None, :])[..., None]
    return tf.where(inside, out, tf.zeros_like(out))


def crop_and_resize_reference(images, boxes, box_indices, crop_size):
    """`tf.image.crop_and_resize` [N,S,S,C] of the same pixel boxes [N,4]; no XLA."""
    images = tf.convert_to_tensor(images)
    boxes = tf.cast(boxes, tf.float32)
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    # Last covered pixel is end - 1; normalised coordinate 1.0 is the centre of pixel H-1.
    normalized = tf.stack(
        [
            boxes[:, 0] / (height - 1.0),
            boxes[:, 1] / (width - 1.0),
            (boxes[:, 2] - 1.0) / (height - 1.0),
            (boxes[:, 3] - 1.0) / (width - 1.0),
        ],
        axis=1,
    )
    return tf.image.crop_and_resize(
        tf.cast(images, tf.float32),
        normalized,
        tf.cast(box_indices, tf.int32),
        [crop_size, crop_size],
        method="bilinear",
        extrapolation_value=0.0,
    )
