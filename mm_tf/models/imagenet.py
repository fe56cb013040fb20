"""ImageNet initialisation by path: a `keras.applications.VGG16` weights file -> our
VGG-16-BN backbone weights (the paper's "ImageNet" column).

Nothing downloads: the user gives the path of a weights file of
`keras.applications.VGG16` (Keras 3 `.weights.h5`, or the legacy `.h5` files
`vgg16_weights_tf_dim_ordering_tf_kernels[_notop].h5` that keras.applications itself
fetches), with or without the classifier ("top"). We build
`keras.applications.VGG16(weights=None, include_top=...)`, load the file into it, and
copy its layers into `build_backbone("vgg16", "rgb", width=1.0)`:

* conv kernels are copied as they are (both are [kh, kw, in, out], 'same' 3x3 convs);
* each conv's bias goes into the BatchNormalization after it, made an exact identity
  plus the bias: gamma = 1, moving mean = 0, moving variance = 1 - epsilon (so that
  sqrt(variance + epsilon) = 1), beta = bias. In inference mode BN(x) = x + bias;
* Keras' VGG16 takes Caffe-style BGR input with the mean subtracted, our `rgb` input
  mode is RGB with the same per-channel means subtracted (`common.RGB_MEAN`), so the
  input-channel axis of conv1_1's kernel is reversed;
* with the top: fc1 (Dense 25088 -> 4096 on the flattened 7x7x512 pool5) becomes fc6, a
  7x7x512x4096 convolution (the flattening order of Keras' channels-last `Flatten` is
  (row, column, channel), so the kernel is a plain reshape), and fc2 (4096 -> 4096)
  becomes fc7, a 1x1 convolution; the 1000-way `predictions` layer is dropped. Without
  the top, fc6/fc7 keep a seeded Glorot initialisation and identity BN (they are not
  pretrained; M&M tunes up to pool5 and the heads retrain them).

Our pools are 'same' and Keras' 'valid'; they agree on even map sizes (every map of an
input whose sides are multiples of 32).

The output is a backbone weights file (`.weights.h5`, or `.npz`) that
`mm_tf.models.weights.load_backbone_weights` and every binary's `--init` accept.

Weights from elsewhere (Caffe, PyTorch, ...): write an `.npz` whose keys are
`"<layer>/<variable>"` for every layer of the backbone, e.g. for VGG-16:
`conv1_1/kernel` [3, 3, C_in, 64] (Keras layout [kh, kw, in, out]; a Caffe/PyTorch
kernel [out, in, kh, kw] becomes `kernel.transpose(2, 3, 1, 0)`), and for its BN
`conv1_1_bn/gamma`, `conv1_1_bn/beta`, `conv1_1_bn/moving_mean`,
`conv1_1_bn/moving_variance` (all [64]); the same for conv1_2 .. conv5_3, fc6 [7, 7, 512,
4096] and fc7 [1, 1, 4096, 4096] (AlexNet: conv1 .. conv5, fc6 [6, 6, 256, 4096], fc7).
Convolutions have no bias: put a bias in the BN's beta with the identity BN above. Mind
the input convention (`common.INPUT_RGB`: RGB minus `RGB_MEAN` on 0..255; a BGR network's
conv1 kernel needs its input axis reversed). `load_backbone_weights(backbone, "x.npz")`
checks every name and shape and names the first mismatching layer.

Example:
    convert_keras_vgg16_file("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                             "weights/vgg16_imagenet.weights.h5")
"""

from __future__ import annotations

import os

import h5py
import keras
import numpy as np

from mm_tf import common
from mm_tf.models import backbones
from mm_tf.models import weights as weights_lib

# keras.applications.VGG16 layer -> our VGG-16-BN layer.
CONV_LAYERS = {
    f"block{block}_conv{i}": f"conv{block}_{i}"
    for block, count in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, count + 1)
}
TOP_LAYERS = {"fc1": "fc6", "fc2": "fc7"}
FIRST_CONV = "conv1_1"
TOP_INPUT_SIDE = 7  # fc1 reads the flattened 7x7 pool5 map of a 224x224 image.


def h5_layer_names(path) -> set:
    """Layer names recorded in a Keras weights file (Keras 3 `.weights.h5` or legacy
    `.h5`): the legacy root attribute `layer_names`, group names and `name` attributes."""
    names = set()

    def text(value):
        return value.decode() if isinstance(value, bytes) else str(value)

    with h5py.File(path, "r") as f:
        names.update(text(n) for n in f.attrs.get("layer_names", []))

        def visit(key, obj):
            names.add(key.split("/")[-1])
            if "name" in obj.attrs:
                names.add(text(obj.attrs["name"]))

        f.visititems(visit)
    return names


