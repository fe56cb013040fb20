"""Jigsaw puzzles (Noroozi & Favaro 2016) as a proxy task, in one compiled Keras step.

A puzzle, built in graph mode on a batch of crops (`make_puzzles`):
* the training crop (225 x 225 by default, `--crop_size`) is split into a 3 x 3 grid of
  cells (75 x 75); from each cell a tile (64 x 64) is cut at a random offset, so that
  tiles do not share edges the network could match;
* each colour channel of a tile is cut `channel_jitter` (2) pixels or less away from the
  tile's offset, independently per channel: spatially jittered colour channels keep the
  network from locating a tile by chromatic aberration;
* each tile is normalised on its own to zero mean and a fixed standard deviation over
  its pixels and channels, so that tiles cannot be matched by their brightness or
  contrast. The fixed value, `TILE_STD` = 58 (ImageNet's pixel standard deviation on the
  0..255 scale), gives the trunk inputs of the scale of the `rgb` input mode the
  backbone later receives in M&M tuning and segmentation;
* the 9 tiles are shuffled by one of P permutations (`mm_tf.proxy.permutations`) drawn
  uniformly per image: position i of the puzzle receives the tile of cell
  `permutation[i]` (`shuffle_tiles`, a `tf.gather`); the permutation's index is the
  label.

The network (Noroozi & Favaro's context-free network): a shared-weight trunk (the
backbone up to pool5, AlexNet-BN by default) applied to all B x 9 tiles at once; each
tile's pool5 map flattened (2 x 2 x 256 = 1024 values for a 64 x 64 tile at width 1,
the size of their per-tile fc6); the 9 vectors concatenated in puzzle order; then fc7
(Dense 4096 x width + ReLU + dropout) and fc8 (Dense P), a softmax over permutations.
Only the trunk (conv1 .. pool5) is trained; the backbone's own fc6/fc7 do not take part
and keep their initialisation in the saved weights (M&M tunes up to pool5 only).

Randomness is stateless: step s uses the seed (seed, s), so a resumed run continues
the same stream of puzzles.

Example:
    perms = permutations.select_permutations(100, seed=0)
    model = JigsawModel(backbones.build_backbone("alexnet", width=0.125), perms,
                        PuzzleConfig(crop_size=96, tile_size=24))
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    model.fit(dataset_with_raw_images, steps_per_epoch=10, epochs=1)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from mm_tf import common
from mm_tf import training
from mm_tf.data import pipeline
from mm_tf.errors import ConfigError
from mm_tf.models import backbones
from mm_tf.proxy import permutations as permutations_lib

GRID = 3
NUM_TILES = GRID * GRID
TILE_STD = 58.0
# Noroozi & Favaro's tile / cell ratio (64 px tiles in 75 px cells).
TILE_FRACTION = 64.0 / 75.0
# Added to a tile's variance (pixel^2) so that a flat tile maps to zeros, not to NaN.
_VARIANCE_FLOOR = 1.0

SCALAR_NAMES = {
    "loss": "losses/total",
    "cross_entropy": "losses/cross_entropy",
    "weight_decay": "losses/weight_decay",
    "accuracy": "jigsaw/accuracy",
}


@dataclasses.dataclass(frozen=True)
class PuzzleConfig:
    """Geometry of a puzzle (defaults: Noroozi & Favaro's 225 / 75 / 64).

    Args:
      crop_size: side S of the square crop the puzzle is cut from (cells: S // 3).
      tile_size: side t of each tile; a tile lies inside its cell.
      channel_jitter: largest spatial shift (pixels) of a colour channel from its tile.
      tile_std: standard deviation of every normalised tile.
    """

    crop_size: int = 225
    tile_size: int = 64
    channel_jitter: int = 2
    tile_std: float = TILE_STD

    @property
    def cell_size(self) -> int:
        """Side of a grid cell (the crop's remainder pixels, if any, are never used)."""
        return self.crop_size // GRID

    def validate(self) -> None:
        """Raises ConfigError unless a jittered tile always fits in its cell."""
        if self.tile_size < 1 or self.channel_jitter < 0:
            raise ConfigError(f"--tile_size must be >= 1 and --channel_jitter >= 0, got "
                              f"{self.tile_size}, {self.channel_jitter}")
        if self.cell_size - self.tile_size < 2 * self.channel_jitter:
            raise ConfigError(
                f"--tile_size={self.tile_size} with --channel_jitter={self.channel_jitter} "
                f"does not fit a cell of --crop_size={self.crop_size} // 3 = "
                f"{self.cell_size} pixels (need tile + 2 x jitter <= cell)")


def auto_tile_size(crop_size: int, channel_jitter: int) -> int:
    """Tile side for a crop: Noroozi & Favaro's 64/75 of a cell (64 for a 225 crop), at
    most cell - 2 x jitter so that jittered channels stay in the cell."""
    cell = crop_size // GRID
    return max(1, min(int(round(cell * TILE_FRACTION)), cell - 2 * channel_jitter))


# ----------------------------------------------------------------------------------------
# Puzzles: pure graph-mode functions on batches.
# ----------------------------------------------------------------------------------------

def tile_offsets(seed, batch, config: PuzzleConfig) -> tf.Tensor:
    """Top-left (y, x) in the crop of each channel of each tile: int32 [B, 9, 3, 2].

    Stateless in `seed` (int [2]). A tile's offset in its cell is uniform in
    [J, cell - t - J] and each channel adds its own shift in [-J, J] (J the jitter), so
    every channel's window lies inside the tile's cell.
    """
    jitter, slack = config.channel_jitter, config.cell_size - config.tile_size
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), num=2)
    base = tf.random.stateless_uniform([batch, NUM_TILES, 1, 2], seeds[0], minval=jitter,
                                       maxval=slack - jitter + 1, dtype=tf.int32)
    shift = tf.random.stateless_uniform([batch, NUM_TILES, 3, 2], seeds[1], minval=-jitter,
                                        maxval=jitter + 1, dtype=tf.int32)
    cells = np.stack(np.divmod(np.arange(NUM_TILES), GRID), axis=-1) * config.cell_size
    return base + shift + tf.constant(cells.reshape(1, NUM_TILES, 1, 2), tf.int32)


def cut_tiles(images, offsets, tile_size) -> tf.Tensor:
    """Images [B,S,S,3] and per-channel offsets int32 [B,9,3,2] -> float32 [B,9,t,t,3]."""
    images = tf.cast(images, tf.float32)
    steps = tf.range(tile_size)
    rows = offsets[..., 0, tf.newaxis] + steps  # [B,9,3,t]
    cols = offsets[..., 1, tf.newaxis] + steps
    shape = tf.concat([tf.shape(offsets)[:3], [tile_size, tile_size]], axis=0)
    rows = tf.broadcast_to(rows[..., :, tf.newaxis], shape)
    cols = tf.broadcast_to(cols[..., tf.newaxis, :], shape)
    channels = tf.broadcast_to(tf.reshape(tf.range(3), [1, 1, 3, 1, 1]), shape)
    index = tf.stack([rows, cols, channels], axis=-1)  # [B,9,3,t,t,3]: (y, x, c)
    tiles = tf.gather_nd(images, index, batch_dims=1)  # [B,9,3,t,t]
    return tf.transpose(tiles, [0, 1, 3, 4, 2])


def normalize_tiles(tiles, tile_std=TILE_STD) -> tf.Tensor:
    """Tiles [..., t, t, C] -> each tile at zero mean and standard deviation `tile_std`."""
    mean, variance = tf.nn.moments(tiles, axes=[-3, -2, -1], keepdims=True)
    return (tiles - mean) * (tile_std * tf.math.rsqrt(variance + _VARIANCE_FLOOR))


def shuffle_tiles(tiles, permutations, index) -> tf.Tensor:
    """Tiles [B,9,...] in grid order -> puzzles [B,9,...]: position i holds the tile of
    cell permutations[index[b], i]. permutations int [P,9], index int [B]."""
    order = tf.gather(tf.cast(permutations, tf.int32), tf.cast(index, tf.int32))  # [B,9]
    return tf.gather(tiles, order, batch_dims=1)


def unshuffle_tiles(puzzles, permutations, index) -> tf.Tensor:
    """Inverse of `shuffle_tiles`: puzzles [B,9,...] -> tiles [B,9,...] in grid order."""
    order = tf.gather(tf.cast(permutations, tf.int32), tf.cast(index, tf.int32))
    return tf.gather(puzzles, tf.argsort(order, axis=-1), batch_dims=1)


def make_puzzles(images, seed, permutations, config: PuzzleConfig, normalize=True):
    """Crops [B,S,S,3] (uint8 or float 0..255) -> (puzzles float32 [B,9,t,t,3], labels
    int32 [B]): random tiles, jittered channels, per-tile normalisation (unless
    `normalize` is False), shuffled by a uniformly drawn permutation whose index is the
    label. Stateless in `seed` (int [2]); permutations int [P,9]."""
    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), num=2)
    tiles = cut_tiles(images, tile_offsets(seeds[0], batch, config), config.tile_size)
    if normalize:
        tiles = normalize_tiles(tiles, config.tile_std)
    num_permutations = tf.shape(permutations)[0]
    labels = tf.random.stateless_uniform([batch], seeds[1], minval=0,
                                         maxval=num_permutations, dtype=tf.int32)
    return shuffle_tiles(tiles, permutations, labels), labels


