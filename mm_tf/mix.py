"""The mix step of M&M tuning: sample labelled square patches from a batch of images.

Per image, K patches (the release: 9; the paper: 10) are taken:

- `num_background = round(K * background_fraction)` are centred on background pixels
  (label == background_class), the rest on foreground pixels (neither background nor
  ignore). With `background_class=None` (CamVid, Cityscapes) every centre is a
  non-ignore pixel. An image without foreground takes its foreground share from the
  background and vice versa; an image whose pixels are all ignore gives invalid patches.
- A centre is a uniformly chosen qualifying pixel, or, with `class_balanced`, a uniformly
  chosen pixel of a uniformly chosen class present among the qualifying pixels.
- The side is even and uniform in [min_side, max_side]; the box
  `(cy - s/2, cx - s/2, cy + s/2, cx + s/2)` (end-exclusive) is centred on the centre
  pixel and may leave the image: pixels outside are 0. The patch's label is the label of
  its centre pixel.
- `oversample` (5) times as many candidates as needed are drawn for each kind, then
  visited in order: a candidate is skipped when more than `max_overlap` (60%) of its area
  is covered by the union of the patches of the same kind kept so far; visiting stops
  taking patches once the kind's quota is full. If fewer survive, the skipped candidates
  with the lowest coverage fill up.
- All patches are resized to `patch_size` and pooled across the batch (N = B * K).

Differences from the authors' Python layer (`create_patch.py`), each deliberate: the
fill-up takes the least-covered skipped candidates (the release takes the first skipped);
coverage is divided by the candidate's own area (the release divides by the first
candidate's area, an evident slip); background centres of an image without background
keep their true label (the release labels them 0); sides are uniform over the even
values (the release floors a uniform integer to even, so the maximum is half as likely);
the background count is `round(K * fraction)` (the release: `max(1, int(K * fraction))`,
equal for 5 <= K <= 14); an all-ignore image gives invalid patches (the release centres
them on ignore pixels, labelled 0). As in the release, background patches are
de-duplicated among themselves only (foreground among foreground).

Everything runs in-graph and compiles with XLA: centres come from an exact two-level
integer inverse-CDF (rows, then columns), the de-duplication is a `tf.scan` over the
candidates vectorised over the images with exact union areas, and the crops use the
gather-based `mm_tf.resize.crop_and_resize`.
"""

import dataclasses
import math
from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from mm_tf import common
from mm_tf import resize
from mm_tf.errors import ConfigError

