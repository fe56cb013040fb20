"""Tests of mm_tf.mix: sampling rules, de-duplication, fallbacks, XLA, the layer."""

import dataclasses
import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_tf import mix
from mm_tf.errors import ConfigError

SMALL = mix.MixConfig(patches_per_image=10, patch_size=8, min_side=4, max_side=16)
SEED = np.array([3, 7], np.int32)


def _label_maps(batch=3, size=32):
    """Labels [B,S,S]: background 0, objects of classes 3 and 7, an ignore band."""
    labels = np.zeros((batch, size, size), np.int32)
    labels[:, 4:14, 6:20] = 3
    labels[:, 18:26, 2:9] = 7
    labels[:, -3:, :] = 255
    return labels


def _images(batch=3, size=32, channels=3):
    """Images [B,S,S,C] in [0, 1) with a zero one-pixel frame (see test_resize_paths)."""
    images = np.random.default_rng(0).uniform(size=(batch, size, size, channels))
    images[:, [0, -1], :] = 0.0
    images[:, :, [0, -1]] = 0.0
    return images.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _compiled(config, jit):
    """One traced function per (config, jit): sample_patches with tensor arguments."""
    return tf.function(lambda i, l, s: mix.sample_patches(i, l, s, config), jit_compile=jit)


def _run(images, labels, config=SMALL, seed=SEED, mode="eager"):
    """sample_patches eagerly, in tf.function, or under XLA -> dict of numpy arrays."""
    args = (tf.constant(images), tf.constant(labels), tf.constant(seed, tf.int32))
    if mode == "eager":
        out = mix.sample_patches(*args, config)
    else:
        out = _compiled(config, mode == "xla")(*args)
    return {name: value.numpy() for name, value in out._asdict().items()}


def _coverage(box, others, height, width):
    """Numpy: in-image part of box (y1,x1,y2,x2) covered by the others / its area."""
    mask = np.zeros((height, width), bool)
    for y1, x1, y2, x2 in np.asarray(others, int).reshape(-1, 4):
        mask[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = True
    y1, x1, y2, x2 = np.asarray(box, int)
    covered = mask[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)].sum()
    return covered / float((y2 - y1) * (x2 - x1))


def test_config_validation_and_counts():
    assert mix.MixConfig().num_background == 1 and mix.MixConfig().num_foreground == 8
    assert mix.MixConfig(patches_per_image=20).num_background == 2
    assert mix.MixConfig(background_class=None).num_background == 0
    for bad in [dict(min_side=63), dict(max_side=32), dict(max_overlap=1.5),
                dict(background_class=255), dict(patches_per_image=0)]:
        with pytest.raises(ConfigError, match=next(iter(bad))):
            mix.MixConfig(**bad)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_shapes_centre_labels_and_boxes(mode):
    labels = _label_maps()
    out = _run(_images(), labels, mode=mode)
    n = 3 * SMALL.patches_per_image
    assert out["patches"].shape == (n, 8, 8, 3) and out["patches"].dtype == np.float32
    assert out["labels"].shape == (n,) and out["labels"].dtype == np.int32
    assert out["valid"].shape == (n,) and out["valid"].dtype == bool and out["valid"].all()
    assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == np.float32
    np.testing.assert_array_equal(out["image_index"], np.repeat(np.arange(3), 10))
    y1, x1, y2, x2 = out["boxes"].T.astype(int)
    side = y2 - y1
    np.testing.assert_array_equal(x2 - x1, side)
    assert (side % 2 == 0).all() and side.min() >= 4 and side.max() <= 16
    cy, cx = y1 + side // 2, x1 + side // 2
    np.testing.assert_array_equal(out["labels"], labels[out["image_index"], cy, cx])
    per_image = out["labels"].reshape(3, 10)
    # round(10 * 0.1) = 1 background patch per image, in the last slot; others foreground.
    np.testing.assert_array_equal(per_image[:, -1], 0)
    assert np.isin(per_image[:, :-1], [3, 7]).all()


def test_background_share_is_rounded_fraction():
    config = dataclasses.replace(SMALL, patches_per_image=20, background_fraction=0.1)
    out = _run(_images(), _label_maps(), config=config)
    np.testing.assert_array_equal((out["labels"].reshape(3, 20) == 0).sum(axis=1), 2)


@pytest.mark.parametrize("balanced", [False, True])
def test_xla_matches_graph_mode(balanced):
    config = dataclasses.replace(SMALL, class_balanced=balanced)
    graph = _run(_images(), _label_maps(), config=config, mode="graph")
    xla = _run(_images(), _label_maps(), config=config, mode="xla")
    for name in ("labels", "valid", "boxes", "image_index"):
        np.testing.assert_array_equal(graph[name], xla[name])
    np.testing.assert_allclose(graph["patches"], xla["patches"], atol=1e-5)