def load_keras_vgg16(path, include_top=None) -> keras.Model:
    """keras.applications.VGG16(weights=None) with the weights of `path` loaded.

    `include_top=None` reads it from the file (a layer named fc1 means a top).
    Raises FileNotFoundError, or ValueError naming the file when Keras cannot load it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Keras VGG16 weights file {path!r} does not exist")
    if include_top is None:
        try:
            include_top = "fc1" in h5_layer_names(path)
        except OSError as e:
            raise ValueError(f"{path}: not an HDF5 Keras weights file ({e})") from None
    model = keras.applications.VGG16(weights=None, include_top=include_top)
    try:
        model.load_weights(path)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path}: cannot load it into keras.applications.VGG16("
                         f"include_top={include_top}): {e}") from None
    return model


def dense_to_conv_kernel(kernel, side, channels) -> np.ndarray:
    """Dense kernel [side*side*channels, n] on a channels-last flatten -> conv kernel
    [side, side, channels, n] (Flatten's order is row, column, channel)."""
    kernel = np.asarray(kernel)
    if kernel.shape[0] != side * side * channels:
        raise ValueError(f"dense kernel {kernel.shape} does not read a flattened "
                         f"{side}x{side}x{channels} map")
    return kernel.reshape(side, side, channels, kernel.shape[1])


def _set_conv_and_identity_bn(backbone, name, kernel, bias) -> None:
    """Assigns `kernel` to conv `name` and makes `name`_bn the identity plus `bias`."""
    conv = backbone.get_layer(name)
    if tuple(conv.kernel.shape) != kernel.shape:
        raise weights_lib.WeightsMismatchError(
            f"layer {name!r}: expected kernel {tuple(conv.kernel.shape)}, the Keras VGG16 "
            f"gives {kernel.shape}", layer=name, expected=tuple(conv.kernel.shape),
            found=kernel.shape)
    conv.kernel.assign(kernel)
    bn = backbone.get_layer(f"{name}_bn")
    bn.gamma.assign(np.ones_like(bias))
    bn.beta.assign(bias)
    bn.moving_mean.assign(np.zeros_like(bias))
    # sqrt(moving_variance + epsilon) = 1: in inference mode BN(x) = x + beta exactly.
    bn.moving_variance.assign(np.full_like(bias, 1.0 - bn.epsilon))


def convert_keras_vgg16(keras_model: keras.Model, seed: int = 0) -> keras.Model:
    """keras.applications.VGG16 (any top) -> our VGG-16-BN backbone (rgb, width 1)."""
    keras.utils.set_random_seed(seed)  # fc6/fc7 initialisation when there is no top.
    backbone = backbones.build_backbone("vgg16", common.INPUT_RGB, width=1.0)
    for keras_name, ours in CONV_LAYERS.items():
        kernel, bias = (np.asarray(w) for w in keras_model.get_layer(keras_name).get_weights())
        if ours == FIRST_CONV:
            # Keras' VGG16 reads BGR, our rgb mode RGB (same means): flip the input axis.
            kernel = kernel[:, :, ::-1, :]
        _set_conv_and_identity_bn(backbone, ours, kernel, bias)
    layer_names = {layer.name for layer in keras_model.layers}
    if set(TOP_LAYERS) <= layer_names:
        kernel, bias = keras_model.get_layer("fc1").get_weights()
        channels = keras_model.get_layer("block5_pool").output.shape[-1]
        _set_conv_and_identity_bn(backbone, "fc6",
                                  dense_to_conv_kernel(kernel, TOP_INPUT_SIDE, channels), bias)
        kernel, bias = keras_model.get_layer("fc2").get_weights()
        _set_conv_and_identity_bn(backbone, "fc7", dense_to_conv_kernel(kernel, 1, kernel.shape[0]),
                                  bias)
    return backbone


def convert_keras_vgg16_file(keras_path, output_path, include_top=None, seed=0) -> dict:
    """Converts a keras.applications.VGG16 weights file into our backbone weights file
    (`.weights.h5` or `.npz`); returns dict(output, include_top, converted layers)."""
    keras_model = load_keras_vgg16(keras_path, include_top)
    has_top = "fc1" in {layer.name for layer in keras_model.layers}
    backbone = convert_keras_vgg16(keras_model, seed)
    weights_lib.save_backbone_weights(backbone, output_path)
    converted = list(CONV_LAYERS.values()) + (list(TOP_LAYERS.values()) if has_top else [])
    return {"output": os.fspath(output_path), "include_top": has_top,
            "converted_layers": converted}
