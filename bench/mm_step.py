"""Benchmark of the M&M training step against the backbone alone, plus the graph layer.

    .venv/bin/python bench/mm_step.py --json

At the paper's shapes (16 images of 512x512, 9 patches per image = 144 patches of
128x128, full-width VGG-16-BN) it times, interleaved in one run so load affects both
alike:
  * the full M&M train step (mix -> pool5 -> match -> triplet loss -> SGD update), and
  * the backbone's own forward + backward + SGD update on the same 144 patches,
and reports `step_overhead_ratio` = full / backbone (target <= 1.10) and the M&M step's
`images_per_s`. It also runs bench/graph_bench.py's match-layer timings (graph mode and
XLA vs the plain-Python release algorithm). Prints one JSON line last.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graph_bench  # noqa: E402
from mm_tf import common  # noqa: E402
from mm_tf import mix as mix_lib  # noqa: E402
from mm_tf import tuner as tuner_lib  # noqa: E402
from mm_tf.models import backbones  # noqa: E402


def _batch(batch, size, num_classes=21, seed=0):
    """Random images [B,S,S,3] and block label maps [B,S,S] with background and objects."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 60.0, (batch, size, size, 3)).astype(np.float32)
    labels = np.zeros((batch, size, size), np.int32)
    for b in range(batch):
        for _ in range(4):
            y, x = rng.integers(0, size - size // 4, 2)
            h, w = rng.integers(size // 8, size // 3, 2)
            labels[b, y:y + h, x:x + w] = rng.integers(1, num_classes)
    return tf.constant(images), tf.constant(labels)


def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_step_bench(batch=16, size=512, width=1.0, runs=5, jit_compile=False):
    """Times the full M&M step and the backbone-only step, interleaved; returns a dict."""
    keras.utils.set_random_seed(0)
    images, labels = _batch(batch, size)
    mix_config = mix_lib.MixConfig(use_gather_resize=jit_compile)
    model = tuner_lib.MMTuner(backbones.build_backbone("vgg16", width=width), mix_config)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=jit_compile)
    model.optimizer.build(model.features.trainable_variables)
    data = {common.IMAGE: images, common.LABEL: labels}
    full_step = tf.function(model.train_step, jit_compile=jit_compile)

    patches = model.mix(images, labels, tf.constant([0, 0], tf.int32)).patches
    variables = model.features.trainable_variables
    pool5_shape = model.features(patches[:1]).shape[1:]  # the backbone has no fixed size
    probe = tf.random.stateless_normal(pool5_shape, [1, 2])

    def backbone_only(x):
        # The same forward/backward/update, with a trivial loss instead of mix/match/loss.
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model.features(x, training=True) * probe)
        model.optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    backbone_step = tf.function(backbone_only, jit_compile=jit_compile)
    full = lambda: float(full_step(data)["loss"])  # noqa: E731  .numpy() waits for the step
    alone = lambda: float(backbone_step(patches))  # noqa: E731
    full()
    alone()  # warm-up: tracing and compilation
    full_s, alone_s = [], []
    for _ in range(runs):
        full_s.append(_time(full))
        alone_s.append(_time(alone))
    full_med, alone_med = statistics.median(full_s), statistics.median(alone_s)
    return {
        "full_step_s": full_med, "backbone_step_s": alone_med,
        "step_overhead_ratio": full_med / alone_med,
        "images_per_s": batch / full_med,
        "patches": int(patches.shape[0]), "batch": batch, "image_size": size,
        "width": width, "jit_compile": jit_compile, "runs": runs,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    parser.add_argument("--runs", type=int, default=5, help="timed steps of each kind")
    parser.add_argument("--width", type=float, default=1.0, help="backbone width")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument("--skip_graph", action="store_true", help="skip the match bench")
    args = parser.parse_args()
    result = {"tf_version": tf.__version__, "cores": os.cpu_count()}
    if not args.skip_graph:
        graph = graph_bench.run_graph_bench()
        result.update({k: {str(n): v for n, v in graph[k].items()}
                       for k in ("graph_ms", "python_reference_ms", "speedup")})
        result["graph_modes_ms"] = {mode: {str(n): v for n, v in times.items()}
                                    for mode, times in graph["graph_modes_ms"].items()}
    result.update(run_step_bench(args.batch, args.size, args.width, args.runs,
                                 args.jit_compile))
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
