"""Segmentation heads (hypercolumn, FCN-32s) and the backbone + head segmentation model.

Coordinates. A point is (y, x) in input pixels, pixel (r, c) having its centre at (r, c).
A map at stride s (cell i covers input pixels s*i .. s*i + s - 1) is read at map
coordinate u = (y + 0.5) / s - 0.5, clamped to [0, size - 1] (edge replication). This is
TensorFlow's `half_pixel_centers` convention: when H = s * h, reading a map at every
pixel equals `tf.image.resize(map, [H, W], "bilinear")`. Using the stride instead of the
size ratio keeps maps aligned when H is not a multiple of s ('same' padding gives
ceil(H / s) cells).

Hypercolumn head (Larsson et al., as used by M&M for VGG-16). Features: the network
input ("data"), every conv endpoint of the backbone (VGG: conv1_1 .. conv5_3), fc6, fc7,
and two extra blocks on fc7 (3x3 conv 1024 + BN + ReLU, then 2x2/2 max-pool; the pooled
outputs, at strides 64 and 128, are the features). Concatenated per point -> Dense(1024)
+ ReLU -> Dense(K).
* Training (`points` given): the features are bilinearly sampled at P points per image
  ([B,P,F]) and classified: logits [B,P,K].
* Test (dense): the same classifier on a grid of ceil(H/2) x ceil(W/2) cells (stride 2,
  cell centres at input coordinate 2i + 0.5), then the scores are resized bilinearly to
  H x W. The first Dense layer is linear and so is bilinear resampling, so W . concat_l
  resample(f_l) = sum_l resample(W_l . f_l): each map is projected to 1024 channels at
  whichever resolution is smaller (its own or the grid's) and only 1024-channel maps are
  resampled, instead of a [B, H/2, W/2, ~14.5k] hypercolumn (3.8 GB at 512x512). Both
  paths use the same two Dense layers; at points (2i + 0.5, 2j + 0.5) they agree to float
  round-off, and the dense output at any pixel is the stride-2 bilinear interpolation of
  the grid scores.

FCN head (Noroozi & Favaro's AlexNet setting, and the plain VGG-16 baseline): FCN-32s, a
1x1 conv score layer on fc7 (stride 32, zero-initialised as in Long et al.), resized
bilinearly (fixed, not learned) to the input size with the convention above. No
pool3/pool4 skips: the architecture contract exposes no pool3/pool4 endpoints, and the
AlexNet comparison uses FCN-32s.

Example:
    model = build_segmentation_model("vgg16", "hypercolumn", num_classes=21, width=0.125)
    logits = model(images)                                     # [B, H, W, 21]
    point_logits, point_labels = model.sampled_call(images, labels, seed)  # [B,256,21], [B,256]
"""

import keras
import tensorflow as tf

from mm_tf import common
from mm_tf.models import backbones

# Key of the network input among a head's features (the hypercolumn's "data" layer).
DATA = "data"
# Probe size for shape inference of endpoint strides (a multiple of every stride).
_PROBE_SIZE = 1024


# ----------------------------------------------------------------------------------------
# Pure functions: point sampling and bilinear reads.
# ----------------------------------------------------------------------------------------

def _hash_uniform(seed, shape):
    """Counter-based uniform floats in [0, 1) of a 2-D `shape`, from int seed [2]."""
    # Philox stateless_uniform over [16, 512*512] took ~3 s under XLA on CPU (tf-facts:
    # ~100x graph mode); this integer hash (lowbias32, two rounds) takes ~20 ms.
    seed = tf.bitcast(tf.cast(seed, tf.int32), tf.uint32)
    counter = tf.bitcast(tf.reshape(tf.range(shape[0] * shape[1], dtype=tf.int32), shape),
                         tf.uint32)
    x = tf.bitwise.bitwise_xor(counter, seed[0] * tf.constant(0x9E3779B9, tf.uint32))
    x = x + seed[1] * tf.constant(0x85EBCA6B, tf.uint32)

    def shift_xor(v, bits):
        return tf.bitwise.bitwise_xor(v, tf.bitwise.right_shift(v, tf.constant(bits, tf.uint32)))

    for _ in range(2):
        x = shift_xor(x, 16) * tf.constant(0x7FEB352D, tf.uint32)
        x = shift_xor(x, 15) * tf.constant(0x846CA68B, tf.uint32)
        x = shift_xor(x, 16)
    # 24 high bits: exactly representable in float32.
    top24 = tf.bitwise.right_shift(x, tf.constant(8, tf.uint32))
    return tf.cast(top24, tf.float32) * (2.0 ** -24)


