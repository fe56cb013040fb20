"""The segmenter: median-frequency weights by hand, gradient
accumulation equal to one big-batch step, a seeded fine-tune on the demo data that beats
the majority-class baseline, resume, and the saved model reloading to the same scores."""

import json
import os

import keras
import numpy as np
import scipy.special
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf import evaluation
from mm_tf import losses
from mm_tf import mix as mix_lib
from mm_tf import segmenter as seg
from mm_tf import training
from mm_tf.data import datasets
from mm_tf.data import pipeline
from mm_tf.data import synthetic
from mm_tf.errors import ConfigError
from mm_tf.models import backbones
from mm_tf.models import weights as weights_lib

IGNORE = common.IGNORE_LABEL


def test_median_frequency_weights_by_hand():
    # freq = [0.1, 0.3, 0, 0.6]; median over present classes = 0.3.
    weights = seg.median_frequency_weights([10, 30, 0, 60])
    np.testing.assert_allclose(weights, [3.0, 1.0, 0.0, 0.5], rtol=1e-6)
    assert weights.dtype == np.float32
    with pytest.raises(ValueError):
        seg.median_frequency_weights([0, 0])


# ----------------------------------------------------------------------------------------
# Gradient accumulation.
# ----------------------------------------------------------------------------------------

class LinearSeg(keras.Model):
    """Per-pixel linear classifier: images [B,H,W,C] -> logits [B,H,W,K] (dense training)."""

    train_with_sampling = False

    def __init__(self, num_classes, channels, seed):
        super().__init__()
        self.num_classes = num_classes
        self.dense = keras.layers.Dense(
            num_classes, kernel_initializer=keras.initializers.GlorotUniform(seed))
        self.dense.build((None, channels))
        self.built = True

    def call(self, images, training=None):
        return self.dense(images)


def _segmenter(iter_size, lr=0.1):
    model = seg.Segmenter(LinearSeg(4, 3, seed=7), weight_decay=0.01, iter_size=iter_size)
    model.compile(optimizer=training.make_sgd(lr, (2,), 0.1, 0.9))
    return model