def puzzle_rows(puzzles, permutations, predicted, tile_std=TILE_STD, max_rows=4,
                border=2) -> np.ndarray:
    """Puzzles [B,9,t,t,3] + predicted indices [B] -> uint8 [1, rows*H, 2*W, 3] where each
    row is the shuffled puzzle | the tiles put back by the predicted permutation."""
    puzzles = tf.convert_to_tensor(puzzles)[:max_rows]
    predicted = tf.convert_to_tensor(predicted)[:max_rows]
    solved = unshuffle_tiles(puzzles, permutations, predicted)

    def board(tiles):
        # +-2 standard deviations -> 0..255: each tile was normalised on its own.
        pixels = np.clip(tiles.numpy() / (4.0 * tile_std) * 255.0 + 127.5, 0, 255)
        count, size = pixels.shape[0], pixels.shape[2]
        cell = size + 2 * border
        out = np.full((count, GRID * cell, GRID * cell, 3), 255, np.uint8)
        for k in range(NUM_TILES):
            r, c = divmod(k, GRID)
            out[:, r * cell + border:r * cell + border + size,
                c * cell + border:c * cell + border + size] = pixels[:, k].astype(np.uint8)
        return out

    rows = np.concatenate([board(puzzles), board(solved)], axis=2)
    return np.concatenate(list(rows), axis=0)[None]


