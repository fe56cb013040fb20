"""Scale-out: distribution strategies, the chief's and the other workers' folders, and
two workarounds that let Keras 3.15's `fit` train under every strategy.

Strategies (`make_strategy`):
  default       one device (the first GPU, else the CPU); no replicas.
  mirrored      `tf.distribute.MirroredStrategy`: one replica per local GPU, or per
                logical CPU device when the machine has no GPU (`num_cpu_devices` splits
                the CPU into N logical devices, for testing and benchmarks).
  multi_worker  `tf.distribute.MultiWorkerMirroredStrategy`: one replica per GPU (or the
                CPU) of every machine listed in the `TF_CONFIG` environment variable.
Batches are global: a step's batch of B images is split into B / replicas per replica,
and Keras sums the replicas' gradients (`optimizer.apply` all-reduces with SUM), so every
loss is scaled once in its `train_step` for that sum.

Multi-worker files follow the TensorFlow/Keras pattern: every worker runs the same
program and saves checkpoints (a save may need collective ops, so all must take part),
but only the chief writes into the real work folder; the others write into a temporary
folder that they delete at the end. Every worker restores from the chief's checkpoints,
so the work folder must be on a file system that all workers see.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import tensorflow as tf

from mm_tf.errors import ConfigError

DEFAULT = "default"
MIRRORED = "mirrored"
MULTI_WORKER = "multi_worker"
STRATEGIES = (DEFAULT, MIRRORED, MULTI_WORKER)


def set_cpu_devices(num_devices: int) -> None:
    """Splits the (first) physical CPU into `num_devices` logical devices.

    Must run before TensorFlow initialises its runtime (before any op, dataset or
    variable is created); afterwards TensorFlow refuses and this raises ConfigError.
    """
    if num_devices < 1:
        raise ConfigError(f"--num_cpu_devices={num_devices}: expected an integer >= 1")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == num_devices:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError as e:
        raise ConfigError(f"--num_cpu_devices={num_devices}: TensorFlow is already "
                          f"initialised; set it before any op runs ({e})") from e


def make_strategy(kind: str, num_cpu_devices: int = 0) -> tf.distribute.Strategy:
    """A tf.distribute strategy by name (see the module docstring).

    Args:
      kind: "default", "mirrored" or "multi_worker".
      num_cpu_devices: with "mirrored" on a machine without GPU, replicate over this many
        logical CPU devices (0 = leave the CPU as one device). Call this before any other
        TensorFlow work: logical devices and the multi-worker runtime must be set up
        before TensorFlow initialises.

    Raises:
      ConfigError: unknown kind, num_cpu_devices with another strategy than mirrored, a
        multi-worker strategy without TF_CONFIG, or a runtime already initialised.
    """
    if kind not in STRATEGIES:
        raise ConfigError(f"--strategy={kind}: expected one of {STRATEGIES}")
    if num_cpu_devices < 0:
        raise ConfigError(f"--num_cpu_devices={num_cpu_devices}: expected >= 0")
    if num_cpu_devices and kind != MIRRORED:
        raise ConfigError(f"--num_cpu_devices={num_cpu_devices} splits the CPU into "
                          f"replicas of --strategy=mirrored, not --strategy={kind}")
    if kind == DEFAULT:
        return tf.distribute.get_strategy()
    if kind == MIRRORED:
        if num_cpu_devices:
            set_cpu_devices(num_cpu_devices)
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        # Without GPUs MirroredStrategy would take CPU:0 only; name every logical CPU.
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(cpus)
    if not os.environ.get("TF_CONFIG"):
        raise ConfigError("--strategy=multi_worker reads the cluster from the TF_CONFIG "
                          "environment variable, which is not set (see docs/distributed.md)")
    return tf.distribute.MultiWorkerMirroredStrategy()


def strategy_kind(strategy: tf.distribute.Strategy) -> str:
    """The `make_strategy` name of a strategy ("default", "mirrored", "multi_worker"),
    else its class name."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return MULTI_WORKER
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return MIRRORED
    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        return DEFAULT
    return type(strategy).__name__


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one task that writes checkpoints, summaries and outputs (always True
    outside multi-worker training)."""
    return bool(strategy.extended.should_checkpoint)


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    """True under MultiWorkerMirroredStrategy with more than one worker (Keras' own test
    for its multi-worker code paths)."""
    extended = strategy.extended
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and bool(getattr(extended, "_in_multi_worker_mode", lambda: False)()))


def task_name(strategy: tf.distribute.Strategy) -> str:
    """'worker_1', 'chief_0', ... in a multi-worker cluster; 'local' otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "local"
    return f"{resolver.task_type}_{resolver.task_id}"


@contextlib.contextmanager
def writable_workdir(strategy: tf.distribute.Strategy, workdir: str):
    """Yields the folder this task writes into: `workdir` on the chief, a temporary
    folder on every other worker (deleted when the block ends, even on error)."""
    if is_chief(strategy):
        yield workdir
        return
    folder = tempfile.mkdtemp(prefix=f"mm_tf_{task_name(strategy)}_")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def per_replica_batch(global_batch: int, strategy: tf.distribute.Strategy,
                      flag: str = "--batch_size") -> int:
    """global_batch / replicas; ConfigError naming `flag` when it does not divide."""
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise ConfigError(f"{flag}={global_batch} is the global batch and must be "
                          f"divisible by the {replicas} replicas of the strategy")
    return global_batch // replicas


def keras_can_jit(strategy: tf.distribute.Strategy) -> bool:
    """Whether `compile(jit_compile=True)` works under `strategy`.

    Keras 3.15 compiles `strategy.run(train_step)` as one XLA function; with more than one
    device that fails ("Trying to access resource ... located in device CPU:1 from device
    CPU:0", measured), and collective ops have no XLA kernel. The models then compile
    each replica's computation between the collectives instead (`compile_replica_step`).
    """
    return strategy.num_replicas_in_sync == 1 and not in_multi_worker_mode(strategy)


class StrategyFitMixin:
    """Lets a custom-`train_step` keras.Model run `fit` under MultiWorkerMirroredStrategy.

    Two Keras 3.15 issues, both measured with 2 workers on localhost:
    - under any strategy `fit` first reduces one input batch across replicas to build the
      model symbolically; MultiWorkerMirroredStrategy's `reduce` rejects a dict batch
      ("Attempt to convert a value ({'image': PerReplica...}) ... to a Tensor"). Models
      using this mixin hold every weight after __init__, so the build is skipped (the
      optimizer is built here in the strategy's scope, as Keras would).
    - the step's outputs are reduced with `strategy.reduce("MEAN", v, axis=0)`, which
      fails on scalars ("Invalid reduction dimension 0 for input with 0 dimensions");
      `fit_logs` gives them a length-1 axis there, and the reduction returns scalars.
    Put the mixin before keras.Model in the bases.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):  # Keras hook
        del iterator, data_batch
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    @staticmethod
    def fit_logs(values: dict) -> dict:
        """The train_step's {name: scalar} in the shape Keras can reduce."""
        if in_multi_worker_mode(tf.distribute.get_strategy()):
            return {name: tf.reshape(value, [1]) for name, value in values.items()}
        return values
