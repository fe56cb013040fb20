"""Scale-out on CPU: the global graph over two logical devices is the one-device step,
replica graphs are not, and per-replica XLA steps are the compiled one-device step
(the binaries under MirroredStrategy: tests/experiment_test.py); strategy errors are one
clear line; mixed precision trains with float32 losses, and float16 loss
scaling keeps the step count.

Logical devices must be configured before TensorFlow initialises, so the two-device
checks run in their own process (tests/distribute_check.py); the rest of the suite keeps
its single CPU device.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf import mix as mix_lib
from mm_tf import training
from mm_tf import tuner as tuner_lib
from mm_tf.data import datasets
from mm_tf.data import pipeline
from mm_tf.models import backbones

ROOT = pathlib.Path(__file__).resolve().parents[1]
# tests/distribute_check.py: 16 images, 3 patches each.
NODES_GLOBAL, NODES_PER_REPLICA = 16 * 3, 8 * 3
MIX = mix_lib.MixConfig(patches_per_image=4, patch_size=32, min_side=16, max_side=32,
                        background_class=0, use_gather_resize=False)


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    return env


def _run(args, timeout=600):
    return subprocess.run(["timeout", "-s", "KILL", str(timeout), sys.executable, *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def two_devices():
    """The two-device checks of tests/distribute_check.py, run once in their own process.
    (The binaries on two logical CPUs: tests/experiment_test.py runs the pipeline's M&M
    and fine-tuning stages under --strategy=mirrored --num_cpu_devices=2.)"""
    result = _run(["tests/distribute_check.py"])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_same_step(logs, reference):
    for key in ("loss", "triplet_loss", "weight_decay", "d_ap", "d_an", "active_fraction",
                "valid_patches", "num_classes"):
        np.testing.assert_allclose(logs[key], reference[key], rtol=1e-5, err_msg=key)


def test_global_graph_on_two_replicas_is_the_one_device_step(two_devices):
    assert two_devices["replicas"] == 2
    result = two_devices["global"]
    # Same loss, same gradients (SGD lr 1: the update is the gradient), to float error.
    _assert_same_step(result["logs"], two_devices["reference"])
    assert result["update_difference"] < 1e-4, result
    assert result["logs"]["valid_patches"] == NODES_GLOBAL


def test_replica_graphs_are_smaller_and_give_another_step(two_devices):
    result = two_devices["replica"]
    assert result["logs"]["valid_patches"] == NODES_PER_REPLICA
    assert result["update_difference"] > 0.05, result
    assert result["logs"]["triplet_loss"] != two_devices["reference"]["triplet_loss"]


def test_per_replica_xla_step_is_the_compiled_one_device_step(two_devices):
    # Keras cannot compile strategy.run over two devices; each replica's step is
    # compiled around the all_gather instead, and matches Keras' compiled 1-device step.
    result = two_devices["global_xla"]
    _assert_same_step(result["logs"], two_devices["reference_xla"])
    assert result["update_difference"] < 1e-4, result
    assert two_devices["keras_can_jit"] is False


def test_per_replica_xla_segmenter_step_is_the_one_device_step(two_devices):
    # Micro-batch steps compiled per replica (iter_size 2, None gradients kept).
    assert two_devices["segmenter_xla_difference"] < 1e-5


def test_two_replicas_with_accumulation_equal_one_device_on_the_global_batch(two_devices):
    assert two_devices["segmenter_accumulation_difference"] < 1e-5


def test_float16_skipped_step_counts_under_two_replicas(two_devices):
    assert two_devices["float16_skipped_step"] == [1, True]


def test_both_scopes_are_the_same_step_on_one_device(two_devices):
    assert two_devices["single_replica_scope"]["update_difference"] == 0.0
    _assert_same_step(two_devices["single_replica_scope"]["logs"], two_devices["reference"])


def test_batch_and_device_errors_name_the_flag(two_devices):
    assert "--batch_size=3" in two_devices["indivisible_batch_error"]
    assert "2 replicas" in two_devices["indivisible_batch_error"]
    assert "--num_cpu_devices=3" in two_devices["late_devices_error"]


@pytest.mark.parametrize("extra,needle", [
    (["--num_cpu_devices=2"], "--num_cpu_devices=2"),  # with --strategy=default
    (["--strategy=multi_worker"], "TF_CONFIG"),
])
def test_strategy_errors_are_one_clear_line(tmp_path, small_demo_dir, extra, needle):
    env_args = ["bin/train_mm.py", "--flagfile=flags/demo_mm.flags",
                "--flagfile=flags/smoke.flags", f"--data_dir={small_demo_dir}",
                f"--workdir={tmp_path / 'mm'}", "--verbose=0", *extra]
    result = _run(env_args)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_distribution_flagfiles_parse():
    sys.path.insert(0, str(ROOT / "bin"))
    from absl import flags  # pylint: disable=import-outside-toplevel
    import train_mm  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    try:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train_mm", "--flagfile=flags/voc_vgg16_random_mm_4gpu.flags",
                     "--workdir=/tmp/x"])
        assert (flags.FLAGS.strategy, flags.FLAGS.graph_scope, flags.FLAGS.batch_size,
                flags.FLAGS.dataset) == ("mirrored", "global", 16, "voc_aug")
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train_mm", "--flagfile=flags/multi_worker_example.flags",
                     "--workdir=/tmp/x"])
        assert (flags.FLAGS.strategy, flags.FLAGS.graph_scope, flags.FLAGS.batch_size,
                flags.FLAGS.dataset) == ("multi_worker", "global", 8, "demo")
    finally:
        flags.FLAGS.unparse_flags()


# ----- Mixed precision (one device, in this process) -----

def _batch(seed=0, size=64, batch=4):
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 40, (batch, size, size, 3)).astype(np.float32)
    labels = np.zeros((batch, size, size), np.int32)
    for b in range(batch):
        y, x = rng.integers(0, size - 24, 2)
        labels[b, y:y + 24, x:x + 24] = 1 + b % 2
        images[b, y:y + 24, x:x + 24] += 60.0 * (1 + b % 2)
    return tf.constant(images), tf.constant(labels)


def test_mixed_bfloat16_trains_without_nan_and_keeps_float32_losses(tmp_path,
                                                                     small_demo_dir):
    pairs, info = datasets.read_dataset("demo", small_demo_dir, "train")
    config = tuner_lib.TuneConfig(width=0.0625, lr_boundaries=(10,),
                                  precision=training.MIXED_BFLOAT16)
    summary = tuner_lib.run_tuning(
        str(tmp_path / "mm"), pairs, info, pipeline.InputConfig(crop_size=64, batch_size=2),
        MIX, config, training.LoopConfig(steps=3, log_every=1, checkpoint_every=3,
                                         image_every=0, verbose=0))
    assert summary["steps"] == 3 and summary["precision"] == "mixed_bfloat16"
    assert all(np.isfinite(v) for v in summary["metrics"].values()), summary["metrics"]
    # The run restored the global policy.
    assert keras.config.dtype_policy().name == "float32"

    with training.precision_policy(training.MIXED_BFLOAT16):
        model = tuner_lib.MMTuner(backbones.build_backbone("vgg16", width=0.0625), MIX)
    images, labels = _batch()
    terms, patches = model.mm_terms(images, labels, tf.constant(0))
    assert model.features(patches.patches).dtype == tf.bfloat16
    for key in ("loss", "objective", "d_ap", "d_an"):
        assert terms[key].dtype == tf.float32, key
    assert all(v.dtype == "float32" for v in model.trainable_variables)


def test_mixed_float16_skipped_steps_still_count():
    with training.precision_policy(training.MIXED_FLOAT16):
        model = tuner_lib.MMTuner(backbones.build_backbone("vgg16", width=0.0625), MIX)
    # A loss scale of 2^100 overflows float16 gradients: the step is skipped and the
    # scale halves, yet optimizer.iterations (windows, checkpoints, seeds) counts it.
    optimizer = training.StepCountingLossScaleOptimizer(keras.optimizers.SGD(0.01),
                                                        initial_scale=2.0 ** 100)
    model.compile(optimizer=optimizer)
    images, labels = _batch()
    before = [v.numpy().copy() for v in model.features.trainable_variables]
    logs = model.train_step({common.IMAGE: images, common.LABEL: labels})
    assert np.isfinite(float(logs["loss"]))
    assert int(model.optimizer.iterations.numpy()) == 1
    assert float(optimizer.dynamic_scale.numpy()) == 2.0 ** 99
    for b, v in zip(before, model.features.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())
    # A usable scale applies the update.
    optimizer.dynamic_scale.assign(2.0 ** 8)
    model.train_step({common.IMAGE: images, common.LABEL: labels})
    assert int(model.optimizer.iterations.numpy()) == 2
    assert any(np.abs(b - v.numpy()).max() > 0
               for b, v in zip(before, model.features.trainable_variables))


def test_optimizer_for_precision_wraps_only_float16():
    sgd = keras.optimizers.SGD(0.01)
    assert training.optimizer_for_precision(sgd, "mixed_bfloat16") is sgd
    wrapped = training.optimizer_for_precision(keras.optimizers.SGD(0.01), "mixed_float16")
    assert isinstance(wrapped, keras.optimizers.LossScaleOptimizer)
    with pytest.raises(ValueError, match="--precision=half"):
        training.check_precision("half")
