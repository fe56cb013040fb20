"""Generate the embedded synthetic demo data set (VOC layout) used by `make demo`.

Example:
  python bin/make_demo_data.py --output_dir=work/demo/data
  python bin/make_demo_data.py --output_dir=/tmp/demo --num_train=20 --num_val=5 --size=64x96
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from mm_tf.data import synthetic  # noqa: E402

flags.DEFINE_string(
    "output_dir",
    None,
    "Folder of the data set (created; re-runs with the same parameters are no-ops).",
    required=True,
)
flags.DEFINE_integer("num_train", 200, "Number of training images.")
flags.DEFINE_integer("num_val", 50, "Number of validation images.")
flags.DEFINE_string("size", "96x128", "Image size HEIGHTxWIDTH.")
flags.DEFINE_integer("seed", 0, "Generation seed: the same seed gives byte-identical files.")
FLAGS = flags.FLAGS


def _parse_size(text: str):
    """Parse 'HxW' into (height, width)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise app.UsageError(f"--size must look like 96x128 (HEIGHTxWIDTH), got {text!r}") from None
    return height, width


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    height, width = _parse_size(FLAGS.size)
    path = synthetic.generate_demo_dataset(
        FLAGS.output_dir,
        num_train=FLAGS.num_train,
        num_val=FLAGS.num_val,
        height=height,
        width=width,
        seed=FLAGS.seed,
    )
    print(f"demo data set: {path} ({FLAGS.num_train} train, {FLAGS.num_val} val, {height}x{width})")


if __name__ == "__main__":
    app.run(main)
