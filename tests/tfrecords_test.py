"""Tests of mm_tf.data.tfrecords: round trip, and identical batches to the file source."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mm_tf import common
from mm_tf.data import pipeline, synthetic, tfrecords
from mm_tf.data.errors import DatasetError
from testutil import demo_info, demo_pairs  # tests/ is on sys.path (prepend import mode)


def take(ds, n):
    """The first n batches as dicts of numpy arrays."""
    return [{k: v.numpy() for k, v in batch.items()} for batch in ds.take(n)]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return synthetic.generate_demo_dataset(
        tmp_path_factory.mktemp("demo"), num_train=10, num_val=3, height=36, width=44, seed=2
    )


@pytest.fixture(scope="module")
def shards(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfrecords")
    tfrecords.write_tfrecords(
        demo_pairs(demo_root, "train"), out, "train", num_shards=3, dataset_name="demo"
    )
    return out


def test_round_trip(demo_root, shards):
    pairs = demo_pairs(demo_root, "train")
    files = tfrecords.tfrecord_files(tfrecords.shard_pattern(shards, "train"))
    assert [pathlib.Path(f).name for f in files] == [
        tfrecords.shard_name("train", i, 3) for i in range(3)
    ]
    assert tfrecords.count_records(files) == len(pairs)
    summary = json.loads((shards / "train.json").read_text())
    assert summary["num_examples"] == len(pairs) and summary["dataset"] == "demo"
    examples = [tfrecords.parse_example(r) for r in tf.data.TFRecordDataset(files)]
    for index, (example, (image_path, label_path)) in enumerate(zip(examples, pairs, strict=True)):
        assert int(example["index"]) == index  # Shards in name order give back the pair order.
        assert example["filename"].numpy().decode() == image_path
        assert example["image_bytes"].numpy() == pathlib.Path(image_path).read_bytes()
        ids = tf.io.decode_png(example["label_bytes"], channels=1).numpy()[..., 0]
        np.testing.assert_array_equal(
            ids, np.asarray(Image.open(label_path))
        )  # Indices, not colours.
        assert (int(example["height"]), int(example["width"])) == ids.shape == (36, 44)


def test_train_batches_identical_to_file_source(demo_root, shards):
    pairs, info = demo_pairs(demo_root, "train"), demo_info()
    kwargs = dict(crop_size=24, batch_size=3, seed=11)
    from_files = take(pipeline.train_dataset(pairs, info, pipeline.InputConfig(**kwargs)), 5)
    from_records = take(
        pipeline.train_dataset(
            tfrecords.shard_pattern(shards, "train"),
            info,
            pipeline.InputConfig(source="tfrecord", **kwargs),
        ),
        5,
    )
    for a, b in zip(from_files, from_records, strict=True):  # 15 > 10 examples: crosses an epoch.
        np.testing.assert_array_equal(a[common.IMAGE], b[common.IMAGE])
        np.testing.assert_array_equal(a[common.LABEL], b[common.LABEL])


def test_eval_batches_identical_to_file_source(demo_root, shards):
    pairs, info = demo_pairs(demo_root, "train"), demo_info()
    from_files = take(pipeline.eval_dataset(pairs, info, pipeline.InputConfig()), 20)
    from_records = take(
        pipeline.eval_dataset(
            [tfrecords.shard_pattern(shards, "train")],
            info,
            pipeline.InputConfig(source="tfrecord"),
        ),
        20,
    )
    assert len(from_files) == len(from_records) == len(pairs)
    for a, b in zip(from_files, from_records, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_rewrite_replaces_stale_shards_and_rejects_bad_labels(demo_root, tmp_path):
    pairs = demo_pairs(demo_root, "val")
    tfrecords.write_tfrecords(pairs, tmp_path, "val", num_shards=3)
    tfrecords.write_tfrecords(pairs, tmp_path, "val", num_shards=2)
    assert len(tfrecords.tfrecord_files(tfrecords.shard_pattern(tmp_path, "val"))) == 2
    rgb_label = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((36, 44, 3), np.uint8)).save(rgb_label)
    with pytest.raises(DatasetError, match="mode 'RGB'"):
        tfrecords.write_tfrecords([(pairs[0][0], str(rgb_label))], tmp_path / "bad", "val")
    small_label = tmp_path / "small.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(small_label)
    with pytest.raises(DatasetError, match="small.png"):
        tfrecords.write_tfrecords([(pairs[0][0], str(small_label))], tmp_path / "bad", "val")
    with pytest.raises(DatasetError, match="no TFRecord files"):
        tfrecords.tfrecord_files(str(tmp_path / "missing-*.tfrecord"))
