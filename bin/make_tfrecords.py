"""Write one split of a data set as sharded TFRecords (read back with source="tfrecord").

Example:
  python bin/make_tfrecords.py --dataset=demo --data_dir=work/demo/data --split=train \
      --output_dir=work/demo/tfrecords --num_shards=4
  # then read with InputConfig(source="tfrecord") and the pattern
  #   work/demo/tfrecords/train-?????-of-?????.tfrecord
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from mm_tf.data import datasets, tfrecords  # noqa: E402

flags.DEFINE_string(
    "dataset", None, "Reader name: voc, voc_aug, cityscapes, camvid, list, demo.", required=True
)
flags.DEFINE_string("data_dir", None, "Data set folder.", required=True)
flags.DEFINE_string("split", "train", "Split to convert.")
flags.DEFINE_string("list_file", None, "List file (only with --dataset=list).")
flags.DEFINE_string("output_dir", None, "Folder of the shards.", required=True)
flags.DEFINE_integer("num_shards", 4, "Number of shards (consecutive runs of the split).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    pairs, info = datasets.read_dataset(
        FLAGS.dataset, FLAGS.data_dir, FLAGS.split, list_file=FLAGS.list_file
    )
    paths = tfrecords.write_tfrecords(
        pairs, FLAGS.output_dir, FLAGS.split, FLAGS.num_shards, dataset_name=info.name
    )
    print(
        f"{len(pairs)} examples of {info.name}/{FLAGS.split} -> {len(paths)} shards: "
        f"{tfrecords.shard_pattern(FLAGS.output_dir, FLAGS.split)}"
    )


if __name__ == "__main__":
    app.run(main)
