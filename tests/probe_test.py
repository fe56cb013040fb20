"""mm_tf/probe.py: the measures by hand (k-NN with and without leave-one-out on six
points, participation ratio, zero fraction, mean cosine), a bank is deterministic per
seed, features are taken with BN in inference mode, and in an M&M run the history holds
step 0 and every probe_every step, survives a resume without duplicates, and
--keep_best_probe writes the logged best step's backbone."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_tf import mix as mix_lib
from mm_tf import probe as probe_lib
from mm_tf import training
from mm_tf import tuner as tuner_lib
from mm_tf.data import datasets
from mm_tf.data import pipeline
from mm_tf.errors import ConfigError
from mm_tf.models import backbones

MIX = mix_lib.MixConfig(patches_per_image=4, patch_size=32, min_side=16, max_side=32,
                        background_class=0, use_gather_resize=False)
INPUT = pipeline.InputConfig(crop_size=64, batch_size=2)

# Six points on a line: classes 0 0 1 | 1 1 0.
POINTS = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
LABELS = np.array([0, 0, 1, 1, 1, 0])


def test_knn_by_hand_on_six_points():
    # Leave-one-out, k=3: point 0 -> 1,2,3 = 0,1,1 -> 1 (wrong); 1 -> 0,2,3 = 0,1,1 -> 1
    # (wrong); 2 -> 1,0,3 = 0,0,1 -> 0 (wrong); 3 -> 4,5,2 = 1,0,1 -> 1 (ok);
    # 4 -> 3,5,2 = 1,0,1 -> 1 (ok); 5 -> 4,3,2 = 1,1,1 -> 1 (wrong). 2 of 6.
    assert probe_lib.knn_accuracy_loo(POINTS, LABELS, k=3) == pytest.approx(2 / 6)
    # k=1: 0->1 ok, 1->0 ok, 2->1 wrong, 3->4 ok, 4->3 ok, 5->4 wrong. 4 of 6.
    assert probe_lib.knn_accuracy_loo(POINTS, LABELS, k=1) == pytest.approx(4 / 6)
    # k=5 leave-one-out: every other point votes. 0: 0,1,1,1,0 -> 1 (wrong); 1: same
    # (wrong); 2: 0,0,1,1,0 -> 0 (wrong); 3: 0,0,1,1,0 -> 0 (wrong); 4: same (wrong);
    # 5: 0,0,1,1,1 -> 1 (wrong). 0 of 6.
    assert probe_lib.knn_accuracy_loo(POINTS, LABELS, k=5) == 0.0
    # Against a bank (no leave-one-out), k=3: query 0.4 -> 0,1,2 = 0,0,1 -> 0;
    # 11.6 -> 5,4,3 = 0,1,1 -> 1; 5.0 -> 2,1,0 (distances 3,4,5) = 1,0,0 -> 0.
    query = np.array([[0.4], [11.6], [5.0]])
    np.testing.assert_array_equal(probe_lib.knn_predict(query, POINTS, LABELS, k=3),
                                  [0, 1, 0])
    assert probe_lib.knn_accuracy(query, [0, 1, 1], POINTS, LABELS, k=3) == \
        pytest.approx(2 / 3)
    # A 2-2 tie goes to the smaller class id.
    assert probe_lib.knn_predict([[6.5]], POINTS[:4], [0, 0, 1, 1],
                                 k=4)[0] == 0


def test_collapse_measures_by_hand():
    # Points +-a e1 and +-b e2: covariance eigenvalues a^2/2... in ratio a^2 : b^2.
    a, b = 3.0, 1.0
    x = np.array([[a, 0, 0], [-a, 0, 0], [0, b, 0], [0, -b, 0]])
    expected = (a**2 + b**2) ** 2 / (a**4 + b**4)
    assert probe_lib.participation_ratio(x) == pytest.approx(expected)
    assert probe_lib.participation_ratio(x, per_dimension=True) == pytest.approx(expected / 3)
    rng = np.random.default_rng(0)
    y = rng.normal(size=(20, 5)) * [3.0, 2.0, 1.0, 0.5, 0.1]
    eig = np.linalg.eigvalsh(np.cov(y, rowvar=False))
    assert probe_lib.participation_ratio(y) == pytest.approx(eig.sum() ** 2 / (eig**2).sum())
    assert probe_lib.participation_ratio(np.ones((4, 3))) == 0.0  # collapsed to a point
    assert probe_lib.zero_fraction(x) == pytest.approx(8 / 12)
    # Pairs of x: (0,1) -1, (2,3) -1, the four cross pairs 0: mean over 6 pairs = -1/3.
    assert probe_lib.mean_cosine(x) == pytest.approx(-1 / 3)
    assert probe_lib.mean_cosine(np.ones((3, 2))) == pytest.approx(1.0)


def test_bank_is_deterministic_per_seed(small_demo_dir):
    pairs, info = datasets.read_dataset("demo", small_demo_dir, "train")
    first = probe_lib.sample_bank(pairs, info, INPUT, MIX, 3, seed=1, split="train")
    again = probe_lib.sample_bank(pairs, info, INPUT, MIX, 3, seed=1, split="train")
    other = probe_lib.sample_bank(pairs, info, INPUT, MIX, 3, seed=2, split="train")
    assert len(first) == 3 * MIX.patches_per_image  # demo images have labelled pixels
    assert first.patches.shape == (12, 32, 32, 3) and first.thumbnails.dtype == np.uint8
    np.testing.assert_array_equal(first.patches, again.patches)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert not np.array_equal(first.patches, other.patches)
    assert sorted(set(first.image_index.tolist())) == [0, 1, 2]
    # The thumbnails are the RGB crops of the normalised patches (in-image pixels; the
    # pipeline rounds the rescaled RGB crop, each rounding moves a value <= 0.5).
    restored = first.patches + np.array([123.68, 116.779, 103.939], np.float32)
    inside = first.thumbnails > 0
    np.testing.assert_allclose(restored[inside], first.thumbnails[inside], atol=1.01)
    # The batch size of the reading does not change the bank.
    wide = probe_lib.sample_bank(pairs, info, pipeline.InputConfig(crop_size=64,
                                                                   batch_size=3),
                                 MIX, 3, seed=1)
    np.testing.assert_allclose(wide.patches, first.patches, atol=1e-5)


def test_features_are_taken_with_batch_norm_in_inference_mode():
    keras.utils.set_random_seed(0)
    backbone = backbones.build_backbone("vgg16", width=0.0625)
    pool5 = backbones.pool5_model(backbone)
    # Moving statistics unlike the batch's: inference and training modes then differ.
    rng = np.random.default_rng(1)
    for variable in backbone.non_trainable_variables:
        value = (rng.uniform(0.5, 2.0, variable.shape) if "variance" in variable.path
                 else rng.normal(0.0, 0.2, variable.shape))
        variable.assign(value.astype(np.float32))
    before = [v.numpy().copy() for v in backbone.non_trainable_variables]
    patches = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32)
    embedded = probe_lib.embedding_fn(pool5)(patches, batch_size=4)
    flat = lambda t: tf.reshape(t, [6, -1]).numpy()  # noqa: E731
    inference = flat(pool5(patches, training=False))
    np.testing.assert_allclose(embedded,
                               inference / np.linalg.norm(inference, axis=1, keepdims=True),
                               rtol=1e-4, atol=1e-6)
    assert np.count_nonzero(embedded) > embedded.size // 4  # not a dead network
    training_mode = flat(pool5(patches, training=True))
    assert not np.allclose(inference, training_mode, atol=1e-3)
    # Calling in training mode above moved the statistics; embedding must not, so redo.
    for variable, value in zip(backbone.non_trainable_variables, before):
        variable.assign(value)
    probe_lib.embedding_fn(pool5)(patches)
    for variable, value in zip(backbone.non_trainable_variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_probe_every_must_tile_the_logging_windows():
    with pytest.raises(ConfigError, match="--probe_every=3"):
        probe_lib.ProbeConfig(every=3).validate(log_every=2)
    with pytest.raises(ConfigError, match="--keep_best_probe"):
        probe_lib.ProbeConfig(keep_best=True).validate(log_every=2)
    probe_lib.ProbeConfig(every=4).validate(log_every=2)


def _run(workdir, pairs, val_pairs, info, steps, keep_best=False, lr=0.05):
    config = tuner_lib.TuneConfig(width=0.0625, lr_boundaries=(), learning_rate=lr, seed=3)
    probe = probe_lib.ProbeConfig(every=2, images=3, keep_best=keep_best, batch_size=8)
    loop = training.LoopConfig(steps=steps, log_every=1, checkpoint_every=1, image_every=0,
                               verbose=0)
    return tuner_lib.run_tuning(workdir, pairs, info, INPUT, MIX, config, loop,
                                probe=probe, probe_pairs=val_pairs), config


def test_tuner_history_resume_and_best_probe_backbone(small_demo_dir, tmp_path):
    pairs, info = datasets.read_dataset("demo", small_demo_dir, "train")
    val_pairs, _ = datasets.read_dataset("demo", small_demo_dir, "val")
    workdir = str(tmp_path / "mm")
    first, _ = _run(workdir, pairs, val_pairs, info, steps=3)
    assert [e["step"] for e in first["probe"]["history"]] == [0, 2, 3]  # + the last step
    for entry in first["probe"]["history"]:
        assert set(probe_lib.METRICS) <= set(entry) and 0 <= entry["knn_val"] <= 1
    assert first["probe"]["patches"] == {"train": 12, "val": 12}
    # A resumed, extended run continues the history without duplicating a step.
    second, config = _run(workdir, pairs, val_pairs, info, steps=5, keep_best=True)
    history = second["probe"]["history"]
    assert [e["step"] for e in history] == [0, 2, 3, 4, 5]
    assert history[:3] == first["probe"]["history"]
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["probe"]["history"] == history
    # Every backbone layer with a kernel has its movement, from the stage's start.
    assert second["movement_from_step"] == 0
    assert set(second["movement"]) == {"conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1",
                                       "conv3_2", "conv3_3", "conv4_1", "conv4_2", "conv4_3",
                                       "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7"}
    assert second["movement"]["conv1_1"] > 0 and second["movement"]["fc6"] == 0
    # keep_best: the best is a step probed in this run (4 and 5; 0, 2 and 3 came from a
    # run without keep_best), backbone.weights.h5 holds its weights and
    # backbone_last.weights.h5 the last step's: re-probing them gives the logged values.
    best = second["probe"]["best"]
    values = {e["step"]: e for e in history}
    assert best["step"] == max((4, 5),
                               key=lambda s: (values[s]["knn_val"], -s))
    assert second["probe_best_step"] == best["step"]
    probe = probe_lib.make_probe(pairs, val_pairs, info, INPUT, MIX,
                                 probe_lib.ProbeConfig(every=2, images=3))
    for name, step in (("backbone.weights.h5", best["step"]),
                       ("backbone_last.weights.h5", 5)):
        backbone = tuner_lib.build_backbone_from(config)
        backbone.load_weights(os.path.join(workdir, name))
        metrics = probe.run(probe_lib.embedding_fn(backbones.pool5_model(backbone)))
        for key in probe_lib.METRICS:
            assert metrics[key] == pytest.approx(values[step][key], abs=1e-5), (name, key)
