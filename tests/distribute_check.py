"""Checks of the M&M step on two logical CPU devices, run in their own process by
tests/distribute_test.py (logical devices must be set before TensorFlow initialises,
which the rest of the test suite would already have done). Prints one JSON line.

The comparison: one optimizer step of MMTuner on a fixed global batch of 16 images,
  * on one device (the default strategy, 16 images, one graph), and
  * under MirroredStrategy on two logical CPUs (8 images per replica),
from the same weights with plain SGD, for graph_scope global/replica and with the
per-replica XLA compilation. The backbone has no batch normalisation: BN statistics are
per replica by design (as in the paper's Caffe), so only a BN-free network can give the
single-device step exactly. Everything else is the real step: mix, pool5, all_gather,
the graph, the loss share, the weight decay, Keras' gradient sum and the SGD update.

    .venv/bin/python tests/distribute_check.py
"""

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from mm_tf import distribute  # noqa: E402

# Before anything else touches TensorFlow.
MIRRORED = distribute.make_strategy("mirrored", num_cpu_devices=2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mm_tf import common  # noqa: E402
from mm_tf import mix as mix_lib  # noqa: E402
from mm_tf import segmenter as seg  # noqa: E402
from mm_tf import training  # noqa: E402
from mm_tf import tuner as tuner_lib  # noqa: E402
from mm_tf.errors import ConfigError  # noqa: E402
from mm_tf.models import backbones  # noqa: E402

GLOBAL_BATCH = 16
MIX = mix_lib.MixConfig(patches_per_image=3, patch_size=16, min_side=8, max_side=16,
                        background_class=0, use_gather_resize=True)


def _batch(seed=0, size=32):
    """16 images whose labels hold background and two of three object classes."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 40, (GLOBAL_BATCH, size, size, 3)).astype(np.float32)
    labels = np.zeros((GLOBAL_BATCH, size, size), np.int32)
    for b in range(GLOBAL_BATCH):
        for cls in rng.choice([1, 2, 3], size=2, replace=False):
            y, x = rng.integers(0, size - 12, 2)
            labels[b, y:y + 12, x:x + 12] = cls
            images[b, y:y + 12, x:x + 12] += 30.0 * cls
    return {common.IMAGE: images, common.LABEL: labels}


def _backbone():
    """A BN-free stand-in backbone with a pool5 endpoint (conv kernels get decay)."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu",
                            name="conv1")(inputs)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", name="conv2")(x)
    return keras.Model(inputs, {backbones.POOL5: x}, name="tiny")


def one_step(strategy, graph_scope, initial, compile_replica_step=False, keras_jit=False):
    """Logs and per-variable updates of one fit step from `initial` weights."""
    with strategy.scope():
        backbone = _backbone()
        backbone.set_weights(initial)
        model = tuner_lib.MMTuner(backbone, MIX, weight_decay=5e-4, seed=7,
                                  graph_scope=graph_scope,
                                  compile_replica_step=compile_replica_step)
        model.compile(optimizer=keras.optimizers.SGD(1.0), jit_compile=keras_jit)
    dataset = tf.data.Dataset.from_tensors(_batch()).repeat()
    history = model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0)
    updates = [np.asarray(v.numpy()) - w for v, w in zip(backbone.weights, initial)]
    logs = {k: float(v[-1]) for k, v in history.history.items()}
    return logs, updates


class LinearSeg(keras.Model):
    """Per-pixel linear classifier: a segmentation network without randomness."""

    train_with_sampling = False

    def __init__(self):
        super().__init__()
        self.num_classes = 4
        self.dense = keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(7))
        self.dense.build((None, 3))
        self.built = True

    def call(self, images, training=None):
        del training
        return self.dense(images)


