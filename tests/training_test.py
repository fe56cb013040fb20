"""The shared training loop: resume after a stop (from the newest checkpoint that reads
back whole), NaN guard keeps the last good checkpoint, schedules are validated with flag
names, coupled weight decay by hand."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_tf import training
from mm_tf.errors import CheckpointError, ConfigError


class LinearToy(keras.Model):
    """y = x w with an MSE loss tracked by a Mean metric (the tuner's train_step shape)."""

    def __init__(self):
        super().__init__(name="linear_toy")
        self.dense = keras.layers.Dense(1, use_bias=False,
                                        kernel_initializer="zeros")
        self.tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.tracker]

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x) - y))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        self.tracker.update_state(loss)
        return {"loss": self.tracker.result()}


def _model(lr=0.1):
    model = LinearToy()
    model(np.zeros((1, 2), np.float32))  # builds the Dense kernel
    model.compile(optimizer=keras.optimizers.SGD(lr))
    return model


def _data(nan_from_step=None):
    """Infinite batches of y = x . [1, -2]; from `nan_from_step` on, x holds NaN."""
    def make(start_step):
        def gen():
            rng = np.random.default_rng(start_step)
            step = start_step
            while True:
                x = rng.normal(size=(8, 2)).astype(np.float32)
                if nan_from_step is not None and step >= nan_from_step:
                    x[:] = np.nan
                yield x, x @ np.array([[1.0], [-2.0]], np.float32)
                step += 1
        return tf.data.Dataset.from_generator(
            gen, output_signature=(tf.TensorSpec((8, 2), tf.float32),
                                   tf.TensorSpec((8, 1), tf.float32)))
    return make


def test_trains_and_resumes_from_checkpoint(tmp_path):
    workdir = str(tmp_path)
    first = training.fit_resumable(
        _model(), _data(), workdir,
        training.LoopConfig(steps=6, log_every=2, checkpoint_every=2, verbose=0))
    assert first["steps"] == 6 and first["start_step"] == 0
    # A "killed" run is one whose newest checkpoint is behind --steps: extend the run.
    second_model = _model()
    second = training.fit_resumable(
        second_model, _data(), workdir,
        training.LoopConfig(steps=10, log_every=2, checkpoint_every=2, verbose=0))
    assert second["start_step"] == 6 and second["steps"] == 10
    w = second_model.dense.kernel.numpy().ravel()
    assert abs(w[0] - 1.0) < 0.5 and abs(w[1] + 2.0) < 0.5  # it kept learning, not restarted
    events = os.listdir(os.path.join(workdir, "tensorboard", "train"))
    assert events, "no TensorBoard event file was written"


def _truncate(prefix):
    """Cuts a checkpoint's data file to 10 bytes (a write cut short on disk)."""
    data = tf.io.gfile.glob(prefix + ".data-*")[0]
    with open(data, "r+b") as f:
        f.truncate(10)


def _kernel_at(prefix):
    model = _model()
    tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
    return model.dense.kernel.numpy()


@pytest.mark.parametrize("state_file", ["kept", "garbage"])
def test_damaged_newest_checkpoint_resumes_from_the_one_before(tmp_path, state_file):
    checkpoints = os.path.join(tmp_path, "checkpoints")
    training.fit_resumable(_model(), _data(), str(tmp_path),
                           training.LoopConfig(steps=6, log_every=2, checkpoint_every=2,
                                               verbose=0))
    at_4 = _kernel_at(os.path.join(checkpoints, "ckpt-4"))
    _truncate(os.path.join(checkpoints, "ckpt-6"))
    if state_file == "garbage":  # the manager's state file unreadable: found on disk
        with open(os.path.join(checkpoints, "checkpoint"), "wb") as f:
            f.write(b"\xff\xfe not a text proto {")
    assert training.checkpoints_newest_first(checkpoints) == [
        os.path.join(checkpoints, f"ckpt-{n}") for n in (6, 4, 2)]
    model = _model()
    _, step = training.restore_or_init(model, checkpoints)
    assert step == 4
    np.testing.assert_array_equal(model.dense.kernel.numpy(), at_4)
    # ... and the loop goes on from there to --steps, rewriting ckpt-6 whole.
    summary = training.fit_resumable(_model(), _data(), str(tmp_path),
                                     training.LoopConfig(steps=8, log_every=2,
                                                         checkpoint_every=2, verbose=0))
    assert summary["start_step"] == 4 and summary["steps"] == 8
    assert np.all(np.isfinite(_kernel_at(os.path.join(checkpoints, "ckpt-6"))))


