"""Throughput of the training input pipeline (images/s) with the default tf.data options.

Two cases: (a) the paper's setting, 512x512 crops in batches of 16, on 64 generated
VOC-sized (375x500 JPEG) synthetic images; (b) CamVid (480x360 PNGs) from
../shared/data/camvid, skipped with a reason when absent. Each case warms up, then
times whole batches for about --seconds. The last line printed with --json is one JSON
object.

Example:
  python bench/input_pipeline.py --json
"""

import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from mm_tf.data import datasets, pipeline, synthetic  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

flags.DEFINE_bool("json", False, "Print one JSON line with the results last.")
flags.DEFINE_float("seconds", 8.0, "Timing budget per case, after warm-up.")
flags.DEFINE_integer("warmup_batches", 2, "Batches consumed before timing.")
flags.DEFINE_string(
    "camvid_dir", str(REPO_ROOT.parent / "shared" / "data" / "camvid"), "CamVid folder."
)
flags.DEFINE_integer(
    "camvid_crop", 352, "CamVid crop side (multiple of 32, below the 360-pixel height)."
)
flags.DEFINE_integer("camvid_batch", 8, "CamVid batch size.")
FLAGS = flags.FLAGS


def measure(dataset: tf.data.Dataset, batch_size: int, seconds: float, warmup: int) -> dict:
    """Time whole batches for about `seconds` after `warmup` batches; return images/s."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    batches, start = 0, time.perf_counter()
    while True:
        next(iterator)
        batches += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return {
        "images_per_s": round(batches * batch_size / elapsed, 2),
        "batches_timed": batches,
        "seconds": round(elapsed, 2),
    }


def bench_512(tmp_dir: str, seconds: float, warmup: int) -> dict:
    """Benchmark 512 crops, batch 16, on 64 generated 375x500 JPEG images."""
    root = synthetic.generate_demo_dataset(
        pathlib.Path(tmp_dir) / "voc_like",
        num_train=64,
        num_val=0,
        height=375,
        width=500,
        seed=0,
        image_format="jpg",
    )
    pairs, info = datasets.read_dataset("demo", root, "train")
    config = pipeline.InputConfig(crop_size=512, batch_size=16)
    result = measure(
        pipeline.train_dataset(pairs, info, config), config.batch_size, seconds, warmup
    )
    return {
        **result,
        "batch_size": config.batch_size,
        "crop": config.crop_size,
        "data": "64 synthetic 375x500 JPEG",
    }


def bench_camvid(camvid_dir: str, crop: int, batch_size: int, seconds: float, warmup: int) -> dict:
    """Benchmark the CamVid training pipeline, or say why it was skipped."""
    if not (pathlib.Path(camvid_dir) / "train.txt").is_file():
        return {"skipped": f"CamVid not found at {camvid_dir}"}
    pairs, info = datasets.read_dataset("camvid", camvid_dir, "train")
    config = pipeline.InputConfig(crop_size=crop, batch_size=batch_size)
    result = measure(pipeline.train_dataset(pairs, info, config), batch_size, seconds, warmup)
    return {
        **result,
        "batch_size": batch_size,
        "crop": crop,
        "data": f"CamVid train ({len(pairs)} images)",
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="mm_tf_bench_") as tmp_dir:
        results["train_512"] = bench_512(tmp_dir, FLAGS.seconds, FLAGS.warmup_batches)
    print(f"train_512: {results['train_512']}")
    results["camvid"] = bench_camvid(
        FLAGS.camvid_dir, FLAGS.camvid_crop, FLAGS.camvid_batch, FLAGS.seconds, FLAGS.warmup_batches
    )
    print(f"camvid: {results['camvid']}")
    results["tf_version"] = tf.__version__
    results["cores"] = os.cpu_count()
    if FLAGS.json:
        print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
