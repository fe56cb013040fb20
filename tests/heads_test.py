"""Tests of mm_tf.models.heads: bilinear reads, point sampling, hypercolumn and FCN heads."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf.models import backbones, heads

WIDTH = 0.0625
IGNORE = common.IGNORE_LABEL


def _centres(n, stride):
    """Input-pixel coordinate of the centre of each of n cells at `stride`."""
    return stride * np.arange(n) + (stride - 1) / 2.0


def _coordinate_map(batch, h, w, stride):
    """Feature [B,h,w,2] whose channels are the input (y, x) of each cell centre."""
    yy, xx = np.meshgrid(_centres(h, stride), _centres(w, stride), indexing="ij")
    return np.broadcast_to(np.stack([yy, xx], -1), (batch, h, w, 2)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# sample_bilinear / resample_bilinear.
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2, 4, 32])
def test_sample_bilinear_reads_the_mapped_coordinates(stride):
    h, w = 5, 7
    feature = _coordinate_map(2, h, w, stride)
    rng = np.random.default_rng(stride)
    # Inside the span of cell centres the map is linear, so a bilinear read is exact.
    y = rng.uniform(_centres(h, stride)[0], _centres(h, stride)[-1], (2, 50))
    x = rng.uniform(_centres(w, stride)[0], _centres(w, stride)[-1], (2, 50))
    points = np.stack([y, x], -1).astype(np.float32)
    out = heads.sample_bilinear(tf.constant(feature), tf.constant(points), stride).numpy()
    np.testing.assert_allclose(out, points, atol=1e-4 * stride)
    # Outside, the read clamps to the border cells (edge replication).
    edge = np.array([[[-5.0, -5.0], [1e4, 1e4]]], np.float32)
    out = heads.sample_bilinear(tf.constant(feature[:1]), tf.constant(edge), stride).numpy()
    np.testing.assert_allclose(out[0, 0], [_centres(h, stride)[0], _centres(w, stride)[0]])
    np.testing.assert_allclose(out[0, 1], [_centres(h, stride)[-1], _centres(w, stride)[-1]])


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_sampling_matches_tf_image_resize(stride):
    feature = tf.random.stateless_normal([2, 6, 5, 3], seed=[0, stride])
    big_h, big_w = 6 * stride, 5 * stride
    expected = tf.image.resize(feature, [big_h, big_w], method="bilinear").numpy()
    yy, xx = np.meshgrid(np.arange(big_h), np.arange(big_w), indexing="ij")
    points = np.broadcast_to(np.stack([yy, xx], -1).reshape(1, -1, 2), (2, big_h * big_w, 2))
    sampled = heads.sample_bilinear(feature, tf.constant(points, tf.float32), stride)
    np.testing.assert_allclose(sampled.numpy().reshape(expected.shape), expected, atol=1e-5)
    dense = heads.resample_bilinear(feature, (big_h, big_w), stride)
    np.testing.assert_allclose(dense.numpy(), expected, atol=1e-5)


def test_sample_bilinear_has_gradients():
    feature = tf.Variable(tf.random.stateless_normal([1, 4, 4, 2], seed=[1, 1]))
    points = tf.Variable([[[3.3, 5.1], [9.0, 2.5]]])
    with tf.GradientTape() as tape:
        out = heads.sample_bilinear(feature, points, 2)
        total = tf.reduce_sum(out)
    d_feature, d_points = tape.gradient(total, [feature, points])
    # Bilinear weights sum to one: each point spreads gradient 1 per channel.
    np.testing.assert_allclose(tf.reduce_sum(d_feature).numpy(), 2 * 2, rtol=1e-6)
    assert np.all(np.isfinite(d_points.numpy())) and np.any(d_points.numpy() != 0)


def test_sampling_compiles_with_xla():
    feature = tf.random.stateless_normal([2, 8, 8, 3], seed=[2, 2])
    labels = tf.random.stateless_uniform([2, 16, 16], [3, 3], 0, 4, tf.int32)
    seed = tf.constant([7, 8])

    def fn(feature, labels, seed):
        points, point_labels = heads.sample_points(labels, seed, 32)
        return heads.sample_bilinear(feature, points, 2), point_labels

    eager = fn(feature, labels, seed)
    compiled = tf.function(fn, jit_compile=True)(feature, labels, seed)
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------
# sample_points.
# ---------------------------------------------------------------------------------------

def _labels():
    """[4,16,20] labels: image 0 mostly valid, 1 with 3 valid pixels, 2 none, 3 all valid."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (4, 16, 20)).astype(np.int32)
    labels[0][rng.random((16, 20)) < 0.3] = IGNORE
    labels[1] = IGNORE
    labels[1, [2, 7, 15], [3, 19, 0]] = [1, 2, 3]
    labels[2] = IGNORE
    return labels


