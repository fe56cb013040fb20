"""`make demo`: the most complete mm-tf pipeline on the embedded synthetic data.

Generates the demo data set (no download), validates it with bin/check_dataset.py,
writes a preview of augmented training batches, then runs bin/pipeline.py with
flags/demo.flags: naive fine-tuning from a random start vs M&M, over two seeds, each
evaluated on the demo val split, and prints where report.md is (its line per M&M arm says
whether the gain is beyond the seed-to-seed spread). Every stage is resumable: rerunning
skips what is done.

  python bin/demo.py --workdir=work/demo
"""

import json
import os
import subprocess
import sys

import flagdefs
from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "work/demo", "Folder for the demo's data and runs.")
flags.DEFINE_string("pipeline_flagfile", "flags/demo.flags", "Arms and stage settings.")


def _run(args, **kwargs):
    """Runs a repo binary with this interpreter; stops the demo if it fails."""
    print("$ " + " ".join(args), flush=True)
    result = subprocess.run([sys.executable] + args, cwd=flagdefs.REPO_ROOT, check=False,
                            **kwargs)
    if result.returncode:
        flagdefs.fail(f"{args[0]} exited with {result.returncode}")
    return result


def main(argv):
    del argv
    workdir = os.path.abspath(FLAGS.workdir)
    data_dir = os.path.join(workdir, "data")
    _run(["bin/make_demo_data.py", f"--output_dir={data_dir}"])
    checked = _run(["bin/check_dataset.py", "--dataset=demo", f"--data_dir={data_dir}",
                    "--split=train", "--json"], stdout=subprocess.PIPE, text=True)
    report = json.loads(checked.stdout.strip().splitlines()[-1])
    print(f"demo data: {report['num_images']} train images, {report['num_classes']} classes, "
          f"{len(report['errors'])} errors")

    from mm_tf import common  # pylint: disable=import-outside-toplevel
    from mm_tf.data import datasets  # pylint: disable=import-outside-toplevel
    from mm_tf.data import pipeline  # pylint: disable=import-outside-toplevel
    from mm_tf.data import preview  # pylint: disable=import-outside-toplevel
    pairs, info = datasets.read_dataset("demo", data_dir, "train")
    batch = next(iter(pipeline.train_dataset(
        pairs, info, pipeline.InputConfig(crop_size=96, batch_size=6),
        include_raw_image=True)))
    preview_path = os.path.join(workdir, "preview.png")
    preview.write_preview(batch[common.RAW_IMAGE].numpy(), batch[common.LABEL].numpy(),
                          info.palette, preview_path)
    print(f"preview of augmented training batches: {preview_path}")

    pipeline_dir = os.path.join(workdir, "pipeline")
    _run(["bin/pipeline.py", f"--flagfile={FLAGS.pipeline_flagfile}",
          f"--workdir={pipeline_dir}", f"--stage_arg=--data_dir={data_dir}"])
    print(f"report: {os.path.join(pipeline_dir, 'report.md')}")
    print(f"TensorBoard: tensorboard --logdir={workdir}")


if __name__ == "__main__":
    app.run(main)