# ----------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------

class JigsawModel(keras.Model):
    """Context-free network: shared trunk per tile -> concatenation -> fc7 -> fc8 (P).

    Args:
      backbone: a functional backbone (`build_backbone`, 3 input channels); its layers up
        to pool5 are the trunk.
      permutations: int [P, 9], the permutation set (P classes).
      puzzle: the `PuzzleConfig` of the tiles.
      fc_units: width of fc7 (paper: 4096).
      dropout: dropout rate after fc7.
      weight_decay: coupled L2 on the trunk's and the fc layers' kernels.
      seed: base seed; step s uses the stateless seed (seed, s).

    Example:
      model = JigsawModel(backbones.build_backbone("alexnet", width=0.125),
                          permutations.select_permutations(10), PuzzleConfig(96, 24),
                          fc_units=64)
      model(tf.zeros([2, 9, 24, 24, 3])).shape  # (2, 10)
    """

    def __init__(self, backbone: keras.Model, permutations, puzzle: PuzzleConfig,
                 fc_units: int = 4096, dropout: float = 0.5, weight_decay: float = 5e-4,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        puzzle.validate()
        self.backbone = backbone
        self.trunk = backbones.pool5_model(backbone)
        self.permutation_table = np.asarray(
            permutations_lib.validate(permutations, NUM_TILES), np.int32)
        self.puzzle = puzzle
        self.fc_units = int(fc_units)
        self.dropout_rate = float(dropout)
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        channels = backbone.input.shape[-1]
        pool5_shape = self.trunk.compute_output_shape(
            (None, puzzle.tile_size, puzzle.tile_size, channels))
        self.tile_features = int(np.prod(pool5_shape[1:]))
        self.fc7 = keras.layers.Dense(self.fc_units, activation="relu",
                                      kernel_initializer="glorot_uniform", name="jigsaw_fc7")
        self.dropout = keras.layers.Dropout(self.dropout_rate)
        self.fc8 = keras.layers.Dense(len(self.permutation_table),
                                      kernel_initializer="glorot_uniform", name="jigsaw_fc8")
        self.fc7.build((None, NUM_TILES * self.tile_features))
        self.fc8.build((None, self.fc_units))
        self._kernels = training.decayed_kernels(self.trunk) + [self.fc7.kernel,
                                                                self.fc8.kernel]
        self._trackers = {name: keras.metrics.Mean(name=name) for name in (
            "loss", "cross_entropy", "weight_decay", "accuracy")}
        self.built = True

    @property
    def metrics(self):
        return list(self._trackers.values())

    @property
    def num_permutations(self) -> int:
        """P, the number of classes."""
        return len(self.permutation_table)

    def call(self, puzzles, training=False):
        """Puzzles [B,9,t,t,C] -> logits over permutations [B,P]."""
        shape = tf.shape(puzzles)
        tiles = tf.reshape(puzzles, tf.concat([[-1], shape[2:]], axis=0))  # [B*9,t,t,C]
        features = self.trunk(tiles, training=training)  # [B*9,h,w,D]
        features = tf.reshape(features, [shape[0], NUM_TILES * self.tile_features])
        hidden = self.dropout(self.fc7(features), training=training)
        return self.fc8(hidden)

    def step_seed(self, step) -> tf.Tensor:
        """Optimizer step -> the stateless puzzle seed int32 [2] of that step."""
        return tf.stack([tf.constant(self.seed, tf.int32), tf.cast(step, tf.int32)])

    def puzzle_terms(self, raw_images, step, training=True):
        """Crops uint8 [B,S,S,3] -> dict(loss, accuracy) of this step's puzzles (scalars)
        and the logits [B,P]; the loss is this replica's, not yet scaled for replicas."""
        puzzles, labels = make_puzzles(raw_images, self.step_seed(step),
                                       self.permutation_table, self.puzzle)
        logits = tf.cast(self(puzzles, training=training), tf.float32)
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)  # [B]
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels),
                          tf.float32)
        return {"loss": tf.reduce_mean(per_example), "accuracy": tf.reduce_mean(correct)}, logits

    def train_step(self, data):
        """Forward -> float32 loss terms -> total -> gradients -> apply -> logs."""
        with tf.GradientTape() as tape:
            terms, _ = self.puzzle_terms(data[common.RAW_IMAGE], self.optimizer.iterations)
            decay = self.weight_decay * training.kernel_l2(self._kernels)
            total = terms["loss"] + decay
            # Keras sums replica gradients; this raw-TF loss is scaled here, once.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = total / tf.cast(replicas, tf.float32)
        # The backbone's fc6/fc7 are not part of the trunk: they get no gradient.
        variables = (self.trunk.trainable_variables + self.fc7.trainable_variables
                     + self.fc8.trainable_variables)
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        values = {"loss": total, "cross_entropy": terms["loss"], "weight_decay": decay,
                  "accuracy": terms["accuracy"]}
        for name, value in values.items():
            self._trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self._trackers.items()}

    def get_config(self):
        config = super().get_config()
        config.update({"puzzle": dataclasses.asdict(self.puzzle),
                       "num_permutations": self.num_permutations, "fc_units": self.fc_units,
                       "dropout": self.dropout_rate, "weight_decay": self.weight_decay,
                       "seed": self.seed})
        return config