def test_sample_points_picks_labelled_pixels():
    labels = _labels()
    points, picked = heads.sample_points(labels, tf.constant([1, 2]), 64)
    points, picked = points.numpy(), picked.numpy()
    assert points.shape == (4, 64, 2) and picked.shape == (4, 64)
    rows, cols = points[..., 0].astype(int), points[..., 1].astype(int)
    np.testing.assert_array_equal(points, np.stack([rows, cols], -1))  # Integer pixels.
    for b in (0, 1, 3):
        np.testing.assert_array_equal(picked[b], labels[b, rows[b], cols[b]])
        assert np.all(picked[b] != IGNORE)
    # Enough valid pixels: all distinct.
    for b in (0, 3):
        assert len({(r, c) for r, c in zip(rows[b], cols[b])}) == 64
    # Three valid pixels: each repeated (with replacement), none masked.
    assert {(r, c) for r, c in zip(rows[1], cols[1])} == {(2, 3), (7, 19), (15, 0)}
    assert sorted(np.bincount(picked[1])[1:].tolist()) == [21, 21, 22]
    # No valid pixel: masked.
    assert np.all(picked[2] == IGNORE)


def test_sample_points_is_stateless_and_uniform():
    labels = _labels()
    a = heads.sample_points(labels, tf.constant([1, 2]), 64)
    b = tf.function(heads.sample_points)(labels, tf.constant([1, 2]), 64)
    c = heads.sample_points(labels, tf.constant([1, 3]), 64)
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    assert np.any(a[0].numpy() != c[0].numpy())
    # Over many seeds each pixel of a fully labelled image is picked about equally often.
    full = np.zeros([1, 8, 8], np.int32)
    counts = np.zeros(64)
    for step in range(200):
        points, _ = heads.sample_points(full, tf.constant([5, step]), 16)
        idx = (points[0, :, 0] * 8 + points[0, :, 1]).numpy().astype(int)
        counts += np.bincount(idx, minlength=64)
    assert counts.min() > 25 and counts.max() < 75  # Expected 50 each.


# ---------------------------------------------------------------------------------------
# Heads and models.
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hypercolumn_model():
    keras.utils.set_random_seed(0)
    return heads.build_segmentation_model("vgg16", "hypercolumn", 5, common.INPUT_RGB, WIDTH)


def _images(shape, seed=0):
    return tf.random.stateless_normal(shape, seed=[seed, 1])


def test_dense_and_sampled_hypercolumn_agree(hypercolumn_model):
    """Dense and sampled logits agree at the 2x grid's cell centres (2i + 0.5, 2j + 0.5).

    Tolerance: atol 1e-5 x max |logit| (measured ~1e-6 relative). At other pixels the dense output is by design the stride-2 bilinear interpolation of
    the grid logits, which is checked against sample_bilinear at every pixel.
    """
    model = hypercolumn_model
    height, width = 40, 52
    features = model.features(_images([2, height, width, 3]), training=False)
    grid = model.head(features, upsample=False).numpy()
    gh, gw = grid.shape[1:3]
    assert (gh, gw) == (20, 26)
    yy, xx = np.meshgrid(2 * np.arange(gh) + 0.5, 2 * np.arange(gw) + 0.5, indexing="ij")
    centres = np.broadcast_to(np.stack([yy, xx], -1).reshape(1, -1, 2), (2, gh * gw, 2))
    sampled = model.head(features, points=tf.constant(centres, tf.float32)).numpy()
    scale = np.abs(grid).max()
    assert scale > 0
    np.testing.assert_allclose(sampled.reshape(grid.shape), grid, atol=1e-5 * scale)

    dense = model.head(features).numpy()
    assert dense.shape == (2, height, width, 5)
    np.testing.assert_allclose(dense, model(_images([2, height, width, 3])).numpy(), atol=1e-5)
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pixels = np.broadcast_to(np.stack([yy, xx], -1).reshape(1, -1, 2), (2, height * width, 2))
    interpolated = heads.sample_bilinear(tf.constant(grid), tf.constant(pixels, tf.float32), 2)
    np.testing.assert_allclose(interpolated.numpy().reshape(dense.shape), dense,
                               atol=1e-5 * scale)


