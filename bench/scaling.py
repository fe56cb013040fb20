"""Scale-out benchmark: the M&M step on 1 and 2 replicas, the global graph at multi-GPU
sizes, and the cost of all_gather itself.

    .venv/bin/python bench/scaling.py --json

1. Steps/s and images/s (median step time within one `fit`) of the M&M step (global graph) with the default
   strategy (1 replica) and MirroredStrategy over 2 logical CPU devices, one subprocess
   per configuration (logical devices must be set before TensorFlow initialises). On a
   CPU the logical devices share the same cores: this measures the overhead of the
   replicated step (all_gather, gradient all-reduce, per-replica mix and graph), not a
   speed-up; on GPUs each replica has its own device.
2. Building the triplets of one global graph (`match.build_triplets`, graph mode and
   XLA, median of repeated runs) at N = 8 GPUs x 16 images x 9 patches = 1152 nodes and
   32 GPUs = 4608 nodes. In global mode every replica builds this same graph.
3. all_gather on 2 logical devices of pool5-sized float32 features (per replica 8 images
   x 9 patches of 128x128 -> pool5 4x4x512), forward alone and forward + gradient (its
   backward is a cross-replica sum), against a replica step that returns its input.
Prints one JSON line last (with --json, only that line).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _median_seconds(fn, runs):
    fn()  # trace / compile
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def child_step(replicas, args):
    """Runs in a subprocess: times `fit` steps on `replicas` replicas; returns a dict."""
    from mm_tf import distribute  # pylint: disable=import-outside-toplevel
    strategy = distribute.make_strategy("mirrored", replicas) if replicas > 1 else (
        distribute.make_strategy("default"))
    import keras  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from mm_tf import common  # pylint: disable=import-outside-toplevel
    from mm_tf import mix as mix_lib  # pylint: disable=import-outside-toplevel
    from mm_tf import tuner as tuner_lib  # pylint: disable=import-outside-toplevel
    from mm_tf.models import backbones  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    size, batch = args.size, args.batch
    images = rng.normal(0, 60, (batch, size, size, 3)).astype(np.float32)
    labels = np.zeros((batch, size, size), np.int32)
    for b in range(batch):
        for _ in range(4):
            y, x = rng.integers(0, size - size // 4, 2)
            labels[b, y:y + size // 4, x:x + size // 4] = rng.integers(1, 21)
    mix_config = mix_lib.MixConfig(patches_per_image=9, patch_size=args.patch,
                                   min_side=args.patch // 2, max_side=args.patch * 2,
                                   use_gather_resize=False)
    with strategy.scope():
        model = tuner_lib.MMTuner(backbones.build_backbone("vgg16", width=args.width),
                                  mix_config, graph_scope="global")
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    data = tf.data.Dataset.from_tensors({common.IMAGE: images, common.LABEL: labels})
    data = data.repeat()
    ends = []
    timer = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    warmup = 2  # the first step traces
    model.fit(data, steps_per_epoch=warmup + args.steps, epochs=1, verbose=0,
              callbacks=[timer])
    step_seconds = statistics.median(b - a for a, b in zip(ends[warmup - 1:], ends[warmup:]))
    result = {"replicas": strategy.num_replicas_in_sync,
              "median_step_s": step_seconds,
              "steps_per_s": 1.0 / step_seconds,
              "images_per_s": batch / step_seconds,
              "graph_nodes": batch * mix_config.patches_per_image}
    if replicas > 1:
        result["all_gather"] = _all_gather_cost(strategy, args.runs)
    return result


def _all_gather_cost(strategy, runs):
    """Median ms of all_gather of pool5-sized features on `strategy`'s replicas."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    per_replica_nodes = 8 * 9
    shape = [per_replica_nodes, 4, 4, 512]  # pool5 of 128x128 patches, VGG-16

    def value_fn(context):
        return tf.random.stateless_normal(shape, [context.replica_id_in_sync_group, 0])

    features = strategy.experimental_distribute_values_from_function(value_fn)
    weights = tf.random.stateless_normal([per_replica_nodes * strategy.num_replicas_in_sync,
                                          4, 4, 512], [9, 9])

    def identity(x):
        return tf.reduce_sum(x)

    def gather(x):
        return tf.reduce_sum(tf.distribute.get_replica_context().all_gather(x, axis=0))

    def gather_and_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            gathered = tf.distribute.get_replica_context().all_gather(x, axis=0)
            loss = tf.reduce_sum(gathered * weights)
        return tf.reduce_sum(tape.gradient(loss, x))

    result = {"per_replica_shape": shape,
              "gathered_mbytes": 4 * per_replica_nodes * 8192
              * strategy.num_replicas_in_sync / 1e6}
    for name, fn in (("identity_ms", identity), ("all_gather_ms", gather),
                     ("all_gather_with_gradient_ms", gather_and_gradient)):
        step = tf.function(lambda x, fn=fn: strategy.run(fn, args=(x,)))
        result[name] = 1000 * _median_seconds(lambda step=step: step(features), runs)
    return result


def graph_times(runs):
    """Median ms of build_triplets at global-graph sizes (graph mode and XLA)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from mm_tf import match  # pylint: disable=import-outside-toplevel
    results = {}
    for gpus in (8, 32):
        n = gpus * 16 * 9
        labels = tf.random.stateless_uniform([n], [1, n], maxval=21, dtype=tf.int32)
        valid = tf.ones([n], tf.bool)
        seed = tf.constant([0, 1], tf.int32)
        entry = {"gpus": gpus, "images": gpus * 16, "nodes": n}
        for name, jit in (("graph_ms", False), ("xla_ms", True)):
            fn = tf.function(lambda l, v, s: match.build_triplets(l, v, s), jit_compile=jit)
            entry[name] = 1000 * _median_seconds(
                lambda fn=fn: [t.numpy() for t in fn(labels, valid, seed)], runs)
        results[f"n{n}"] = entry
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--steps", type=int, default=5, help="timed fit steps per config")
    parser.add_argument("--batch", type=int, default=8, help="global batch (images)")
    parser.add_argument("--size", type=int, default=128, help="image side")
    parser.add_argument("--patch", type=int, default=64, help="patch side")
    parser.add_argument("--width", type=float, default=0.25, help="VGG-16 width")
    parser.add_argument("--runs", type=int, default=20, help="repeats of the timings")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_step(args.child, args)))
        return
    steps = []
    for replicas in (1, 2):
        command = [sys.executable, __file__, f"--child={replicas}", f"--steps={args.steps}",
                   f"--batch={args.batch}", f"--size={args.size}", f"--patch={args.patch}",
                   f"--width={args.width}", f"--runs={args.runs}"]
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if result.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        steps.append(json.loads(result.stdout.strip().splitlines()[-1]))
        if not args.json:
            print(steps[-1], flush=True)
    report = {
        "config": {"global_batch": args.batch, "image_size": args.size,
                   "patch_size": args.patch, "patches_per_image": 9,
                   "vgg16_width": args.width, "timed_steps": args.steps,
                   "cpu_cores": os.cpu_count()},
        "steps": steps,
        "two_replica_speed_ratio": steps[1]["steps_per_s"] / steps[0]["steps_per_s"],
        "global_graph": graph_times(args.runs),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