# ----------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class JigsawConfig:
    """The jigsaw stage's model and optimisation settings.

    Args:
      backbone: "alexnet" (the paper's) or "vgg16".
      width: channel multiplier of the backbone and of fc7.
      tile_size: side of a tile; 0 = `auto_tile_size` of the input pipeline's crop_size
        (64 for 225, and it follows smaller smoke-test crops).
      channel_jitter: largest spatial shift of a colour channel, pixels.
      num_permutations: P (paper: 1000).
      permutation_criterion: "min" (max-min Hamming) or "sum" (Noroozi's Algorithm 1).
      fc_units: fc7 width; None = 4096 x width (rounded as the backbone's channels).
      dropout: after fc7.
      learning_rate, lr_boundaries, lr_decay, momentum: SGD with a step schedule.
      weight_decay: coupled L2 on kernels.
      seed: seeds the permutation set, the puzzles and (through the input config) data.
      jit_compile: compile the train step with XLA.
    """

    backbone: str = "alexnet"
    width: float = 1.0
    tile_size: int = 0
    channel_jitter: int = 2
    num_permutations: int = 1000
    permutation_criterion: str = "min"
    fc_units: Optional[int] = None
    dropout: float = 0.5
    learning_rate: float = 0.01
    lr_boundaries: tuple = ()
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    jit_compile: bool = False


