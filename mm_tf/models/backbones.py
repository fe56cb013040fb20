"""VGG-16-BN and AlexNet-BN backbones as functional Keras models with named endpoints.

Each architecture is a tuple of layer specs in `BACKBONES` (a dict, not a framework);
`build_backbone` turns a spec into a functional `keras.Model` whose output is a dict of
endpoints (post-ReLU conv outputs, `pool5`, `fc6`, `fc7`). The same specs give the
endpoint names, strides and channel counts without building anything, so heads can be
configured from them.

Every convolution is `Conv2D(use_bias=False, glorot_uniform)` -> `BatchNormalization`
-> `ReLU`, named `<conv>`, `<conv>_bn`, `<conv>_relu`. These names are the keys of the
weight files (`mm_tf.models.weights`), so they never depend on `width` or `name_prefix`.

Padding is 'same' everywhere (convolutions and pools), so any input size works and a map
at stride s has ceil(H / s) rows. For VGG-16 this keeps the classic layout exactly (3x3
'same' convs, 2x2/2 pools). For AlexNet it departs from the 227x227 'valid' original:
conv1 (11x11/4), the 3x3/2 pools and fc6 (6x6, the classic fc6 kernel, so converted
classic fc6 weights keep their shape) are 'same' as well; a 128x128 patch gives a 4x4
pool5 instead of 3x3. TensorFlow pads even kernels one more cell after than before, so
fc6's receptive field centre sits half a cell (16 px) below/right of its output cell;
fine-tuning absorbs this and it keeps converted weights usable.

Example:
    backbone = build_backbone("vgg16", input_mode="grey", width=0.125)
    endpoints = backbone(tf.zeros([2, 64, 64, 1]))
    endpoints["pool5"].shape  # (2, 2, 2, 64)
"""

import collections

import keras

from mm_tf import common
# Weight files are part of the backbone contract (docs/architecture.md); they live in
# weights.py and are re-exported here.
from mm_tf.models.weights import (  # noqa: F401
    WeightsMismatchError, load_backbone_weights, save_backbone_weights)

# One layer of a backbone spec. kind "conv": a conv-BN-ReLU unit with `filters` output
# channels (before width scaling), `kernel` x `kernel` window and `stride`; kind "pool":
# max-pooling with a `kernel` window and `stride` (`filters` unused).
LayerSpec = collections.namedtuple("LayerSpec", ["name", "kind", "filters", "kernel", "stride"])


def _conv(name, filters, kernel, stride=1):
    """A conv-BN-ReLU unit spec."""
    return LayerSpec(name, "conv", filters, kernel, stride)


def _pool(name, kernel, stride):
    """A max-pooling spec."""
    return LayerSpec(name, "pool", None, kernel, stride)


VGG16 = (
    _conv("conv1_1", 64, 3), _conv("conv1_2", 64, 3), _pool("pool1", 2, 2),
    _conv("conv2_1", 128, 3), _conv("conv2_2", 128, 3), _pool("pool2", 2, 2),
    _conv("conv3_1", 256, 3), _conv("conv3_2", 256, 3), _conv("conv3_3", 256, 3),
    _pool("pool3", 2, 2),
    _conv("conv4_1", 512, 3), _conv("conv4_2", 512, 3), _conv("conv4_3", 512, 3),
    _pool("pool4", 2, 2),
    _conv("conv5_1", 512, 3), _conv("conv5_2", 512, 3), _conv("conv5_3", 512, 3),
    _pool("pool5", 2, 2),
    # fc6/fc7 of the classifier, convolutionalised (FCN): 7x7 on the 7x7 pool5 grid.
    _conv("fc6", 4096, 7), _conv("fc7", 4096, 1),
)

# The BN AlexNet of the colorization / jigsaw papers: ungrouped convolutions, no LRN.
ALEXNET = (
    _conv("conv1", 96, 11, 4), _pool("pool1", 3, 2),
    _conv("conv2", 256, 5), _pool("pool2", 3, 2),
    _conv("conv3", 384, 3), _conv("conv4", 384, 3), _conv("conv5", 256, 3),
    _pool("pool5", 3, 2),
    _conv("fc6", 4096, 6), _conv("fc7", 4096, 1),
)

BACKBONES = {"vgg16": VGG16, "alexnet": ALEXNET}

# Pooled endpoint every backbone exposes besides its conv outputs (the M&M feature).
POOL5 = "pool5"


def _spec(name):
    """The layer specs of backbone `name`, or a ValueError listing the known names."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def scaled_channels(channels, width):
    """Channel count `channels * width` rounded to a multiple of 8, at least 8."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    # int(x + 0.5) rounds halves up (Python's round() would round 1.5 and 2.5 both to 2).
    return max(8, int(channels * width / 8 + 0.5) * 8)


