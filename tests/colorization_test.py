"""mm_tf.proxy.colorization: the targets are the colours of the sampled pixels, the hue
term vanishes on greys, shapes of the dense and point paths, and a few seeded steps on
the demo data lower the colour loss."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf.data import datasets, pipeline, synthetic
from mm_tf.errors import ConfigError
from mm_tf.models import backbones, heads
from mm_tf.proxy import color, colorization

WIDTH = 0.0625


def _model(points=32, seed=0):
    keras.utils.set_random_seed(seed)
    model = colorization.build_model(colorization.ColorizationConfig(
        width=WIDTH, points_per_image=points, hidden_units=32, seed=seed))
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    return model


@pytest.fixture(scope="module")
def demo_batch(tmp_path_factory):
    root = synthetic.generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=8,
                                           num_val=0)
    pairs, info = datasets.read_dataset("demo", root, "train")
    config = pipeline.InputConfig(crop_size=48, batch_size=4, input_mode=common.INPUT_GREY,
                                  min_scale=0.5, max_scale=0.5, flip=False)
    return next(iter(pipeline.train_dataset(pairs, info, config, include_raw_image=True)))


def test_points_cover_distinct_pixels_and_targets_read_them():
    model = _model(points=20)
    images = tf.zeros([2, 8, 6, 1])
    points = model.sample_points(images, tf.constant([3, 4])).numpy()
    assert points.shape == (2, 20, 2)
    assert len({tuple(p) for p in points[0]}) == 20  # Without replacement.
    assert (points == np.round(points)).all()  # Pixel centres.
    raw = np.random.default_rng(0).integers(0, 256, (2, 8, 6, 3)).astype(np.float32)
    read = heads.sample_bilinear(tf.constant(raw), tf.constant(points), 1).numpy()
    rows, cols = points[..., 0].astype(int), points[..., 1].astype(int)
    np.testing.assert_array_equal(read, raw[np.arange(2)[:, None], rows, cols])


def test_dense_and_point_logits_shapes():
    model = _model()
    bins = model.bins.num_bins
    assert model(tf.zeros([1, 40, 24, 1])).shape == (1, 40, 24, bins)
    points = tf.constant([[[0.0, 0.0], [39.0, 23.0], [10.0, 5.0]]])
    assert model.point_logits(tf.zeros([1, 40, 24, 1]), points).shape == (1, 3, bins)
    predicted = model.predict_colors(tf.zeros([1, 40, 24, 1]),
                                     tf.fill([1, 40, 24, 3], tf.constant(128, tf.uint8)))
    assert predicted.shape == (1, 40, 24, 3) and predicted.dtype == tf.uint8


def test_hue_term_is_weighted_by_chroma():
    model = _model()
    grey_raw = tf.fill([2, 16, 16, 3], tf.constant(120, tf.uint8))
    images = pipeline.normalize(grey_raw, common.INPUT_GREY)
    terms = model.color_terms(images, grey_raw, tf.constant(0), training=False)
    # Grey pixels have chroma ~0: the loss is the chroma KL alone.
    np.testing.assert_allclose(float(terms["loss"]), float(terms["kl_chroma"]), rtol=1e-4)
    assert float(terms["kl_hue"]) > 0


def test_kl_divergence_by_hand():
    target = tf.constant([[0.5, 0.5, 0.0]])
    logits = tf.math.log(tf.constant([[0.25, 0.25, 0.5]]))
    np.testing.assert_allclose(colorization.kl_divergence(target, logits).numpy(),
                               [np.log(2.0)], rtol=1e-5)


def test_seeded_steps_lower_the_colour_loss_on_demo_data(demo_batch):
    model = _model()
    images, raw = demo_batch[common.IMAGE], demo_batch[common.RAW_IMAGE]
    before = model.color_terms(images, raw, tf.constant(0))
    for _ in range(4):  # Eager: cheaper than compiling the step for so few.
        logs = model.train_step(demo_batch)
    after = model.color_terms(images, raw, tf.constant(0))
    assert float(after["loss"]) < float(before["loss"])
    assert int(model.optimizer.iterations) == 4
    np.testing.assert_allclose(float(logs["loss"]),
                               float(logs["color_loss"]) + float(logs["weight_decay"]),
                               rtol=1e-5)
    rows = colorization.color_rows(images, raw, model.predict_colors(images, raw))
    assert rows.shape == (1, 4 * 48, 3 * 48, 3) and rows.dtype == np.uint8


def test_backbone_must_be_grey_and_bins_follow_the_config():
    with pytest.raises(ConfigError, match="grey"):
        colorization.ColorizationModel(backbones.build_backbone("vgg16", width=WIDTH))
    config = colorization.ColorizationConfig(num_hue_bins=16, num_chroma_bins=8, width=WIDTH,
                                             hidden_units=16)
    assert config.bins() == color.ColorBins(num_chroma_bins=8, num_hue_bins=16)
    model = colorization.build_model(config)
    assert model(tf.zeros([1, 32, 32, 1])).shape[-1] == 24
    with pytest.raises(ConfigError, match="neighbours"):
        colorization.build_model(colorization.ColorizationConfig(neighbours=50, width=WIDTH))