def test_union_coverage_is_exact():
    rng = np.random.default_rng(5)
    corners = rng.integers(-5, 30, size=(64, 6, 2))
    boxes = np.concatenate([corners, corners + rng.integers(1, 12, size=(64, 6, 2))], -1)
    boxes = boxes[..., [0, 1, 2, 3]].astype(np.float32)
    member = rng.uniform(size=(64, 5)) < 0.7
    got = mix.union_coverage(tf.constant(boxes[:, 0] + 10), tf.constant(boxes[:, 1:] + 10),
                             tf.constant(member)).numpy()
    for b in range(64):
        box = boxes[b, 0] + 10
        others = boxes[b, 1:][member[b]] + 10
        mask = np.zeros((60, 60), bool)
        for y1, x1, y2, x2 in others.astype(int):
            mask[y1:y2, x1:x2] = True
        y1, x1, y2, x2 = box.astype(int)
        assert got[b] == mask[y1:y2, x1:x2].sum()


def _reference_deduplicate(boxes, lanes, usable, quotas, size, max_overlap):
    """Numpy statement of the rule: visit in order; kept, then least-covered skipped."""
    chosen = []
    for b in range(boxes.shape[0]):
        kept, coverage = [], {}
        for j in range(boxes.shape[1]):
            same = [k for k in kept if lanes[k] == lanes[j]]
            coverage[j] = _coverage(boxes[b, j], boxes[b, same], size, size)
            if usable[b, j] and len(same) < quotas[lanes[j]] and coverage[j] <= max_overlap:
                kept.append(j)
        row = []
        for lane, quota in enumerate(quotas):
            mine = [j for j in kept if lanes[j] == lane]
            rest = sorted((coverage[j], j) for j in range(boxes.shape[1])
                          if lanes[j] == lane and j not in kept)
            row += (mine + [j for _, j in rest])[:quota]
        chosen.append(row)
    return np.array(chosen)


def test_deduplication_matches_the_sequential_rule():
    rng = np.random.default_rng(6)
    batch, size, quotas = 4, 24, (4, 2)
    lanes = np.array([0] * 12 + [1] * 8, np.int32)
    centres = rng.integers(8, 16, size=(batch, 20, 2))  # crowded: many skips and fill-ups
    half = rng.integers(2, 9, size=(batch, 20, 1))
    boxes = np.concatenate([centres - half, centres + half], -1).astype(np.float32)
    usable = np.ones((batch, 20), bool)
    kept, coverage = mix._deduplicate(tf.constant(boxes), tf.constant(lanes),
                                      tf.constant((2.0 * half[..., 0]) ** 2, tf.float32),
                                      tf.constant(usable), quotas, size, size, 0.6)
    chosen = mix._select(kept, coverage, lanes, quotas).numpy()
    np.testing.assert_array_equal(
        chosen, _reference_deduplicate(boxes, lanes, usable, quotas, size, 0.6))
    assert kept.numpy().sum() < batch * sum(quotas)  # the case does exercise fill-up


@pytest.mark.parametrize("object_size", [3, 32])
def test_kept_patches_are_not_covered_by_earlier_ones(object_size):
    """Foreground slots: kept ones (<= 60% covered by earlier kept), then fill-ups."""
    labels = np.zeros((4, 48, 48), np.int32)
    labels[:, 20:20 + object_size, 20:20 + object_size] = 5  # 3x3 forces overlaps
    config = dataclasses.replace(SMALL, min_side=8, max_side=16)
    out = _run(_images(4, 48), labels, config=config, mode="graph")
    boxes = out["boxes"].reshape(4, 10, 4)[:, :9]  # the 9 foreground slots
    fill_ups = 0
    for image_boxes in boxes:
        kept = 1
        while kept < 9 and _coverage(image_boxes[kept], image_boxes[:kept], 48, 48) <= 0.6:
            kept += 1
        for box in image_boxes[kept:]:  # fill-ups were skipped: > 60% covered by kept
            assert _coverage(box, image_boxes[:kept], 48, 48) > 0.6
        fill_ups += 9 - kept
    assert (fill_ups > 0) == (object_size == 3)


def test_pixels_outside_the_image_are_zero():
    ones = np.ones((3, 32, 32, 3), np.float32)
    out = _run(ones, _label_maps())
    s = SMALL.patch_size
    for patch, (y1, x1, y2, x2) in zip(out["patches"], out["boxes"]):
        ys = y1 + np.arange(s) * (y2 - 1 - y1) / (s - 1)
        xs = x1 + np.arange(s) * (x2 - 1 - x1) / (s - 1)
        inside = ((ys >= 0) & (ys <= 31))[:, None] & ((xs >= 0) & (xs <= 31))[None, :]
        np.testing.assert_array_equal(patch, np.repeat(inside[..., None], 3, -1))
    assert (out["patches"] == 0).any()  # some boxes do leave the image