def sample_points(labels, seed, num_points, ignore_label=common.IGNORE_LABEL):
    """Random labelled pixels: labels [B,H,W] -> (points [B,P,2] (y, x) float32, labels [B,P]).

    Stateless in `seed` (int [2]). Pixels equal to `ignore_label` are never picked. An
    image with at least P labelled pixels gets P distinct ones (uniformly, without
    replacement); one with 0 < n < P repeats its n pixels cyclically in random order (so
    every image still weighs P points in a per-point mean); one with none gets
    `ignore_label` for all P labels (masked) and points at (0, 0). XLA-compatible.
    """
    labels = tf.cast(labels, tf.int32)
    shape = tf.shape(labels)
    batch, width = shape[0], shape[2]
    flat = tf.reshape(labels, [batch, -1])
    num_pixels = tf.shape(flat)[1]
    keys = tf.where(flat != ignore_label, _hash_uniform(seed, tf.shape(flat)), -1.0)
    # Padding columns of key -1 let top_k take P even from images smaller than P pixels.
    keys = tf.concat([keys, -tf.ones([batch, num_points], keys.dtype)], axis=1)
    values, index = tf.math.top_k(keys, num_points)  # Valid pixels first, in random order.
    num_valid = tf.reduce_sum(tf.cast(values >= 0.0, tf.int32), axis=1, keepdims=True)
    source = tf.range(num_points)[tf.newaxis, :] % tf.maximum(num_valid, 1)
    index = tf.minimum(tf.gather(index, source, batch_dims=1), num_pixels - 1)
    picked = tf.gather(flat, index, batch_dims=1)
    picked = tf.where(num_valid > 0, picked, ignore_label)
    points = tf.stack([index // width, index % width], axis=-1)
    points = tf.where((num_valid > 0)[..., tf.newaxis], points, 0)
    return tf.cast(points, tf.float32), picked


def _axis_taps(coords, size, stride):
    """Taps on one axis of a `size` map: input coords [...] -> (i0, i1 int32, w1 float32)."""
    size_f = tf.cast(size, tf.float32)
    u = tf.clip_by_value((tf.cast(coords, tf.float32) + 0.5) / stride - 0.5, 0.0, size_f - 1.0)
    lower = tf.floor(u)
    i0 = tf.cast(lower, tf.int32)
    return i0, tf.minimum(i0 + 1, size - 1), u - lower


def _concat(maps):
    """maps: list of [B,h,w,C_i] of one size -> [B,h,w,sum C_i] (the map itself if one)."""
    return maps[0] if len(maps) == 1 else tf.concat(maps, axis=-1)


def sample_bilinear(feature, points, stride):
    """Bilinear read of feature [B,h,w,C] at stride s at points [B,P,2] (y, x pixels) -> [B,P,C].

    Map coordinate u = (y + 0.5) / s - 0.5, clamped to the map (edge replication), as in
    `tf.image.resize(..., "bilinear")` when H = s * h. Gather-based (XLA-friendly) and
    differentiable in `feature` and, inside the map, in `points`.
    """
    shape = tf.shape(feature)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    y0, y1, wy = _axis_taps(points[..., 0], height, stride)
    x0, x1, wx = _axis_taps(points[..., 1], width, stride)
    # The four taps in one flat gather: its gradient is a handful of ops, where a
    # `batch_dims=1` gather's builds ~40, and tracing the hypercolumn train step (four taps
    # of every feature map) took seconds for them.
    offsets = (tf.range(batch) * (height * width))[:, tf.newaxis]  # [B,1]
    rows = tf.stack([y0 * width + x0, y0 * width + x1,
                     y1 * width + x0, y1 * width + x1]) + offsets  # [4,B,P]
    taps = tf.gather(tf.reshape(feature, [-1, channels]), rows)  # [4,B,P,C]
    wy = tf.cast(wy, feature.dtype)[..., tf.newaxis]
    wx = tf.cast(wx, feature.dtype)[..., tf.newaxis]
    top = taps[0] * (1 - wx) + taps[1] * wx
    bottom = taps[2] * (1 - wx) + taps[3] * wx
    return top * (1 - wy) + bottom * wy


def _resample_axis(x, axis, length, stride, out_stride):
    """Bilinear resampling of x along `axis` (1 or 2) onto `length` cells at `out_stride`."""
    centres = (tf.cast(tf.range(length), tf.float32) + 0.5) * out_stride - 0.5
    i0, i1, w1 = _axis_taps(centres, tf.shape(x)[axis], stride)
    # [length, 1, 1] broadcasts over [B, length, w, C]; [length, 1] over [B, H, length, C].
    w1 = tf.reshape(tf.cast(w1, x.dtype), [-1, 1, 1] if axis == 1 else [-1, 1])
    return tf.gather(x, i0, axis=axis) * (1 - w1) + tf.gather(x, i1, axis=axis) * w1


def resample_bilinear(feature, size, stride, out_stride=1):
    """Resample feature [B,h,w,C] at stride s onto a grid [B,size[0],size[1],C] at `out_stride`.

    Grid cell (i, j) is centred at input pixel ((i + 0.5) * out_stride - 0.5, likewise j)
    and read with the convention of `sample_bilinear`, so the two agree at those points.
    Separable (rows, then columns), gather-based.
    """
    rows = _resample_axis(feature, 1, size[0], stride, out_stride)
    return _resample_axis(rows, 2, size[1], stride, out_stride)


def endpoint_geometry(backbone):
    """Dict endpoint -> (channels, stride) of a backbone model, by symbolic shape inference."""
    channels = backbone.input.shape[-1]
    shapes = backbone.compute_output_shape((1, _PROBE_SIZE, _PROBE_SIZE, channels))
    return {name: (int(shape[-1]), _PROBE_SIZE // int(shape[1])) for name, shape in shapes.items()}


def _feature_list(backbone):
    """[(name, channels, stride)] of the network input and every non-pool endpoint, by stride."""
    geometry = endpoint_geometry(backbone)
    endpoints = sorted(((name, c, s) for name, (c, s) in geometry.items()
                        if name != backbones.POOL5), key=lambda f: (f[2], f[0]))
    return [(DATA, int(backbone.input.shape[-1]), 1)] + endpoints


# ----------------------------------------------------------------------------------------
# Heads.
# ----------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="mm_tf")
class HypercolumnHead(keras.layers.Layer):
    """Hypercolumn classifier over backbone features, sampled at points or dense.

    Args:
      num_classes: number of classes K.
      features: list of (name, channels, stride) in concatenation order: `DATA` (the
        network input, stride 1) and backbone endpoints (VGG: conv1_1 .. conv5_3, fc6,
        fc7). `build_hypercolumn_segmenter` fills it from a backbone.
      extra_input: the feature the extra blocks start from ("fc7").
      extra_channels: output channels of each extra 3x3 conv (paper: 1024).
      num_extra_blocks: number of extra conv-BN-ReLU-maxpool blocks (paper: 2); their
        pooled outputs, named "extra1", "extra2", are appended to the features.
      hidden_units: width of the hidden fully connected layer (paper: 1024).
      grid_stride: stride of the dense test-time grid (paper: 2).
      data_scale: factor on the network input where the classifier reads it (1.0: the
        release's raw `data` tap, mean-removed 0-255, rms ~80 on CamVid against ~0.7
        for the BN'd conv taps, so that its 3 rows dominate the hidden layer's input and
        its gradient; 1/80 brings it to unit scale).
      **kwargs: Layer arguments (name, dtype, ...).

    Example:
      head = HypercolumnHead(3, [(DATA, 3, 1), ("conv1", 8, 2), ("fc7", 16, 4)],
                             extra_channels=8, hidden_units=16)
      feats = {DATA: tf.zeros([1, 8, 8, 3]), "conv1": tf.zeros([1, 4, 4, 8]),
               "fc7": tf.zeros([1, 2, 2, 16])}
      head(feats).shape                                     # (1, 8, 8, 3)
      head(feats, points=tf.zeros([1, 5, 2])).shape         # (1, 5, 3)
    """

    # The paper trains this head on sampled points, not on dense maps.
    train_with_sampling = True

    def __init__(self, num_classes, features, extra_input="fc7", extra_channels=1024,
                 num_extra_blocks=2, hidden_units=1024, grid_stride=2, data_scale=1.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.data_scale = float(data_scale)
        self.feature_specs = tuple((str(n), int(c), int(s)) for n, c, s in features)
        names = [n for n, _, _ in self.feature_specs]
        if DATA not in names or extra_input not in names:
            raise ValueError(f"features {names} must contain {DATA!r} and {extra_input!r}")
        self.extra_input = extra_input
        self.extra_channels = int(extra_channels)
        self.num_extra_blocks = int(num_extra_blocks)
        self.hidden_units = int(hidden_units)
        self.grid_stride = int(grid_stride)

        stride = dict((n, s) for n, _, s in self.feature_specs)[extra_input]
        extras = []
        self.extra_convs, self.extra_bns, self.extra_pools = [], [], []
        for k in range(1, self.num_extra_blocks + 1):
            name = f"extra{k}"
            self.extra_convs.append(keras.layers.Conv2D(
                self.extra_channels, 3, padding="same", use_bias=False,
                kernel_initializer="glorot_uniform", name=name))
            self.extra_bns.append(keras.layers.BatchNormalization(name=f"{name}_bn"))
            self.extra_pools.append(keras.layers.MaxPooling2D(2, 2, padding="same",
                                                              name=f"{name}_pool"))
            stride *= 2
            extras.append((name, self.extra_channels, stride))
        # Every feature the classifier reads, in the row order of the hidden kernel.
        self.all_features = self.feature_specs + tuple(extras)
        self._rows, start = [], 0
        for _, channels, _ in self.all_features:
            self._rows.append((start, start + channels))
            start += channels
        self.hypercolumn_channels = start
        # Runs of consecutive features at one stride (one map size: "same" padding
        # throughout): each run is sampled or resampled as one concatenated map, with its
        # rows of the hidden kernel [start, stop), in the order of the hypercolumn.
        self._runs = []
        for (name, _, stride), (begin, end) in zip(self.all_features, self._rows):
            if self._runs and self._runs[-1][0] == stride:
                names, (first, _) = self._runs[-1][1], self._runs[-1][2]
                self._runs[-1] = (stride, names + [name], (first, end))
            else:
                self._runs.append((stride, [name], (begin, end)))
        # The one classifier, applied to [B,P,F] points and (by kernel slices) to grids.
        self.hidden = keras.layers.Dense(self.hidden_units, activation="relu",
                                         kernel_initializer="glorot_uniform", name="hidden")
        self.scores = keras.layers.Dense(self.num_classes, kernel_initializer="glorot_uniform",
                                         name="scores")
        # All shapes are known from the config: build now, so weights exist before a call.
        self.build()

    def build(self, *args, **kwargs):
        """Create the weights from the configured channel counts (input shapes are ignored)."""
        channels = dict((n, c) for n, c, _ in self.feature_specs)[self.extra_input]
        for conv, bn in zip(self.extra_convs, self.extra_bns):
            conv.build((None, None, None, channels))
            channels = self.extra_channels
            bn.build((None, None, None, channels))
        self.hidden.build((None, self.hypercolumn_channels))
        self.scores.build((None, self.hidden_units))
        self.built = True

    def call(self, features, points=None, training=None, upsample=True):
        """Logits from features {name: [B,h,w,C]} (incl. DATA [B,H,W,C_in]).

        Args:
          features: dict with every configured feature (extra keys are ignored).
          points: None for the dense path, else [B,P,2] (y, x) input pixel coordinates.
          training: BatchNormalization mode of the extra blocks.
          upsample: dense path only; False returns the stride-`grid_stride` grid logits.

        Returns:
          points given: [B,P,K]. Dense: [B,H,W,K], or [B,ceil(H/g),ceil(W/g),K] if not
          `upsample`.
        """
        maps = {name: features[name] for name, _, _ in self.feature_specs}
        if self.data_scale != 1.0:
            maps[DATA] = maps[DATA] * tf.cast(self.data_scale, maps[DATA].dtype)
        x = maps[self.extra_input]
        extra_names = [name for name, _, _ in self.all_features[len(self.feature_specs):]]
        for conv, bn, pool, name in zip(self.extra_convs, self.extra_bns, self.extra_pools,
                                        extra_names):
            x = pool(tf.nn.relu(bn(conv(x), training=training)))
            maps[name] = x
        if points is not None:
            columns = [sample_bilinear(_concat([maps[name] for name in names]), points, stride)
                       for stride, names, _ in self._runs]
            return self.scores(self.hidden(tf.concat(columns, axis=-1)))
        return self._dense(maps, upsample)

    def _dense(self, maps, upsample):
        """Dense path: maps {name: [B,h,w,C]} -> logits [B,H,W,K] (or the grid's)."""
        size = tf.shape(maps[DATA])[1:3]
        g = self.grid_stride
        grid = (size + g - 1) // g
        # One resample per run of equal-stride maps (self._runs): its maps concatenated
        # when finer than the grid, else their projections summed. Resampling and the
        # projection are both linear: neither the order nor the grouping changes the
        # result, only the number of resamples.
        parts = []
        for stride, names, (start, stop) in self._runs:
            feature = _concat([maps[name] for name in names])
            kernel = tf.cast(self.hidden.kernel[start:stop], feature.dtype)
            # Project where it is cheaper: on the grid for maps finer than the grid (data,
            # conv1_x), at the maps' own resolution for coarser ones.
            if stride < g:
                parts.append(tf.einsum("bhwc,cd->bhwd",
                                       resample_bilinear(feature, grid, stride, g), kernel))
            else:
                parts.append(resample_bilinear(tf.einsum("bhwc,cd->bhwd", feature, kernel),
                                               grid, stride, g))
        total = tf.add_n(parts)
        hidden = tf.nn.relu(total + tf.cast(self.hidden.bias, total.dtype))
        logits = self.scores(hidden)
        return resample_bilinear(logits, size, g) if upsample else logits

    def compute_output_shape(self, features_shape, points_shape=None, upsample=True):
        """[B,P,K] with points, else [B,H,W,K] (or the grid's when not upsampled)."""
        if points_shape is not None:
            return tuple(points_shape[:2]) + (self.num_classes,)
        batch, height, width = tuple(features_shape[DATA])[:3]
        if not upsample:
            height, width = [None if d is None else -(-d // self.grid_stride)
                             for d in (height, width)]
        return (batch, height, width, self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            features=[list(f) for f in self.feature_specs],
            extra_input=self.extra_input,
            extra_channels=self.extra_channels,
            num_extra_blocks=self.num_extra_blocks,
            hidden_units=self.hidden_units,
            grid_stride=self.grid_stride,
            data_scale=self.data_scale,
        )
        return config


@keras.saving.register_keras_serializable(package="mm_tf")
class FCNHead(keras.layers.Layer):
    """FCN-32s head: 1x1 conv scores on one endpoint, bilinearly resized to the input.

    Args:
      num_classes: number of classes K.
      in_channels: channels of the input endpoint.
      feature: the endpoint to score ("fc7").
      stride: the endpoint's stride (32 for VGG-16 and AlexNet fc7).
      score_initializer: initializer of the score kernel; zeros as in Long et al.'s FCN.
      **kwargs: Layer arguments (name, dtype, ...).

    Example:
      head = FCNHead(21, in_channels=16, stride=32)
      head({DATA: tf.zeros([1, 97, 131, 3]), "fc7": tf.zeros([1, 4, 5, 16])}).shape
      # (1, 97, 131, 21)
    """

    # Trained on dense maps (the points path exists so one training interface fits both).
    train_with_sampling = False

    def __init__(self, num_classes, in_channels, feature="fc7", stride=32,
                 score_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.feature = feature
        self.stride = int(stride)
        self.score_initializer = keras.initializers.get(score_initializer)
        self.score = keras.layers.Conv2D(self.num_classes, 1, use_bias=True,
                                         kernel_initializer=self.score_initializer,
                                         name="score")
        self.build()

    def build(self, *args, **kwargs):
        """Create the score layer's weights from `in_channels` (input shapes are ignored)."""
        self.score.build((None, None, None, self.in_channels))
        self.built = True

    def call(self, features, points=None, training=None):
        """Logits from features {DATA: [B,H,W,C_in], feature: [B,h,w,C]}.

        Returns [B,P,K] at `points` [B,P,2] (y, x) if given, else [B,H,W,K].
        """
        scores = self.score(features[self.feature])
        if points is not None:
            return sample_bilinear(scores, points, self.stride)
        return resample_bilinear(scores, tf.shape(features[DATA])[1:3], self.stride)

    def compute_output_shape(self, features_shape, points_shape=None):
        """[B,P,K] with points, else [B,H,W,K]."""
        if points_shape is not None:
            return tuple(points_shape[:2]) + (self.num_classes,)
        return tuple(features_shape[DATA])[:3] + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            feature=self.feature,
            stride=self.stride,
            score_initializer=keras.initializers.serialize(self.score_initializer),
        )
        return config


# ----------------------------------------------------------------------------------------
# Backbone + head.
# ----------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="mm_tf")
class SegmentationModel(keras.Model):
    """A backbone and a segmentation head; dense and point-sampled forward passes.

    `model.backbone` is the functional backbone (load M&M weights into it with
    `mm_tf.models.weights.load_backbone_weights(model.backbone, path)`, and use
    `model.backbone.trainable_variables` vs `model.head.trainable_variables` for per-part
    settings). `model.train_with_sampling` says which pass the paper trains with:
    True (hypercolumn) -> `sampled_call`, False (FCN) -> `model(images)` with a dense
    cross-entropy. Both heads support both passes.

    Args:
      backbone: functional model, images [B,H,W,C] -> dict of endpoints.
      head: `HypercolumnHead` or `FCNHead` configured for this backbone.
      num_points: P, points per image of `sampled_call` (paper: 256).
      ignore_label: label value never sampled (common.IGNORE_LABEL).
      **kwargs: Model arguments (name, ...).

    Example:
      model = build_segmentation_model("alexnet", "fcn", num_classes=21, width=0.125)
      model(tf.zeros([2, 97, 131, 3])).shape  # (2, 97, 131, 21)
    """

    def __init__(self, backbone, head, num_points=256, ignore_label=common.IGNORE_LABEL,
                 **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.head = head
        self.num_points = int(num_points)
        self.ignore_label = int(ignore_label)
        self.num_classes = head.num_classes
        self.train_with_sampling = head.train_with_sampling
        # Backbone and head are built: the model has all its weights before a call.
        self.built = True

    def features(self, images, training=None):
        """Head inputs: images [B,H,W,C] -> {DATA: images, endpoint: [B,h,w,C_e], ...}."""
        features = dict(self.backbone(images, training=training))
        features[DATA] = images
        return features

    def call(self, images, training=None):
        """Dense logits: images [B,H,W,C] -> [B,H,W,K]."""
        return self.head(self.features(images, training), training=training)

    def sampled_call(self, images, labels, seed, training=None):
        """Logits at random labelled pixels: images [B,H,W,C], labels [B,H,W], seed int [2]
        -> (logits [B,P,K], labels [B,P] int32, `ignore_label` where masked).

        Points come from `sample_points` (stateless in `seed`; pass a per-step seed).
        """
        points, point_labels = sample_points(labels, seed, self.num_points, self.ignore_label)
        logits = self.head(self.features(images, training), points=points, training=training)
        return logits, point_labels

    def compute_output_shape(self, images_shape):
        """[B,H,W,K] for images [B,H,W,C]."""
        return tuple(images_shape)[:3] + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=keras.saving.serialize_keras_object(self.backbone),
            head=keras.saving.serialize_keras_object(self.head),
            num_points=self.num_points,
            ignore_label=self.ignore_label,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        config["head"] = keras.saving.deserialize_keras_object(config["head"])
        return cls(**config)


def build_hypercolumn_segmenter(backbone, num_classes, width=1.0, hidden_units=None,
                                extra_channels=None, grid_stride=2, num_points=256,
                                ignore_label=common.IGNORE_LABEL, data_scale=1.0):
    """Hypercolumn segmentation model on `backbone` (paper's VGG-16 head, sizes x width)."""
    head = HypercolumnHead(
        num_classes, _feature_list(backbone),
        extra_channels=extra_channels or backbones.scaled_channels(1024, width),
        hidden_units=hidden_units or backbones.scaled_channels(1024, width),
        grid_stride=grid_stride, data_scale=data_scale, name="hypercolumn")
    return SegmentationModel(backbone, head, num_points=num_points, ignore_label=ignore_label,
                             name=f"{backbone.name}_hypercolumn")


def build_fcn_segmenter(backbone, num_classes, width=1.0, feature="fc7", num_points=256,
                        ignore_label=common.IGNORE_LABEL):
    """FCN-32s segmentation model on `backbone`'s fc7 (`width` unused: one builder signature)."""
    del width  # The score layer's size is fixed by the classes.
    channels, stride = endpoint_geometry(backbone)[feature]
    head = FCNHead(num_classes, channels, feature=feature, stride=stride, name="fcn")
    return SegmentationModel(backbone, head, num_points=num_points, ignore_label=ignore_label,
                             name=f"{backbone.name}_fcn")


HEADS = {"hypercolumn": build_hypercolumn_segmenter, "fcn": build_fcn_segmenter}


def build_segmentation_model(backbone_name, head_name, num_classes,
                             input_mode=common.INPUT_RGB, width=1.0, **head_kwargs):
    """Build backbone `backbone_name` and head `head_name`: a SegmentationModel.

    Args:
      backbone_name: a key of `backbones.BACKBONES` ("vgg16", "alexnet").
      head_name: a key of `HEADS` ("hypercolumn", "fcn").
      num_classes: number of classes K.
      input_mode: common.INPUT_RGB or common.INPUT_GREY.
      width: channel multiplier of backbone and head.
      **head_kwargs: extra arguments of the head builder (e.g. num_points).

    Example:
      model = build_segmentation_model("vgg16", "hypercolumn", 21, "grey", width=0.125)
      logits, labels = model.sampled_call(images, labels, tf.constant([0, 1]))
    """
    if head_name not in HEADS:
        raise ValueError(f"unknown head {head_name!r}; expected one of {sorted(HEADS)}")
    backbone = backbones.build_backbone(backbone_name, input_mode, width)
    return HEADS[head_name](backbone, num_classes, width=width, **head_kwargs)