# Label values are uint8 train ids after the data set's LUT; one extra key marks ignore.
_NUM_LABEL_VALUES = 256
_IGNORE_KEY = _NUM_LABEL_VALUES
# Pixel kinds; also the two "lanes" of candidates, de-duplicated separately.
_FOREGROUND, _BACKGROUND, _NONE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """Knobs of the mix step; defaults are the authors' release values (VOC).

    Attributes:
      patches_per_image: K, patches per image (release 9, paper 10).
      patch_size: S, side of the resized patches.
      min_side, max_side: even bounds of the uniform even side, in pixels.
      background_fraction: share of background patches, rounded per image.
      background_class: label of background (VOC 0), or None (CamVid, Cityscapes).
      ignore_label: label never used as a centre.
      oversample: candidates drawn per wanted patch before de-duplication.
      max_overlap: a candidate covered more than this by kept patches is skipped.
      class_balanced: centre = uniform class among those present, then uniform pixel.
      use_gather_resize: crop with `mm_tf.resize.crop_and_resize` (compiles with XLA);
        False uses `tf.image.crop_and_resize`, which has no XLA kernel but is ~4x
        faster than the gathers in plain graph mode. Set it to the step's jit_compile.
    """

    patches_per_image: int = 9
    patch_size: int = 128
    min_side: int = 64
    max_side: int = 256
    background_fraction: float = 0.1
    background_class: Optional[int] = 0
    ignore_label: int = common.IGNORE_LABEL
    oversample: int = 5
    max_overlap: float = 0.6
    class_balanced: bool = False
    use_gather_resize: bool = True

    def __post_init__(self):
        def check(ok, field, expected):
            if not ok:
                raise ConfigError(f"MixConfig.{field}={getattr(self, field)!r}: expected "
                                  f"{expected}")

        check(self.patches_per_image >= 1, "patches_per_image", "an integer >= 1")
        check(self.patch_size >= 1, "patch_size", "an integer >= 1")
        check(self.min_side >= 2 and self.min_side % 2 == 0, "min_side",
              "an even integer >= 2")
        check(self.max_side >= self.min_side and self.max_side % 2 == 0, "max_side",
              f"an even integer >= min_side ({self.min_side})")
        check(0.0 <= self.background_fraction <= 1.0, "background_fraction",
              "a fraction in [0, 1]")
        check(self.background_class is None
              or (0 <= self.background_class < _NUM_LABEL_VALUES
                  and self.background_class != self.ignore_label),
              "background_class", "None or a label in [0, 255] other than ignore_label")
        check(0 <= self.ignore_label < _NUM_LABEL_VALUES, "ignore_label",
              "a label in [0, 255]")
        check(self.oversample >= 1, "oversample", "an integer >= 1")
        check(0.0 <= self.max_overlap <= 1.0, "max_overlap", "a fraction in [0, 1]")

    @property
    def num_background(self) -> int:
        """Background patches per image: round(K * background_fraction), 0 without one."""
        if self.background_class is None:
            return 0
        # floor(x + 0.5), not round(): Python rounds halves to even.
        return int(math.floor(self.patches_per_image * self.background_fraction + 0.5))

    @property
    def num_foreground(self) -> int:
        """Foreground patches per image: K - num_background."""
        return self.patches_per_image - self.num_background


class Patches(NamedTuple):
    """The mixed patches of a batch, N = B * K, image-major (K slots per image)."""

    patches: tf.Tensor  # float32 [N, S, S, C]
    labels: tf.Tensor  # int32 [N]: label of the centre pixel (ignore_label if invalid)
    valid: tf.Tensor  # bool [N]: False when the image had no usable pixel
    boxes: tf.Tensor  # float32 [N, 4]: (y1, x1, y2, x2) pixels, end-exclusive
    image_index: tf.Tensor  # int32 [N]: source image in the batch


def union_coverage(box, others, member):
    """Area of box [B,4] covered by the union of others [B,K,4] where member [B,K] -> [B].

    Exact for axis-aligned boxes (y1, x1, y2, x2): the others are clipped to the box, the
    plane is cut at every box edge (coordinate compression, (2K+1)^2 cells) and a cell
    counts when its midpoint lies in a member box. Integer coordinates give exact areas.
    """
    y1, x1, y2, x2 = (box[:, i : i + 1] for i in range(4))
    # A non-member collapses to an empty box at the corner, so it covers no midpoint.
    oy1 = tf.where(member, tf.clip_by_value(others[..., 0], y1, y2), y1)
    ox1 = tf.where(member, tf.clip_by_value(others[..., 1], x1, x2), x1)
    oy2 = tf.where(member, tf.clip_by_value(others[..., 2], y1, y2), y1)
    ox2 = tf.where(member, tf.clip_by_value(others[..., 3], x1, x2), x1)

    def cells(lo, hi, olo, ohi):
        cuts = tf.sort(tf.concat([lo, hi, olo, ohi], axis=1), axis=1)  # [B, 2K+2]
        return (cuts[:, 1:] + cuts[:, :-1]) * 0.5, cuts[:, 1:] - cuts[:, :-1]

    my, dy = cells(y1, y2, oy1, oy2)  # [B, 2K+1]
    mx, dx = cells(x1, x2, ox1, ox2)
    in_y = (oy1[:, None, :] <= my[:, :, None]) & (my[:, :, None] < oy2[:, None, :])
    in_x = (ox1[:, None, :] <= mx[:, :, None]) & (mx[:, :, None] < ox2[:, None, :])
    covered = tf.reduce_any(in_y[:, :, None, :] & in_x[:, None, :, :], axis=-1)
    area = dy[:, :, None] * dx[:, None, :]
    return tf.reduce_sum(tf.where(covered, area, tf.zeros_like(area)), axis=[1, 2])