@pytest.mark.parametrize("balanced", [False, True])
def test_fallbacks_ignore_only_foreground_free_background_free(balanced):
    labels = _label_maps(5)
    labels[0] = 255  # only ignore: invalid
    labels[1] = np.where(labels[1] == 255, 255, 0)  # no foreground: background patches
    labels[2] = np.where(labels[2] == 0, 7, labels[2])  # no background: foreground ones
    labels[3, :, :16] = -1  # out-of-range values count as ignore
    labels[3, :, 16:] = 300
    labels[3, 5, 20] = 3  # ... and one foreground pixel takes every centre
    config = dataclasses.replace(SMALL, class_balanced=balanced)
    out = _run(_images(5), labels, config=config, mode="graph")
    valid, got = out["valid"].reshape(5, 10), out["labels"].reshape(5, 10)
    assert not valid[0].any() and (got[0] == 255).all()
    assert valid[1:].all()
    assert (got[1] == 0).all()
    assert np.isin(got[2], [3, 7]).all()
    assert (got[3] == 3).all()
    assert np.isfinite(out["patches"]).all()


def test_no_background_class_uses_every_labelled_pixel():
    config = dataclasses.replace(SMALL, background_class=None)
    labels = _label_maps()
    out = _run(_images(), labels, config=config)
    assert out["valid"].all() and np.isin(out["labels"], [0, 3, 7]).all()
    assert (out["labels"] == 0).sum() > 10  # class 0 is an ordinary class here


def test_determinism():
    first = _run(_images(), _label_maps(), mode="graph")
    again = _run(_images(), _label_maps(), mode="graph")
    other = _run(_images(), _label_maps(), seed=np.array([3, 8], np.int32), mode="graph")
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["boxes"], other["boxes"])


def test_resize_paths_agree():
    # The zero image frame makes samples exactly on the border equal in both paths
    # (the reference's coordinate rounding may push them just outside: 0 either way).
    config = dataclasses.replace(SMALL, use_gather_resize=False)
    ours = _run(_images(), _label_maps(), mode="graph")
    ref = _run(_images(), _label_maps(), config=config, mode="graph")
    np.testing.assert_array_equal(ours["boxes"], ref["boxes"])
    np.testing.assert_allclose(ours["patches"], ref["patches"], atol=1e-5)


def test_centres_are_uniform_over_qualifying_pixels():
    # No de-duplication (max_overlap=1) and no over-sampling: outputs are raw draws.
    config = dataclasses.replace(SMALL, oversample=1, max_overlap=1.0)
    labels = np.zeros((64, 8, 8), np.int32)
    labels[:, 2, 2:5] = 1
    labels[:, 5, 4:6] = 1
    out = _run(np.zeros((64, 8, 8, 1), np.float32), labels, config=config, mode="graph")
    y1, x1, y2, _ = out["boxes"].reshape(64, 10, 4)[:, :9].reshape(-1, 4).T.astype(int)
    half = (y2 - y1) // 2
    counts = np.zeros((8, 8))
    np.add.at(counts, (y1 + half, x1 + half), 1)
    observed = counts[labels[0] == 1]
    assert observed.sum() == 64 * 9
    expected = 64 * 9 / 5
    assert ((observed - expected) ** 2 / expected).sum() < 25  # chi2(4) p ~ 5e-5


def test_class_balanced_evens_out_an_imbalanced_map():
    labels = np.zeros((32, 32, 32), np.int32)
    labels[:, 2:30, 2:30] = 1
    labels[:, 10:14, 10:14] = 2  # 16 pixels of class 2 against 768 of class 1
    images = np.zeros((32, 32, 32, 1), np.float32)
    fractions = {}
    for balanced in (False, True):
        config = dataclasses.replace(SMALL, max_overlap=1.0, class_balanced=balanced)
        out = _run(images, labels, config=config, mode="graph")
        foreground = out["labels"].reshape(32, 10)[:, :9]
        fractions[balanced] = (foreground == 2).mean()
    assert fractions[False] < 0.08  # expected 16 / 784 ~ 0.02
    assert 0.38 < fractions[True] < 0.62  # expected 0.5 over 288 draws (sd 0.03)


def test_mix_layer_call_and_config_round_trip():
    layer = mix.Mix(SMALL, name="mixer")
    args = (tf.constant(_images()), tf.constant(_label_maps()), tf.constant(SEED))
    eager = layer(*args)
    assert isinstance(eager, mix.Patches)
    traced = tf.function(lambda i, l, s: layer(i, l, s))(*args)
    assert isinstance(traced, mix.Patches)
    np.testing.assert_array_equal(eager.boxes.numpy(), traced.boxes.numpy())
    shapes = layer.compute_output_shape((3, 32, 32, 3))
    assert shapes.patches == (30, 8, 8, 3) and shapes.labels == (30,)

    config = layer.get_config()
    assert config["name"] == "mixer" and config["config"]["patch_size"] == 8
    restored = mix.Mix.from_config(config)
    assert restored.config == SMALL and restored.name == "mixer"
    serialized = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(clone, mix.Mix) and clone.config == SMALL


def test_mix_layer_keeps_float32_pixels_under_mixed_precision():
    images = tf.constant(_images() * 255.0 + 0.1)  # not representable in bfloat16
    args = (images, tf.constant(_label_maps()), tf.constant(SEED))
    out = mix.Mix(SMALL, dtype="mixed_bfloat16")(*args)
    assert out.patches.dtype == tf.float32
    np.testing.assert_array_equal(out.patches.numpy(),
                                  mix.sample_patches(*args, SMALL).patches.numpy())
