"""Stage hooks: callbacks of `training.fit_resumable` that live for a whole stage, and
the layer-movement hook every backbone-training stage gets from it.

A stage runs `fit` in windows and may be killed and resumed, so a Keras callback alone
does not see the stage: a `StageHook` is told where the stage starts (`begin`, after the
checkpoint restore, with the run's TensorBoard writer and the folder it may write), sees
the window ends (Keras `on_epoch_end`) and gives the fields it adds to summary.json at
the end (`end`), also when a rerun of a finished stage trains no step at all.

Layer movement: for every backbone layer with a kernel, ||W - W0|| / ||W0|| (Frobenius
norms), W0 the kernel at the stage's start. The first run of a stage (start step 0)
saves every backbone weight to `workdir/movement_reference.npz`; a resumed run reads W0
from there, so movement is always measured from the stage's start. A resumed run of a
stage started before this file existed measures from its resume point and says so
(`movement_from_step`).
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import keras
import numpy as np
import tensorflow as tf

from mm_tf.models import weights as weights_lib

MOVEMENT_REFERENCE = "movement_reference.npz"
# npz keys are "<layer>/<variable>" (`weights.save_npz`); Keras names a kernel "kernel".
_KERNEL = "kernel"


class StageHook(keras.callbacks.Callback):
    """A callback that `training.fit_resumable` also tells where the stage starts and
    asks for summary fields at its end.

    Attributes set by `begin`: `writer` (the run's tf.summary writer of
    tensorboard/train, open during fit), `write_dir` (the work folder, or a temporary
    one on non-chief workers), `chief`, `start_step`.
    """

    def __init__(self):
        super().__init__()
        self.writer = None
        self.write_dir: Optional[str] = None
        self.chief = True
        self.start_step = 0

    def begin(self, writer, write_dir: str, start_step: int, chief: bool) -> None:
        """Called once per fit_resumable, after the restore and before any fit."""
        self.writer, self.write_dir = writer, write_dir
        self.start_step, self.chief = int(start_step), bool(chief)

    def end(self) -> dict:
        """Fields for the stage's summary.json (called after the last fit, in order)."""
        return {}


def backbone_kernels(backbone: keras.Model) -> Dict[str, tf.Variable]:
    """Layer name -> kernel variable of every layer of `backbone` that has one."""
    return {layer.name: layer.kernel for layer in backbone.layers
            if getattr(layer, _KERNEL, None) is not None}


def relative_movement(kernels: Dict[str, np.ndarray],
                      reference: Dict[str, np.ndarray]) -> Dict[str, float]:
    """{layer: ||W - W0|| / ||W0||} for the layers of `kernels` (any shapes, per layer
    equal to the reference's); a zero reference kernel gives ||W|| (no division by 0)."""
    movement = {}
    for name, kernel in kernels.items():
        w0 = np.asarray(reference[name], np.float64)
        delta = float(np.linalg.norm(np.asarray(kernel, np.float64) - w0))
        scale = float(np.linalg.norm(w0))
        movement[name] = delta / scale if scale > 0 else delta
    return movement


class MovementHook(StageHook):
    """Logs `movement/<layer>` (relative kernel change from the stage's start) at every
    window end and adds `movement` {layer: value} and `movement_from_step` to summary.json.

    Args:
      backbone: the functional backbone the stage trains (M&M and proxies: the backbone;
        segmentation: `model.backbone`).
    """

    def __init__(self, backbone: keras.Model):
        super().__init__()
        self._backbone = backbone
        self._kernels = backbone_kernels(backbone)
        self._reference: Dict[str, np.ndarray] = {}
        self.from_step = 0

    def begin(self, writer, write_dir, start_step, chief):
        super().begin(writer, write_dir, start_step, chief)
        path = os.path.join(write_dir, MOVEMENT_REFERENCE)
        if start_step > 0 and os.path.isfile(path):
            with np.load(path, allow_pickle=False) as stored:
                self._reference = {name: stored[f"{name}/{_KERNEL}"] for name in self._kernels}
            self.from_step = 0
            return
        # Step 0 is the stage's start (a restart before the first checkpoint starts over).
        self._reference = {name: v.numpy().copy() for name, v in self._kernels.items()}
        self.from_step = start_step
        if start_step == 0:
            weights_lib.save_npz(self._backbone, path)

    def movement(self) -> Dict[str, float]:
        """{layer: ||W - W0|| / ||W0||} now."""
        return relative_movement({n: v.numpy() for n, v in self._kernels.items()},
                                 self._reference)

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training:
            return  # A diverged window: its weights are not kept.
        step = int(self.model.optimizer.iterations.numpy())
        with self.writer.as_default(step=step):
            for name, value in self.movement().items():
                tf.summary.scalar(f"movement/{name}", value)

    def end(self) -> dict:
        return {"movement": self.movement(), "movement_from_step": self.from_step}