def _random_ints(seed, shape):
    """Uniform non-negative int32 of `shape` (31 random bits) from a stateless seed [2]."""
    bits = tf.random.stateless_uniform(shape, seed=seed, minval=None, maxval=None,
                                       dtype=tf.int32)
    return tf.bitwise.bitwise_and(bits, 0x7FFFFFFF)


def _nth_true(mask, n):
    """Index [...] of the (n+1)-th True along the last axis of mask [..., L] (n [...])."""
    rank = tf.cumsum(tf.cast(mask, tf.int32), axis=-1)
    return tf.reduce_sum(tf.cast(rank <= n[..., None], tf.int32), axis=-1)


def _draw_centres(labels, key_of, row_counts, keys, draws):
    """Uniform pixel among those whose key matches, per candidate: -> (cy, cx, found).

    labels [B,H,W] int32; key_of maps labels to pixel keys; row_counts [B,NK,H] (pixels
    of each key per row); keys [B,M] (the key each candidate wants); draws [B,M]
    non-negative ints. Returns int32 [B,M] rows, columns and bool [B,M] (False when no
    pixel has the key). The inverse CDF is integer and two-level (rows, then one row's
    columns), so it is exact and touches only B*M*(H+W) values, not B*M*H*W.
    """
    height, width = labels.shape[1], labels.shape[2]
    counts = tf.gather(row_counts, keys, axis=1, batch_dims=1)  # [B, M, H]
    total = tf.reduce_sum(counts, axis=-1)
    found = total > 0
    target = tf.math.floormod(draws, tf.maximum(total, 1))  # bias <= total / 2^31
    cdf = tf.cumsum(counts, axis=-1)
    row = tf.minimum(tf.reduce_sum(tf.cast(cdf <= target[..., None], tf.int32), -1),
                     height - 1)
    before = tf.gather(cdf, row, batch_dims=2) - tf.gather(counts, row, batch_dims=2)
    batch = tf.broadcast_to(tf.range(tf.shape(keys)[0])[:, None], tf.shape(keys))
    row_keys = key_of(tf.gather_nd(labels, tf.stack([batch, row], axis=-1)))  # [B,M,W]
    col = _nth_true(tf.equal(row_keys, keys[..., None]), target - before)
    return row, tf.minimum(col, width - 1), found


def _deduplicate(boxes, lanes, areas, usable, quotas, height, width, max_overlap):
    """Visit candidates in order, keep those covered <= max_overlap by kept ones.

    boxes [B,M,4] float32 pixels, lanes [M] int32 (0 foreground, 1 background), areas
    [B,M] full box areas, usable [B,M] bool, quotas (foreground, background) ints.
    Returns kept [B,M] bool and coverage [B,M] float32 (at the candidate's visit). Only
    kept boxes of the candidate's lane count; the in-image parts of boxes are compared
    (outside is zero padding, as in the release's occupancy mask).
    """
    batch = tf.shape(boxes)[0]
    slots = sum(quotas)
    limits = tf.constant([float(height), float(width), float(height), float(width)])
    clipped = tf.clip_by_value(boxes, 0.0, limits)
    quota = tf.constant(quotas, tf.int32)

    def visit(carry, candidate):
        (kept_boxes, kept_lanes, taken), _ = carry
        box, lane, area, ok = candidate
        covered = union_coverage(box, kept_boxes, tf.equal(kept_lanes, lane[:, None]))
        coverage = covered / area
        room = tf.gather(taken, lane, batch_dims=1) < tf.gather(quota, lane)
        keep = ok & room & (coverage <= max_overlap)
        # The next free slot is the number kept so far over both lanes.
        slot = tf.one_hot(tf.reduce_sum(taken, axis=1), slots, on_value=True,
                          off_value=False) & keep[:, None]
        kept_boxes = tf.where(slot[..., None], box[:, None, :], kept_boxes)
        kept_lanes = tf.where(slot, lane[:, None], kept_lanes)
        taken = taken + tf.cast(keep, tf.int32)[:, None] * tf.one_hot(lane, 2,
                                                                      dtype=tf.int32)
        return (kept_boxes, kept_lanes, taken), (keep, coverage)

    # tf.scan's accumulator is (state, this step's outputs); the outputs get stacked.
    initial = ((tf.zeros([batch, slots, 4]), -tf.ones([batch, slots], tf.int32),
                tf.zeros([batch, 2], tf.int32)),
               (tf.zeros([batch], tf.bool), tf.zeros([batch])))
    elements = (tf.transpose(clipped, [1, 0, 2]),
                tf.broadcast_to(lanes[:, None], tf.stack([tf.size(lanes), batch])),
                tf.transpose(areas), tf.transpose(usable))
    _, (kept, coverage) = tf.scan(visit, elements, initializer=initial)
    return tf.transpose(kept), tf.transpose(coverage)