def test_sampled_call_shapes_and_labels(hypercolumn_model):
    labels = _labels()[:, :, :16]
    logits, point_labels = hypercolumn_model.sampled_call(
        _images([4, 16, 16, 3]), labels, tf.constant([0, 1]))
    assert tuple(logits.shape) == (4, 256, 5) and tuple(point_labels.shape) == (4, 256)
    assert np.all(point_labels.numpy()[2] == IGNORE)
    assert hypercolumn_model.train_with_sampling


@pytest.mark.parametrize("backbone", ["alexnet", "vgg16"])
def test_fcn_output_is_input_size_for_odd_sizes(backbone):
    keras.utils.set_random_seed(1)
    model = heads.build_segmentation_model(backbone, "fcn", 4, common.INPUT_GREY, WIDTH)
    assert not model.train_with_sampling
    # Random scores, so the dense/sampled comparison below is not trivially zero.
    model.head.score.kernel.assign(tf.random.stateless_normal(model.head.score.kernel.shape,
                                                              seed=[1, 1]))
    images = _images([1, 97, 131, 1])
    dense = model(images).numpy()
    assert dense.shape == (1, 97, 131, 4)
    assert model.compute_output_shape((1, 97, 131, 1)) == (1, 97, 131, 4)
    # The FCN's point path reads the same score map at the same coordinates.
    points = np.array([[[0, 0], [96, 130], [50, 61], [13, 100]]], np.float32)
    sampled = model.head(model.features(images), points=tf.constant(points)).numpy()
    np.testing.assert_allclose(sampled[0], dense[0, [0, 96, 50, 13], [0, 130, 61, 100]],
                               atol=1e-5 * np.abs(dense).max())


def test_hypercolumn_features_and_sizes(hypercolumn_model):
    head = hypercolumn_model.head
    names = [n for n, _, _ in head.all_features]
    assert names == ["data", "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1",
                     "conv3_2", "conv3_3", "conv4_1", "conv4_2", "conv4_3", "conv5_1",
                     "conv5_2", "conv5_3", "fc6", "fc7", "extra1", "extra2"]
    strides = [s for _, _, s in head.all_features]
    assert strides[-4:] == [32, 32, 64, 128]
    channels = backbones.endpoint_channels("vgg16", WIDTH)
    expected = 3 + sum(c for n, c in channels.items() if n != "pool5") + 2 * 64
    assert head.hypercolumn_channels == expected
    assert head.hidden.kernel.shape == (expected, 64)
    assert head.scores.kernel.shape == (64, 5)


def test_backbone_attribute_partitions_variables(hypercolumn_model):
    model = hypercolumn_model
    assert model.backbone.name == "vgg16"
    ids = {id(v) for v in model.trainable_variables}
    backbone_ids = {id(v) for v in model.backbone.trainable_variables}
    head_ids = {id(v) for v in model.head.trainable_variables}
    assert backbone_ids | head_ids == ids and not backbone_ids & head_ids


def _same_outputs(a, b, images):
    np.testing.assert_allclose(a(images).numpy(), b(images).numpy(), atol=1e-6)


def test_head_config_round_trips():
    keras.utils.set_random_seed(2)
    head = heads.HypercolumnHead(3, [("data", 3, 1), ("conv1", 8, 2), ("fc7", 16, 4)],
                                 extra_channels=8, hidden_units=16, name="hc")
    clone = heads.HypercolumnHead.from_config(head.get_config())
    assert clone.get_config() == head.get_config() and clone.name == "hc"
    clone.set_weights(head.get_weights())
    feats = {"data": _images([1, 8, 8, 3]), "conv1": _images([1, 4, 4, 8], 1),
             "fc7": _images([1, 2, 2, 16], 2)}
    np.testing.assert_allclose(head(feats).numpy(), clone(feats).numpy(), atol=1e-6)
    assert head.compute_output_shape({"data": (1, 8, 8, 3)}) == (1, 8, 8, 3)
    assert head.compute_output_shape({"data": (1, 9, 8, 3)}, upsample=False) == (1, 5, 4, 3)
    assert head.compute_output_shape({}, (1, 7, 2)) == (1, 7, 3)

    fcn = heads.FCNHead(4, in_channels=16, stride=32, score_initializer="glorot_uniform",
                        trainable=False)
    clone = heads.FCNHead.from_config(fcn.get_config())
    assert clone.get_config() == fcn.get_config() and not clone.trainable