def test_no_restorable_checkpoint_is_a_checkpoint_error(tmp_path):
    checkpoints = os.path.join(tmp_path, "checkpoints")
    training.fit_resumable(_model(), _data(), str(tmp_path),
                           training.LoopConfig(steps=4, log_every=2, checkpoint_every=2,
                                               verbose=0))
    for n in (2, 4):
        _truncate(os.path.join(checkpoints, f"ckpt-{n}"))
    with pytest.raises(CheckpointError) as err:
        training.restore_or_init(_model(), checkpoints)
    assert checkpoints in str(err.value)
    assert "ckpt-4" in str(err.value) and "ckpt-2" in str(err.value)


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(training.TrainingDivergedError) as err:
        training.fit_resumable(
            _model(), _data(nan_from_step=5), str(tmp_path),
            training.LoopConfig(steps=10, log_every=1, checkpoint_every=1, verbose=0))
    message = str(err.value)
    assert "step 6" in message and "ckpt-5" in message
    latest = tf.train.latest_checkpoint(os.path.join(tmp_path, "checkpoints"))
    assert latest.endswith("ckpt-5")
    restored = _model()
    tf.train.Checkpoint(model=restored).restore(latest).expect_partial()
    assert np.all(np.isfinite(restored.dense.kernel.numpy()))


def test_last_window_is_shorter_when_log_every_does_not_divide_steps(tmp_path):
    # 7 = 3 + 3 + 1: two full windows and a one-step window; the last step is saved.
    result = training.fit_resumable(
        _model(), _data(), str(tmp_path),
        training.LoopConfig(steps=7, log_every=3, checkpoint_every=3, image_every=0, verbose=0))
    assert result["steps"] == 7
    latest = tf.train.latest_checkpoint(os.path.join(tmp_path, "checkpoints"))
    assert latest.endswith("ckpt-7")
    saved = sorted(int(name.split("-")[1].split(".")[0])
                   for name in os.listdir(os.path.join(tmp_path, "checkpoints"))
                   if name.startswith("ckpt-") and name.endswith(".index"))
    assert saved == [3, 6, 7]
    # A run shorter than one window (--steps=2, --log_every=20) is one short window.
    short = training.fit_resumable(
        _model(), _data(), str(tmp_path / "short"),
        training.LoopConfig(steps=2, log_every=20, checkpoint_every=20, image_every=0,
                            verbose=0))
    assert short["steps"] == 2
    assert tf.train.latest_checkpoint(os.path.join(tmp_path, "short", "checkpoints")).endswith(
        "ckpt-2")


def test_resume_inside_the_last_short_window(tmp_path):
    def config(steps):
        return training.LoopConfig(steps=steps, log_every=3, checkpoint_every=3,
                                   image_every=0, verbose=0)
    training.fit_resumable(_model(), _data(), str(tmp_path), config(6))
    resumed = training.fit_resumable(_model(), _data(), str(tmp_path), config(8))
    assert resumed["start_step"] == 6 and resumed["steps"] == 8


@pytest.mark.parametrize("kwargs,flag", [
    (dict(steps=0), "--steps"),
    (dict(steps=10, log_every=0), "--log_every"),
    (dict(steps=10, log_every=2, checkpoint_every=3), "--checkpoint_every"),
    (dict(steps=10, log_every=2, image_every=5), "--image_every"),
])
def test_schedule_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        training.LoopConfig(**kwargs).validate()


def test_coupled_weight_decay_gradient_is_the_weight():
    w = tf.Variable([[1.0, -2.0], [3.0, 0.5]])
    with tf.GradientTape() as tape:
        loss = training.kernel_l2([w])
    np.testing.assert_allclose(float(loss), 0.5 * (1 + 4 + 9 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(loss, w).numpy(), w.numpy())


def test_decayed_kernels_skip_batchnorm():
    model = keras.Sequential([keras.layers.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.BatchNormalization(), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    kernels = training.decayed_kernels(model)
    assert [tuple(k.shape) for k in kernels] == [(3, 3, 3, 4), (144, 2)]


def test_sgd_step_schedule():
    opt = training.make_sgd(0.01, [3, 5], 0.1, 0.9)
    opt.build([tf.Variable(1.0)])
    rates = []
    for step in (0, 2, 3, 4, 5, 9):
        opt.iterations.assign(step)
        rates.append(float(opt.learning_rate))
    np.testing.assert_allclose(rates, [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001], rtol=1e-5)


def test_linear_warmup_then_step_schedule():
    opt = training.make_sgd(0.01, [6], 0.1, 0.9, warmup_steps=4)
    opt.build([tf.Variable(1.0)])
    rates = []
    for step in (0, 1, 3, 5, 6):
        opt.iterations.assign(step)
        rates.append(float(opt.learning_rate))
    np.testing.assert_allclose(rates, [0.0025, 0.005, 0.01, 0.01, 0.001], rtol=1e-5)
