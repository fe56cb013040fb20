"""Training plumbing shared by the M&M tuner and the segmenter.

`fit_resumable` drives `keras.Model.fit` in windows of `log_every` steps: each window is a
Keras "epoch", so Keras' Mean metrics are windowed averages, TensorBoard scalars are
written once per window at the optimizer's step, and checkpoints land on window
boundaries. When `log_every` does not divide `steps` the last window is shorter (the
remainder), and the final step is always logged and checkpointed. A killed run restarted
with the same work folder restores the newest checkpoint (model, optimizer, step) and
continues; a NaN/inf loss stops the run with a clear message and keeps the last good
checkpoint.

Under a distribution strategy the model, its optimizer and the checkpoint restore live in
the strategy's scope; in multi-worker training every worker saves (saving may need
collective ops) but only the chief writes into the work folder, and every worker restores
from the chief's checkpoints (`mm_tf.distribute`).

Precision (`PRECISIONS`): "float32", or a Keras mixed policy ("mixed_bfloat16",
"mixed_float16") under which layers compute in 16 bits and keep float32 variables; the
train steps cast their outputs to float32 before any loss. float16 needs loss scaling
(`optimizer_for_precision`); bfloat16 has float32's exponent range and does not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import re
import time
from typing import Callable, Optional, Sequence

from absl import logging
import keras
import tensorflow as tf

from mm_tf import distribute
from mm_tf import files
from mm_tf import hooks as hooks_lib
from mm_tf.data import pipeline
from mm_tf.errors import CheckpointError, ConfigError
from mm_tf.models import weights as weights_lib

FLOAT32 = "float32"
MIXED_BFLOAT16 = "mixed_bfloat16"
MIXED_FLOAT16 = "mixed_float16"
PRECISIONS = (FLOAT32, MIXED_BFLOAT16, MIXED_FLOAT16)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to log, checkpoint and write images.

    Args:
      steps: total optimizer steps of the run.
      log_every: steps per logging window (a Keras epoch); the last window is shorter
        when it does not divide `steps`.
      checkpoint_every: steps between checkpoints; a multiple of `log_every`.
      image_every: steps between image summaries (0 = never); a multiple of `log_every`.
      keep_checkpoints: how many checkpoints the manager keeps.
      verbose: Keras progress output (0 silent, 2 one line per window).
    """

    steps: int
    log_every: int = 20
    checkpoint_every: int = 200
    image_every: int = 500
    keep_checkpoints: int = 3
    verbose: int = 2

    def validate(self) -> None:
        """Raises ConfigError naming the flag when the schedule does not tile the run."""
        if self.steps <= 0:
            raise ConfigError(f"--steps must be positive, got {self.steps}")
        if self.log_every <= 0:
            raise ConfigError(f"--log_every must be positive, got {self.log_every}")
        for flag, value in (("checkpoint_every", self.checkpoint_every),
                            ("image_every", self.image_every)):
            if value < 0 or value % self.log_every:
                raise ConfigError(
                    f"--{flag}={value} must be a non-negative multiple of "
                    f"--log_every={self.log_every}")


class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = schedule(step) * min(1, (step + 1) / warmup_steps): a linear ramp over
    the first updates (as TF Model Garden's `linear` warm-up), then the schedule.

    Args:
      schedule: a LearningRateSchedule or a constant learning rate.
      warmup_steps: updates of the ramp (>= 1).
    """

    def __init__(self, schedule, warmup_steps: int):
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        base = (self.schedule(step) if callable(self.schedule)
                else tf.constant(self.schedule, tf.float32))
        return base * tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))

    def get_config(self):
        schedule = (keras.optimizers.schedules.serialize(self.schedule)
                    if callable(self.schedule) else self.schedule)
        return {"schedule": schedule, "warmup_steps": self.warmup_steps}


def make_sgd(learning_rate: float, boundaries, decay: float, momentum: float,
             warmup_steps: int = 0):
    """SGD with momentum and a step schedule: lr x decay from each boundary step on
    (Caffe 'multistep': the update at iteration b already uses the dropped rate), after
    a linear warm-up over `warmup_steps` updates (0: none, the paper)."""
    # Keras switches values only when step > boundary; Caffe when iter >= stepvalue.
    boundaries = [int(b) - 1 for b in boundaries]
    if boundaries:
        values = [learning_rate * decay**i for i in range(len(boundaries) + 1)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    else:
        lr = learning_rate
    if warmup_steps:
        lr = LinearWarmup(lr, warmup_steps)
    return keras.optimizers.SGD(learning_rate=lr, momentum=momentum)


def check_precision(precision: str) -> None:
    """Raises ConfigError naming --precision for an unknown policy name."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision={precision}: expected one of {PRECISIONS}")