def test_data_scale_multiplies_the_data_tap_only():
    """data_scale s on input x == data_scale 1 on s * x with the other taps unchanged, in
    both the sampled and the dense path; the config keeps s."""
    keras.utils.set_random_seed(4)
    specs = [("data", 3, 1), ("conv1", 8, 2), ("fc7", 16, 4)]
    plain = heads.HypercolumnHead(3, specs, extra_channels=8, hidden_units=16)
    scaled = heads.HypercolumnHead(3, specs, extra_channels=8, hidden_units=16, data_scale=0.01)
    scaled.set_weights(plain.get_weights())
    assert heads.HypercolumnHead.from_config(scaled.get_config()).data_scale == 0.01
    data = 100.0 * _images([2, 8, 8, 3])
    others = {"conv1": _images([2, 4, 4, 8], 1), "fc7": _images([2, 2, 2, 16], 2)}
    points = tf.constant([[[0.0, 0.0], [3.0, 5.0]], [[7.0, 7.0], [2.0, 1.0]]])
    for kwargs in ({}, {"points": points}):
        ours = scaled({"data": data, **others}, **kwargs).numpy()
        np.testing.assert_allclose(ours, plain({"data": 0.01 * data, **others}, **kwargs).numpy(),
                                   atol=1e-5)
        # Not a no-op: the raw tap gives other logits.
        assert np.abs(ours - plain({"data": data, **others}, **kwargs).numpy()).max() > 1e-2


def test_model_config_and_keras_file_round_trip(tmp_path):
    keras.utils.set_random_seed(3)
    model = heads.build_segmentation_model("alexnet", "fcn", 3, width=WIDTH, num_points=16)
    model.head.score.kernel.assign(tf.random.stateless_normal(model.head.score.kernel.shape,
                                                              seed=[2, 2]))
    images = _images([1, 64, 64, 3])
    clone = heads.SegmentationModel.from_config(model.get_config())
    assert clone.num_points == 16 and clone.name == model.name
    clone.set_weights(model.get_weights())
    _same_outputs(model, clone, images)
    path = str(tmp_path / "model.keras")
    model.save(path)
    _same_outputs(model, keras.saving.load_model(path), images)


def test_unknown_head_raises():
    assert set(heads.HEADS) == {"hypercolumn", "fcn"}
    with pytest.raises(ValueError, match="unknown head"):
        heads.build_segmentation_model("vgg16", "deeplab", 3)


def _masked_cross_entropy(logits, labels):
    """Mean cross-entropy over points/pixels whose label is not IGNORE: scalar."""
    valid = labels != IGNORE
    per_point = tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.where(valid, labels, 0), tf.cast(logits, tf.float32))
    weights = tf.cast(valid, tf.float32)
    return tf.reduce_sum(per_point * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


@pytest.mark.parametrize("head_name", ["hypercolumn", "fcn"])
def test_one_training_step_reduces_loss(head_name):
    keras.utils.set_random_seed(4)
    model = heads.build_segmentation_model("vgg16", head_name, 3, common.INPUT_GREY, WIDTH)
    images = _images([2, 32, 32, 1], 5)
    # Labels that depend on the image, so there is something to learn.
    labels = tf.cast(tf.clip_by_value(images[..., 0] + 1.5, 0.0, 2.0), tf.int32)
    labels = tf.tensor_scatter_nd_update(labels, [[0, 0, 0]], [IGNORE])
    seed = tf.constant([9, 9])

    def loss_fn():
        if model.train_with_sampling:
            return _masked_cross_entropy(*model.sampled_call(images, labels, seed, training=True))
        return _masked_cross_entropy(model(images, training=True), labels)

    optimizer = keras.optimizers.SGD(0.01)
    with tf.GradientTape() as tape:
        before = loss_fn()
    grads = tape.gradient(before, model.trainable_variables)
    assert all(g is not None for g in grads)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    after = loss_fn()
    assert float(after) < float(before)
