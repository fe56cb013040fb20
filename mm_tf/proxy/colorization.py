"""Colorization (Larsson et al. 2016/2017) as a proxy task, in one compiled Keras step.

The network sees the grey input of the colorization models (`common.INPUT_GREY`: mean of
RGB, /255, -0.4488, the pipeline's `normalize`) and predicts, at randomly sampled pixels,
the distributions of the pixel's chroma and hue (`mm_tf.proxy.color`: 32 + 32 bins of
CIE LCh). Targets come from the RGB crop the pipeline carries along
(`train_dataset(..., include_raw_image=True)`, `common.RAW_IMAGE`) and are computed in
TensorFlow inside the step: RGB -> Lab -> LCh at the sampled points -> soft encoding.
No labels are used: points are sampled from an all-valid mask (every pixel of the crop).

Model: the backbone (VGG-16-BN by default, grey input) with a hypercolumn head
(`mm_tf.models.heads.HypercolumnHead`, Larsson et al.'s design): the network input and
every conv endpoint, fc6 and fc7 are bilinearly sampled at P points per image,
concatenated, then Dense(1024 x width) + ReLU and Dense(64) logits (chroma bins, then hue
bins). The paper's segmentation head adds two extra conv blocks on fc7; colorization
does not use them by default (`num_extra_blocks=0`).

Loss per point: KL(chroma target || softmax(chroma logits)) + hue_weight x (C / max_chroma)
x KL(hue target || softmax(hue logits)): hue is undefined for greys, so its term is
weighted by the true chroma (Larsson et al.'s hue/chroma loss); the mean over points and
images, plus coupled L2 weight decay on every kernel. Only the backbone is saved
(`backbone.weights.h5`), for `--init` of M&M tuning and segmentation with
`--input_mode=grey`.

Example:
    model = ColorizationModel(backbones.build_backbone("vgg16", "grey", width=0.125))
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    model.fit(train_dataset(pairs, info, config, include_raw_image=True), ...)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from mm_tf import common
from mm_tf import summaries
from mm_tf import training
from mm_tf.data import pipeline
from mm_tf.errors import ConfigError
from mm_tf.models import backbones
from mm_tf.models import heads
from mm_tf.proxy import color

SCALAR_NAMES = {
    "loss": "losses/total",
    "color_loss": "losses/color",
    "kl_chroma": "losses/kl_chroma",
    "kl_hue": "losses/kl_hue",
    "weight_decay": "losses/weight_decay",
}


def hypercolumn_features(backbone: keras.Model):
    """[(name, channels, stride)] the head reads: the input (`heads.DATA`, stride 1) and
    every endpoint but pool5, by increasing stride."""
    geometry = heads.endpoint_geometry(backbone)
    endpoints = sorted(((name, c, s) for name, (c, s) in geometry.items()
                        if name != backbones.POOL5), key=lambda f: (f[2], f[0]))
    return [(heads.DATA, int(backbone.input.shape[-1]), 1)] + endpoints


def kl_divergence(target, logits) -> tf.Tensor:
    """KL(target || softmax(logits)) per row: target, logits [..., K] -> [...]."""
    log_q = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    # xlogy: 0 log 0 = 0 for the bins the soft encoding leaves empty.
    return tf.reduce_sum(tf.math.xlogy(target, target) - target * log_q, axis=-1)


class ColorizationModel(keras.Model):
    """Grey backbone + hypercolumn head predicting chroma/hue histograms at sampled pixels.

    Args:
      backbone: functional backbone with a 1-channel (grey) input.
      bins: the `color.ColorBins` predicted per pixel.
      points_per_image: P, pixels sampled per image and step.
      hidden_units: width of the head's hidden layer (paper: 1024).
      num_extra_blocks, extra_channels: extra conv blocks on fc7 (0: Larsson et al.).
      hue_weight: lambda_H, weight of the chroma-weighted hue term.
      weight_decay: coupled L2 coefficient on every conv/dense kernel.
      seed: base seed; step s samples points with the stateless seed (seed, s).

    Example:
      model = ColorizationModel(backbones.build_backbone("vgg16", "grey", width=0.0625),
                                hidden_units=32)
      model(tf.zeros([1, 32, 32, 1])).shape  # (1, 32, 32, 64) dense logits
    """

    def __init__(self, backbone: keras.Model, bins: color.ColorBins = color.ColorBins(),
                 points_per_image: int = 128, hidden_units: int = 1024,
                 num_extra_blocks: int = 0, extra_channels: int = 1024,
                 hue_weight: float = 5.0, weight_decay: float = 5e-4, seed: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        if backbone.input.shape[-1] != 1:
            raise ConfigError("colorization needs a grey backbone (input_mode='grey'), got "
                              f"{backbone.input.shape[-1]} input channels")
        self.backbone = backbone
        self.bins = bins
        self.points_per_image = int(points_per_image)
        self.hue_weight = float(hue_weight)
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        self.head = heads.HypercolumnHead(
            bins.num_bins, hypercolumn_features(backbone), extra_channels=extra_channels,
            num_extra_blocks=num_extra_blocks, hidden_units=hidden_units,
            name="colorization_head")
        self._kernels = training.decayed_kernels(self)
        self._trackers = {name: keras.metrics.Mean(name=name) for name in (
            "loss", "color_loss", "kl_chroma", "kl_hue", "weight_decay")}
        self.built = True

    @property
    def metrics(self):
        return list(self._trackers.values())

    def features(self, images, training=None):
        """Head inputs: grey images [B,H,W,1] -> {DATA: images, endpoint: [B,h,w,C], ...}."""
        features = dict(self.backbone(images, training=training))
        features[heads.DATA] = images
        return features

    def call(self, images, training=False):
        """Dense logits: grey images [B,H,W,1] -> [B,H,W,Kc+Kh]."""
        return self.head(self.features(images, training), training=training)

    def point_logits(self, images, points, training=False):
        """Logits at points: images [B,H,W,1], points [B,P,2] (y, x) -> [B,P,Kc+Kh]."""
        return self.head(self.features(images, training), points=points, training=training)

    def step_seed(self, step) -> tf.Tensor:
        """Optimizer step -> the stateless point-sampling seed int32 [2] of that step."""
        return tf.stack([tf.constant(self.seed, tf.int32), tf.cast(step, tf.int32)])

    def sample_points(self, images, seed) -> tf.Tensor:
        """P distinct random pixels per image: images [B,H,W,C] -> points float32 [B,P,2]."""
        everywhere = tf.zeros(tf.shape(images)[:3], tf.int32)  # No labels: all pixels valid.
        points, _ = heads.sample_points(everywhere, seed, self.points_per_image)
        return points

    def color_terms(self, images, raw_images, step, training=True) -> dict:
        """Grey images [B,H,W,1] + RGB crops uint8 [B,H,W,3] -> dict of float32 scalars
        (loss, kl_chroma, kl_hue) at this step's points; this replica's, unscaled."""
        points = self.sample_points(images, self.step_seed(step))
        logits = tf.cast(self.point_logits(images, points, training), tf.float32)  # [B,P,K]
        # Points sit on pixel centres, so a stride-1 bilinear read is the pixel itself.
        rgb = heads.sample_bilinear(tf.cast(raw_images, tf.float32), points, 1)  # [B,P,3]
        lch = color.rgb_uint8_to_lch(rgb)
        chroma_target, hue_target = color.encode_lch(lch, self.bins)
        chroma_logits, hue_logits = color.split_logits(logits, self.bins)
        kl_chroma = kl_divergence(chroma_target, chroma_logits)  # [B,P]
        kl_hue = kl_divergence(hue_target, hue_logits)  # [B,P]
        hue_scale = tf.minimum(lch[..., 1] / self.bins.max_chroma, 1.0)
        per_point = kl_chroma + self.hue_weight * hue_scale * kl_hue
        return {"loss": tf.reduce_mean(per_point), "kl_chroma": tf.reduce_mean(kl_chroma),
                "kl_hue": tf.reduce_mean(kl_hue)}

    def train_step(self, data):
        """Forward -> float32 loss terms -> total -> gradients -> apply -> logs."""
        with tf.GradientTape() as tape:
            terms = self.color_terms(data[common.IMAGE], data[common.RAW_IMAGE],
                                     self.optimizer.iterations)
            decay = self.weight_decay * training.kernel_l2(self._kernels)
            total = terms["loss"] + decay
            # Keras sums replica gradients; this raw-TF loss is scaled here, once.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = total / tf.cast(replicas, tf.float32)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        values = {"loss": total, "color_loss": terms["loss"], "kl_chroma": terms["kl_chroma"],
                  "kl_hue": terms["kl_hue"], "weight_decay": decay}
        for name, value in values.items():
            self._trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self._trackers.items()}

    def predict_colors(self, images, raw_images, temperature=1.0) -> tf.Tensor:
        """Grey images [B,H,W,1] + true RGB uint8 [B,H,W,3] -> predicted RGB uint8
        [B,H,W,3]: predicted chroma and hue with the true lightness."""
        logits = self(images, training=False)
        lightness = color.rgb_to_lab(tf.cast(raw_images, tf.float32) / 255.0)[..., 0]
        rgb = color.lab_to_rgb(color.decode_logits(logits, lightness, self.bins, temperature))
        return tf.cast(tf.round(rgb * 255.0), tf.uint8)

    def get_config(self):
        config = super().get_config()
        config.update({"bins": dataclasses.asdict(self.bins),
                       "points_per_image": self.points_per_image,
                       "hue_weight": self.hue_weight, "weight_decay": self.weight_decay,
                       "seed": self.seed})
        return config


def color_rows(images, raw_images, predicted, max_rows=4) -> np.ndarray:
    """Grey inputs [B,H,W,1], true and predicted RGB uint8 [B,H,W,3] -> uint8
    [1, rows*H, 3*W, 3]: each row is grey input | true colour | predicted colour."""
    grey = summaries.denormalize(images[:max_rows], common.INPUT_GREY).numpy()
    true = np.asarray(raw_images)[:max_rows]
    pred = np.asarray(predicted)[:max_rows]
    rows = [np.concatenate([grey[i], true[i], pred[i]], axis=1) for i in range(len(grey))]
    return np.concatenate(rows, axis=0)[None]


@dataclasses.dataclass(frozen=True)
class ColorizationConfig:
    """The colorization stage's model and optimisation settings.

    Args:
      backbone: "vgg16" (the paper's colorization network) or "alexnet".
      width: channel multiplier of the backbone and of the head.
      num_chroma_bins, num_hue_bins, sigma, neighbours: the `color.ColorBins`.
      points_per_image: pixels sampled per image and step.
      hidden_units: head hidden width; None = 1024 x width (rounded like the backbone).
      num_extra_blocks: extra conv blocks of the hypercolumn head (0 for colorization).
      hue_weight: lambda_H of the chroma-weighted hue term.
      learning_rate, lr_boundaries, lr_decay, momentum: SGD with a step schedule.
      weight_decay: coupled L2 on kernels.
      preview_temperature: annealed-mean temperature of the TensorBoard colour preview
        (Zhang et al.'s 0.38 gives livelier colours than the plain expectation, 1.0).
      seed: base seed of the point sampling (the data order is the input config's).
      jit_compile: compile the train step with XLA.
    """

    backbone: str = "vgg16"
    width: float = 1.0
    num_chroma_bins: int = 32
    num_hue_bins: int = 32
    sigma: float = 0.5
    neighbours: int = 5
    points_per_image: int = 128
    hidden_units: Optional[int] = None
    num_extra_blocks: int = 0
    hue_weight: float = 5.0
    learning_rate: float = 0.01
    lr_boundaries: tuple = ()
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    preview_temperature: float = 0.38
    seed: int = 0
    jit_compile: bool = False

    def bins(self) -> color.ColorBins:
        """The colour bins of this config."""
        return color.ColorBins(num_chroma_bins=self.num_chroma_bins,
                               num_hue_bins=self.num_hue_bins, sigma=self.sigma,
                               neighbours=self.neighbours)


def build_model(config: ColorizationConfig) -> ColorizationModel:
    """The ColorizationModel of `config` (randomly initialised, grey backbone)."""
    try:
        bins = config.bins()
    except ValueError as e:
        raise ConfigError(f"colour bins: {e}") from None
    hidden = config.hidden_units or backbones.scaled_channels(1024, config.width)
    backbone = backbones.build_backbone(config.backbone, common.INPUT_GREY, config.width)
    return ColorizationModel(backbone, bins, points_per_image=config.points_per_image,
                             hidden_units=hidden, num_extra_blocks=config.num_extra_blocks,
                             extra_channels=hidden, hue_weight=config.hue_weight,
                             weight_decay=config.weight_decay, seed=config.seed)


def run_colorization(workdir: str, pairs, info, input_config: pipeline.InputConfig,
                     config: ColorizationConfig, loop: training.LoopConfig,
                     strategy: Optional[tf.distribute.Strategy] = None) -> dict:
    """Trains colorization on the images of `pairs` into `workdir`, resuming if it holds
    checkpoints. Writes `backbone.weights.h5` (grey backbone for `--init`) and
    `summary.json`; returns the summary dict."""
    strategy = strategy or tf.distribute.get_strategy()
    if input_config.input_mode != common.INPUT_GREY:
        raise ConfigError(f"colorization needs --input_mode=grey, got "
                          f"{input_config.input_mode!r}")
    if config.points_per_image < 1:
        raise ConfigError(f"--points_per_image must be >= 1, got {config.points_per_image}")
    os.makedirs(workdir, exist_ok=True)
    with strategy.scope():
        keras.utils.set_random_seed(config.seed)  # a rerun starts from the same weights
        model = build_model(config)
        model.compile(optimizer=training.make_sgd(config.learning_rate, config.lr_boundaries,
                                                  config.lr_decay, config.momentum),
                      jit_compile=config.jit_compile)

    preview = next(iter(pipeline.train_dataset(pairs, info, input_config,
                                               include_raw_image=True)))

    def write_colors(step):
        del step  # The preview batch is fixed, so images compare across steps.
        images, raw = preview[common.IMAGE][:4], preview[common.RAW_IMAGE][:4]
        predicted = model.predict_colors(images, raw, config.preview_temperature)
        tf.summary.image("colorization/grey_true_predicted", color_rows(images, raw, predicted))

    return training.run_backbone_stage(
        model, model.backbone,
        training.resumable_train_data(pairs, info, input_config, include_raw_image=True),
        workdir, loop, stage="colorization_pretraining", image_fn=write_colors,
        scalar_names=SCALAR_NAMES,
        fields={"input_mode": common.INPUT_GREY,
                "color_bins": dataclasses.asdict(model.bins),
                "config": {"colorization": dataclasses.asdict(config),
                           "input": dataclasses.asdict(input_config),
                           "loop": dataclasses.asdict(loop), "dataset": info.name}})
