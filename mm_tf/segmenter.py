"""Segmentation fine-tuning (the paper's stage c): a Keras model whose train_step trains
a backbone + head on pixel labels, and the run function that trains, evaluates and
saves it.

The release's solver ("Segmentation" in mm-reference-facts): SGD momentum 0.9, lr 0.01
x0.1 at 24k and 36k of 40k iterations, weight decay 5e-4 (coupled, Caffe's), batch 6 with
`iter_size` 2. The hypercolumn head (VGG-16) is trained on 256 random labelled pixels per
image; the FCN head (AlexNet) on the dense map. BN layers keep training.

Gradient accumulation (`iter_size`). Caffe's iter_size runs iter_size forward/backward
passes of `batch_size` images per solver iteration and averages their gradients; the lr
schedule, `max_iter` and snapshots count solver iterations. Here one `train_step` is one
solver iteration: the dataset yields `batch_size * iter_size` images, the step splits them
into `iter_size` micro-batches, runs them one after another (a control dependency keeps
only one micro-batch's activations alive, the point of iter_size) and applies the mean of
their gradients once. So `optimizer.iterations`, `--steps`, the lr boundaries, the logging
windows and the checkpoints all count optimizer updates, and no half-accumulated gradient
ever sits in a checkpoint. Each micro-batch's loss is the mean over its own valid pixels
(Caffe's SoftmaxWithLoss `normalize: true`), so the update equals one step on the
concatenated batch whenever the micro-batches have equal valid counts (always so for the
hypercolumn head's 256 points per image).
Keras 3's built-in `SGD(gradient_accumulation_steps=n)` was measured and not used: with
n = 2, `optimizer.iterations` counts updates (floor(micro_steps / n)) while the lr
schedule is evaluated at the micro-step counter, so a Caffe boundary b would have to be
given as n*b, and `fit`'s steps_per_epoch (micro-batches) would no longer match the update
count that `training.fit_resumable` uses for windows, checkpoints and resume.

Training metrics, per logging window: loss terms (Mean), pixel accuracy on the pixels the
step sees (the sampled points for the hypercolumn head, every labelled pixel for FCN) and
a streaming mIoU over the same pixels (`keras.metrics.MeanIoU(ignore_class=255)` fed
argmax predictions; classes with an empty union are left out, as in `mm_tf.evaluation`).
No ignore pixel reaches the loss or the metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from mm_tf import common
from mm_tf import distribute
from mm_tf import evaluation
from mm_tf import files
from mm_tf import losses
from mm_tf import mix as mix_lib
from mm_tf import summaries
from mm_tf import training
from mm_tf.data import datasets
from mm_tf.data import pipeline
from mm_tf.errors import ConfigError
from mm_tf.models import backbones
from mm_tf.models import heads
from mm_tf.models import weights as weights_lib

CLASS_WEIGHTINGS = ("none", "median_frequency")
MODEL_WEIGHTS = common.MODEL_WEIGHTS
MODEL_CONFIG = common.MODEL_CONFIG
SUMMARY = "summary.json"
CLASS_WEIGHTS = "class_weights.json"

# Keras log key -> TensorBoard tag (style: losses/<term>, <split>/miou).
SCALAR_NAMES = {
    "loss": "losses/total",
    "cross_entropy": "losses/cross_entropy",
    "weight_decay": "losses/weight_decay",
    "pixel_acc": "train/pixel_acc",
    "miou": "train/miou",
    "aux_mm_loss": "losses/aux_mm",
}
# Images in the fixed validation batch of the image summaries, and their display width.
_PREVIEW_IMAGES = 3
_PREVIEW_MAX_WIDTH = 512
# Data seed offset of the BN recomputation stream (apart from the training streams).
_BN_SEED_OFFSET = 7919
# Folded into a micro-batch's seed for its auxiliary mix, apart from its point sampling.
_AUX_MIX_SALT = 4099


# ----------------------------------------------------------------------------------------
# Losses and class weights.
# ----------------------------------------------------------------------------------------

def median_frequency_weights(pixels_per_class) -> np.ndarray:
    """Median frequency balancing: pixels_per_class int [K] -> float32 [K] weights.

    freq_c = pixels_c / sum(pixels); weight_c = median(freq over present classes) / freq_c;
    classes with no pixel get weight 0. (Eigen & Fergus divide by the pixels of the images
    where c is present; check_dataset's `pixels_per_class` has no per-image presence, so
    the frequency here is over all labelled pixels. Both give the same ordering.)
    """
    counts = np.asarray(pixels_per_class, np.float64)
    if counts.ndim != 1 or np.any(counts < 0):
        raise ValueError(f"pixels_per_class must be non-negative [K], got {counts.tolist()}")
    present = counts > 0
    if not present.any():
        raise ValueError("pixels_per_class has no labelled pixel; cannot balance classes")
    freq = counts / counts.sum()
    median = np.median(freq[present])
    weights = np.zeros_like(freq)
    weights[present] = median / freq[present]
    return weights.astype(np.float32)


# ----------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SegConfig:
    """The segmentation stage's model and optimisation settings (defaults: the paper's).

    Args:
      backbone: "vgg16" or "alexnet".
      head: "hypercolumn" (VGG-16, trained on 256 sampled points per image) or "fcn".
      width: channel multiplier of backbone and head (1.0 = the paper's network).
      input_mode: "rgb" or "grey" (colorization models).
      init: "random" (Glorot) or a backbone weights file (e.g. an M&M run's
        backbone.weights.h5).
      learning_rate, lr_boundaries, lr_decay, momentum: SGD with Caffe's multistep
        schedule; boundaries count optimizer updates.
      weight_decay: coupled L2 on conv/dense kernels (grad += wd * w), Caffe's.
      iter_size: micro-batches per optimizer update (Caffe's iter_size; gradients are
        averaged). The data pipeline's batch_size is the micro-batch.
      class_weighting: "none" or "median_frequency" (weights from the training labels).
      seed: base seed of the stateless point sampling.
      jit_compile: compile the train step with XLA (under several replicas: each
        replica's micro-batch step, see `Segmenter`).
      warmup_steps: linear learning-rate warm-up over the first updates (0: none, the
        paper; TF Model Garden's segmentation configs warm up).
      backbone_lr_multiplier: the backbone's learning rate relative to the head's
        (Caffe's lr_mult; 1.0: one rate, the paper). Implemented by scaling the
        backbone's gradients, which for SGD with momentum and coupled decay is the same.
      hypercolumn_data_scale: factor on the raw input where the hypercolumn reads it
        (`heads.HypercolumnHead`'s data_scale; 1.0: the release). Its rms is ~80 against
        ~0.7 for the other taps, so at 1.0 its three rows take most of the hidden layer's
        input (measured at the CamVid CPU settings, random init: pre-activation std 3.0
        from data, 0.08-0.5 from each other tap).
      bn_recompute_batches: after training, replace every BN layer's moving statistics
        by their average over this many training batches ("precise BN"); 0 (the paper)
        keeps the moving averages. For short CPU runs: with Keras' momentum 0.99 the
        moving averages still lag the fast-changing weights after a few hundred
        updates, and inference-mode predictions are then far off (measured on the demo
        data after 120 updates: val pixel accuracy 0.12 before, 0.85 after 20 batches).
      aux_mm_weight: weight of an auxiliary M&M loss added to the cross-entropy of every
        micro-batch (0: none, the paper, whose M&M is a stage before fine-tuning): the
        micro-batch's images are mixed into patches (`aux_mm_mix`) and the supervised
        contrastive loss of their pool5 features (temperature `aux_mm_temperature`,
        same-class patches positive; `mm_tf.losses.supcon_loss`) joins the objective.
        Beyond the paper (docs/camvid_study.md): the match loss shapes the backbone
        while the pixel loss keeps what the start segments.
      aux_mm_mix: `mm_tf.mix.MixConfig` of the auxiliary patches.
    """

    backbone: str = "vgg16"
    head: str = "hypercolumn"
    width: float = 1.0
    input_mode: str = common.INPUT_RGB
    init: str = "random"
    learning_rate: float = 0.01
    lr_boundaries: tuple = (24000, 36000)
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    iter_size: int = 2
    class_weighting: str = "none"
    seed: int = 0
    jit_compile: bool = False
    bn_recompute_batches: int = 0
    precision: str = training.FLOAT32
    warmup_steps: int = 0
    backbone_lr_multiplier: float = 1.0
    hypercolumn_data_scale: float = 1.0
    aux_mm_weight: float = 0.0
    aux_mm_temperature: float = losses.TEMPERATURE
    aux_mm_mix: mix_lib.MixConfig = mix_lib.MixConfig()

    def head_kwargs(self) -> dict:
        """The head builder's options that differ from its defaults (JSON-ready)."""
        if self.head == "hypercolumn" and self.hypercolumn_data_scale != 1.0:
            return {"data_scale": float(self.hypercolumn_data_scale)}
        return {}

    def validate(self) -> None:
        """Raises ConfigError naming the flag of an invalid value."""
        training.check_precision(self.precision)
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.backbone_lr_multiplier < 0:
            raise ConfigError(f"--backbone_lr_multiplier must be >= 0, got "
                              f"{self.backbone_lr_multiplier}")
        if self.iter_size < 1:
            raise ConfigError(f"--iter_size must be >= 1, got {self.iter_size}")
        if self.aux_mm_weight < 0:
            raise ConfigError(f"--aux_mm_weight must be >= 0, got {self.aux_mm_weight}")
        if self.aux_mm_temperature <= 0:
            raise ConfigError(f"--aux_mm_temperature must be > 0, got "
                              f"{self.aux_mm_temperature}")
        if self.hypercolumn_data_scale < 0:
            raise ConfigError(f"--hypercolumn_data_scale must be >= 0, got "
                              f"{self.hypercolumn_data_scale}")
        if self.hypercolumn_data_scale != 1.0 and self.head != "hypercolumn":
            raise ConfigError(f"--hypercolumn_data_scale applies to --head=hypercolumn, "
                              f"not --head={self.head}")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ConfigError(f"--class_weighting={self.class_weighting!r}: expected one of "
                              f"{CLASS_WEIGHTINGS}")
        if self.bn_recompute_batches < 0:
            raise ConfigError(f"--bn_recompute_batches must be >= 0, got "
                              f"{self.bn_recompute_batches}")
        if self.head not in heads.HEADS:
            raise ConfigError(f"--head={self.head!r}: expected one of {sorted(heads.HEADS)}")
        if self.input_mode not in common.INPUT_MODES:
            raise ConfigError(f"--input_mode={self.input_mode!r}: expected one of "
                              f"{common.INPUT_MODES}")


@keras.saving.register_keras_serializable(package="mm_tf")
class Segmenter(distribute.StrategyFitMixin, keras.Model):
    """Fine-tunes a segmentation network with pixel cross-entropy.

    Args:
      network: a `SegmentationModel` (or any model with `call(images) -> [B,H,W,K]`,
        `num_classes`, and for `train_with_sampling=True` a
        `sampled_call(images, labels, seed, training)`).
      weight_decay: coupled L2 coefficient on the network's conv/dense kernels.
      iter_size: micro-batches per optimizer update; the batch given to `train_step`
        holds iter_size * micro-batch images.
      class_weights: optional float [K] cross-entropy weights.
      ignore_label: label excluded from loss and metrics.
      seed: base seed; update s samples points with the stateless seeds of (seed, s)
        (with several replicas, each folds its replica id in).
      compile_replica_step: compile each micro-batch's forward and backward pass with
        XLA, for strategies under which Keras' `compile(jit_compile=True)` cannot work
        (`mm_tf.distribute.keras_can_jit`).
      aux_mm_weight, aux_mm_mix, aux_mm_temperature: the auxiliary M&M loss of
        `SegConfig` (weight 0: none); it needs a network with a `backbone`, whose pool5
        features it reads.

    Example:
      >>> network = heads.build_segmentation_model("vgg16", "hypercolumn", 5, width=0.0625)
      >>> segmenter = Segmenter(network, iter_size=2)
      >>> segmenter.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
      >>> segmenter.fit(dataset, steps_per_epoch=10, epochs=1)  # batches of 2 x B images
    """

    def __init__(self, network: keras.Model, weight_decay: float = 5e-4, iter_size: int = 1,
                 class_weights: Optional[Sequence[float]] = None,
                 ignore_label: int = common.IGNORE_LABEL, seed: int = 0,
                 compile_replica_step: bool = False, backbone_lr_multiplier: float = 1.0,
                 aux_mm_weight: float = 0.0,
                 aux_mm_mix: mix_lib.MixConfig = mix_lib.MixConfig(),
                 aux_mm_temperature: float = losses.TEMPERATURE, **kwargs):
        super().__init__(**kwargs)
        if int(iter_size) < 1:
            raise ValueError(f"iter_size must be >= 1, got {iter_size}")
        self.network = network
        self.num_classes = int(network.num_classes)
        self.weight_decay = float(weight_decay)
        self.iter_size = int(iter_size)
        self.class_weights = (None if class_weights is None
                              else [float(w) for w in class_weights])
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ValueError(f"{len(self.class_weights)} class weights for "
                             f"{self.num_classes} classes")
        self.ignore_label = int(ignore_label)
        self.seed = int(seed)
        self.compile_replica_step = bool(compile_replica_step)
        self.backbone_lr_multiplier = float(backbone_lr_multiplier)
        backbone = getattr(network, "backbone", None)
        if backbone is None and self.backbone_lr_multiplier != 1.0:
            raise ValueError("backbone_lr_multiplier needs a network with a `backbone`")
        self._backbone_variables = ({id(v) for v in backbone.trainable_variables}
                                    if backbone is not None else set())
        self.aux_mm_weight = float(aux_mm_weight)
        if isinstance(aux_mm_mix, dict):  # from get_config
            aux_mm_mix = mix_lib.MixConfig(**aux_mm_mix)
        self.aux_mm_mix = aux_mm_mix
        self.aux_mm_temperature = float(aux_mm_temperature)
        if self.aux_mm_weight < 0:
            raise ValueError(f"aux_mm_weight must be >= 0, got {aux_mm_weight}")
        if self.aux_mm_weight > 0:
            if backbone is None:
                raise ValueError("aux_mm_weight needs a network with a `backbone`")
            self._aux_mix = mix_lib.Mix(self.aux_mm_mix)
            self._aux_features = backbones.pool5_model(backbone)
        self._micro_step = (tf.function(self.micro_step, jit_compile=True)
                            if self.compile_replica_step else self.micro_step)
        self.train_with_sampling = bool(getattr(network, "train_with_sampling", False))
        self._kernels = training.decayed_kernels(network)
        self._trackers = {name: keras.metrics.Mean(name=name) for name in (
            "loss", "cross_entropy", "weight_decay", "pixel_acc") + (
                ("aux_mm_loss",) if self.aux_mm_weight > 0 else ())}
        self._miou = keras.metrics.MeanIoU(self.num_classes, name="miou",
                                           ignore_class=self.ignore_label)
        # The network holds every weight already: without this, fit() would first trace a
        # symbolic call to build the model.
        self.built = True

    @property
    def metrics(self):
        return list(self._trackers.values()) + [self._miou]

    def call(self, images, training=False):
        """Dense logits: images [B,H,W,C] (or a batch dict holding them) -> [B,H,W,K]."""
        if isinstance(images, dict):
            images = images[common.IMAGE]
        return self.network(images, training=training)

    def step_seeds(self, step):
        """Optimizer step (int) -> int32 [iter_size, 2]: one stateless seed per micro-batch."""
        base = tf.stack([tf.constant(self.seed, tf.int32), tf.cast(step, tf.int32)])
        return tf.random.experimental.stateless_split(base, num=self.iter_size)

    def forward(self, images, labels, seed, training=True):
        """One micro-batch: images [B,H,W,C], labels [B,H,W] -> (logits [...,K], targets
        [...]): the sampled points [B,P] for the hypercolumn head, else every pixel."""
        if self.train_with_sampling:
            return self.network.sampled_call(images, labels, seed, training=training)
        return self.network(images, training=training), labels

    def loss_terms(self, logits, targets):
        """logits [...,K] (float32), targets [...] -> dict(cross_entropy scalar, per_pixel
        [...], num_valid scalar), this replica's, not yet scaled for replicas."""
        weights = None if self.class_weights is None else tf.constant(self.class_weights)
        per_pixel, num_valid = losses.pixel_cross_entropy(logits, targets, self.ignore_label,
                                                          weights)
        return {"cross_entropy": losses.mean_cross_entropy(per_pixel, num_valid),
                "per_pixel": per_pixel, "num_valid": num_valid}

    def aux_mm_loss(self, images, labels, seed, training=True):
        """The auxiliary M&M loss of one micro-batch: images [B,H,W,C], labels [B,H,W],
        seed int32 [2] -> float32 scalar, the SupCon loss of the pool5 features of the
        micro-batch's mixed patches (0 when no two valid patches share a class)."""
        mix_seed = tf.random.experimental.stateless_fold_in(seed, _AUX_MIX_SALT)
        patches = self._aux_mix(tf.cast(images, tf.float32), labels, mix_seed)
        features = tf.cast(self._aux_features(patches.patches, training=training),
                           tf.float32)
        return losses.supcon_loss(features, patches.labels, patches.valid,
                                  self.aux_mm_temperature)["loss"]

    def micro_step(self, images, labels, seed, scale):
        """One micro-batch: forward -> float32 -> loss terms -> total -> gradients of
        total * scale (times the float16 loss scale, if any). Returns (gradients per
        network.trainable_variables (None where unused), cross_entropy, decay, logits
        float32, targets, auxiliary M&M loss (0 when off))."""
        variables = self.network.trainable_variables
        with tf.GradientTape() as tape:
            logits, targets = self.forward(images, labels, seed, training=True)
            logits = tf.cast(logits, tf.float32)
            terms = self.loss_terms(logits, targets)
            # Decay is added per micro-batch and averaged: applied once per update.
            decay = self.weight_decay * training.kernel_l2(self._kernels)
            total = terms["cross_entropy"] + decay
            aux = tf.constant(0.0, tf.float32)
            if self.aux_mm_weight > 0:
                aux = self.aux_mm_loss(images, labels, seed)
                total = total + self.aux_mm_weight * aux
            scaled = self.optimizer.scale_loss(total * scale)
        gradients = tape.gradient(scaled, variables)
        return gradients, terms["cross_entropy"], decay, logits, targets, aux

    def train_step(self, data):
        """One optimizer update over iter_size micro-batches: per micro-batch forward ->
        float32 -> loss terms -> total -> gradients (accumulated); then apply -> logs."""
        images, labels = data[common.IMAGE], data[common.LABEL]
        micro_images = tf.split(images, self.iter_size, axis=0)
        micro_labels = tf.split(labels, self.iter_size, axis=0)
        seeds = self.step_seeds(self.optimizer.iterations)
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync
        if replicas > 1:
            # Equal seeds would sample the same point positions in every replica's images.
            replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
            seeds = tf.stack([tf.random.experimental.stateless_fold_in(seeds[k], replica)
                              for k in range(self.iter_size)])
        variables = self.network.trainable_variables
        # Keras sums replica gradients; the raw-TF loss is scaled here, once, together with
        # the 1/iter_size of the gradient average.
        scale = tf.constant(1.0 / (self.iter_size * replicas), tf.float32)
        accumulated = [None] * len(variables)
        cross_entropies, auxes, decay = [], [], None
        for k in range(self.iter_size):
            x, y = micro_images[k], micro_labels[k]
            ready = [g for g in accumulated if g is not None]
            if ready:
                # Start this micro-batch only after the previous backward pass: one
                # micro-batch of activations in memory at a time.
                with tf.control_dependencies(ready):
                    x = tf.identity(x)
            gradients, cross_entropy, decay, logits, targets, aux = self._micro_step(
                x, y, seeds[k], scale)
            accumulated = [a if g is None else (g if a is None else a + g)
                           for a, g in zip(accumulated, gradients)]
            cross_entropies.append(cross_entropy)
            auxes.append(aux)
            self._update_pixel_metrics(logits, targets)
        pairs = [(g, v) for g, v in zip(accumulated, variables) if g is not None]
        if self.backbone_lr_multiplier != 1.0:
            pairs = [(g * self.backbone_lr_multiplier if id(v) in self._backbone_variables
                      else g, v) for g, v in pairs]
        self.optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
        cross_entropy = tf.add_n(cross_entropies) / float(self.iter_size)
        values = {"loss": cross_entropy + decay, "cross_entropy": cross_entropy,
                  "weight_decay": decay}
        if self.aux_mm_weight > 0:
            values["aux_mm_loss"] = tf.add_n(auxes) / float(self.iter_size)
            values["loss"] = values["loss"] + self.aux_mm_weight * values["aux_mm_loss"]
        for name, value in values.items():
            self._trackers[name].update_state(value)
        return self.fit_logs({metric.name: metric.result() for metric in self.metrics})

    def _update_pixel_metrics(self, logits, targets):
        """Pixel accuracy and mIoU over the non-ignore entries of targets [...]."""
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
        targets = tf.cast(targets, tf.int32)
        valid = tf.cast(tf.not_equal(targets, self.ignore_label), tf.float32)
        correct = tf.cast(tf.equal(predictions, targets), tf.float32)
        self._trackers["pixel_acc"].update_state(correct, sample_weight=valid)
        self._miou.update_state(targets, predictions)

    def get_config(self):
        config = super().get_config()
        config.update(network=keras.saving.serialize_keras_object(self.network),
                      weight_decay=self.weight_decay, iter_size=self.iter_size,
                      class_weights=self.class_weights, ignore_label=self.ignore_label,
                      seed=self.seed, compile_replica_step=self.compile_replica_step,
                      backbone_lr_multiplier=self.backbone_lr_multiplier,
                      aux_mm_weight=self.aux_mm_weight,
                      aux_mm_mix=dataclasses.asdict(self.aux_mm_mix),
                      aux_mm_temperature=self.aux_mm_temperature)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)


def recompute_batch_norm_statistics(network: keras.Model, batches) -> int:
    """Sets every BatchNormalization layer's moving mean/variance of `network` to the
    population statistics of its inputs over `batches` (dicts with IMAGE [B,H,W,C]),
    "precise BN"; returns the number of batches used. Other weights do not change.

    Per batch b the layer sees mean m_b and variance v_b; the population mean is the mean
    of m_b and the variance mean(v_b + m_b^2) - mean^2 (the mean of v_b alone would miss
    the spread between batches, large for deep maps of a few cells per image).
    """
    every_layer = network._flatten_layers(include_self=False)  # pylint: disable=protected-access
    layers = [layer for layer in every_layer
              if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    sums = [[0.0, 0.0] for _ in layers]
    count = 0
    try:
        for layer in layers:
            # moving <- moving * 0 + batch: after a call the moving statistics are that
            # batch's. The function below is traced after this, so it sees this momentum.
            layer.momentum = 0.0
        # One trace per batch shape, not every layer's ops run eagerly per batch.
        forward = tf.function(lambda images: network(images, training=True))
        for count, batch in enumerate(batches, start=1):
            forward(batch[common.IMAGE])
            for layer, total in zip(layers, sums):
                mean = layer.moving_mean.numpy().astype(np.float64)
                total[0] = total[0] + mean
                total[1] = total[1] + layer.moving_variance.numpy() + mean ** 2
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    if count:
        for layer, (mean_sum, square_sum) in zip(layers, sums):
            mean = mean_sum / count
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign(np.maximum(square_sum / count - mean ** 2,
                                                    0.0).astype(np.float32))
    return count


# ----------------------------------------------------------------------------------------
# Building, saving and loading.
# ----------------------------------------------------------------------------------------

def build_network(config: SegConfig, num_classes: int) -> keras.Model:
    """SegmentationModel of `config`; loads `config.init` into its backbone unless random."""
    network = heads.build_segmentation_model(config.backbone, config.head, num_classes,
                                              input_mode=config.input_mode, width=config.width,
                                              **config.head_kwargs())
    if config.init != "random":
        if not os.path.isfile(config.init):
            raise ConfigError(f"--init={config.init}: no such weights file (expected "
                              "'random' or a backbone .weights.h5/.npz, e.g. an M&M run's "
                              "backbone.weights.h5)")
        weights_lib.load_backbone_weights(network.backbone, config.init)
    return network


def model_config_dict(config: SegConfig, info, data: Optional[dict] = None,
                      inference: Optional[evaluation.InferenceConfig] = None) -> dict:
    """Everything needed to rebuild a trained network, read its data set and test it as
    it was tested after training (JSON-ready)."""
    inference = inference or evaluation.InferenceConfig()
    return {
        "backbone": config.backbone,
        "head": config.head,
        "width": config.width,
        "input_mode": config.input_mode,
        "head_options": config.head_kwargs(),
        "num_classes": int(info.num_classes),
        "ignore_label": common.IGNORE_LABEL,
        "dataset": info.name,
        "class_names": list(info.class_names),
        "palette": np.asarray(info.palette).astype(int).tolist(),
        "data": dict(data or {}),
        "inference": {"flip": inference.flip, "scales": [float(x) for x in inference.scales],
                      "window": inference.window, "stride": inference.stride},
    }


def save_network_weights(network: keras.Model, path: str) -> None:
    """Writes every weight of `network` to `path` (.weights.h5) via a temp file + rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".weights.h5")
    os.close(fd)
    try:
        network.save_weights(tmp, overwrite=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_model(weights_path: str, model_config_path: str):
    """(network, model_config) from a model_config.json and a model.weights.h5."""
    for path in (model_config_path, weights_path):
        if not os.path.isfile(path):
            raise ConfigError(f"{path} does not exist (a bin/train_seg.py run's --workdir "
                              f"holds {MODEL_CONFIG} and {MODEL_WEIGHTS}; or give --weights "
                              "and --model_config)")
    try:
        with open(model_config_path) as f:
            model_config = json.load(f)
        network = heads.build_segmentation_model(
            model_config["backbone"], model_config["head"], int(model_config["num_classes"]),
            input_mode=model_config["input_mode"], width=float(model_config["width"]),
            **dict(model_config.get("head_options") or {}))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{model_config_path}: not a valid model config ({e})") from e
    try:
        network.load_weights(weights_path)
    except (ValueError, OSError) as e:
        reason = " ".join(str(e).split())  # Keras' message spans lines; errors are one.
        raise ConfigError(f"{weights_path}: does not fit the model of {model_config_path} "
                          f"({reason[:400]})") from e
    return network, model_config


def load_trained_model(workdir: str):
    """(network, model_config) of a finished run_segmentation workdir."""
    return load_model(os.path.join(workdir, MODEL_WEIGHTS), os.path.join(workdir, MODEL_CONFIG))


def _class_weights(workdir, train_pairs, info, config: SegConfig, input_config,
                   write_cache: bool = True):
    """The configured class weights float [K] or None; median frequencies are computed
    once from the training labels and cached in workdir/class_weights.json (written
    only when `write_cache`: by the chief of a multi-worker run)."""
    if config.class_weighting == "none":
        return None
    cache = os.path.join(workdir, CLASS_WEIGHTS)
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)["weights"]
    if input_config.source != pipeline.SOURCE_FILES:
        raise ConfigError("--class_weighting=median_frequency counts pixels in the label "
                          "files; it cannot be used with --tfrecord_pattern")
    report = datasets.check_dataset(train_pairs, info)
    if report["errors"]:
        raise ConfigError(f"--class_weighting: the training labels have errors, e.g. "
                          f"{report['errors'][0]} (run bin/check_dataset.py)")
    weights = median_frequency_weights(report["pixels_per_class"]).tolist()
    if write_cache:
        files.write_json_atomic(cache, {"pixels_per_class": report["pixels_per_class"],
                                        "weights": weights})
    return weights


def _preview_fn(network, val_pairs, info, eval_input, input_mode):
    """step -> None: writes image | ground truth | prediction rows of a fixed val batch."""
    count = min(_PREVIEW_IMAGES, len(val_pairs))
    batch = next(iter(pipeline.eval_dataset(val_pairs[:count], info, eval_input,
                                            batch_size=count)))
    images = batch[common.IMAGE]
    labels = batch[common.LABEL].numpy()
    heights, widths = batch[common.HEIGHT].numpy(), batch[common.WIDTH].numpy()
    # Large frames (Cityscapes) are shown subsampled, so the summary stays small.
    every = max(1, -(-int(images.shape[2]) // _PREVIEW_MAX_WIDTH))

    def write(step):
        logits = network(images, training=False)
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int32).numpy()
        for i, (h, w) in enumerate(zip(heights, widths)):  # Padding is not an image.
            predictions[i, h:, :] = common.IGNORE_LABEL
            predictions[i, :, w:] = common.IGNORE_LABEL
        rows = summaries.segmentation_rows(images[:, ::every, ::every],
                                           labels[:, ::every, ::every],
                                           predictions[:, ::every, ::every],
                                           info.palette, input_mode, max_rows=count)
        tf.summary.image("val/segmentation", rows, step=step)

    return write


def run_segmentation(workdir: str, train_pairs, val_pairs, info,
                     input_config: pipeline.InputConfig, config: SegConfig,
                     loop: training.LoopConfig,
                     eval_config: Optional[evaluation.InferenceConfig] = None, *,
                     data: Optional[dict] = None,
                     strategy: Optional[tf.distribute.Strategy] = None) -> dict:
    """Fine-tunes on (train_pairs, info), evaluates on val_pairs, saves the model.

    Resumes from `workdir/checkpoints` if present. `input_config.batch_size` is the
    global micro-batch; each optimizer update reads `batch_size * config.iter_size`
    images, of which each of the strategy's R replicas gets 1/R (batch_size must divide
    by R). Model, optimizer and checkpoint restore are created in the strategy's scope
    under the Keras dtype policy `config.precision`; in multi-worker training only the
    chief writes files (every worker evaluates).
    `data` (dataset, data_dir, split, ...) is recorded in model_config.json so that
    bin/evaluate.py finds the evaluation data by default.

    Writes workdir/model.weights.h5 (every weight of the network), model_config.json,
    summary.json, tensorboard/{train,val}; returns the summary dict.

    Raises:
      ConfigError: an invalid setting (names the flag), or a missing --init file.
      WeightsMismatchError: --init does not fit the backbone (names the layer).
      training.TrainingDivergedError: the loss became NaN/inf.
    """
    config.validate()
    if not info.has_labels:
        raise ConfigError(f"--dataset={info.name} has no labels; fine-tuning needs "
                          "labelled images (image-only data serves the proxy tasks)")
    strategy = strategy or tf.distribute.get_strategy()
    os.makedirs(workdir, exist_ok=True)
    if config.input_mode != input_config.input_mode:
        raise ConfigError(f"input_mode mismatch: model {config.input_mode!r} vs data "
                          f"{input_config.input_mode!r}")
    if not val_pairs:
        raise ConfigError("the evaluation split has no images (--eval_split)")
    update_batch = input_config.batch_size * config.iter_size
    # Each replica splits its share of an update into iter_size micro-batches.
    distribute.per_replica_batch(input_config.batch_size, strategy)
    chief = distribute.is_chief(strategy)
    class_weights = _class_weights(workdir, train_pairs, info, config, input_config,
                                   write_cache=chief)
    keras_jit = config.jit_compile and distribute.keras_can_jit(strategy)
    with training.precision_policy(config.precision), strategy.scope():
        keras.utils.set_random_seed(config.seed)  # a rerun draws the same head (and init)
        network = build_network(config, info.num_classes)
        segmenter = Segmenter(network, weight_decay=config.weight_decay,
                              iter_size=config.iter_size, class_weights=class_weights,
                              seed=config.seed,
                              compile_replica_step=config.jit_compile and not keras_jit,
                              backbone_lr_multiplier=config.backbone_lr_multiplier,
                              aux_mm_weight=config.aux_mm_weight,
                              # The gather crop compiles with XLA; TF's is faster without.
                              aux_mm_mix=dataclasses.replace(
                                  config.aux_mm_mix, use_gather_resize=config.jit_compile),
                              aux_mm_temperature=config.aux_mm_temperature)
        optimizer = training.make_sgd(config.learning_rate, config.lr_boundaries,
                                      config.lr_decay, config.momentum,
                                      warmup_steps=config.warmup_steps)
        segmenter.compile(
            optimizer=training.optimizer_for_precision(optimizer, config.precision),
            jit_compile=keras_jit)

    # One element = one optimizer update, re-seeded from the step a resumed run starts at.
    make_dataset = training.resumable_train_data(
        train_pairs, info, dataclasses.replace(input_config, batch_size=update_batch))
    eval_input = pipeline.InputConfig(input_mode=config.input_mode)
    image_fn = (_preview_fn(network, val_pairs, info, eval_input, config.input_mode)
                if loop.image_every else None)
    started = time.time()
    result = training.fit_resumable(segmenter, make_dataset, workdir, loop,
                                    image_fn=image_fn, scalar_names=SCALAR_NAMES,
                                    backbone=network.backbone)

    if config.bn_recompute_batches:
        # A fixed stream (not the resumed one): rerunning a finished run gives the same
        # statistics from the same final checkpoint.
        stream = pipeline.train_dataset(train_pairs, info, dataclasses.replace(
            input_config, seed=input_config.seed + _BN_SEED_OFFSET))
        recompute_batch_norm_statistics(network, stream.take(config.bn_recompute_batches))

    eval_config = eval_config or evaluation.InferenceConfig()
    scores = evaluation.Evaluator(pipeline.eval_dataset(val_pairs, info, eval_input),
                                  info.num_classes, info.class_names, eval_config).run(network)
    if chief:
        writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard", "val"))
        with writer.as_default(step=result["steps"]):
            tf.summary.scalar("val/miou", scores["miou"])
            tf.summary.scalar("val/pixel_acc", scores["pixel_acc"])
        writer.close()

    summary_path = os.path.join(workdir, SUMMARY)
    metrics = result["logs"]
    if not metrics and os.path.isfile(summary_path):
        # A rerun of a finished run trains no step: keep the metrics of the run that did.
        with open(summary_path) as f:
            metrics = json.load(f).get("metrics", {})
    weights_path = os.path.join(workdir, MODEL_WEIGHTS)
    config_path = os.path.join(workdir, MODEL_CONFIG)
    summary = {
        "stage": "segmentation",
        "steps": result["steps"],
        "resumed_from_step": result["start_step"],
        "seconds": time.time() - started,
        "metrics": metrics,
        "eval": {key: scores[key] for key in ("miou", "per_class_iou", "pixel_acc",
                                              "mean_acc", "num_images", "confusion_matrix")},
        "images_per_update": update_batch,
        "num_replicas": strategy.num_replicas_in_sync,
        "strategy": distribute.strategy_kind(strategy),
        "precision": config.precision,
        "model_weights": weights_path,
        "model_config": config_path,
        # How far fine-tuning moved each backbone kernel from its init (hooks.py).
        **result["fields"],
        "config": {"seg": dataclasses.asdict(config), "input": dataclasses.asdict(input_config),
                   "loop": dataclasses.asdict(loop),
                   "inference": dataclasses.asdict(eval_config), "dataset": info.name,
                   "class_weights": class_weights},
    }
    if chief:
        save_network_weights(network, weights_path)
        files.write_json_atomic(config_path,
                                model_config_dict(config, info, data, eval_config))
        files.write_json_atomic(summary_path, summary)
    return summary
