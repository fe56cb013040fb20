"""Tests of mm_tf.models.weights: round trips, name/shape checks, atomic writes."""

import os
import shutil

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf.models import backbones, heads, weights

WIDTH = 0.0625


def _backbone(seed, name="vgg16", width=WIDTH, input_mode=common.INPUT_RGB):
    """A backbone with seeded random kernels and random BN statistics (so they matter)."""
    keras.utils.set_random_seed(seed)
    model = backbones.build_backbone(name, input_mode, width=width)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            layer.beta.assign(rng.normal(0, 0.1, n))
            layer.moving_mean.assign(rng.normal(0, 0.1, n))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n))
    return model


@pytest.fixture(scope="module")
def images():
    return tf.random.stateless_normal([2, 64, 64, 3], seed=[3, 4])


def _assert_same_outputs(a, b, x):
    out_a, out_b = a(x, training=False), b(x, training=False)
    for name in out_a:
        np.testing.assert_array_equal(out_a[name].numpy(), out_b[name].numpy(), err_msg=name)


@pytest.mark.parametrize("suffix", [".weights.h5", ".npz"])
def test_round_trip_gives_identical_outputs(tmp_path, images, suffix):
    source, target = _backbone(1), _backbone(2)
    path = tmp_path / f"backbone{suffix}"
    weights.save_backbone_weights(source, path)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # No temp file left behind.
    weights.load_backbone_weights(target, path)
    _assert_same_outputs(source, target, images)


def test_h5_file_is_a_keras_weights_file(tmp_path, images):
    source, target = _backbone(1, "alexnet"), _backbone(2, "alexnet")
    path = str(tmp_path / "alexnet.weights.h5")
    weights.save_backbone_weights(source, path)
    target.load_weights(path)  # Plain Keras loading works too.
    _assert_same_outputs(source, target, images)


def test_npz_format_names(tmp_path):
    model = _backbone(1)
    path = tmp_path / "b.npz"
    weights.save_npz(model, path)
    with np.load(path) as data:
        keys = set(data.files)
        assert data["conv1_1/kernel"].shape == (3, 3, 3, 8)
        np.testing.assert_array_equal(
            data["conv1_1_bn/moving_mean"], model.get_layer("conv1_1_bn").moving_mean.numpy())
    assert {"conv1_1_bn/gamma", "conv1_1_bn/beta", "conv1_1_bn/moving_variance",
            "fc7/kernel"} <= keys
    assert len(keys) == len(model.weights)


def test_overwrite_is_atomic_and_replaces(tmp_path, images):
    path = tmp_path / "b.weights.h5"
    weights.save_backbone_weights(_backbone(1), path)
    second = _backbone(5)
    weights.save_backbone_weights(second, path)
    target = _backbone(2)
    weights.load_backbone_weights(target, path)
    _assert_same_outputs(second, target, images)
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("suffix", [".weights.h5", ".npz"])
def test_different_width_names_first_layer(tmp_path, suffix):
    path = tmp_path / f"wide{suffix}"
    weights.save_backbone_weights(_backbone(1, width=4 * WIDTH), path)
    target = _backbone(2)
    before = [v.numpy() for v in target.weights]
    with pytest.raises(weights.WeightsMismatchError, match="'conv1_1'") as info:
        weights.load_backbone_weights(target, path)
    assert info.value.layer == "conv1_1"
    assert info.value.expected == (3, 3, 3, 8) and info.value.found == (3, 3, 3, 16)
    assert "(3, 3, 3, 8)" in str(info.value) and "(3, 3, 3, 16)" in str(info.value)
    # Checked before loading: nothing changed.
    for old, v in zip(before, target.weights):
        np.testing.assert_array_equal(old, v.numpy())


def test_different_input_mode_names_conv1_1(tmp_path):
    path = tmp_path / "grey.weights.h5"
    weights.save_backbone_weights(_backbone(1, input_mode=common.INPUT_GREY), path)
    with pytest.raises(weights.WeightsMismatchError) as info:
        weights.load_backbone_weights(_backbone(2), path)
    assert info.value.layer == "conv1_1" and info.value.found == (3, 3, 1, 8)