def segmenter_steps(strategy, compile_replica_step, iter_size=2):
    """Weights after 2 Segmenter updates (of `iter_size` micro-batches) on a fixed batch
    of 8 images."""
    rng = np.random.default_rng(0)
    batch = {common.IMAGE: rng.normal(size=(8, 5, 5, 3)).astype(np.float32),
             common.LABEL: rng.integers(0, 4, size=(8, 5, 5)).astype(np.int32)}
    with strategy.scope():
        model = seg.Segmenter(LinearSeg(), weight_decay=0.01, iter_size=iter_size,
                              compile_replica_step=compile_replica_step)
        model.compile(optimizer=training.make_sgd(0.1, (2,), 0.1, 0.9))
    model.fit(tf.data.Dataset.from_tensors(batch).repeat(), steps_per_epoch=2, epochs=1,
              verbose=0)
    return [v.numpy() for v in model.network.weights]


def float16_skip_counts(strategy):
    """(iterations, weights unchanged) after one mixed_float16 step whose loss scale
    (2^100) overflows: the skipped step must still count under the strategy."""
    with training.precision_policy(training.MIXED_FLOAT16), strategy.scope():
        backbone = _backbone()
        model = tuner_lib.MMTuner(backbone, MIX, seed=7)
        model.compile(optimizer=training.StepCountingLossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=2.0 ** 100))
    before = [w.copy() for w in backbone.get_weights()]
    model.fit(tf.data.Dataset.from_tensors(_batch()).repeat(), steps_per_epoch=1, epochs=1,
              verbose=0)
    unchanged = all(np.array_equal(a, b) for a, b in zip(before, backbone.get_weights()))
    return int(model.optimizer.iterations.numpy()), unchanged


def _relative_difference(a, b):
    scale = max(max(float(np.abs(x).max()) for x in a), 1e-30)
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b)) / scale


def main():
    keras.utils.set_random_seed(3)
    initial = _backbone().get_weights()
    default = tf.distribute.get_strategy()
    ref_logs, ref_updates = one_step(default, "global", initial)
    # XLA draws the mix's stateless random numbers with its own algorithm, so compiled
    # steps are compared with the compiled single-device step (Keras' jit_compile).
    xla_logs, xla_updates = one_step(default, "global", initial, keras_jit=True)
    results = {"replicas": MIRRORED.num_replicas_in_sync, "reference": ref_logs,
               "keras_can_jit": distribute.keras_can_jit(MIRRORED),
               "reference_xla": xla_logs,
               "reference_update_norm": float(np.sqrt(sum((u ** 2).sum() for u in ref_updates)))}
    for name, scope, compiled in (("global", "global", False), ("replica", "replica", False),
                                  ("global_xla", "global", True)):
        logs, updates = one_step(MIRRORED, scope, initial, compile_replica_step=compiled)
        reference = xla_updates if compiled else ref_updates
        results[name] = {"logs": logs,
                         "update_difference": _relative_difference(reference, updates)}
    results["segmenter_xla_difference"] = _relative_difference(
        segmenter_steps(default, False), segmenter_steps(MIRRORED, True))
    # Two replicas accumulating 2 micro-batches of 2 images each = one device's update
    # on the whole batch of 8 in one pass.
    results["segmenter_accumulation_difference"] = _relative_difference(
        segmenter_steps(default, False, iter_size=1), segmenter_steps(MIRRORED, False))
    results["float16_skipped_step"] = float16_skip_counts(MIRRORED)
    # One device: the two scopes are the same step.
    logs, updates = one_step(default, "replica", initial)
    results["single_replica_scope"] = {"logs": logs, "update_difference":
                                       _relative_difference(ref_updates, updates)}
    try:
        tuner_lib.run_tuning("/nonexistent", [], None, _InputStub(3),
                             MIX, tuner_lib.TuneConfig(), training.LoopConfig(steps=1),
                             strategy=MIRRORED)
        results["indivisible_batch_error"] = None
    except ConfigError as e:
        results["indivisible_batch_error"] = str(e)
    try:
        distribute.set_cpu_devices(3)
        results["late_devices_error"] = None
    except ConfigError as e:
        results["late_devices_error"] = str(e)
    print(json.dumps(results))


class _InputStub:
    """Only the batch size is read before the divisibility check."""

    def __init__(self, batch_size):
        self.batch_size = batch_size
        self.input_mode = common.INPUT_RGB


if __name__ == "__main__":
    main()
