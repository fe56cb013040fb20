"""mm_tf/hooks.py: layer movement is ||W - W0|| / ||W0|| by hand, zero after a zero-lr
run, equal to the hand value after one known SGD update, measured from the stage's start
after a resume, and logged into summary fields by training.fit_resumable."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_tf import hooks
from mm_tf import training

X = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
Y = np.array([[1.0], [0.0]], np.float32)
W0 = np.array([[0.5], [-1.0]], np.float32)


class Regression(keras.Model):
    """y = x w (a functional "backbone" of one Dense layer) under an MSE loss."""

    def __init__(self):
        inputs = keras.Input((2,))
        dense = keras.layers.Dense(1, use_bias=False, name="dense",
                                   kernel_initializer=keras.initializers.Constant(W0))
        self.backbone = keras.Model(inputs, dense(inputs), name="toy_backbone")
        super().__init__()
        self.tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.tracker]

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self.backbone(x) - y))
        variables = self.backbone.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        self.tracker.update_state(loss)
        return {"loss": self.tracker.result()}


def _fit(workdir, lr, steps):
    model = Regression()
    model.compile(optimizer=keras.optimizers.SGD(lr))
    data = lambda _: tf.data.Dataset.from_tensors((X, Y)).repeat()  # noqa: E731
    result = training.fit_resumable(
        model, data, workdir, training.LoopConfig(steps=steps, log_every=1, image_every=0,
                                                  checkpoint_every=1, verbose=0),
        backbone=model.backbone)
    return result, model


def test_relative_movement_by_hand():
    moved = hooks.relative_movement({"a": np.array([[3.0, 4.0]]), "b": np.ones((2, 2))},
                                    {"a": np.array([[0.0, 4.0]]), "b": np.ones((2, 2))})
    assert moved == {"a": pytest.approx(3.0 / 4.0), "b": 0.0}


def test_zero_after_a_zero_lr_run(tmp_path):
    result, _ = _fit(str(tmp_path), lr=0.0, steps=2)
    assert result["fields"] == {"movement": {"dense": 0.0}, "movement_from_step": 0}
    tags = set()
    folder = tmp_path / "tensorboard" / "train"
    for name in os.listdir(folder):
        for event in tf.compat.v1.train.summary_iterator(str(folder / name)):
            tags.update(value.tag for value in event.summary.value)
    assert "movement/dense" in tags


def test_hand_value_after_one_known_update_and_from_the_start_after_resume(tmp_path):
    lr = 0.1
    # d/dw mean((x w - y)^2) = (2 / B) x^T (x w - y); one SGD step w1 = w0 - lr * grad.
    w1 = W0 - lr * (2.0 / len(X)) * X.T @ (X @ W0 - Y)
    expected = np.linalg.norm(w1 - W0) / np.linalg.norm(W0)
    result, model = _fit(str(tmp_path), lr=lr, steps=1)
    np.testing.assert_allclose(model.backbone.get_layer("dense").kernel.numpy(), w1,
                               rtol=1e-6)
    assert result["fields"]["movement"]["dense"] == pytest.approx(expected, rel=1e-5)
    assert os.path.isfile(tmp_path / hooks.MOVEMENT_REFERENCE)
    # Resumed to step 3: still measured from W0, not from the resume point (step 1).
    resumed, model = _fit(str(tmp_path), lr=lr, steps=3)
    assert resumed["start_step"] == 1 and resumed["fields"]["movement_from_step"] == 0
    w3 = model.backbone.get_layer("dense").kernel.numpy()
    assert resumed["fields"]["movement"]["dense"] == pytest.approx(
        np.linalg.norm(w3 - W0) / np.linalg.norm(W0), rel=1e-5)