def test_missing_layer_in_h5_is_named(tmp_path):
    full = tmp_path / "full.weights.h5"
    weights.save_backbone_weights(_backbone(1), full)
    broken = tmp_path / "broken.weights.h5"
    shutil.copy(full, broken)
    with h5py.File(broken, "r+") as f:
        deleted = [key for key in f["layers"]
                   if f[f"layers/{key}/vars"].attrs.get("name") in ("conv3_2", "conv4_1")]
        assert len(deleted) == 2
        for key in deleted:
            del f[f"layers/{key}"]
    with pytest.raises(weights.WeightsMismatchError, match="'conv3_2' is missing") as info:
        weights.load_backbone_weights(_backbone(2), broken)
    assert info.value.layer == "conv3_2"


def test_missing_variable_in_npz_is_named(tmp_path):
    path = tmp_path / "b.npz"
    weights.save_npz(_backbone(1), path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "conv2_2_bn/moving_variance"}
    np.savez(path, **arrays)
    with pytest.raises(weights.WeightsMismatchError, match="conv2_2_bn") as info:
        weights.load_npz(_backbone(2), path)
    assert info.value.layer == "conv2_2_bn"
    assert info.value.expected == (8,) and info.value.found is None


def test_other_architecture_is_rejected(tmp_path):
    path = tmp_path / "alexnet.weights.h5"
    weights.save_backbone_weights(_backbone(1, "alexnet"), path)
    with pytest.raises(weights.WeightsMismatchError, match="'conv1_1' is missing"):
        weights.load_backbone_weights(_backbone(2), path)
    # A file with layers the model lacks is rejected too (here: a VGG file with an extra).
    npz = tmp_path / "extra.npz"
    weights.save_npz(_backbone(1), npz)
    with np.load(npz) as data:
        arrays = dict(data)
    arrays["conv6/kernel"] = np.zeros([3, 3, 8, 8], np.float32)
    np.savez(npz, **arrays)
    with pytest.raises(weights.WeightsMismatchError, match="'conv6'"):
        weights.load_npz(_backbone(2), npz)


def test_load_into_segmentation_model_backbone(tmp_path, images):
    source = _backbone(1, "alexnet")
    path = tmp_path / "mm.weights.h5"
    weights.save_backbone_weights(source, path)
    model = heads.build_fcn_segmenter(_backbone(2, "alexnet"), num_classes=3)
    weights.load_backbone_weights(model.backbone, path)
    _assert_same_outputs(source, model.backbone, images)
    with pytest.raises(ValueError, match="model.backbone"):
        weights.save_backbone_weights(model, tmp_path / "whole.weights.h5")


def test_bad_suffix_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="must end with"):
        weights.save_backbone_weights(_backbone(1), tmp_path / "b.h5")
    with pytest.raises(weights.WeightsFileError, match="absent.weights.h5: weights file not"):
        weights.load_backbone_weights(_backbone(1), tmp_path / "absent.weights.h5")


@pytest.mark.parametrize("suffix", [".weights.h5", ".npz"])
def test_unreadable_files_are_one_line_naming_them(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    weights.save_backbone_weights(_backbone(1), good)
    data = good.read_bytes()
    text = tmp_path / f"text{suffix}"
    text.write_text("not a weights file\n")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    model = _backbone(2)
    before = [v.numpy() for v in model.weights]
    for path, needle in ((text, "not a"), (cut, "truncated or damaged")):
        with pytest.raises(weights.WeightsFileError) as raised:
            weights.load_backbone_weights(model, path)
        message = str(raised.value)
        assert message.startswith(f"{path}: ") and needle in message, message
        assert "\n" not in message
    for variable, value in zip(model.weights, before):  # Nothing was assigned.
        np.testing.assert_array_equal(variable.numpy(), value)
    weights.check_weights_file(good)


def test_blend_with_weights_is_the_weighted_mean_of_both_networks(tmp_path):
    # 0.25 * file + 0.75 * model for every variable (kernels, BN scale, shift, statistics).
    start = backbones.build_backbone("vgg16", width=0.0625)
    path = str(tmp_path / "start.npz")
    weights.save_npz(start, path)
    model = backbones.build_backbone("vgg16", width=0.0625)
    rng = np.random.default_rng(3)
    for v in model.weights:
        v.assign(rng.normal(size=v.shape).astype(np.float32))
    own = [v.numpy().copy() for v in model.weights]
    weights.blend_with_weights(model, path, 0.25)
    for v, s, o in zip(model.weights, start.weights, own):
        np.testing.assert_allclose(v.numpy(), 0.25 * s.numpy() + 0.75 * o, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="blend fraction 1.5"):
        weights.blend_with_weights(model, path, 1.5)
