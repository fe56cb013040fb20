"""Evaluation: the confusion matrix ignores the ignore label, mIoU matches a matrix
worked out by hand, absent classes follow the documented convention, and test-time
flip / multi-scale / sliding-window inference agree with plain inference where they must."""

import numpy as np
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf import evaluation

IGN = common.IGNORE_LABEL


def test_confusion_matrix_by_hand_and_ignore_excluded():
    labels = np.array([[0, 0, 1, 1], [2, 2, IGN, IGN]])
    preds = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = evaluation.confusion_matrix(labels, preds, 3).numpy()
    expected = np.array([[1, 1, 0],
                         [0, 2, 0],
                         [1, 0, 1]])
    np.testing.assert_array_equal(cm, expected)


def test_scores_from_hand_made_confusion_matrix():
    cm = np.array([[5, 1, 0, 0],
                   [2, 3, 0, 0],
                   [0, 0, 0, 0],    # class 2: absent and never predicted -> left out
                   [0, 0, 0, 0]])
    cm[0, 3] = 1                    # class 3: absent from truth but predicted once -> 0
    scores = evaluation.scores_from_confusion(cm, ["a", "b", "c", "d"])
    iou_a = 5 / (5 + 1 + 1 + 2)      # TP / (row + col - TP) = 5 / (7 + 7 - 5)
    iou_b = 3 / (5 + 4 - 3)
    assert scores["per_class_iou"]["a"] == pytest.approx(iou_a)
    assert scores["per_class_iou"]["b"] == pytest.approx(iou_b)
    assert scores["per_class_iou"]["c"] is None
    assert scores["per_class_iou"]["d"] == 0.0
    assert scores["miou"] == pytest.approx((iou_a + iou_b + 0.0) / 3)
    assert scores["pixel_acc"] == pytest.approx(8 / 12)


def _coordinate_model(num_classes=3):
    """Logits that depend on position and content, so flips/windows are tested for real:
    class k's logit = k * mean-channel value * x-ramp."""
    def logits_fn(x):
        width = tf.shape(x)[2]
        ramp = tf.cast(tf.range(width), tf.float32)[None, None, :, None] / 10.0
        base = tf.reduce_mean(x, axis=-1, keepdims=True)
        return tf.concat([base * ramp * k for k in range(num_classes)], axis=-1)
    return logits_fn


def test_flip_and_window_reduce_to_plain_inference_for_local_models():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 13, 17, 3)).astype(np.float32)
    # A per-pixel model (no position dependence): flips and windows must not change it.
    def local(x):
        return tf.concat([x[..., :1] * k for k in range(3)], axis=-1)
    plain = evaluation.predict_probabilities(local, image, 3)
    flipped = evaluation.predict_probabilities(local, image, 3,
                                               evaluation.InferenceConfig(flip=True))
    windowed = evaluation.predict_probabilities(
        local, image, 3, evaluation.InferenceConfig(window=8, stride=5))
    np.testing.assert_allclose(flipped, plain, atol=1e-6)
    np.testing.assert_allclose(windowed, plain, atol=1e-6)
    # A position-dependent model: flip averaging really averages two different views.
    pos = _coordinate_model()
    a = evaluation.predict_probabilities(pos, image, 3)
    b = evaluation.predict_probabilities(pos, image, 3, evaluation.InferenceConfig(flip=True))
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_allclose(b.sum(-1), 1.0, atol=1e-5)


def test_multiscale_shapes_and_normalisation():
    image = np.ones((1, 9, 11, 3), np.float32)
    probs = evaluation.predict_probabilities(
        _coordinate_model(), image, 3, evaluation.InferenceConfig(scales=(0.5, 1.0, 1.5)))
    assert probs.shape == (1, 9, 11, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_evaluator_perfect_model_scores_one():
    labels = np.array([[[0, 1], [2, IGN]]], np.int32)
    one_hot = tf.one_hot(np.where(labels == IGN, 0, labels), 3) * 10.0
    batch = {common.IMAGE: one_hot, common.LABEL: tf.constant(labels)}
    dataset = tf.data.Dataset.from_tensors(batch).repeat(2)
    scores = evaluation.Evaluator(dataset, 3, ["x", "y", "z"]).run(lambda x, training: x)
    assert scores["miou"] == pytest.approx(1.0)
    assert scores["num_images"] == 2
    assert np.array(scores["confusion_matrix"]).sum() == 6  # ignore pixel not counted