def input_channels(input_mode):
    """Number of input channels for `input_mode` (common.INPUT_RGB: 3, INPUT_GREY: 1)."""
    if input_mode == common.INPUT_RGB:
        return 3
    if input_mode == common.INPUT_GREY:
        return 1
    raise ValueError(f"unknown input_mode {input_mode!r}; expected one of {common.INPUT_MODES}")


def endpoint_names(name):
    """Endpoint names of backbone `name` in network order (conv outputs, pool5, fc6, fc7)."""
    return tuple(s.name for s in _spec(name) if s.kind == "conv" or s.name == POOL5)


def endpoint_strides(name):
    """Dict endpoint name -> stride in input pixels (e.g. VGG conv3_1: 4, fc7: 32)."""
    strides, stride = {}, 1
    for s in _spec(name):
        stride *= s.stride
        if s.kind == "conv" or s.name == POOL5:
            strides[s.name] = stride
    return strides


def endpoint_channels(name, width=1.0):
    """Dict endpoint name -> number of channels at this `width`."""
    channels, current = {}, None
    for s in _spec(name):
        if s.kind == "conv":
            current = scaled_channels(s.filters, width)
        if s.kind == "conv" or s.name == POOL5:
            channels[s.name] = current
    return channels


def conv_bn_relu(x, filters, kernel, stride=1, name="conv"):
    """Conv2D (no bias, Glorot) -> BatchNormalization -> ReLU on [B,H,W,C] -> [B,H',W',filters]."""
    x = keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False,
        kernel_initializer="glorot_uniform", name=name)(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_backbone(name, input_mode=common.INPUT_RGB, width=1.0, name_prefix=None):
    """Functional backbone: images [B,H,W,C] -> dict of endpoints [B,ceil(H/s),ceil(W/s),C_e].

    Args:
      name: a key of `BACKBONES` ("vgg16" or "alexnet").
      input_mode: common.INPUT_RGB (3 channels) or common.INPUT_GREY (1 channel).
      width: multiplies every channel count (rounded to a multiple of 8, at least 8);
        1.0 is the paper's network, 0.125 a CPU-scale study.
      name_prefix: prepended to the model's name (and its input's), so several backbones
        can be nested in one Keras model. Layer names never change, so weight files stay
        interchangeable between prefixed and plain backbones.

    Returns:
      A `keras.Model` named `<name_prefix><name>`; its output is a dict keyed by
      `endpoint_names(name)`.

    Example:
      backbone = build_backbone("alexnet", width=0.125)
      backbone(tf.zeros([1, 128, 128, 3]))["fc7"].shape  # (1, 4, 4, 512)
    """
    spec = _spec(name)
    prefix = name_prefix or ""
    images = keras.Input((None, None, input_channels(input_mode)), name=f"{prefix}images")
    x, endpoints = images, {}
    for s in spec:
        if s.kind == "conv":
            x = conv_bn_relu(x, scaled_channels(s.filters, width), s.kernel, s.stride, s.name)
            endpoints[s.name] = x
        else:
            x = keras.layers.MaxPooling2D(s.kernel, s.stride, padding="same", name=s.name)(x)
            if s.name == POOL5:
                endpoints[s.name] = x
    # Dict in network order, so iterating the output follows endpoint_names(name).
    outputs = {n: endpoints[n] for n in endpoint_names(name)}
    return keras.Model(images, outputs, name=f"{prefix}{name}")


def pool5_model(backbone):
    """Model sharing `backbone`'s layers and weights: images [B,H,W,C] -> pool5 [B,h,w,C5]."""
    return keras.Model(backbone.input, backbone.output[POOL5], name=f"{backbone.name}_pool5")


def freeze_units(backbone, units):
    """Marks conv-BN units of `backbone` untrainable; returns their conv names in order.

    `units` holds conv names (`conv3_1`) or VGG blocks (`conv3` = `conv3_1`..`conv3_3`).
    A frozen unit keeps its weights and, as Keras runs a `trainable=False`
    BatchNormalization, normalises with its moving statistics. ValueError names an
    entry that matches no conv unit, with the names there are.
    """
    convs = [layer.name for layer in backbone.layers
             if isinstance(layer, keras.layers.Conv2D)]
    frozen = set()
    for unit in units:
        matched = [c for c in convs if c == unit or c.startswith(f"{unit}_")]
        if not matched:
            raise ValueError(f"{unit!r} is no conv unit or block of this backbone; "
                             f"expected some of {convs}")
        frozen.update(matched)
    for name in frozen:
        backbone.get_layer(name).trainable = False
        backbone.get_layer(f"{name}_bn").trainable = False
    return [c for c in convs if c in frozen]
