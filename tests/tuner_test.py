"""The M&M tuner: a seeded step on tiny shapes lowers the triplet loss, only layers up
to pool5 move, coupled weight decay is in the total, and the run function resumes and
writes the backbone weights and summary.json."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf import losses
from mm_tf import mix as mix_lib
from mm_tf import training
from mm_tf import tuner as tuner_lib
from mm_tf.data import datasets
from mm_tf.data import pipeline
from mm_tf.data import synthetic
from mm_tf.errors import ConfigError
from mm_tf.models import backbones

MIX = mix_lib.MixConfig(patches_per_image=4, patch_size=32, min_side=16, max_side=32,
                        background_class=0, use_gather_resize=False)


def _batch(seed=0, size=64, batch=4):
    """Images whose class is visible in the pixels: class 1 = bright stripes, class 2 =
    dark squares, on a noisy background (class 0)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 20, size=(batch, size, size, 3)).astype(np.float32)
    labels = np.zeros((batch, size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for b in range(batch):
        cls = 1 + b % 2
        y0, x0 = rng.integers(8, size - 32, size=2)
        region = (yy >= y0) & (yy < y0 + 24) & (xx >= x0) & (xx < x0 + 24)
        labels[b][region] = cls
        pattern = (np.sin(xx / 2.0) * 80.0) if cls == 1 else (((yy // 4 + xx // 4) % 2) * -90.0)
        images[b][region] += pattern[region][:, None]
    return tf.constant(images), tf.constant(labels)


def _tuner(mode="graph", seed=0):
    backbone = backbones.build_backbone("vgg16", width=0.0625)
    model = tuner_lib.MMTuner(backbone, MIX, triplet_mode=mode, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    return model


def test_seeded_steps_lower_the_triplet_loss():
    keras.utils.set_random_seed(1)
    model = _tuner()
    images, labels = _batch()
    before, _ = model.mm_terms(images, labels, tf.constant(0))
    for _ in range(8):
        model.train_step({common.IMAGE: images, common.LABEL: labels})
    after, _ = model.mm_terms(images, labels, tf.constant(0))
    assert float(after["loss"]) < float(before["loss"])
    assert int(model.optimizer.iterations) == 8


def test_only_layers_up_to_pool5_are_tuned():
    model = _tuner()
    fc6_before = [v.numpy().copy() for v in model.backbone.get_layer("fc6").weights]
    conv_before = model.backbone.get_layer("conv1_1").kernel.numpy().copy()
    images, labels = _batch()
    model.train_step({common.IMAGE: images, common.LABEL: labels})
    for before, var in zip(fc6_before, model.backbone.get_layer("fc6").weights):
        np.testing.assert_array_equal(before, var.numpy())
    assert np.abs(model.backbone.get_layer("conv1_1").kernel.numpy() - conv_before).max() > 0


def test_logged_total_includes_coupled_weight_decay():
    model = _tuner()
    images, labels = _batch()
    logs = model.train_step({common.IMAGE: images, common.LABEL: labels})
    assert float(logs["weight_decay"]) > 0
    np.testing.assert_allclose(float(logs["loss"]),
                               float(logs["triplet_loss"]) + float(logs["weight_decay"]),
                               rtol=1e-5)
    assert 0.0 <= float(logs["active_fraction"]) <= 1.0
    assert float(logs["valid_patches"]) == 4 * MIX.patches_per_image


def test_step_seeds_are_deterministic_and_differ_by_step():
    model = _tuner(seed=3)
    a = [s.numpy() for s in model.step_seeds(5)]
    b = [s.numpy() for s in model.step_seeds(5)]
    c = [s.numpy() for s in model.step_seeds(6)]
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], a[1])


@pytest.mark.parametrize("mode", ["random", "graph_semihard"])
def test_other_triplet_modes_train(mode):
    model = _tuner(mode)
    images, labels = _batch()
    logs = model.train_step({common.IMAGE: images, common.LABEL: labels})
    assert np.isfinite(float(logs["loss"]))


def test_run_tuning_resumes_and_writes_outputs(tmp_path):
    data_dir = synthetic.generate_demo_dataset(str(tmp_path / "data"), num_train=8,
                                               num_val=2)
    pairs, info = datasets.read_dataset("demo", data_dir, "train")
    input_config = pipeline.InputConfig(crop_size=64, batch_size=2)
    config = tuner_lib.TuneConfig(width=0.0625, lr_boundaries=(3,))
    workdir = str(tmp_path / "mm")
    first = tuner_lib.run_tuning(workdir, pairs, info, input_config, MIX, config,
                                 training.LoopConfig(steps=2, log_every=1,
                                                     checkpoint_every=1, image_every=2,
                                                     verbose=0))
    assert first["steps"] == 2 and first["resumed_from_step"] == 0
    second = tuner_lib.run_tuning(workdir, pairs, info, input_config, MIX, config,
                                  training.LoopConfig(steps=4, log_every=1,
                                                      checkpoint_every=1, verbose=0))
    assert second["resumed_from_step"] == 2 and second["steps"] == 4
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["graph_nodes"] == summary["global_batch_size"] * summary["patches_per_image"]
    assert summary["graph_nodes"] == 2 * MIX.patches_per_image
    assert os.path.isfile(summary["backbone_weights"])
    for key in ("loss", "triplet_loss", "active_fraction", "d_ap", "d_an"):
        assert np.isfinite(summary["metrics"][key])


def test_random_init_is_the_seeded_draw_the_figures_rebuild(tmp_path):
    # With lr 0 and no decay the trainable weights stay at the run's starting point, which
    # must be build_backbone_from(config): the "before M&M" figures rebuild it from --seed.
    data_dir = synthetic.generate_demo_dataset(str(tmp_path / "data"), num_train=4,
                                               num_val=1)
    pairs, info = datasets.read_dataset("demo", data_dir, "train")
    config = tuner_lib.TuneConfig(width=0.0625, learning_rate=0.0, momentum=0.0,
                                  weight_decay=0.0, seed=5, lr_boundaries=())
    workdir = str(tmp_path / "mm")
    keras.utils.set_random_seed(123)  # whatever the global state, the init is the seed's
    tuner_lib.run_tuning(workdir, pairs, info, pipeline.InputConfig(crop_size=64, batch_size=2),
                         MIX, config, training.LoopConfig(steps=1, log_every=1,
                                                          image_every=0, verbose=0))
    run = backbones.build_backbone("vgg16", width=0.0625)
    run.load_weights(os.path.join(workdir, "backbone.weights.h5"))
    rebuilt = tuner_lib.build_backbone_from(config)
    for a, b in zip(run.trainable_weights, rebuilt.trainable_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    other = tuner_lib.build_backbone_from(dataclasses.replace(config, seed=6))
    assert not np.array_equal(other.trainable_weights[0].numpy(),
                              rebuilt.trainable_weights[0].numpy())


def test_image_only_data_is_refused_with_the_dataset_named():
    with pytest.raises(ConfigError, match="--dataset=images has no labels"):
        tuner_lib.run_tuning("/nonexistent", [("a.png", "")], datasets.images_info(),
                             pipeline.InputConfig(), MIX, tuner_lib.TuneConfig(),
                             training.LoopConfig(steps=1))


def test_supcon_objective_and_jitter_train_with_triplet_monitors():
    backbone = backbones.build_backbone("vgg16", width=0.0625)
    model = tuner_lib.MMTuner(backbone, MIX, loss="supcon", temperature=0.5,
                              color_jitter=0.5, random_grey=0.2)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    images, labels = _batch()
    terms, patches = model.mm_terms(images, labels, tf.constant(0), training=False)
    plain = model.mix(images, labels, model.step_seeds(0)[0])
    # The backbone saw jittered patches: same boxes and labels, other pixels.
    np.testing.assert_array_equal(patches.labels.numpy(), plain.labels.numpy())
    assert np.abs(patches.patches.numpy() - plain.patches.numpy()).max() > 1.0
    features = model.features(patches.patches, training=False)
    expected = losses.supcon_loss(features, patches.labels, patches.valid, 0.5)["loss"]
    np.testing.assert_allclose(float(terms["loss"]), float(expected), rtol=1e-5)
    assert "triplet_loss" in terms and float(terms["triplet_loss"]) >= 0
    logs = model.train_step({common.IMAGE: images, common.LABEL: labels})
    assert np.isfinite(float(logs["supcon_loss"])) and float(logs["supcon_loss"]) > 0
    np.testing.assert_allclose(float(logs["loss"]),
                               float(logs["supcon_loss"]) + float(logs["weight_decay"]),
                               rtol=1e-5)


@pytest.mark.parametrize("mode", ["graph", "random"])
def test_soft_triplet_objective_reads_the_selected_triplets(mode):
    backbone = backbones.build_backbone("vgg16", width=0.0625)
    model = tuner_lib.MMTuner(backbone, MIX, triplet_mode=mode, loss="soft_triplet",
                              temperature=0.2)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    images, labels = _batch()
    terms, patches = model.mm_terms(images, labels, tf.constant(0), training=False)
    features = model.features(patches.patches, training=False)
    indices, mask = model.match(patches.labels, patches.valid, model.step_seeds(0)[1])
    expected = losses.soft_triplet_loss(features, indices, mask, 0.2)["loss"]
    np.testing.assert_allclose(float(terms["loss"]), float(expected), rtol=1e-5)
    hinge = losses.triplet_loss(features, indices, mask)["loss"]
    np.testing.assert_allclose(float(terms["triplet_loss"]), float(hinge), rtol=1e-5)
    logs = model.train_step({common.IMAGE: images, common.LABEL: labels})
    assert float(logs["soft_triplet_loss"]) > 0
    np.testing.assert_allclose(float(logs["loss"]), float(logs["soft_triplet_loss"])
                               + float(logs["weight_decay"]), rtol=1e-5)


def test_frozen_units_keep_their_start_weights_and_statistics(tmp_path):
    # conv1 frozen, the rest tuned: conv1_1/conv1_2 (kernel, BN scale, shift, moving
    # statistics) leave M&M as they came in, conv2_1 does not, and the summary says so.
    data_dir = synthetic.generate_demo_dataset(str(tmp_path / "data"), num_train=4,
                                               num_val=1)
    pairs, info = datasets.read_dataset("demo", data_dir, "train")
    config = tuner_lib.TuneConfig(width=0.0625, seed=2, lr_boundaries=(),
                                  frozen_layers=("conv1",))
    workdir = str(tmp_path / "mm")
    summary = tuner_lib.run_tuning(
        workdir, pairs, info, pipeline.InputConfig(crop_size=64, batch_size=2), MIX,
        config, training.LoopConfig(steps=3, log_every=1, image_every=0, verbose=0))
    assert summary["frozen_units"] == ["conv1_1", "conv1_2"]
    run = backbones.build_backbone("vgg16", width=0.0625)
    run.load_weights(os.path.join(workdir, "backbone.weights.h5"))
    start = tuner_lib.build_backbone_from(config)
    for name in ("conv1_1", "conv1_1_bn", "conv1_2", "conv1_2_bn"):
        for a, b in zip(run.get_layer(name).weights, start.get_layer(name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert summary["movement"]["conv1_1"] == 0.0
    moved = run.get_layer("conv2_1").kernel.numpy() - start.get_layer("conv2_1").kernel.numpy()
    assert np.abs(moved).max() > 0 and summary["movement"]["conv2_1"] > 0
    # Weight decay reads the tuned kernels only.
    backbones.freeze_units(start, ["conv1_2", "conv2"])
    decayed = [k.path.split("/")[0] for k in tuner_lib.MMTuner(start, MIX)._kernels]
    assert decayed[:2] == ["conv1_1", "conv3_1"] and "conv2_2" not in decayed


def test_frozen_layers_that_match_no_unit_name_the_flag(tmp_path):
    data_dir = synthetic.generate_demo_dataset(str(tmp_path / "data"), num_train=2,
                                               num_val=1)
    pairs, info = datasets.read_dataset("demo", data_dir, "train")
    config = tuner_lib.TuneConfig(width=0.0625, frozen_layers=("conv9",))
    with pytest.raises(ConfigError, match=r"--frozen_layers=conv9: 'conv9' is no conv unit"):
        tuner_lib.run_tuning(str(tmp_path / "mm"), pairs, info,
                             pipeline.InputConfig(crop_size=64, batch_size=2), MIX, config,
                             training.LoopConfig(steps=1, verbose=0))


@pytest.mark.parametrize("field,value,flag", [("loss", "hinge", "--loss"),
                                               ("temperature", 0.0, "--temperature"),
                                               ("random_grey", 1.5, "--random_grey")])
def test_bad_loss_settings_name_the_flag(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        dataclasses.replace(tuner_lib.TuneConfig(), **{field: value}).validate()


def test_blend_start_writes_the_midpoint_of_start_and_tuned_weights(tmp_path):
    # A finished run rerun with blend_start=0.5 writes 0.5 * W_start + 0.5 * W_tuned; a
    # second rerun writes the same (the checkpoints keep W_tuned, nothing compounds).
    data_dir = synthetic.generate_demo_dataset(str(tmp_path / "data"), num_train=4,
                                               num_val=1)
    pairs, info = datasets.read_dataset("demo", data_dir, "train")
    input_config = pipeline.InputConfig(crop_size=64, batch_size=2)
    loop = training.LoopConfig(steps=2, log_every=1, image_every=0, verbose=0)
    config = tuner_lib.TuneConfig(width=0.0625, seed=1, lr_boundaries=())
    workdir = str(tmp_path / "mm")
    written = os.path.join(workdir, "backbone.weights.h5")

    def read():
        backbone = backbones.build_backbone("vgg16", width=0.0625)
        backbone.load_weights(written)
        return [v.numpy() for v in backbone.weights]

    assert "blend_start" not in tuner_lib.run_tuning(workdir, pairs, info, input_config,
                                                     MIX, config, loop)
    tuned = read()
    start = tuner_lib.build_backbone_from(config)
    blended = dataclasses.replace(config, blend_start=0.5)
    summary = tuner_lib.run_tuning(workdir, pairs, info, input_config, MIX, blended, loop)
    assert summary["blend_start"] == 0.5 and summary["resumed_from_step"] == 2
    for name, moved in summary["movement"].items():  # the tuned weights'; written: half
        assert summary["written_movement"][name] == pytest.approx(moved / 2, rel=1e-4)
    once = read()
    for got, w0, w1 in zip(once, start.weights, tuned):
        np.testing.assert_allclose(got, 0.5 * w0.numpy() + 0.5 * w1, rtol=1e-5, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(once, tuned)) > 0
    tuner_lib.run_tuning(workdir, pairs, info, input_config, MIX, blended, loop)
    for a, b in zip(read(), once):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match=r"--blend_start=1.0"):
        dataclasses.replace(config, blend_start=1.0).validate()
