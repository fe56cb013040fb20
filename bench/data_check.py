"""Cost of the training binaries' pre-flight data check (--check_data=quick|full).

Two cases: (a) CamVid train (367 pairs of 480x360 PNGs) from ../shared/data/camvid,
skipped with a reason when absent; (b) a synthetic list of --num_pairs (10,000) VOC-sized
pairs (500x375 JPEG image, palette PNG label) under --tmp_dir: --distinct_pairs generated
pairs, each hard-linked under many names, so that every listed path is a file of its own
to open and read while the generation stays cheap. Every file has just been written or
read, so the times are warm-cache CPU costs: a cold disk adds the reads of each file's
first and last 64 bytes (quick) or of the whole file (full). Each mode is timed
--repeats times (median), on the checker's default thread pool. The last line printed
with --json is one JSON object.

Example:
  python bench/data_check.py --json
"""

import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from mm_tf.data import datasets, synthetic  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

flags.DEFINE_bool("json", False, "Print one JSON line with the results last.")
flags.DEFINE_string(
    "camvid_dir", str(REPO_ROOT.parent / "shared" / "data" / "camvid"), "CamVid folder."
)
flags.DEFINE_integer("num_pairs", 10000, "Pairs in the synthetic list.")
flags.DEFINE_integer("distinct_pairs", 100, "Generated pairs behind the synthetic list.")
flags.DEFINE_integer("repeats", 3, "Timed runs per mode (the median is reported).")
flags.DEFINE_string("tmp_dir", None, "Where the synthetic list is made (default: the "
                    "system temporary folder); it is deleted afterwards.")
FLAGS = flags.FLAGS


def time_modes(pairs, info, repeats: int) -> dict:
    """Median seconds of check_files in each mode, and the problems it found (0 here)."""
    result = {"pairs": len(pairs)}
    for mode in ("quick", "full"):
        times, problems = [], None
        for _ in range(repeats):
            started = time.perf_counter()
            problems = datasets.check_files(pairs, info, mode)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        result[mode] = {"seconds": round(seconds, 3),
                        "ms_per_pair": round(1000 * seconds / len(pairs), 3),
                        "problems": len(problems)}
    return result


def bench_camvid(camvid_dir: str, repeats: int) -> dict:
    """Both modes on CamVid train, or say why it was skipped."""
    if not (pathlib.Path(camvid_dir) / "train.txt").is_file():
        return {"skipped": f"CamVid not found at {camvid_dir}"}
    pairs, info = datasets.read_dataset("camvid", camvid_dir, "train")
    return {**time_modes(pairs, info, repeats), "data": "CamVid train, 480x360 PNG"}


def bench_synthetic(tmp_dir: str, num_pairs: int, distinct: int, repeats: int) -> dict:
    """Both modes on `num_pairs` hard-linked names of `distinct` generated VOC-sized pairs."""
    root = synthetic.generate_demo_dataset(pathlib.Path(tmp_dir) / "voc_like",
                                           num_train=distinct, num_val=0, height=375,
                                           width=500, seed=0, image_format="jpg")
    base, info = datasets.read_dataset("demo", root, "train")
    links = pathlib.Path(tmp_dir) / "links"
    links.mkdir()
    pairs = []
    for i in range(num_pairs):
        image, label = base[i % distinct]
        pair = (str(links / f"{i:06d}.jpg"), str(links / f"{i:06d}.png"))
        os.link(image, pair[0])
        os.link(label, pair[1])
        pairs.append(pair)
    return {**time_modes(pairs, info, repeats), "distinct_files": 2 * distinct,
            "data": "500x375 JPEG + palette PNG label"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    results = {"camvid_train": bench_camvid(FLAGS.camvid_dir, FLAGS.repeats)}
    print(f"camvid_train: {results['camvid_train']}")
    tmp_dir = tempfile.mkdtemp(prefix="mm_tf_check_bench_", dir=FLAGS.tmp_dir)
    try:
        results["synthetic"] = bench_synthetic(tmp_dir, FLAGS.num_pairs,
                                               FLAGS.distinct_pairs, FLAGS.repeats)
    finally:
        shutil.rmtree(tmp_dir)
    print(f"synthetic: {results['synthetic']}")
    results["cores"] = os.cpu_count()
    results["load_average_1min"] = round(os.getloadavg()[0], 2)  # Other jobs slow it down.
    if FLAGS.json:
        print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