def run_jigsaw(workdir: str, pairs, info, input_config: pipeline.InputConfig,
               config: JigsawConfig, loop: training.LoopConfig,
               strategy: Optional[tf.distribute.Strategy] = None) -> dict:
    """Trains the jigsaw task on the images of `pairs` into `workdir`, resuming if it holds
    checkpoints. Writes `backbone.weights.h5` (rgb backbone for `--init`),
    `permutations.npy` and `summary.json`; returns the summary dict."""
    strategy = strategy or tf.distribute.get_strategy()
    os.makedirs(workdir, exist_ok=True)
    tile_size = config.tile_size or auto_tile_size(input_config.crop_size,
                                                   config.channel_jitter)
    puzzle = PuzzleConfig(crop_size=input_config.crop_size, tile_size=tile_size,
                          channel_jitter=config.channel_jitter)
    puzzle.validate()
    if config.num_permutations < 2:
        raise ConfigError(f"--num_permutations must be >= 2, got {config.num_permutations}")
    try:
        # Saved before training starts, so a resumed run reuses the same classes.
        perms = permutations_lib.load_or_select(workdir, config.num_permutations,
                                                config.seed, config.permutation_criterion)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fc_units = config.fc_units or backbones.scaled_channels(4096, config.width)
    with strategy.scope():
        keras.utils.set_random_seed(config.seed)  # a rerun starts from the same weights
        backbone = backbones.build_backbone(config.backbone, common.INPUT_RGB, config.width)
        model = JigsawModel(backbone, perms, puzzle, fc_units=fc_units,
                            dropout=config.dropout, weight_decay=config.weight_decay,
                            seed=config.seed)
        model.compile(optimizer=training.make_sgd(config.learning_rate, config.lr_boundaries,
                                                  config.lr_decay, config.momentum),
                      jit_compile=config.jit_compile)

    preview = next(iter(pipeline.train_dataset(pairs, info, input_config,
                                               include_raw_image=True)))[common.RAW_IMAGE]

    def write_puzzles(step):
        puzzles, _ = make_puzzles(preview, model.step_seed(step), model.permutation_table,
                                  puzzle)
        predicted = tf.argmax(model(puzzles, training=False), axis=-1)
        tf.summary.image("jigsaw/puzzle_and_predicted_solution",
                         puzzle_rows(puzzles, model.permutation_table, predicted,
                                     puzzle.tile_std))

    return training.run_backbone_stage(
        model, model.backbone,
        training.resumable_train_data(pairs, info, input_config, include_raw_image=True),
        workdir, loop, stage="jigsaw_pretraining", image_fn=write_puzzles,
        scalar_names=SCALAR_NAMES,
        fields={
            "input_mode": common.INPUT_RGB,
            "permutations": os.path.join(workdir, permutations_lib.FILENAME),
            "num_permutations": int(len(perms)),
            "min_hamming_distance": permutations_lib.min_hamming_distance(perms),
            "mean_hamming_distance": permutations_lib.mean_hamming_distance(perms),
            "trained_layers": "conv1 .. pool5 (the backbone's fc6/fc7 keep their "
                              "initialisation)",
            "config": {"jigsaw": dataclasses.asdict(config),
                       "puzzle": dataclasses.asdict(puzzle),
                       "input": dataclasses.asdict(input_config),
                       "loop": dataclasses.asdict(loop), "dataset": info.name}})
