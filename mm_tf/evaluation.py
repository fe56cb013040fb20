"""Segmentation evaluation: confusion matrix, IoU/mIoU, and test-time inference
(whole image or sliding window, optional left-right flip and multi-scale averaging).

mIoU convention: a class's IoU is TP / (TP + FP + FN) over the whole split; classes
that are absent from the ground truth AND never predicted (union 0) are left out of
the mean (reported as null); a class absent from the ground truth but predicted gets
IoU 0. Ignore-label pixels never enter the matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from mm_tf import common


def confusion_matrix(labels, predictions, num_classes: int) -> tf.Tensor:
    """labels, predictions int [...] -> int64 [K, K] (rows: truth, cols: prediction);
    pixels labelled IGNORE_LABEL (or outside [0, K)) are not counted."""
    labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
    predictions = tf.reshape(tf.cast(predictions, tf.int64), [-1])
    keep = (labels >= 0) & (labels < num_classes)
    return tf.math.confusion_matrix(tf.boolean_mask(labels, keep),
                                    tf.boolean_mask(predictions, keep),
                                    num_classes=num_classes, dtype=tf.int64)


def scores_from_confusion(matrix, class_names: Optional[Sequence[str]] = None) -> dict:
    """Confusion matrix [K, K] -> dict(miou, per_class_iou, pixel_acc, mean_acc);
    per-class values are None where the class has no union (see module docstring)."""
    matrix = np.asarray(matrix, np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    gt = matrix.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    total = matrix.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.any(union > 0) else 0.0,
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
        "pixel_acc": float(tp.sum() / total) if total else 0.0,
        "mean_acc": float(np.nanmean(acc)) if np.any(gt > 0) else 0.0,
    }


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """Test-time options.

    Args:
      flip: average with the left-right flipped prediction.
      scales: image scales whose probabilities are averaged (1.0 = as is).
      window: sliding-window side (0 = whole image in one pass).
      stride: sliding-window stride (default: 2/3 of the window).
    """

    flip: bool = False
    scales: tuple = (1.0,)
    window: int = 0
    stride: int = 0


def _sliding_probs(logits_fn, image, num_classes, window, stride):
    """image float32 [1,H,W,C] -> probs [1,H,W,K] averaged over overlapping windows;
    windows past the border are zero-padded (zero = the mean after normalisation)."""
    height, width = int(image.shape[1]), int(image.shape[2])
    stride = stride or max(1, (2 * window) // 3)
    pad_h, pad_w = max(window - height, 0), max(window - width, 0)
    padded = tf.pad(image, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])
    full_h, full_w = height + pad_h, width + pad_w
    total = np.zeros((1, full_h, full_w, num_classes), np.float32)
    count = np.zeros((1, full_h, full_w, 1), np.float32)
    ys = list(range(0, max(full_h - window, 0) + 1, stride))
    xs = list(range(0, max(full_w - window, 0) + 1, stride))
    if ys[-1] + window < full_h:
        ys.append(full_h - window)
    if xs[-1] + window < full_w:
        xs.append(full_w - window)
    for y in ys:
        for x in xs:
            crop = padded[:, y:y + window, x:x + window]
            total[:, y:y + window, x:x + window] += tf.nn.softmax(logits_fn(crop)).numpy()
            count[:, y:y + window, x:x + window] += 1.0
    return (total / count)[:, :height, :width]


def predict_probabilities(logits_fn: Callable, image, num_classes: int,
                          config: InferenceConfig = InferenceConfig()) -> np.ndarray:
    """Class probabilities float32 [1,H,W,K] for image float32 [1,H,W,C], averaged over
    the configured scales and flips. `logits_fn`: [1,h,w,C] -> logits [1,h,w,K]."""
    image = tf.convert_to_tensor(image, tf.float32)
    height, width = int(image.shape[1]), int(image.shape[2])
    total = np.zeros((1, height, width, num_classes), np.float32)
    views = 0
    for scale in config.scales:
        size = (max(1, int(round(height * scale))), max(1, int(round(width * scale))))
        scaled = image if scale == 1.0 else tf.image.resize(image, size, "bilinear")
        for flipped in ((False, True) if config.flip else (False,)):
            view = tf.reverse(scaled, [2]) if flipped else scaled
            if config.window:
                probs = _sliding_probs(logits_fn, view, num_classes, config.window,
                                       config.stride)
            else:
                probs = tf.nn.softmax(logits_fn(view)).numpy()
            if flipped:
                probs = probs[:, :, ::-1]
            if scale != 1.0:
                probs = tf.image.resize(probs, (height, width), "bilinear").numpy()
            total += probs
            views += 1
    return total / views


class Evaluator:
    """Scores a segmentation model on an evaluation dataset.

    Args:
      dataset: batches of one full image: {IMAGE: [1,H,W,C], LABEL: [1,H,W], ...}.
      num_classes: number of classes K.
      class_names: names for per-class IoU keys.
      config: test-time inference options.
      on_prediction: optional callback(batch, prediction int32 [H,W]) (e.g. write PNGs).

    Example:
      >>> scores = Evaluator(eval_ds, info.num_classes, info.class_names).run(model)
      >>> scores["miou"]
    """

    def __init__(self, dataset, num_classes: int, class_names: Sequence[str],
                 config: InferenceConfig = InferenceConfig(),
                 on_prediction: Optional[Callable] = None):
        self.dataset = dataset
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.config = config
        self.on_prediction = on_prediction

    def run(self, model) -> dict:
        """model (images [1,H,W,C] -> logits [1,H,W,K]) -> dict(miou, per_class_iou,
        pixel_acc, mean_acc, confusion_matrix, num_images)."""
        logits_fn = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32),
                                reduce_retracing=True)
        matrix = np.zeros((self.num_classes, self.num_classes), np.int64)
        images = 0
        for batch in self.dataset:
            probs = predict_probabilities(logits_fn, batch[common.IMAGE], self.num_classes,
                                          self.config)
            prediction = np.argmax(probs[0], axis=-1).astype(np.int32)
            matrix += confusion_matrix(batch[common.LABEL][0], prediction,
                                       self.num_classes).numpy()
            if self.on_prediction:
                self.on_prediction(batch, prediction)
            images += 1
        scores = scores_from_confusion(matrix, self.class_names)
        scores.update(confusion_matrix=matrix.tolist(), num_images=images)
        return scores
