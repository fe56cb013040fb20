"""Checks a segmentation data set on disk: decodes every pair and reports all problems.

Prints a per-class pixel table; with --json the LAST line of stdout is one JSON object
(num_images, num_classes, class_names, pixels_per_class, ignore_pixels, image_sizes,
errors). Exits 1 when any pair is bad and 2 when the data set cannot be read at all.

    python bin/check_dataset.py --dataset=camvid --data_dir=../shared/data/camvid \
        --split=train --json
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

import flagdefs  # noqa: E402  (bin/ is on sys.path: the script's folder)
from mm_tf.data import datasets  # noqa: E402
from mm_tf.data.errors import DatasetError  # noqa: E402

flags.DEFINE_enum("dataset", None, sorted(datasets.READERS), "Data set layout to read.")
flags.DEFINE_string("data_dir", None, "Data set folder (see docs for each layout).")
flags.DEFINE_string("split", "train", "Split to check (train, val, ...).")
flags.DEFINE_string("list_file", None, "For --dataset=list: the `IMAGE LABEL` list file.")
flags.DEFINE_integer("num_classes", None, "For --dataset=list: number of classes.")
flags.DEFINE_integer("ignore_label", None, "For --dataset=list: raw ignore value (255).")
flags.DEFINE_bool("json", False, "Also print the summary as one JSON object, last line.")
flags.DEFINE_integer("workers", None, "Decoding threads (default: a few per core).")
flags.mark_flag_as_required("dataset")

MAX_ERRORS_SHOWN = 20  # In the human summary; the JSON always holds all of them.


def format_summary(report: dict, split: str) -> str:
    """The human-readable summary of a check_dataset report: a class table and the errors."""
    labelled = sum(report["pixels_per_class"]) or 1
    lines = [f"{report['dataset']} / {split}: {report['num_images']} images, "
             f"{report['num_classes']} classes, {report['num_bad_pairs']} bad pairs",
             f"{'id':>3}  {'class':<16} {'pixels':>14} {'share':>7}"]
    rows = zip(report["class_names"], report["pixels_per_class"])
    for class_id, (name, pixels) in enumerate(rows):
        lines.append(f"{class_id:>3}  {name:<16} {pixels:>14,d} {100 * pixels / labelled:>6.2f}%")
    lines.append(f"{'':>3}  {'(ignore)':<16} {report['ignore_pixels']:>14,d}")
    sizes = ", ".join(f"{size}: {count}" for size, count in report["image_sizes"].items())
    lines.append(f"image sizes: {sizes or '-'}")
    errors = report["errors"]
    if errors:
        lines.append(f"{len(errors)} errors:")
        lines += [f"  {e}" for e in errors[:MAX_ERRORS_SHOWN]]
        if len(errors) > MAX_ERRORS_SHOWN:
            lines.append(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more (see --json)")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        pairs, info = datasets.read_dataset(
            f.dataset, f.data_dir, f.split, list_file=f.list_file,
            num_classes=f.num_classes, ignore_label=f.ignore_label)
    except DatasetError as e:  # Every missing file of a list is one of its `problems`.
        flagdefs.fail(str(e), getattr(e, "problems", ()))
    report = datasets.check_dataset(pairs, info, workers=f.workers)
    print(format_summary(report, f.split))
    if f.json:
        print(json.dumps(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    app.run(main)
