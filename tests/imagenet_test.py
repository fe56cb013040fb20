"""mm_tf.models.imagenet: a keras.applications.VGG16 weights file converted into our
VGG-16-BN gives the same conv5_3 as Keras' block5_conv3 on the BGR-flipped input; the
fc1/fc2 -> fc6/fc7 reshape; the top is detected from the file; errors name the file."""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf.models import backbones, imagenet, weights


@pytest.fixture(scope="module")
def keras_notop(tmp_path_factory):
    """A seeded random keras VGG16 without top (random biases too), saved to a file."""
    keras.utils.set_random_seed(3)
    model = keras.applications.VGG16(weights=None, include_top=False)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.bias.assign(rng.normal(0.0, 0.1, layer.bias.shape))
    path = str(tmp_path_factory.mktemp("keras") / "vgg16_notop.weights.h5")
    model.save_weights(path)
    return model, path


def test_converted_backbone_equals_keras_vgg16(keras_notop, tmp_path):
    keras_model, keras_path = keras_notop
    output = tmp_path / "vgg16_imagenet.weights.h5"
    try:
        result = imagenet.convert_keras_vgg16_file(keras_path, output)
        assert result["include_top"] is False and "fc6" not in result["converted_layers"]
        backbone = backbones.build_backbone("vgg16", common.INPUT_RGB, width=1.0)
        weights.load_backbone_weights(backbone, output)  # What --init does.
    finally:
        if output.exists():
            os.remove(output)  # ~0.5 GB (fc6 alone is 7x7x512x4096).
    rng = np.random.default_rng(1)
    pixels = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    ours = backbone(pixels - np.float32(common.RGB_MEAN), training=False)["conv5_3"].numpy()
    # Keras' VGG16 input: BGR minus the same means (keras.applications' "caffe" mode).
    bgr = pixels[..., ::-1] - np.float32(common.RGB_MEAN[::-1])
    features = keras.Model(keras_model.input, keras_model.get_layer("block5_conv3").output)
    theirs = features(bgr).numpy()
    assert (theirs > 0).mean() > 0.2  # Random weights still leave a live signal.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


def test_bn_is_the_identity_plus_bias(keras_notop):
    backbone = imagenet.convert_keras_vgg16(keras_notop[0])
    bn = backbone.get_layer("conv3_2_bn")
    x = tf.random.stateless_normal([2, 3, 3, bn.beta.shape[0]], seed=[0, 1])
    np.testing.assert_allclose(bn(x, training=False).numpy(), x.numpy() + bn.beta.numpy(),
                               atol=1e-6)
    np.testing.assert_array_equal(bn.beta.numpy(),
                                  keras_notop[0].get_layer("block3_conv2").bias.numpy())
    bgr_kernel = keras_notop[0].get_layer("block1_conv1").kernel.numpy()
    np.testing.assert_array_equal(backbone.get_layer("conv1_1").kernel.numpy(),
                                  bgr_kernel[:, :, ::-1])


def test_dense_to_conv_kernel_matches_flatten_dense():
    rng = np.random.default_rng(2)
    side, channels, units = 3, 4, 5
    kernel = rng.normal(size=(side * side * channels, units)).astype(np.float32)
    x = rng.normal(size=(2, side, side, channels)).astype(np.float32)
    dense = x.reshape(2, -1) @ kernel  # keras Flatten is row-major over (row, col, channel).
    conv = tf.nn.conv2d(x, imagenet.dense_to_conv_kernel(kernel, side, channels), 1, "VALID")
    np.testing.assert_allclose(conv.numpy().reshape(2, units), dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="flattened 7x7x512"):
        imagenet.dense_to_conv_kernel(kernel, 7, 512)


# Keras warns about the layers it cannot fill before it raises; the raise is the test.
@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_top_is_read_from_the_file_and_errors_name_it(keras_notop, tmp_path):
    names = imagenet.h5_layer_names(keras_notop[1])
    assert "block5_conv3" in names and "fc1" not in names
    with pytest.raises(ValueError, match="vgg16_notop.weights.h5"):
        imagenet.load_keras_vgg16(keras_notop[1], include_top=True)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        imagenet.load_keras_vgg16(tmp_path / "missing.h5")
    not_h5 = tmp_path / "junk.weights.h5"
    not_h5.write_text("not hdf5")
    with pytest.raises(ValueError, match="junk.weights.h5"):
        imagenet.load_keras_vgg16(not_h5)


def test_binary_reports_a_missing_file_in_one_line(tmp_path):
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "bin/convert_keras_vgg16.py", f"--keras_weights={tmp_path}/none.h5",
         f"--output={tmp_path}/out.weights.h5"], cwd=root, capture_output=True, text=True,
        timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 2
    assert "none.h5" in result.stderr and "Traceback" not in result.stderr
