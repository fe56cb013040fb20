"""M&M tuning: a Keras model whose train_step runs mix -> backbone pool5 -> match ->
triplet loss inside one compiled step, and the run function that trains it resumably.

The paper's stage (b): patches sampled across a batch of target images (mix), a
class-wise connected graph over them (match), and a triplet ranking loss on the
L2-normalised pool5 features of the patches. Only the layers up to pool5 are tuned.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import keras
import tensorflow as tf

from mm_tf import common
from mm_tf import files
from mm_tf.errors import ConfigError
from mm_tf import losses
from mm_tf import match as match_lib
from mm_tf import mix as mix_lib
from mm_tf import summaries
from mm_tf import training
from mm_tf.data import pipeline
from mm_tf.models import backbones
from mm_tf.models import weights as weights_lib

# Keras log key -> TensorBoard tag (style: losses/<term>, so runs compare in one board).
SCALAR_NAMES = {
    "loss": "losses/total",
    "triplet_loss": "losses/triplet",
    "weight_decay": "losses/weight_decay",
    "active_fraction": "triplets/active_fraction",
    "d_ap": "triplets/d_ap",
    "d_an": "triplets/d_an",
    "num_classes": "mix/classes_per_batch",
    "valid_patches": "mix/valid_patches",
}


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """The M&M stage's model and optimisation settings (defaults: the paper/release).

    Args:
      backbone: registry name, "vgg16" or "alexnet".
      width: channel multiplier of the backbone (1.0 = the paper's network).
      input_mode: "rgb" or "grey" (the colorization models' input).
      init: "random" (Glorot) or a path to backbone weights (.weights.h5 or .npz).
      triplet_mode: "graph" (paper), "random" (Table 1 ablation) or "graph_semihard".
      margin: triplet margin alpha.
      learning_rate, lr_boundaries, lr_decay, momentum: SGD with a step schedule.
      weight_decay: coupled L2 on conv kernels, as Caffe applies it (grad += wd * w).
      seed: base seed of the stateless mix/match randomness and of the data order.
      jit_compile: compile the train step with XLA.
    """

    backbone: str = "vgg16"
    width: float = 1.0
    input_mode: str = common.INPUT_RGB
    init: str = "random"
    triplet_mode: str = "graph"
    margin: float = losses.MARGIN
    learning_rate: float = 0.01
    lr_boundaries: tuple = (6000,)
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    jit_compile: bool = False

    def validate(self) -> None:
        """Raises ConfigError naming the flag when a value cannot work."""
        if self.input_mode not in common.INPUT_MODES:
            raise ConfigError(f"--input_mode={self.input_mode}: expected one of "
                              f"{common.INPUT_MODES}")
        if self.triplet_mode not in match_lib.MODES:
            raise ConfigError(f"--triplet_mode={self.triplet_mode}: expected one of "
                              f"{match_lib.MODES}")
        if self.init != "random" and not os.path.isfile(self.init):
            raise ConfigError(f"--init={self.init}: no such weights file (expected "
                              "'random' or a backbone .weights.h5/.npz file)")


class MMTuner(keras.Model):
    """Mix-and-match tuning of a backbone's layers up to pool5.

    Args:
      backbone: a functional backbone from `mm_tf.models.backbones.build_backbone`.
      mix_config: `mm_tf.mix.MixConfig` (patches per image, sizes, background share).
      triplet_mode: "graph", "random" or "graph_semihard".
      margin: triplet margin (2.1 in the paper).
      weight_decay: coupled L2 coefficient on the tuned conv kernels.
      seed: base seed; step s uses the stateless seed (seed, s).

    Example:
      >>> backbone = backbones.build_backbone("vgg16", width=0.125)
      >>> tuner = MMTuner(backbone, mix_lib.MixConfig(patch_size=32, min_side=16,
      ...                 max_side=32, patches_per_image=4))
      >>> tuner.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
      >>> tuner.fit(dataset, steps_per_epoch=10, epochs=1)
    """

    def __init__(self, backbone: keras.Model, mix_config: mix_lib.MixConfig,
                 triplet_mode: str = "graph", margin: float = losses.MARGIN,
                 weight_decay: float = 5e-4, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.features = backbones.pool5_model(backbone)
        self.mix = mix_lib.Mix(mix_config)
        self.match = match_lib.TripletGraph(mode=triplet_mode)
        self.mix_config = mix_config
        self.triplet_mode = triplet_mode
        self.margin = float(margin)
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        self._kernels = training.decayed_kernels(self.features)
        self._trackers = {name: keras.metrics.Mean(name=name) for name in (
            "loss", "triplet_loss", "weight_decay", "active_fraction", "d_ap", "d_an",
            "num_classes", "valid_patches")}

    @property
    def metrics(self):
        return list(self._trackers.values())

    def call(self, patches, training=False):
        """Patches float32 [N,S,S,C] -> pool5 features [N,s,s,D]."""
        return self.features(patches, training=training)

    def step_seeds(self, step):
        """Optimizer step (int) -> (mix_seed, match_seed), each int32 [2], stateless."""
        base = tf.stack([tf.constant(self.seed, tf.int32), tf.cast(step, tf.int32)])
        seeds = tf.random.experimental.stateless_split(base, num=2)
        return seeds[0], seeds[1]

    def mm_terms(self, images, labels, step, training=True):
        """One M&M forward: images [B,H,W,C], labels [B,H,W] -> (dict of loss terms,
        Patches); the loss is this replica's, not yet scaled for replicas."""
        mix_seed, match_seed = self.step_seeds(step)
        patches = self.mix(images, labels, mix_seed)
        features = self.features(patches.patches, training=training)
        # Distances and the margin live in float32 whatever the compute dtype.
        features = tf.cast(features, tf.float32)
        embeddings = features if self.triplet_mode == "graph_semihard" else None
        indices, mask = self.match(patches.labels, patches.valid, match_seed,
                                   embeddings=embeddings)
        terms = losses.triplet_loss(features, indices, mask, margin=self.margin)
        terms = dict(terms)
        terms["num_classes"] = _count_classes(patches.labels, patches.valid)
        terms["valid_patches"] = tf.reduce_sum(tf.cast(patches.valid, tf.float32))
        return terms, patches

    def train_step(self, data):
        """Forward -> float32 loss terms -> total -> gradients -> apply -> logs."""
        images, labels = data[common.IMAGE], data[common.LABEL]
        with tf.GradientTape() as tape:
            terms, _ = self.mm_terms(images, labels, self.optimizer.iterations)
            decay = self.weight_decay * training.kernel_l2(self._kernels)
            total = terms["loss"] + decay
            # Keras sums replica gradients; this raw-TF loss is scaled here, once.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = total / tf.cast(replicas, tf.float32)
        variables = self.features.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        values = {"loss": total, "triplet_loss": terms["loss"], "weight_decay": decay,
                  "active_fraction": terms["active_fraction"], "d_ap": terms["d_ap"],
                  "d_an": terms["d_an"], "num_classes": terms["num_classes"],
                  "valid_patches": terms["valid_patches"]}
        for name, value in values.items():
            self._trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self._trackers.items()}

    def get_config(self):
        config = super().get_config()
        config.update({"mix_config": dataclasses.asdict(self.mix_config),
                       "triplet_mode": self.triplet_mode, "margin": self.margin,
                       "weight_decay": self.weight_decay, "seed": self.seed})
        return config


def _count_classes(labels, valid):
    """Patch labels [N] + valid [N] -> float32 scalar: distinct classes among valid ones."""
    ids = tf.where(valid, tf.cast(labels, tf.int32), -1)
    present = tf.reduce_any(tf.equal(ids[:, None], tf.range(256)[None, :]), axis=0)
    return tf.reduce_sum(tf.cast(present, tf.float32))


def build_backbone_from(config: TuneConfig) -> keras.Model:
    """Builds the backbone of `config` and loads `config.init` weights unless random."""
    backbone = backbones.build_backbone(config.backbone, input_mode=config.input_mode,
                                        width=config.width)
    if config.init != "random":
        weights_lib.load_backbone_weights(backbone, config.init)
    return backbone


def run_tuning(workdir: str, pairs, info, input_config: pipeline.InputConfig,
               mix_config: mix_lib.MixConfig, config: TuneConfig,
               loop: training.LoopConfig, strategy: Optional[tf.distribute.Strategy] = None
               ) -> dict:
    """Trains M&M on (pairs, info) into `workdir`, resuming if it holds checkpoints.

    Writes `workdir/backbone.weights.h5` (the tuned backbone for segmentation) and
    `workdir/summary.json`; returns the summary dict.
    """
    config.validate()
    # The gather-based crop exists for XLA (no CropAndResize kernel); in graph mode the
    # TF op is ~4x faster (measured), so the crop follows the compile mode.
    mix_config = dataclasses.replace(mix_config, use_gather_resize=config.jit_compile)
    strategy = strategy or tf.distribute.get_strategy()
    os.makedirs(workdir, exist_ok=True)
    if config.input_mode != input_config.input_mode:
        raise ConfigError(f"input_mode mismatch: model {config.input_mode!r} vs data "
                         f"{input_config.input_mode!r}")
    with strategy.scope():
        tuner = MMTuner(build_backbone_from(config), mix_config,
                        triplet_mode=config.triplet_mode, margin=config.margin,
                        weight_decay=config.weight_decay, seed=config.seed)
        tuner.compile(optimizer=training.make_sgd(config.learning_rate,
                                                  config.lr_boundaries, config.lr_decay,
                                                  config.momentum),
                      jit_compile=config.jit_compile)

    def make_dataset(start_step):
        # A resumed run re-seeds its data order from the step it resumes at, so it does
        # not replay the batches of the first run.
        resumed = dataclasses.replace(input_config, seed=input_config.seed + start_step)
        return pipeline.train_dataset(pairs, info, resumed)

    preview = next(iter(pipeline.train_dataset(pairs, info, input_config)))
    preview_images = preview[common.IMAGE]
    preview_labels = preview[common.LABEL]

    def write_patch_grid(step):
        patches = tuner.mix(preview_images, preview_labels, tuner.step_seeds(step)[0])
        grid = summaries.patch_grid(patches.patches, patches.labels, patches.valid,
                                    info.palette, config.input_mode)
        tf.summary.image("mix/patches", grid)

    started = time.time()
    result = training.fit_resumable(tuner, make_dataset, workdir, loop,
                                    image_fn=write_patch_grid, scalar_names=SCALAR_NAMES)
    weights_path = os.path.join(workdir, "backbone.weights.h5")
    weights_lib.save_backbone_weights(tuner.backbone, weights_path)
    global_batch = input_config.batch_size
    summary = {
        "stage": "mm_tuning",
        "steps": result["steps"],
        "resumed_from_step": result["start_step"],
        "seconds": time.time() - started,
        "metrics": result["logs"],
        "graph_nodes": global_batch * mix_config.patches_per_image,
        "global_batch_size": global_batch,
        "patches_per_image": mix_config.patches_per_image,
        "backbone_weights": weights_path,
        "config": {"tune": dataclasses.asdict(config), "mix": dataclasses.asdict(mix_config),
                   "input": dataclasses.asdict(input_config),
                   "loop": dataclasses.asdict(loop), "dataset": info.name},
    }
    files.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    return summary
