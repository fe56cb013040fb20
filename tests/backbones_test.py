"""Tests of mm_tf.models.backbones: endpoints, shapes, conv-BN-ReLU wiring, init, pool5."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf.models import backbones

WIDTH = 0.125


@pytest.fixture(scope="module")
def vgg():
    keras.utils.set_random_seed(0)
    return backbones.build_backbone("vgg16", common.INPUT_RGB, width=WIDTH)


@pytest.fixture(scope="module")
def alexnet():
    keras.utils.set_random_seed(0)
    return backbones.build_backbone("alexnet", common.INPUT_RGB, width=WIDTH)


VGG_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
             "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3",
             "pool5", "fc6", "fc7")
ALEXNET_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7")


def test_endpoint_names():
    assert backbones.endpoint_names("vgg16") == VGG_NAMES
    assert backbones.endpoint_names("alexnet") == ALEXNET_NAMES


@pytest.mark.parametrize("size", [64, 128])
def test_vgg_endpoint_shapes(vgg, size):
    out = vgg(tf.zeros([2, size, size, 3]))
    assert tuple(out) == VGG_NAMES
    strides = backbones.endpoint_strides("vgg16")
    channels = backbones.endpoint_channels("vgg16", WIDTH)
    for name in VGG_NAMES:
        side = size // strides[name]
        assert tuple(out[name].shape) == (2, side, side, channels[name]), name
    assert tuple(out["pool5"].shape[1:3]) == (size // 32,) * 2
    assert channels["conv1_1"] == 8 and channels["conv5_3"] == 64 and channels["fc7"] == 512


@pytest.mark.parametrize("size", [64, 128])
def test_alexnet_endpoint_shapes(alexnet, size):
    out = alexnet(tf.zeros([1, size, size, 3]))
    assert tuple(out) == ALEXNET_NAMES
    strides = backbones.endpoint_strides("alexnet")
    assert strides == {"conv1": 4, "conv2": 8, "conv3": 16, "conv4": 16, "conv5": 16,
                       "pool5": 32, "fc6": 32, "fc7": 32}
    channels = backbones.endpoint_channels("alexnet", WIDTH)
    for name in ALEXNET_NAMES:
        side = size // strides[name]
        assert tuple(out[name].shape) == (1, side, side, channels[name]), name


def test_odd_sizes_give_ceil_maps(vgg, alexnet):
    out = vgg(tf.zeros([1, 97, 131, 3]))
    assert tuple(out["conv2_1"].shape[1:3]) == (49, 66)
    assert tuple(out["fc7"].shape[1:3]) == (4, 5)
    out = alexnet(tf.zeros([1, 97, 131, 3]))
    assert tuple(out["fc7"].shape[1:3]) == (4, 5)


@pytest.mark.parametrize("mode,channels", [(common.INPUT_RGB, 3), (common.INPUT_GREY, 1)])
def test_input_modes(mode, channels):
    assert backbones.input_channels(mode) == channels
    model = backbones.build_backbone("alexnet", mode, width=0.0625)
    assert tuple(model.input.shape) == (None, None, None, channels)
    assert model.get_layer("conv1").kernel.shape[2] == channels


def test_every_conv_is_followed_by_bn_then_relu(vgg, alexnet):
    for model in (vgg, alexnet):
        convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
        assert len(convs) == {"vgg16": 15, "alexnet": 7}[model.name]
        for conv in convs:
            assert not conv.use_bias
            consumers = [l for l in model.layers if l.input is conv.output]
            assert [type(l) for l in consumers] == [keras.layers.BatchNormalization], conv.name
            assert consumers[0].name == f"{conv.name}_bn"
            after_bn = [l for l in model.layers if l.input is consumers[0].output]
            assert [type(l) for l in after_bn] == [keras.layers.ReLU], conv.name
            assert after_bn[0].name == f"{conv.name}_relu"


def test_glorot_uniform_init(vgg):
    for conv in [l for l in vgg.layers if isinstance(l, keras.layers.Conv2D)]:
        assert isinstance(conv.kernel_initializer, keras.initializers.GlorotUniform)
        kh, kw, cin, cout = conv.kernel.shape
        limit = np.sqrt(6.0 / (kh * kw * (cin + cout)))
        kernel = conv.kernel.numpy()
        assert np.abs(kernel).max() <= limit + 1e-7, conv.name
        # Uniform on [-limit, limit] has std limit / sqrt(3).
        if kernel.size > 10000:
            np.testing.assert_allclose(kernel.std(), limit / np.sqrt(3), rtol=0.05)


def test_scaled_channels():
    assert backbones.scaled_channels(64, 1.0) == 64
    assert backbones.scaled_channels(96, 0.125) == 16  # 12 rounds up to 16.
    assert backbones.scaled_channels(64, 0.0625) == 8  # 4 -> at least 8.
    assert backbones.scaled_channels(4096, 0.125) == 512
    with pytest.raises(ValueError):
        backbones.scaled_channels(64, 0.0)


def test_pool5_model_shares_weights(alexnet):
    pool5 = backbones.pool5_model(alexnet)
    assert {id(v) for v in pool5.weights} <= {id(v) for v in alexnet.weights}
    x = tf.random.stateless_normal([2, 64, 64, 3], seed=[1, 2])
    np.testing.assert_allclose(pool5(x).numpy(), alexnet(x)["pool5"].numpy(), rtol=1e-6)
    gamma = alexnet.get_layer("conv5_bn").gamma
    old = gamma.numpy()
    try:
        gamma.assign(old * 2.0 + 1.0)
        np.testing.assert_allclose(pool5(x).numpy(), alexnet(x)["pool5"].numpy(), rtol=1e-6)
    finally:
        gamma.assign(old)


def test_name_prefix_keeps_layer_names_and_allows_nesting():
    a = backbones.build_backbone("alexnet", width=0.0625, name_prefix="imagenet_")
    b = backbones.build_backbone("alexnet", width=0.0625, name_prefix="mm_")
    assert a.name == "imagenet_alexnet" and b.name == "mm_alexnet"
    assert [l.name for l in a.layers[1:]] == [l.name for l in b.layers[1:]]
    images = keras.Input((None, None, 3))
    ensemble = keras.Model(images, [a(images)["fc7"], b(images)["fc7"]])
    outs = ensemble(tf.zeros([1, 64, 64, 3]))
    assert [tuple(o.shape) for o in outs] == [(1, 2, 2, 256)] * 2


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown backbone"):
        backbones.build_backbone("resnet50")
    with pytest.raises(ValueError, match="unknown input_mode"):
        backbones.input_channels("lab")
