"""mm_tf.proxy.jigsaw: tiles land where the permutation says (eagerly and in tf.function),
channel jitter stays inside the cell, per-tile normalisation, the model's shapes, and a
few seeded steps on the demo data lower the puzzle loss."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf.data import datasets, pipeline, synthetic
from mm_tf.models import backbones
from mm_tf.proxy import jigsaw, permutations

PUZZLE = jigsaw.PuzzleConfig(crop_size=96, tile_size=24, channel_jitter=2)


def _numbered_cells(batch=3, crop=96):
    """uint8 [B,crop,crop,3] whose 3x3 cells hold the constant 10 * k + 5 (k row-major)."""
    cell = crop // 3
    image = np.zeros((batch, crop, crop, 3), np.uint8)
    for k in range(9):
        r, c = divmod(k, 3)
        image[:, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 10 * k + 5
    return image


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_tiles_land_where_the_permutation_says(compiled):
    perms = permutations.select_permutations(30, seed=0)
    def make(images, seed, table):
        return jigsaw.make_puzzles(images, seed, table, PUZZLE, normalize=False)

    make = tf.function(make) if compiled else make
    puzzles, labels = make(tf.constant(_numbered_cells()), tf.constant([4, 2]),
                           tf.constant(perms))
    puzzles, labels = puzzles.numpy(), labels.numpy()
    assert puzzles.shape == (3, 9, 24, 24, 3) and labels.shape == (3,)
    for b in range(3):
        for position in range(9):
            tile = puzzles[b, position]
            # Each tile (every channel, jitter included) lies inside one cell: constant.
            assert tile.min() == tile.max() == 10 * perms[labels[b], position] + 5


def test_channel_jitter_moves_channels_within_the_cell():
    offsets = jigsaw.tile_offsets(tf.constant([1, 2]), 64, PUZZLE).numpy()  # [B,9,3,2]
    cell, tile, jitter = PUZZLE.cell_size, PUZZLE.tile_size, PUZZLE.channel_jitter
    grid = np.stack(np.divmod(np.arange(9), 3), -1)[None, :, None, :] * cell
    inside = offsets - grid
    assert inside.min() >= 0 and inside.max() <= cell - tile
    spread = offsets.max(axis=2) - offsets.min(axis=2)  # Across the 3 channels.
    assert spread.max() <= 2 * jitter and spread.max() > 0
    # The cut reads exactly those windows: an image whose value is its column index.
    columns = np.broadcast_to(np.arange(96, dtype=np.float32)[None, None, :, None],
                              (64, 96, 96, 3))
    tiles = jigsaw.cut_tiles(tf.constant(columns), tf.constant(offsets), tile).numpy()
    np.testing.assert_array_equal(tiles[:, :, 0, 0, :], offsets[..., 1])


def test_tiles_are_normalised_one_by_one():
    rng = np.random.default_rng(0)
    tiles = rng.uniform(0, 255, (2, 9, 8, 8, 3)) * rng.uniform(0.1, 1, (2, 9, 1, 1, 1))
    out = jigsaw.normalize_tiles(tf.constant(tiles, tf.float32)).numpy()
    np.testing.assert_allclose(out.mean(axis=(2, 3, 4)), 0.0, atol=1e-3)
    np.testing.assert_allclose(out.std(axis=(2, 3, 4)), jigsaw.TILE_STD, rtol=1e-2)
    flat = jigsaw.normalize_tiles(tf.fill([1, 9, 8, 8, 3], 7.0)).numpy()
    assert np.isfinite(flat).all() and np.abs(flat).max() == 0.0


def test_unshuffle_inverts_shuffle_and_labels_cover_the_set():
    perms = permutations.select_permutations(10, seed=1)
    tiles = tf.reshape(tf.range(4 * 9), [4, 9])
    index = tf.constant([0, 3, 9, 5])
    shuffled = jigsaw.shuffle_tiles(tiles, perms, index)
    np.testing.assert_array_equal(shuffled.numpy()[1], tiles.numpy()[1][perms[3]])
    np.testing.assert_array_equal(jigsaw.unshuffle_tiles(shuffled, perms, index), tiles)
    _, labels = jigsaw.make_puzzles(tf.zeros([500, 96, 96, 3], tf.uint8), tf.constant([0, 1]),
                                    perms, PUZZLE)
    assert set(labels.numpy().tolist()) == set(range(10))


def test_config_rejects_tiles_that_do_not_fit():
    with pytest.raises(ValueError, match="--tile_size=30"):
        jigsaw.PuzzleConfig(crop_size=96, tile_size=30, channel_jitter=2).validate()


def _model(num_permutations=12, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = backbones.build_backbone("alexnet", width=0.125)
    model = jigsaw.JigsawModel(backbone, permutations.select_permutations(num_permutations),
                               PUZZLE, fc_units=64, dropout=0.0, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    return model


def test_model_shapes_and_puzzle_rows():
    model = _model()
    assert model.tile_features == 1 * 1 * backbones.endpoint_channels("alexnet", 0.125)["pool5"]
    logits = model(tf.zeros([2, 9, 24, 24, 3]))
    assert logits.shape == (2, 12)
    puzzles, _ = jigsaw.make_puzzles(_numbered_cells(2), tf.constant([0, 0]),
                                     model.permutation_table, PUZZLE)
    rows = jigsaw.puzzle_rows(puzzles, model.permutation_table, tf.constant([0, 1]))
    assert rows.shape == (1, 2 * 3 * 28, 2 * 3 * 28, 3) and rows.dtype == np.uint8


def test_seeded_steps_lower_the_puzzle_loss_on_demo_data(tmp_path):
    root = synthetic.generate_demo_dataset(tmp_path / "demo", num_train=8, num_val=0)
    pairs, info = datasets.read_dataset("demo", root, "train")
    config = pipeline.InputConfig(crop_size=96, batch_size=8, min_scale=1.0, max_scale=1.0,
                                  flip=False)
    batch = next(iter(pipeline.train_dataset(pairs, info, config, include_raw_image=True)))
    model = _model()
    step = tf.function(model.train_step)
    before, _ = model.puzzle_terms(batch[common.RAW_IMAGE], tf.constant(0))
    for _ in range(12):
        logs = step(batch)
    after, _ = model.puzzle_terms(batch[common.RAW_IMAGE], tf.constant(0))
    assert float(after["loss"]) < float(before["loss"])
    assert int(model.optimizer.iterations) == 12
    np.testing.assert_allclose(float(logs["loss"]),
                               float(logs["cross_entropy"]) + float(logs["weight_decay"]),
                               rtol=1e-5)


def test_only_the_trunk_and_the_fc_layers_train():
    model = _model()
    fc6 = model.backbone.get_layer("fc6").kernel.numpy().copy()
    conv1 = model.backbone.get_layer("conv1").kernel.numpy().copy()
    model.train_step({common.RAW_IMAGE: tf.constant(_numbered_cells(4))})
    np.testing.assert_array_equal(model.backbone.get_layer("fc6").kernel.numpy(), fc6)
    assert np.abs(model.backbone.get_layer("conv1").kernel.numpy() - conv1).max() > 0


def test_auto_tile_size_keeps_noroozis_proportion_and_fits():
    assert jigsaw.auto_tile_size(225, 2) == 64
    for crop in (32, 48, 64, 96, 160):
        tile = jigsaw.auto_tile_size(crop, 2)
        jigsaw.PuzzleConfig(crop, tile, 2).validate()  # Fits any crop a smoke run picks.
