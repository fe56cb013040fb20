"""M&M tuning: a Keras model whose train_step runs mix -> backbone pool5 -> match ->
triplet loss inside one compiled step, and the run function that trains it resumably.

The paper's stage (b): patches sampled across a batch of target images (mix), a
class-wise connected graph over them (match), and a triplet ranking loss on the
L2-normalised pool5 features of the patches. Only the layers up to pool5 are tuned.

Under a distribution strategy the global batch is split among replicas, and the graph
spans either the whole global batch (`graph_scope="global"`, the default: the paper's
graph over 16 images stays one graph of 144 nodes on any number of devices) or each
replica's images (`"replica"`: R graphs of N/R nodes). In global mode every replica mixes
its own images and computes their pool5 features, then `all_gather`s the patch labels,
valid flags and float32 features, builds the same graph over all N nodes (the match seed
is the same on every replica) and differentiates the loss of its own anchors only.

The scaling, derived once. Let R replicas hold n = N / R nodes each, h_a the hinge term
of anchor a, C the number of valid triplets of the global graph, and L = (1/C) sum_a h_a
the objective. Replica r differentiates its share l_r = (1/C) sum_{a in r} h_a, so
sum_r l_r = L. Its features x_r reach the gathered X = [x_1; ...; x_R] on every replica;
the gradient of all_gather sums the incoming gradients of X over replicas and keeps the
local rows, so replica r receives sum_r' dl_r'/dx_r = dL/dx_r and its backbone gradient
is g_r = dL/dx_r * dx_r/dtheta. Keras sums the replicas' gradients (optimizer.apply
all-reduces with SUM): sum_r g_r = dL/dtheta, the gradient of the mean over all global
anchors. So the triplet share is NOT divided by R. The weight decay D(theta) is the same
on every replica and is divided by R once. In replica mode replica r's graph has its own
mean L_r and the objective is (1/R) sum_r L_r + D: each replica differentiates
(L_r + D) / R. With one replica both modes are the single-device step.

Randomness under replicas: image i of the global batch (replica r holds i in
[r*b, (r+1)*b)) is mixed with row i of the step's mix stream, so patches do not depend on
the replica count (and replicas never reuse each other's draws). The global graph uses
the step's match seed on every replica (the graph must be identical); replica graphs
fold the replica id into it, so equal node positions do not get correlated draws.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from mm_tf import common
from mm_tf import distribute
from mm_tf import hooks as hooks_lib
from mm_tf.errors import ConfigError
from mm_tf import losses
from mm_tf import match as match_lib
from mm_tf import mix as mix_lib
from mm_tf import probe as probe_lib
from mm_tf import summaries
from mm_tf import training
from mm_tf.data import augment
from mm_tf.data import pipeline
from mm_tf.models import backbones
from mm_tf.models import weights as weights_lib

# Keras log key -> TensorBoard tag (style: losses/<term>, so runs compare in one board).
SCALAR_NAMES = {
    "loss": "losses/total",
    "triplet_loss": "losses/triplet",
    "supcon_loss": "losses/supcon",
    "soft_triplet_loss": "losses/soft_triplet",
    "weight_decay": "losses/weight_decay",
    "active_fraction": "triplets/active_fraction",
    "d_ap": "triplets/d_ap",
    "d_an": "triplets/d_an",
    "num_classes": "mix/classes_per_batch",
    "valid_patches": "mix/valid_patches",
}

GLOBAL = "global"
REPLICA = "replica"
GRAPH_SCOPES = (GLOBAL, REPLICA)


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
      jit_compile: compile the train step with XLA (under several replicas: each
        replica's computation between the collectives, see `MMTuner`).
      graph_scope: "global" (one graph over the global batch) or "replica" (one graph
        per replica's share of it); equal with one replica.
      precision: "float32", "mixed_bfloat16" or "mixed_float16" (Keras dtype policy of
        the backbone; distances and losses stay float32).
      loss: "triplet" (the paper: the graph's triplets), "supcon" (supervised
        contrastive over all the graph's nodes, same class = positive; beyond the paper)
        or "soft_triplet" (softplus of the selected triplets' distance gap over 2 tau;
        beyond the paper). The triplet statistics (active_fraction, d_ap, d_an) are
        logged either way.
      temperature: tau of SupCon and of the soft triplet loss.
      color_jitter: strength s of per-patch photometric jitter of the mixed patches
        (`mm_tf.data.augment.photometric_jitter`; 0 = none, the paper).
      random_grey: probability that a patch is turned grey (RGB input; 0 = never).
      frozen_layers: conv units or blocks kept at `init` during M&M
        (`mm_tf.models.backbones.freeze_units`; () = every layer up to pool5 is tuned,
        the paper).
      blend_start: fraction lambda of the stage's start in the backbone it writes:
        lambda * W_start + (1 - lambda) * W_tuned for every variable (weight-space
        ensembling, WiSE-FT, Wortsman et al. 2022; beyond the paper). 0 = the tuned
        weights (the paper); W_start is the stage's `movement_reference.npz`; summary.json
        keeps `movement` of the tuned weights and adds `written_movement`.
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
    graph_scope: str = GLOBAL
    precision: str = training.FLOAT32
    loss: str = losses.TRIPLET
    temperature: float = losses.TEMPERATURE
    color_jitter: float = 0.0
    random_grey: float = 0.0
    frozen_layers: tuple = ()
    blend_start: float = 0.0

    def validate(self) -> None:
        """Raises ConfigError naming the flag when a value cannot work."""
        if self.loss not in losses.LOSSES:
            raise ConfigError(f"--loss={self.loss}: expected one of {losses.LOSSES}")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature={self.temperature}: expected > 0")
        if self.color_jitter < 0:
            raise ConfigError(f"--color_jitter={self.color_jitter}: expected >= 0")
        if not 0 <= self.random_grey <= 1:
            raise ConfigError(f"--random_grey={self.random_grey}: expected a probability "
                              "in [0, 1]")
        if not 0 <= self.blend_start < 1:
            raise ConfigError(f"--blend_start={self.blend_start}: expected a fraction in "
                              "[0, 1)")
        if self.graph_scope not in GRAPH_SCOPES:
            raise ConfigError(f"--graph_scope={self.graph_scope}: expected one of "
                              f"{GRAPH_SCOPES}")
        training.check_precision(self.precision)
        if self.input_mode not in common.INPUT_MODES:
            raise ConfigError(f"--input_mode={self.input_mode}: expected one of "
                              f"{common.INPUT_MODES}")
        if self.triplet_mode not in match_lib.MODES:
            raise ConfigError(f"--triplet_mode={self.triplet_mode}: expected one of "
                              f"{match_lib.MODES}")
        if self.init != "random" and not os.path.isfile(self.init):
            raise ConfigError(f"--init={self.init}: no such weights file (expected "
                              "'random' or a backbone .weights.h5/.npz file)")


class MMTuner(distribute.StrategyFitMixin, keras.Model):
    """Mix-and-match tuning of a backbone's layers up to pool5.

    Args:
      backbone: a functional backbone from `mm_tf.models.backbones.build_backbone`.
      mix_config: `mm_tf.mix.MixConfig` (patches per image, sizes, background share).
      triplet_mode: "graph", "random" or "graph_semihard".
      margin: triplet margin (2.1 in the paper).
      weight_decay: coupled L2 coefficient on the tuned conv kernels.
      seed: base seed; step s uses the stateless seed (seed, s).
      graph_scope: "global" (one graph over all replicas' patches) or "replica"; see
        the module docstring for the loss scaling of each.
      compile_replica_step: compile each replica's computation with XLA in two parts
        around the all_gather (mix + backbone, then match + loss), for strategies under
        which Keras' `compile(jit_compile=True)` cannot work
        (`mm_tf.distribute.keras_can_jit`). The mix must then use the gather crop.
      loss, temperature: "triplet" (paper), "supcon" or "soft_triplet" with its
        temperature (`mm_tf.losses`).
      color_jitter, random_grey, input_mode: per-patch photometric jitter of the mixed
        patches (0, 0: none) and the input mode it undoes and redoes normalisation in.

    Example:
      >>> backbone = backbones.build_backbone("vgg16", width=0.125)
      >>> tuner = MMTuner(backbone, mix_lib.MixConfig(patch_size=32, min_side=16,
      ...                 max_side=32, patches_per_image=4))
      >>> tuner.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
      >>> tuner.fit(dataset, steps_per_epoch=10, epochs=1)
    """

    def __init__(self, backbone: keras.Model, mix_config: mix_lib.MixConfig,
                 triplet_mode: str = "graph", margin: float = losses.MARGIN,
                 weight_decay: float = 5e-4, seed: int = 0, graph_scope: str = GLOBAL,
                 compile_replica_step: bool = False, loss: str = losses.TRIPLET,
                 temperature: float = losses.TEMPERATURE, color_jitter: float = 0.0,
                 random_grey: float = 0.0, input_mode: str = common.INPUT_RGB, **kwargs):
        super().__init__(**kwargs)
        if graph_scope not in GRAPH_SCOPES:
            raise ValueError(f"graph_scope must be one of {GRAPH_SCOPES}, got {graph_scope!r}")
        self.backbone = backbone
        self.features = backbones.pool5_model(backbone)
        self.mix = mix_lib.Mix(mix_config)
        self.match = match_lib.TripletGraph(mode=triplet_mode)
        self.mix_config = mix_config
        self.triplet_mode = triplet_mode
        self.margin = float(margin)
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        self.graph_scope = graph_scope
        self.compile_replica_step = bool(compile_replica_step)
        if loss not in losses.LOSSES:
            raise ValueError(f"loss must be one of {losses.LOSSES}, got {loss!r}")
        self.loss_name = loss
        self.temperature = float(temperature)
        self.color_jitter = float(color_jitter)
        self.random_grey = float(random_grey)
        self.input_mode = input_mode
        self._kernels = training.decayed_kernels(self.features)
        self._trackers = {name: keras.metrics.Mean(name=name) for name in (
            "loss", "triplet_loss", "weight_decay", "active_fraction", "d_ap", "d_an",
            "num_classes", "valid_patches") + (
                () if loss == losses.TRIPLET else (f"{loss}_loss",))}
        if self.compile_replica_step:
            self._embed_step = tf.function(self.embed, jit_compile=True)
            self._graph_step = tf.function(self.graph_terms, jit_compile=True)
        else:
            self._embed_step, self._graph_step = self.embed, self.graph_terms
        # Every weight exists now (the backbone is functional); fit need not build.
        self.built = True

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

    def embed(self, images, labels, mix_seed, image_offset, total_images, training=True):
        """Mix + backbone on one replica's images [b,H,W,C], labels [b,H,W] (images
        [image_offset, image_offset + b) of a global batch of total_images) ->
        (Patches with n = b*K, pool5 features float32 [n,s,s,D])."""
        patches = self.jitter(self.mix(images, labels, mix_seed, image_offset=image_offset,
                                       total_images=total_images), mix_seed, image_offset)
        features = self.features(patches.patches, training=training)
        # Distances and the margin live in float32 whatever the compute dtype.
        return patches, tf.cast(features, tf.float32)

    def jitter(self, patches, mix_seed, image_offset=0):
        """Patches -> the same with photometric jitter of every patch (none when both
        strengths are 0); draws depend on the step's mix seed and the replica's first
        image, so replicas never share draws."""
        if self.color_jitter <= 0 and self.random_grey <= 0:
            return patches
        seed = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(mix_seed, _JITTER_SALT),
            tf.cast(image_offset, tf.int32))
        return patches._replace(patches=augment.photometric_jitter(
            patches.patches, seed, self.color_jitter, self.random_grey, self.input_mode))

    def graph_terms(self, features, labels, valid, match_seed, first_anchor, num_anchors):
        """Match + triplet loss over a graph: features float32 [N,...], patch labels [N],
        valid [N], seed int32 [2] -> dict of float32 scalars: the graph's loss,
        active_fraction, d_ap, d_an, num_classes, valid_patches, and anchor_share (the
        hinge terms of anchors [first_anchor, first_anchor + num_anchors) over the
        graph's valid count; see `losses.triplet_loss`)."""
        embeddings = features if self.triplet_mode == match_lib.GRAPH_SEMIHARD else None
        indices, mask = self.match(labels, valid, match_seed, embeddings=embeddings)
        terms = dict(losses.triplet_loss(features, indices, mask, margin=self.margin,
                                         anchors=(first_anchor, num_anchors)))
        if self.loss_name != losses.TRIPLET:
            # The graph's triplet statistics stay as monitors; the objective is the loss's.
            terms["triplet_loss"] = terms["loss"]
            if self.loss_name == losses.SUPCON:
                terms.update(losses.supcon_loss(features, labels, valid, self.temperature,
                                                anchors=(first_anchor, num_anchors)))
            else:
                terms.update(losses.soft_triplet_loss(features, indices, mask,
                                                      self.temperature,
                                                      anchors=(first_anchor, num_anchors)))
        terms["num_classes"] = _count_classes(labels, valid)
        terms["valid_patches"] = tf.reduce_sum(tf.cast(valid, tf.float32))
        return terms

    def mm_terms(self, images, labels, step, training=True):
        """One M&M forward of this replica: images [b,H,W,C], labels [b,H,W] -> (terms,
        Patches of this replica). terms: float32 scalars `loss` (the triplet loss of the
        graph: the global one, or this replica's), active_fraction, d_ap, d_an,
        num_classes, valid_patches (over the graph's nodes) and `objective`: this
        replica's part of the triplet objective, already scaled so that the replicas'
        gradients sum to the objective's gradient (module docstring)."""
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync
        replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
        mix_seed, match_seed = self.step_seeds(step)
        local_images = tf.shape(images)[0]
        patches, features = self._embed_step(images, labels, mix_seed,
                                             replica * local_images,
                                             replicas * local_images, training)
        local_nodes = tf.shape(features)[0]
        if self.graph_scope == GLOBAL:
            # Every replica gathers the same three tensors in the same order; rows are
            # in replica order, so node i of replica r is global node r * n + i.
            graph_features = context.all_gather(features, axis=0)
            graph_labels = context.all_gather(patches.labels, axis=0)
            graph_valid = context.all_gather(tf.cast(patches.valid, tf.int32), axis=0) > 0
            terms = self._graph_step(graph_features, graph_labels, graph_valid, match_seed,
                                     replica * local_nodes, local_nodes)
            terms["objective"] = terms.pop("anchor_share")
        else:
            if replicas > 1:
                match_seed = tf.random.experimental.stateless_fold_in(match_seed, replica)
            terms = self._graph_step(features, patches.labels, patches.valid, match_seed,
                                     0, local_nodes)
            del terms["anchor_share"]
            terms["objective"] = terms["loss"] / float(replicas)
        return terms, patches

    def train_step(self, data):
        """Forward -> float32 loss terms -> total -> gradients -> apply -> logs."""
        images, labels = data[common.IMAGE], data[common.LABEL]
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        with tf.GradientTape() as tape:
            terms, _ = self.mm_terms(images, labels, self.optimizer.iterations)
            decay = self.weight_decay * training.kernel_l2(self._kernels)
            total = terms["loss"] + decay
            # Keras sums the replicas' gradients: the triplet part is already this
            # replica's share (mm_terms); the decay, equal on every replica, is divided
            # here, once. scale_loss multiplies by the float16 loss scale, if any.
            objective = terms["objective"] + decay / float(replicas)
            scaled = self.optimizer.scale_loss(objective)
        variables = self.features.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        values = {"loss": total, "triplet_loss": terms.get("triplet_loss", terms["loss"]),
                  "weight_decay": decay,
                  "active_fraction": terms["active_fraction"], "d_ap": terms["d_ap"],
                  "d_an": terms["d_an"], "num_classes": terms["num_classes"],
                  "valid_patches": terms["valid_patches"]}
        if self.loss_name != losses.TRIPLET:
            values[f"{self.loss_name}_loss"] = terms["loss"]
        for name, value in values.items():
            self._trackers[name].update_state(value)
        return self.fit_logs({name: tracker.result()
                              for name, tracker in self._trackers.items()})

    def get_config(self):
        config = super().get_config()
        config.update({"mix_config": dataclasses.asdict(self.mix_config),
                       "triplet_mode": self.triplet_mode, "margin": self.margin,
                       "weight_decay": self.weight_decay, "seed": self.seed,
                       "graph_scope": self.graph_scope,
                       "compile_replica_step": self.compile_replica_step,
                       "loss": self.loss_name, "temperature": self.temperature,
                       "color_jitter": self.color_jitter, "random_grey": self.random_grey,
                       "input_mode": self.input_mode})
        return config


# Folded into the mix seed for the jitter draws, so they differ from the mix's own.
_JITTER_SALT = 0x717


def _count_classes(labels, valid):
    """Patch labels [N] + valid [N] -> float32 scalar: distinct classes among valid ones."""
    ids = tf.where(valid, tf.cast(labels, tf.int32), -1)
    present = tf.reduce_any(tf.equal(ids[:, None], tf.range(256)[None, :]), axis=0)
    return tf.reduce_sum(tf.cast(present, tf.float32))


def build_backbone_from(config: TuneConfig) -> keras.Model:
    """Builds the backbone of `config` and loads `config.init` weights unless random; a
    random init is drawn after seeding Keras with `config.seed`, so the starting point of
    a run can be rebuilt (the "before M&M" figures do)."""
    if config.init == "random":
        keras.utils.set_random_seed(config.seed)
    backbone = backbones.build_backbone(config.backbone, input_mode=config.input_mode,
                                        width=config.width)
    if config.init != "random":
        weights_lib.load_backbone_weights(backbone, config.init)
    return backbone


def run_tuning(workdir: str, pairs, info, input_config: pipeline.InputConfig,
               mix_config: mix_lib.MixConfig, config: TuneConfig,
               loop: training.LoopConfig, strategy: Optional[tf.distribute.Strategy] = None,
               probe: Optional[probe_lib.ProbeConfig] = None, probe_pairs=None) -> dict:
    """Trains M&M on (pairs, info) into `workdir`, resuming if it holds checkpoints.

    `input_config.batch_size` is the global batch: under `strategy` each of its R
    replicas gets batch_size / R images (ConfigError naming --batch_size otherwise).
    Model, optimizer and the checkpoint restore are created in the strategy's scope,
    under the Keras dtype policy `config.precision`.

    Writes `workdir/backbone.weights.h5` (the tuned backbone for segmentation) and
    `workdir/summary.json` (in multi-worker training: the chief only); returns the
    summary dict. With `probe` enabled, the online probe (`mm_tf.probe`) embeds fixed
    patch banks of `pairs` and of `probe_pairs` (the held-out split) during training.
    """
    config.validate()
    probe = probe or probe_lib.ProbeConfig()
    probe.validate(loop.log_every)
    # The gather-based crop exists for XLA (no CropAndResize kernel); in graph mode the
    # TF op is ~4x faster (measured), so the crop follows the compile mode.
    mix_config = dataclasses.replace(mix_config, use_gather_resize=config.jit_compile)
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    per_replica = distribute.per_replica_batch(input_config.batch_size, strategy)
    if not info.has_labels:
        raise ConfigError(f"--dataset={info.name} has no labels; M&M tuning needs labelled "
                          "images (image-only data serves the proxy tasks)")
    os.makedirs(workdir, exist_ok=True)
    if config.input_mode != input_config.input_mode:
        raise ConfigError(f"input_mode mismatch: model {config.input_mode!r} vs data "
                         f"{input_config.input_mode!r}")
    keras_jit = config.jit_compile and distribute.keras_can_jit(strategy)
    with training.precision_policy(config.precision), strategy.scope():
        backbone = build_backbone_from(config)
        try:
            # Before the tuner: it collects the trainable kernels for weight decay.
            frozen = backbones.freeze_units(backbone, config.frozen_layers)
        except ValueError as e:
            raise ConfigError(f"--frozen_layers={','.join(config.frozen_layers)}: {e}") from e
        tuner = MMTuner(backbone, mix_config,
                        triplet_mode=config.triplet_mode, margin=config.margin,
                        weight_decay=config.weight_decay, seed=config.seed,
                        graph_scope=config.graph_scope,
                        compile_replica_step=config.jit_compile and not keras_jit,
                        loss=config.loss, temperature=config.temperature,
                        color_jitter=config.color_jitter, random_grey=config.random_grey,
                        input_mode=config.input_mode)
        optimizer = training.make_sgd(config.learning_rate, config.lr_boundaries,
                                      config.lr_decay, config.momentum)
        tuner.compile(optimizer=training.optimizer_for_precision(optimizer, config.precision),
                      jit_compile=keras_jit)

    preview = next(iter(pipeline.train_dataset(pairs, info, input_config)))
    preview_images = preview[common.IMAGE]
    preview_labels = preview[common.LABEL]

    def write_patch_grid(step):
        mix_seed = tuner.step_seeds(step)[0]
        # The grid shows what the backbone sees: the patches after any jitter.
        patches = tuner.jitter(tuner.mix(preview_images, preview_labels, mix_seed), mix_seed)
        grid = summaries.patch_grid(patches.patches, patches.labels, patches.valid,
                                    info.palette, config.input_mode)
        tf.summary.image("mix/patches", grid)

    def blend_with_start():
        if config.blend_start == 0:
            return {}
        reference = os.path.join(workdir, hooks_lib.MOVEMENT_REFERENCE)
        if not os.path.isfile(reference):
            raise ConfigError(f"--blend_start={config.blend_start}: {reference} (the "
                              "stage's start weights) is missing; it is written when a "
                              "run starts at step 0")
        weights_lib.blend_with_weights(tuner.backbone, reference, config.blend_start)
        # `movement` stays the tuned weights'; this is what the next stage starts from.
        kernels = {n: v.numpy() for n, v in hooks_lib.backbone_kernels(tuner.backbone).items()}
        with np.load(reference, allow_pickle=False) as start:
            written = hooks_lib.relative_movement(
                kernels, {n: start[f"{n}/kernel"] for n in kernels})
        return {"blend_start": config.blend_start, "written_movement": written}

    global_batch = input_config.batch_size
    graph_images = global_batch if config.graph_scope == GLOBAL else per_replica
    return training.run_backbone_stage(
        tuner, tuner.backbone, training.resumable_train_data(pairs, info, input_config),
        workdir, loop, stage="mm_tuning", image_fn=write_patch_grid,
        scalar_names=SCALAR_NAMES,
        hooks=probe_hooks(tuner, pairs, probe_pairs, info, input_config, mix_config, probe,
                          loop.steps),
        finalize=blend_with_start,
        fields={
            # Nodes of one graph: the global batch's patches, or one replica's.
            "graph_nodes": graph_images * mix_config.patches_per_image,
            "graph_scope": config.graph_scope,
            "global_batch_size": global_batch,
            "per_replica_batch_size": per_replica,
            "num_replicas": replicas,
            "strategy": distribute.strategy_kind(strategy),
            "precision": config.precision,
            "frozen_units": frozen,
            "patches_per_image": mix_config.patches_per_image,
            "config": {"tune": dataclasses.asdict(config),
                       "mix": dataclasses.asdict(mix_config),
                       "input": dataclasses.asdict(input_config),
                       "loop": dataclasses.asdict(loop),
                       "probe": dataclasses.asdict(probe), "dataset": info.name}})


# ----------------------------------------------------------------------------------------
# The online probe of the M&M stage (mm_tf/probe.py), outside the compiled step.
# ----------------------------------------------------------------------------------------

def probe_hooks(tuner: MMTuner, pairs, probe_pairs, info, input_config: pipeline.InputConfig,
                mix_config: mix_lib.MixConfig, probe: probe_lib.ProbeConfig,
                steps: int) -> list:
    """[] when the probe is off, else [a ProbeHook over banks of `pairs` (train) and
    `probe_pairs` (the probe split) embedded by the tuner's pool5 model]."""
    if not probe.enabled:
        return []
    if not probe_pairs:
        raise ConfigError(f"--probe_split={probe.split}: no images to probe (or set "
                          "--probe_every=0)")
    bank = probe_lib.make_probe(pairs, probe_pairs, info, input_config, mix_config, probe)
    return [probe_lib.ProbeHook(bank, tuner.features, tuner.backbone, probe, steps)]