def test_accumulating_two_micro_batches_equals_one_step_on_the_big_batch():
    rng = np.random.default_rng(0)
    small, big = _segmenter(iter_size=2), _segmenter(iter_size=1)
    np.testing.assert_array_equal(small.network.dense.kernel.numpy(),
                                  big.network.dense.kernel.numpy())
    for step in range(3):  # Crosses the lr boundary at update 2; momentum carries over.
        batch = {common.IMAGE: tf.constant(rng.normal(size=(4, 5, 5, 3)), tf.float32),
                 common.LABEL: tf.constant(rng.integers(0, 4, size=(4, 5, 5)), tf.int32)}
        logs_small = small.train_step(batch)
        logs_big = big.train_step(batch)
        assert int(small.optimizer.iterations) == int(big.optimizer.iterations) == step + 1
        for a, b in zip(small.network.weights, big.network.weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
        np.testing.assert_allclose(float(logs_small["loss"]), float(logs_big["loss"]),
                                   rtol=1e-5)
    assert float(small.optimizer.learning_rate) == pytest.approx(0.01)


def test_train_step_logs_and_excludes_ignore_pixels_from_metrics():
    model = _segmenter(iter_size=2, lr=0.0)
    labels = np.zeros((2, 4, 4), np.int32)
    labels[:, :, 2:] = IGNORE
    images = np.zeros((2, 4, 4, 3), np.float32)
    logs = model.train_step({common.IMAGE: tf.constant(images), common.LABEL: labels})
    assert set(logs) == {"loss", "cross_entropy", "weight_decay", "pixel_acc", "miou"}
    np.testing.assert_allclose(float(logs["loss"]),
                               float(logs["cross_entropy"]) + float(logs["weight_decay"]),
                               rtol=1e-6)
    # Zero images give the bias' argmax everywhere; only the 16 label-0 pixels count.
    bias = model.network.dense.bias.numpy()
    predicted = int(np.argmax(bias))
    assert float(logs["pixel_acc"]) == (1.0 if predicted == 0 else 0.0)
    # Zero lr: the logged cross-entropy is -log softmax(bias)[0], ignore pixels excluded.
    expected = -scipy.special.log_softmax(bias, axis=-1)[0]
    np.testing.assert_allclose(float(logs["cross_entropy"]), expected, rtol=1e-5)


def test_all_ignore_micro_batch_adds_no_cross_entropy_and_no_nan():
    model = _segmenter(iter_size=2)
    labels = np.zeros((4, 3, 3), np.int32)
    labels[:2] = IGNORE  # The first micro-batch has no labelled pixel.
    images = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    logs = model.train_step({common.IMAGE: tf.constant(images), common.LABEL: labels})
    assert all(np.isfinite(float(v)) for v in logs.values())
    assert np.all(np.isfinite(model.network.dense.kernel.numpy()))
    # Mean over micro-batches: 0 for the empty one.
    reference = _segmenter(iter_size=1)
    per_pixel, count = losses.pixel_cross_entropy(reference.network(images[2:]), labels[2:])
    np.testing.assert_allclose(float(logs["cross_entropy"]),
                               float(losses.mean_cross_entropy(per_pixel, count)) / 2, rtol=1e-5)


def test_hypercolumn_step_uses_per_step_seeds():
    from mm_tf.models import heads  # pylint: disable=import-outside-toplevel
    network = heads.build_segmentation_model("vgg16", "hypercolumn", 3, width=0.0625)
    model = seg.Segmenter(network, iter_size=2, seed=3)
    seeds0, seeds1 = model.step_seeds(0).numpy(), model.step_seeds(1).numpy()
    assert seeds0.shape == (2, 2)
    assert not np.array_equal(seeds0[0], seeds0[1]) and not np.array_equal(seeds0, seeds1)
    np.testing.assert_array_equal(seeds0, model.step_seeds(0).numpy())


def test_config_round_trip_keeps_settings_and_network():
    from mm_tf.models import heads  # pylint: disable=import-outside-toplevel
    network = heads.build_segmentation_model("alexnet", "fcn", 3, width=0.0625)
    model = seg.Segmenter(network, weight_decay=1e-3, iter_size=4, class_weights=[1, 2, 0],
                          seed=5, name="seg")
    clone = seg.Segmenter.from_config(model.get_config())
    assert (clone.name, clone.weight_decay, clone.iter_size, clone.class_weights,
            clone.seed) == ("seg", 1e-3, 4, [1.0, 2.0, 0.0], 5)
    assert clone.network.head.num_classes == 3 and not clone.train_with_sampling
    assert len(clone.network.weights) == len(network.weights)
    assert clone(tf.zeros([1, 40, 48, 3])).shape == (1, 40, 48, 3)


# ----------------------------------------------------------------------------------------
# A short fine-tune on the demo data (shared by the tests below).
# ----------------------------------------------------------------------------------------

STEPS = 120
INPUT = pipeline.InputConfig(crop_size=64, batch_size=4, min_scale=0.75, max_scale=1.25,
                             seed=0)
# The paper's lr and iter_size; BN statistics recomputed, as 120 updates leave the moving
# averages behind the weights.
CONFIG = seg.SegConfig(width=0.0625, learning_rate=0.01, lr_boundaries=(90,), iter_size=2,
                       seed=0, bn_recompute_batches=20)


def _loop(steps):
    return training.LoopConfig(steps=steps, log_every=30, checkpoint_every=30,
                               image_every=60, verbose=0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    data = synthetic.generate_demo_dataset(root / "data", num_train=24, num_val=8)
    train, info = datasets.read_dataset("demo", data, "train")
    val, _ = datasets.read_dataset("demo", data, "val")
    return root, train, val, info


@pytest.fixture(scope="module")
def trained(demo):
    root, train, val, info = demo
    workdir = str(root / "run")
    keras.utils.set_random_seed(0)
    summary = seg.run_segmentation(workdir, train, val, info, INPUT, CONFIG, _loop(STEPS),
                                   data={"dataset": "demo", "data_dir": str(root / "data"),
                                         "split": "val"})
    return workdir, summary


def test_fine_tune_beats_the_majority_class_baseline(trained):
    workdir, summary = trained
    assert summary["steps"] == STEPS and summary["images_per_update"] == 8
    scores = summary["eval"]
    matrix = np.array(scores["confusion_matrix"])
    majority_acc = matrix.sum(1).max() / matrix.sum()
    # Predicting the majority class (background, ~80% of the pixels) everywhere: pixel acc
    # = its share, mIoU = share / K. Measured over seeds 0-2 and lr 0.003/0.01: mIoU
    # 0.27-0.36 (baseline 0.16), pixel acc 0.837-0.861 (baseline 0.804).
    majority_miou = majority_acc / len(scores["per_class_iou"])
    assert scores["miou"] > 1.4 * majority_miou, (scores, majority_miou)
    assert scores["pixel_acc"] > majority_acc + 0.015, (scores, majority_acc)
    for name in ("model.weights.h5", "model_config.json", "summary.json"):
        assert os.path.isfile(os.path.join(workdir, name))
    assert os.listdir(os.path.join(workdir, "tensorboard", "val"))
    assert set(summary["metrics"]) == {"loss", "cross_entropy", "weight_decay", "pixel_acc",
                                       "miou"}
    # Fine-tuning moved every backbone kernel from its init, fc6/fc7 included.
    assert summary["movement_from_step"] == 0
    assert len(summary["movement"]) == 15 and min(summary["movement"].values()) > 0


def test_saved_model_reloads_to_the_same_scores(trained, demo):
    workdir, summary = trained
    _, _, val, info = demo
    network, model_config = seg.load_trained_model(workdir)
    assert model_config["num_classes"] == info.num_classes
    assert model_config["class_names"] == list(info.class_names)
    assert model_config["palette"] == np.asarray(info.palette).tolist()
    scores = evaluation.Evaluator(
        pipeline.eval_dataset(val, info, pipeline.InputConfig()), info.num_classes,
        info.class_names).run(network)
    assert scores["confusion_matrix"] == summary["eval"]["confusion_matrix"]
    assert scores["miou"] == summary["eval"]["miou"]


def test_rerun_resumes_and_continues_the_step_count(trained, demo):
    workdir, _ = trained
    _, train, val, info = demo
    more = STEPS + 4
    summary = seg.run_segmentation(workdir, train, val, info, INPUT, CONFIG, _loop(more))
    assert summary["resumed_from_step"] == STEPS
    assert summary["steps"] == more
    # A finished run rerun trains nothing, keeps its metrics and scores the same model.
    again = seg.run_segmentation(workdir, train, val, info, INPUT, CONFIG, _loop(more))
    assert again["resumed_from_step"] == again["steps"] == more
    assert again["metrics"] == summary["metrics"] and again["metrics"]
    assert again["eval"]["confusion_matrix"] == summary["eval"]["confusion_matrix"]


# ----------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------

def test_missing_init_file_names_the_flag(demo, tmp_path):
    _, train, val, info = demo
    config = seg.SegConfig(width=0.0625, init=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(ConfigError, match="--init"):
        seg.run_segmentation(str(tmp_path / "run"), train, val, info, INPUT, config, _loop(30))


def test_mismatched_init_weights_name_the_layer(demo, tmp_path):
    _, train, val, info = demo
    path = str(tmp_path / "wide.weights.h5")
    weights_lib.save_backbone_weights(backbones.build_backbone("vgg16", width=0.125), path)
    config = seg.SegConfig(width=0.0625, init=path)
    with pytest.raises(weights_lib.WeightsMismatchError, match="layer 'conv2_1'"):
        seg.run_segmentation(str(tmp_path / "run"), train, val, info, INPUT, config, _loop(30))


def test_load_trained_model_of_an_empty_folder_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="model_config.json"):
        seg.load_trained_model(str(tmp_path))


def test_invalid_config_names_the_flag():
    with pytest.raises(ConfigError, match="--class_weighting"):
        seg.SegConfig(class_weighting="inverse").validate()
    with pytest.raises(ConfigError, match="--iter_size"):
        seg.SegConfig(iter_size=0).validate()
    with pytest.raises(ConfigError, match="--hypercolumn_data_scale applies to --head=hyper"):
        seg.SegConfig(head="fcn", hypercolumn_data_scale=0.5).validate()


def test_hypercolumn_data_scale_reaches_the_head_and_the_model_config(demo, tmp_path):
    """The head option is recorded in model_config.json and a reload rebuilds it."""
    info = demo[3]
    config = seg.SegConfig(width=0.0625, hypercolumn_data_scale=0.0125)
    assert seg.SegConfig(width=0.0625).head_kwargs() == {}
    keras.utils.set_random_seed(0)
    network = seg.build_network(config, info.num_classes)
    assert network.head.data_scale == 0.0125
    weights = str(tmp_path / "model.weights.h5")
    seg.save_network_weights(network, weights)
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps(seg.model_config_dict(config, info)))
    clone, _ = seg.load_model(weights, str(path))
    assert clone.head.data_scale == 0.0125
    images = tf.random.stateless_uniform([1, 32, 32, 3], [0, 1], -100.0, 100.0)
    np.testing.assert_allclose(clone(images).numpy(), network(images).numpy(), atol=1e-5)


def test_image_only_data_is_refused_with_the_dataset_named(tmp_path):
    with pytest.raises(ConfigError, match="--dataset=images has no labels"):
        seg.run_segmentation(str(tmp_path), [("a.png", "")], [("a.png", "")],
                             datasets.images_info(), pipeline.InputConfig(), seg.SegConfig(),
                             training.LoopConfig(steps=1))


class TwoPartSeg(keras.Model):
    """Per-pixel Dense "backbone" then Dense head: [B,H,W,C] -> [B,H,W,K]."""

    train_with_sampling = False

    def __init__(self, num_classes, channels):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = keras.layers.Dense(channels, kernel_initializer=
                                           keras.initializers.GlorotUniform(1))
        self.head = keras.layers.Dense(num_classes, kernel_initializer=
                                       keras.initializers.GlorotUniform(2))
        self.backbone.build((None, channels))
        self.head.build((None, channels))
        self.built = True

    def call(self, images, training=None):
        return self.head(self.backbone(images))


def test_backbone_lr_multiplier_scales_only_the_backbone_update():
    rng = np.random.default_rng(3)
    batch = {common.IMAGE: tf.constant(rng.normal(size=(2, 4, 4, 3)), tf.float32),
             common.LABEL: tf.constant(rng.integers(0, 4, size=(2, 4, 4)), tf.int32)}
    moved = {}
    for multiplier in (1.0, 0.25):
        network = TwoPartSeg(4, 3)
        start = [v.numpy().copy() for v in network.weights]
        model = seg.Segmenter(network, weight_decay=0.01, backbone_lr_multiplier=multiplier)
        model.compile(optimizer=training.make_sgd(0.1, (), 0.1, 0.9))
        model.train_step(batch)
        in_backbone = [any(v is b for b in network.backbone.weights) for v in network.weights]
        moved[multiplier] = [v.numpy() - s for v, s in zip(network.weights, start)]
    assert sum(in_backbone) == 2 and len(in_backbone) == 4
    for delta, scaled, backbone in zip(moved[1.0], moved[0.25], in_backbone):
        # First update of momentum SGD: lr x gradient, the backbone's scaled by 0.25.
        assert np.abs(delta).max() > 0
        np.testing.assert_allclose(scaled, (0.25 if backbone else 1.0) * delta, rtol=1e-4,
                                   atol=1e-7)
    with pytest.raises(ValueError, match="backbone"):
        seg.Segmenter(LinearSeg(4, 3, seed=7), backbone_lr_multiplier=0.5)


# ----------------------------------------------------------------------------------------
# The auxiliary M&M loss.
# ----------------------------------------------------------------------------------------

def _aux_mix():
    return mix_lib.MixConfig(patches_per_image=3, patch_size=16, min_side=8, max_side=16,
                             background_class=None)


def _aux_batch(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((2, 32, 32), np.int32)
    labels[:, :, 16:] = 1
    labels[1, :8] = 2
    images = rng.normal(0, 50, size=(2, 32, 32, 3)).astype(np.float32)
    return {common.IMAGE: tf.constant(images), common.LABEL: tf.constant(labels)}


def test_aux_mm_loss_is_supcon_of_the_mixed_patches_pool5_features_and_joins_the_loss():
    from mm_tf.models import heads  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(0)
    network = heads.build_segmentation_model("vgg16", "hypercolumn", 3, width=0.0625)
    model = seg.Segmenter(network, iter_size=1, seed=2, aux_mm_weight=0.5,
                          aux_mm_mix=_aux_mix(), aux_mm_temperature=0.2)
    model.compile(optimizer=training.make_sgd(0.0, (), 0.1, 0.9))  # lr 0: weights stay
    batch = _aux_batch()
    seed = model.step_seeds(0)[0]
    # By hand: the same mix seed, BN in training mode, pool5 of the shared backbone.
    mix_seed = tf.random.experimental.stateless_fold_in(seed, seg._AUX_MIX_SALT)
    patches = mix_lib.sample_patches(batch[common.IMAGE], batch[common.LABEL], mix_seed,
                                     _aux_mix())
    pool5 = backbones.pool5_model(network.backbone)(patches.patches, training=True)
    expected = losses.supcon_loss(pool5, patches.labels, patches.valid, 0.2)["loss"]
    assert float(expected) > 0
    aux = model.aux_mm_loss(batch[common.IMAGE], batch[common.LABEL], seed)
    np.testing.assert_allclose(float(aux), float(expected), rtol=1e-5)
    logs = model.train_step(batch)
    np.testing.assert_allclose(float(logs["aux_mm_loss"]), float(expected), rtol=1e-5)
    np.testing.assert_allclose(
        float(logs["loss"]),
        float(logs["cross_entropy"]) + float(logs["weight_decay"]) + 0.5 * float(expected),
        rtol=1e-5)


def test_aux_mm_loss_moves_the_backbone_and_round_trips_through_the_config():
    from mm_tf.models import heads  # pylint: disable=import-outside-toplevel
    batch = _aux_batch(1)
    moved = {}
    for weight in (0.0, 1.0):
        keras.utils.set_random_seed(0)
        network = heads.build_segmentation_model("vgg16", "hypercolumn", 3, width=0.0625)
        start = network.backbone.get_layer("conv1_1").kernel.numpy().copy()
        model = seg.Segmenter(network, iter_size=1, seed=2, aux_mm_weight=weight,
                              aux_mm_mix=_aux_mix())
        model.compile(optimizer=training.make_sgd(0.01, (), 0.1, 0.9))
        logs = model.train_step(batch)
        assert ("aux_mm_loss" in logs) == (weight > 0)
        moved[weight] = network.backbone.get_layer("conv1_1").kernel.numpy() - start
    # The auxiliary gradient reaches the first conv: the two updates differ.
    assert np.abs(moved[1.0] - moved[0.0]).max() > 1e-7
    clone = seg.Segmenter.from_config(model.get_config())
    assert (clone.aux_mm_weight, clone.aux_mm_temperature) == (1.0, 0.1)
    assert clone.aux_mm_mix == _aux_mix()
    with pytest.raises(ValueError, match="backbone"):
        seg.Segmenter(LinearSeg(4, 3, seed=7), aux_mm_weight=1.0)
    with pytest.raises(ConfigError, match="--aux_mm_weight"):
        seg.SegConfig(aux_mm_weight=-1.0).validate()
    with pytest.raises(ConfigError, match="--aux_mm_temperature"):
        seg.SegConfig(aux_mm_temperature=0.0).validate()