def _select(kept, coverage, lanes, quotas):
    """Indices [B,K] into the M candidates: per lane, kept in order, then least covered.

    kept, coverage [B,M]; lanes: static sequence of M lane ids in non-decreasing order;
    quotas: patches per lane. Ranks come from explicit pairwise comparisons with the
    candidate index as tie-break, so the order never depends on a sort's stability.
    """
    lanes = [int(lane) for lane in lanes]
    # Order by (lane, kept first, coverage, index): kept ones get -1 < any coverage.
    key = tf.where(kept, -1.0, coverage)
    lane_ids = tf.constant(lanes)
    order = tf.range(len(lanes))
    earlier_index = (order[:, None] < order[None, :])[None]
    same_lane = tf.equal(lane_ids[:, None], lane_ids[None, :])[None]
    before = ((lane_ids[:, None] < lane_ids[None, :])[None]
              | (same_lane & ((key[:, :, None] < key[:, None, :])
                              | ((key[:, :, None] == key[:, None, :]) & earlier_index))))
    rank = tf.reduce_sum(tf.cast(before, tf.int32), axis=1)  # [B, M]
    wanted = [lanes.index(lane) + r for lane, quota in enumerate(quotas) if quota
              for r in range(quota)]
    hits = tf.equal(rank[:, None, :], tf.constant(wanted)[None, :, None])  # [B, K, M]
    return tf.argmax(tf.cast(hits, tf.int32), axis=-1, output_type=tf.int32)


def _usable(labels, config):
    """Bool [...]: labels that may be a centre (in [0, 255] and not ignore_label)."""
    # Clearing the low 8 bits leaves 0 exactly for 0..255: negatives fail too.
    in_range = tf.equal(tf.bitwise.bitwise_and(labels, -_NUM_LABEL_VALUES), 0)
    return in_range & tf.not_equal(labels, config.ignore_label)


def _kind_of(labels, config):
    """Int32 [...]: kind of each label (_FOREGROUND, _BACKGROUND or _NONE)."""
    kind = tf.where(_usable(labels, config), _FOREGROUND, _NONE)
    if config.background_class is None:
        return kind
    return tf.where(tf.equal(labels, config.background_class), _BACKGROUND, kind)


def _kind_row_counts(labels, config):
    """Pixels of each kind per row [B,2,H] (foreground, background) of labels [B,H,W]."""
    usable = tf.reduce_sum(tf.cast(_usable(labels, config), tf.int32), axis=2)
    if config.background_class is None:
        return tf.stack([usable, tf.zeros_like(usable)], axis=1)
    # background_class is a usable value, so foreground = usable - background.
    background = tf.reduce_sum(
        tf.cast(tf.equal(labels, config.background_class), tf.int32), axis=2)
    return tf.stack([usable - background, background], axis=1)


def _class_row_counts(labels, config):
    """Pixels of each label value per row [B,257,H]; index 256 counts unusable pixels."""
    batch, height = tf.shape(labels)[0], labels.shape[1]
    num_keys = _NUM_LABEL_VALUES + 1
    keys = tf.where(_usable(labels, config), labels, _IGNORE_KEY)
    rows = tf.range(height)[None, :, None]
    segment = (tf.range(batch)[:, None, None] * height + rows) * num_keys + keys
    counts = tf.math.unsorted_segment_sum(tf.ones_like(keys), segment,
                                          batch * height * num_keys)
    return tf.transpose(tf.reshape(counts, [batch, height, num_keys]), [0, 2, 1])