@contextlib.contextmanager
def precision_policy(precision: str):
    """Sets Keras' global dtype policy to `precision` for the block (build the models
    inside it: a layer keeps the policy it was created with) and restores the previous
    policy afterwards, so that a run function leaves no global state behind."""
    check_precision(precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


class StepCountingLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Dynamic loss scaling whose `iterations` count every step, skipped ones included.

    Keras 3's LossScaleOptimizer skips the update of a step whose scaled gradients
    overflow and, unlike Keras 2's, then leaves `iterations` behind the number of
    steps run. Logging windows, checkpoints, step seeds and resumption here count
    `optimizer.iterations`, so a skipped step is counted too (Keras 2's behaviour): the
    lr schedule and the step seeds advance as if the step had been applied.
    """

    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()
        self.inner_optimizer.iterations.assign_add(1)


def optimizer_for_precision(optimizer, precision: str):
    """`optimizer` itself, or wrapped in dynamic loss scaling for "mixed_float16". A
    train_step must compute gradients of `optimizer.scale_loss(loss)` (the identity for
    an unwrapped optimizer); `apply` unscales them."""
    check_precision(precision)
    if precision == MIXED_FLOAT16:
        return StepCountingLossScaleOptimizer(optimizer)
    return optimizer


def kernel_l2(variables) -> tf.Tensor:
    """0.5 * sum of squared kernels: Caffe's coupled weight decay (its gradient is w)."""
    terms = [tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in variables]
    if not terms:
        return tf.constant(0.0)
    return 0.5 * tf.add_n(terms)


def decayed_kernels(model: keras.Model):
    """The conv/dense kernels of `model` (weight decay targets; BN and biases are exempt)."""
    kernels = []
    for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and layer.trainable:
            kernels.append(layer.kernel)
    return kernels


class _WindowCallback(keras.callbacks.Callback):
    """Scalars, images, checkpoints and the NaN guard, once per logging window."""

    def __init__(self, manager, writer, config: LoopConfig,
                 image_fn: Optional[Callable[[int], None]], scalar_names: dict):
        super().__init__()
        self._manager = manager
        self._writer = writer
        self._config = config
        self._image_fn = image_fn
        self._scalar_names = scalar_names
        self.diverged_at: Optional[int] = None
        self.last_logs: dict = {}

    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged_at = self._step()
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged_at is not None:
            return  # Never checkpoint a diverged model: the last good one stays newest.
        step = self._step()
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.last_logs = logs
        with self._writer.as_default(step=step):
            for key, value in logs.items():
                tf.summary.scalar(self._scalar_names.get(key, key), value)
            tf.summary.scalar("learning_rate", float(self.model.optimizer.learning_rate))
        if self._image_fn and self._config.image_every and step % self._config.image_every == 0:
            with self._writer.as_default(step=step):
                self._image_fn(step)
        self._writer.flush()
        if (self._config.checkpoint_every and step % self._config.checkpoint_every == 0) or \
                step == self._config.steps:
            self._manager.save(checkpoint_number=step)


def restore_or_init(model: keras.Model, checkpoint_dir: str, keep: int = 3,
                    restore_dir: Optional[str] = None):
    """Builds a CheckpointManager over (model, optimizer) writing to `checkpoint_dir` and
    restores the newest checkpoint of `restore_dir` (default: `checkpoint_dir`) if any;
    returns (manager, restored_step). `model` must be built. Runs in the scope of the
    model's distribution strategy (the optimizer's slots are created there)."""
    with model.distribute_strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        _set_aside_unreadable_state(checkpoint_dir)
        manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=keep)
        _restore_newest_readable(checkpoint, restore_dir or checkpoint_dir)
    return manager, int(model.optimizer.iterations.numpy())


def _read_state(checkpoint_dir: str):
    """The CheckpointManager's state of `checkpoint_dir`; None when it is missing or
    unreadable."""
    try:
        return tf.train.get_checkpoint_state(checkpoint_dir)
    except (tf.errors.OpError, ValueError):  # includes UnicodeDecodeError, a parse error
        return None


def _set_aside_unreadable_state(checkpoint_dir: str) -> None:
    """Renames an unreadable `checkpoint` state file to `checkpoint.unreadable` (the
    manager would fail on it), so the checkpoints are found on disk instead."""
    state_file = os.path.join(checkpoint_dir, "checkpoint")
    if os.path.exists(state_file) and _read_state(checkpoint_dir) is None:
        os.replace(state_file, state_file + ".unreadable")
        logging.warning("%s cannot be parsed; set aside as checkpoint.unreadable, the "
                        "checkpoints are looked up on disk", state_file)


def checkpoints_newest_first(checkpoint_dir: str) -> list:
    """Checkpoint prefixes of `checkpoint_dir`, newest first: the CheckpointManager's
    list, or, when its `checkpoint` state file is missing or unreadable, every
    `ckpt-N.index` on disk by N."""
    state = _read_state(checkpoint_dir)
    if state and state.all_model_checkpoint_paths:
        paths = [os.path.join(checkpoint_dir, os.path.basename(p))
                 for p in state.all_model_checkpoint_paths]
        return [p for p in reversed(paths) if os.path.exists(p + ".index")]
    numbered = []
    for index in glob.glob(os.path.join(checkpoint_dir, "ckpt-*.index")):
        match = re.fullmatch(r"ckpt-(\d+)\.index", os.path.basename(index))
        if match:
            numbered.append((int(match.group(1)), index[:-len(".index")]))
    return [path for _, path in sorted(numbered, reverse=True)]


def _restore_newest_readable(checkpoint: tf.train.Checkpoint, checkpoint_dir: str) -> None:
    """Restores the newest checkpoint of `checkpoint_dir` that reads back whole, warning
    about each newer one that does not (a file cut short or damaged on disk), so a
    damaged newest checkpoint costs the steps since the one before it, not the run.
    Raises CheckpointError when checkpoints exist and none restores (e.g. the folder
    holds another model's run)."""
    problems = []
    for path in checkpoints_newest_first(checkpoint_dir):
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except (tf.errors.OpError, ValueError, IndexError, AssertionError) as e:
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            problems.append(f"{os.path.basename(path)}: {type(e).__name__}: {reason}")
            logging.warning("checkpoint %s cannot be restored (%s); trying the one before it",
                            path, problems[-1])
            continue
        if problems:
            logging.warning("resumed from %s; the newer checkpoints could not be read: %s",
                            path, "; ".join(problems))
        return
    if problems:
        raise CheckpointError(
            f"no checkpoint in {checkpoint_dir} can be restored ({'; '.join(problems)}); "
            "rerun with the flags that wrote them, or pass a new --workdir to start over")


def fit_resumable(model: keras.Model, make_dataset: Callable[[int], tf.data.Dataset],
                  workdir: str, config: LoopConfig, *,
                  image_fn: Optional[Callable[[int], None]] = None,
                  scalar_names: Optional[dict] = None,
                  backbone: Optional[keras.Model] = None,
                  hooks: Sequence[hooks_lib.StageHook] = ()) -> dict:
    """Trains `model` (compiled) to `config.steps`, resuming from `workdir/checkpoints`.

    Args:
      model: a compiled keras.Model whose train_step returns Mean-metric results; built
        in the scope of the strategy it trains under (`model.distribute_strategy`).
      make_dataset: start_step -> an infinite dataset of global batches (Keras splits
        each among the replicas); a resumed run gets the step it resumes from so that it
        can re-seed or skip its data stream.
      workdir: run folder; holds `checkpoints/` and `tensorboard/`. In multi-worker
        training only the chief writes there; the other workers write into a temporary
        folder that is deleted, and all restore from `workdir/checkpoints`.
      config: the loop schedule.
      image_fn: step -> None, writes image summaries (called inside the writer context).
      scalar_names: Keras log key -> TensorBoard tag (e.g. "loss" -> "losses/total").
      backbone: the backbone the stage trains, if any: its layer movement is logged
        (`hooks.MovementHook`: `movement/<layer>`, and the summary fields).
      hooks: more `hooks.StageHook`s (e.g. the M&M probe), run after the checkpoint of
        each window end.

    Returns:
      dict(steps, start_step, seconds, logs, chief, fields) where logs are the last
      window's metrics, chief tells whether this task wrote into `workdir` and fields
      are the hooks' summary fields (`movement` when a backbone is given).

    Raises:
      TrainingDivergedError: the loss became NaN/inf (the message names the step and the
        checkpoint that is kept).
    """
    config.validate()
    strategy = model.distribute_strategy
    with distribute.writable_workdir(strategy, workdir) as write_dir:
        manager, start_step = restore_or_init(
            model, os.path.join(write_dir, "checkpoints"), config.keep_checkpoints,
            restore_dir=os.path.join(workdir, "checkpoints"))
        full_windows = config.steps // config.log_every
        if start_step % config.log_every and start_step < config.steps:
            raise ConfigError(f"checkpoint step {start_step} in {workdir} is not a multiple "
                              f"of --log_every={config.log_every}; resume with the original "
                              "flags")
        writer = tf.summary.create_file_writer(os.path.join(write_dir, "tensorboard", "train"))
        callback = _WindowCallback(manager, writer, config, image_fn, scalar_names or {})
        stage_hooks = ([hooks_lib.MovementHook(backbone)] if backbone is not None else []
                       ) + list(hooks)
        started = time.time()
        for hook in stage_hooks:
            hook.set_model(model)
            hook.begin(writer, write_dir, start_step, distribute.is_chief(strategy))
        # The window callback first: a hook's files are never ahead of the checkpoint.
        callbacks = [callback, *stage_hooks]
        if start_step < full_windows * config.log_every:
            model.fit(make_dataset(start_step),
                      steps_per_epoch=config.log_every,
                      epochs=full_windows,
                      initial_epoch=start_step // config.log_every,
                      callbacks=callbacks, verbose=config.verbose)
        done = int(model.optimizer.iterations.numpy())
        if done < config.steps and callback.diverged_at is None:
            # Keras epochs have one length per fit call: the remainder is a second call.
            model.fit(make_dataset(done), steps_per_epoch=config.steps - done, epochs=1,
                      callbacks=callbacks, verbose=config.verbose)
        fields = {}
        if callback.diverged_at is None:
            for hook in stage_hooks:
                fields.update(hook.end())
        writer.close()
    if callback.diverged_at is not None:
        kept = (tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
                or "none (no checkpoint was written yet)")
        raise TrainingDivergedError(
            f"loss became NaN or infinite at step {callback.diverged_at}; training stopped. "
            f"Last good checkpoint: {kept}. Lower the learning rate or check the data.")
    return {"steps": int(model.optimizer.iterations.numpy()), "start_step": start_step,
            "seconds": time.time() - started, "logs": callback.last_logs,
            "chief": distribute.is_chief(strategy), "fields": fields}


def resumable_train_data(pairs, info, input_config: pipeline.InputConfig,
                         **options) -> Callable[[int], tf.data.Dataset]:
    """start_step -> the training stream of `pipeline.train_dataset`, re-seeded from the
    step a resumed run starts at (so it does not replay the first run's batches)."""
    def make_dataset(start_step: int) -> tf.data.Dataset:
        resumed = dataclasses.replace(input_config, seed=input_config.seed + start_step)
        return pipeline.train_dataset(pairs, info, resumed, **options)
    return make_dataset


def run_backbone_stage(model: keras.Model, backbone: keras.Model,
                       make_dataset: Callable[[int], tf.data.Dataset], workdir: str,
                       config: LoopConfig, *, stage: str, fields: dict,
                       image_fn: Optional[Callable[[int], None]] = None,
                       scalar_names: Optional[dict] = None,
                       hooks: Sequence[hooks_lib.StageHook] = (),
                       finalize: Optional[Callable[[], dict]] = None) -> dict:
    """Trains a stage whose product is a backbone (proxy tasks, M&M tuning): runs
    `fit_resumable` (with the backbone's movement and `hooks`), then `finalize` (which
    may change the backbone before it is written, and returns summary fields), then the
    chief writes `workdir/backbone.weights.h5` and `workdir/summary.json` (stage, steps,
    resumed_from_step, seconds, last window's metrics, backbone_weights, movement, the
    hooks' fields, plus the stage's own `fields`); returns the summary."""
    started = time.time()
    result = fit_resumable(model, make_dataset, workdir, config, image_fn=image_fn,
                           scalar_names=scalar_names, backbone=backbone, hooks=hooks)
    if finalize is not None and result["chief"]:
        # After fit: the checkpoints keep the trained weights, so a rerun finalizes the
        # same weights again instead of compounding the change.
        fields = {**fields, **finalize()}
    weights_path = os.path.join(workdir, "backbone.weights.h5")
    summary = {
        "stage": stage,
        "steps": result["steps"],
        "resumed_from_step": result["start_step"],
        "seconds": time.time() - started,
        "metrics": result["logs"],
        "backbone_weights": weights_path,
        **result["fields"],
        **fields,
    }
    if result["chief"]:
        weights_lib.save_backbone_weights(backbone, weights_path)
        files.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    return summary