def _class_kinds(config):
    """Int32 [257]: the kind of every label value (and of the unusable key 256)."""
    kinds = [_NONE if k in (_IGNORE_KEY, config.ignore_label)
             else _BACKGROUND if k == config.background_class else _FOREGROUND
             for k in range(_NUM_LABEL_VALUES + 1)]
    return tf.constant(kinds, tf.int32)


def _draw_classes(present, source, draws, config):
    """Class [B,M] uniform among present [B,257] classes of each candidate's source kind."""
    eligible = present[:, None, :] & tf.equal(_class_kinds(config)[None, None, :],
                                              source[..., None])
    num_eligible = tf.reduce_sum(tf.cast(eligible, tf.int32), axis=-1)
    classes = _nth_true(eligible, tf.math.floormod(draws, tf.maximum(num_eligible, 1)))
    # No eligible class (an all-ignore image): ignore_label, a key no pixel maps to
    # (its pixels count under the unusable key), so the draw finds nothing.
    return tf.where(num_eligible > 0, classes, config.ignore_label)


def sample_patches(images, labels, seed, config: MixConfig = MixConfig(),
                   image_offset=0, total_images=None) -> Patches:
    """Mix: images [B,H,W,C], labels [B,H,W], seed int32 [2] -> Patches with N = B*K.

    Each image's random draws are row `image_offset + b` of one stream of
    `total_images` (default B) rows for `seed`: a replica holding images
    [offset, offset + B) of a global batch samples them exactly as one device holding
    the whole batch would (int32 scalars; the defaults are the single-device case).
    """
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.float32:
        images = tf.cast(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    height, width = images.shape[1], images.shape[2]
    if height is None or width is None or images.shape[3] is None:
        raise ValueError(f"sample_patches needs static H, W, C; got images {images.shape}")
    batch = tf.shape(images)[0]
    quotas = (config.num_foreground, config.num_background)
    lanes_py = [lane for lane, q in enumerate(quotas) for _ in range(config.oversample * q)]
    lanes = tf.constant(lanes_py, tf.int32)
    num_candidates = len(lanes_py)

    if config.class_balanced:
        row_counts = _class_row_counts(labels, config)  # [B, 257, H]
        present = tf.reduce_sum(row_counts, axis=2) > 0  # [B, 257]
        kinds = _class_kinds(config)[None, :]
        has_fg = tf.reduce_any(present & tf.equal(kinds, _FOREGROUND), axis=1)
        has_bg = tf.reduce_any(present & tf.equal(kinds, _BACKGROUND), axis=1)
    else:
        row_counts = _kind_row_counts(labels, config)  # [B, 2, H]
        has_fg, has_bg = tf.unstack(tf.reduce_sum(row_counts, axis=2) > 0, axis=1)
    # Each lane draws from its own kind, or from the other kind when its own is absent.
    source = tf.stack([tf.where(has_fg, _FOREGROUND, _BACKGROUND),
                       tf.where(has_bg, _BACKGROUND, _FOREGROUND)], axis=1)  # [B, 2]
    source = tf.gather(source, lanes, axis=1)  # [B, M]

    if total_images is None:
        draws = _random_ints(seed, tf.stack([3, batch, num_candidates]))
    else:
        draws = _random_ints(seed, tf.stack([3, total_images, num_candidates]))
        draws = tf.slice(draws, tf.stack([0, image_offset, 0]),
                         tf.stack([3, batch, num_candidates]))
    pixel_draw, side_draw, class_draw = tf.unstack(draws)
    if config.class_balanced:
        keys = _draw_classes(present, source, class_draw, config)

        def key_of(rows):
            return tf.where(_usable(rows, config), rows, _IGNORE_KEY)
    else:
        keys = source

        def key_of(rows):
            return _kind_of(rows, config)
    cy, cx, found = _draw_centres(labels, key_of, row_counts, keys, pixel_draw)

    num_sides = (config.max_side - config.min_side) // 2 + 1
    half = config.min_side // 2 + tf.math.floormod(side_draw, num_sides)
    boxes = tf.cast(tf.stack([cy - half, cx - half, cy + half, cx + half], axis=-1),
                    tf.float32)  # [B, M, 4]
    areas = tf.cast(4 * half * half, tf.float32)
    kept, coverage = _deduplicate(boxes, lanes, areas, found, quotas, height, width,
                                  config.max_overlap)
    chosen = _select(kept, coverage, lanes_py, quotas)  # [B, K]

    boxes = tf.reshape(tf.gather(boxes, chosen, batch_dims=1), [-1, 4])
    valid = tf.reshape(tf.gather(found, chosen, batch_dims=1), [-1])
    centres = tf.stack([tf.gather(cy, chosen, batch_dims=1),
                        tf.gather(cx, chosen, batch_dims=1)], axis=-1)  # [B, K, 2]
    patch_labels = tf.reshape(tf.gather_nd(labels, centres, batch_dims=1), [-1])
    patch_labels = tf.where(valid, patch_labels, config.ignore_label)
    image_index = tf.repeat(tf.range(batch), config.patches_per_image)
    crop = resize.crop_and_resize if config.use_gather_resize else (
        resize.crop_and_resize_reference)
    patches = crop(images, boxes, image_index, config.patch_size)
    return Patches(patches=patches, labels=patch_labels, valid=valid, boxes=boxes,
                   image_index=image_index)


@keras.saving.register_keras_serializable(package="mm_tf")
class Mix(keras.layers.Layer):
    """The mix step as a Keras layer: labelled patches pooled across a batch.

    It holds no weights; all randomness comes from the `seed` argument (stateless), so a
    compiled train step repeats exactly for a given seed.

    Args:
      config: a `MixConfig` (defaults: 9 patches per image, 128x128, sides 64..256).
      **kwargs: standard `keras.layers.Layer` arguments (name, dtype, ...).

    Example:
      >>> mix = Mix(MixConfig(patches_per_image=4, patch_size=16, min_side=8,
      ...                     max_side=16))
      >>> images = tf.random.uniform([2, 32, 32, 3])
      >>> labels = tf.random.uniform([2, 32, 32], maxval=3, dtype=tf.int32)
      >>> out = mix(images, labels, tf.constant([0, 1]))
      >>> out.patches.shape, out.labels.shape
      (TensorShape([8, 16, 16, 3]), TensorShape([8]))
    """

    def __init__(self, config: Optional[MixConfig] = None, **kwargs):
        # Under a mixed policy Keras would round the images to bfloat16 before cropping;
        # the patches stay float32 pixels and the backbone casts them itself.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.config = config if config is not None else MixConfig()

    def call(self, images, labels, seed, image_offset=0, total_images=None):
        """images float32 [B,H,W,C], labels int [B,H,W], seed int32 [2] -> `Patches`
        (patches [N,S,S,C], labels [N], valid [N], boxes [N,4], image_index [N]),
        N = B * patches_per_image, S = patch_size. `image_offset`, `total_images`: the
        images' place in a global batch split among replicas (see `sample_patches`)."""
        return sample_patches(images, labels, seed, self.config, image_offset=image_offset,
                              total_images=total_images)

    def compute_output_shape(self, images_shape, labels_shape=None, seed_shape=None):
        """Shapes of the `Patches` fields for images of shape [B,H,W,C]."""
        k, s = self.config.patches_per_image, self.config.patch_size
        n = None if images_shape[0] is None else images_shape[0] * k
        return Patches(patches=(n, s, s, images_shape[-1]), labels=(n,), valid=(n,),
                       boxes=(n, 4), image_index=(n,))

    def get_config(self):
        """Layer config plus the MixConfig fields under "config"."""
        config = super().get_config()
        config["config"] = dataclasses.asdict(self.config)
        return config

    @classmethod
    def from_config(cls, config):
        """Inverse of get_config."""
        config = dict(config)
        mix_config = MixConfig(**config.pop("config", {}))
        return cls(mix_config, **config)
