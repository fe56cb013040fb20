"""Sharded TFRecords of (image, label) pairs: writer, file listing and example parser.

Each `tf.train.Example` holds the image file's own encoded bytes (decoded exactly as the
file source decodes them), the label as a single-channel index PNG (palette PNGs are
converted with PIL here, once, so the reader never needs PIL), the size, the original
image path and the example's position in the pair list. Labels are stored raw: the data
set's LUT is applied when reading, exactly as with the file source.

Shards hold consecutive runs of the pair list and are named
`<split>-00000-of-0000N.tfrecord`; reading them in name order gives back the pair order,
which the pipeline relies on for identical batches from either source.
"""

import glob
import io
import json
import os
import pathlib
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
from PIL import Image

from mm_tf.data.errors import DatasetError

IMAGE_BYTES = "image/encoded"
LABEL_BYTES = "label/encoded"
FILENAME = "image/filename"
HEIGHT = "image/height"
WIDTH = "image/width"
INDEX = "index"

_FEATURES = {
    IMAGE_BYTES: tf.io.FixedLenFeature([], tf.string),
    LABEL_BYTES: tf.io.FixedLenFeature([], tf.string),
    FILENAME: tf.io.FixedLenFeature([], tf.string),
    HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    WIDTH: tf.io.FixedLenFeature([], tf.int64),
    INDEX: tf.io.FixedLenFeature([], tf.int64),
}


def shard_name(split: str, shard: int, num_shards: int) -> str:
    """Return the file name of one shard, e.g. `train-00001-of-00004.tfrecord`."""
    return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


def shard_pattern(output_dir, split: str) -> str:
    """Return the glob pattern matching every shard of `split` in `output_dir`."""
    return str(pathlib.Path(output_dir) / f"{split}-?????-of-?????.tfrecord")


def index_png(label_path) -> Tuple[bytes, int, int]:
    """Read a label PNG as class ids and return (single-channel PNG bytes, height, width)."""
    label_path = str(label_path)
    try:
        with Image.open(label_path) as img:
            mode = img.mode
            if mode == "L" and img.format == "PNG":
                # Already ids: keep the file's own bytes (no re-encoding, same decode).
                width, height = img.size
                return pathlib.Path(label_path).read_bytes(), height, width
            if mode not in ("P", "L"):
                raise DatasetError(
                    f"label {label_path}: PIL mode {mode!r}; expected a grey (L) or palette (P) PNG"
                )
            # np.asarray of a "P" image gives the palette indices, i.e. the class ids.
            ids = np.asarray(img, dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"label {label_path}: cannot be read as an image ({e})") from e
    buf = io.BytesIO()
    Image.fromarray(ids, mode="L").save(buf, format="PNG")
    return buf.getvalue(), ids.shape[0], ids.shape[1]


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def make_example(image_path, label_path, index: int) -> tf.train.Example:
    """Build the `tf.train.Example` of one (image, label) pair at position `index`."""
    image_path = str(image_path)
    if not str(label_path):
        raise DatasetError(f"image {image_path} has no label: TFRecords hold labelled pairs; "
                           "read image-only data (--dataset=images) from its files")
    try:
        with Image.open(image_path) as img:
            image_size = img.size  # Only the header is read here.
        image_bytes = pathlib.Path(image_path).read_bytes()
    except OSError as e:
        raise DatasetError(f"image {image_path}: cannot be read as an image ({e})") from e
    label_bytes, height, width = index_png(label_path)
    if image_size != (width, height):
        raise DatasetError(
            f"image {image_path} is {image_size[0]}x{image_size[1]} (WxH) but its label "
            f"{label_path} is {width}x{height}"
        )
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                IMAGE_BYTES: _bytes(image_bytes),
                LABEL_BYTES: _bytes(label_bytes),
                FILENAME: _bytes(image_path.encode("utf-8")),
                HEIGHT: _int(height),
                WIDTH: _int(width),
                INDEX: _int(index),
            }
        )
    )


def write_tfrecords(
    pairs: Sequence[Tuple[str, str]],
    output_dir,
    split: str,
    num_shards: int = 4,
    dataset_name: Optional[str] = None,
) -> List[str]:
    """Write `pairs` as `num_shards` shards of consecutive examples; return the shard paths.

    Each shard is written to a temporary name and renamed when complete, and a
    `<split>.json` summary (count, shards, data set name) is written last.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    pairs = list(pairs)
    if not pairs:
        raise DatasetError(f"no pairs to write for split {split!r}")
    num_shards = min(num_shards, len(pairs))
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(shard_pattern(output_dir, split)):
        os.remove(stale)  # A previous run with another shard count would otherwise mix in.
    bounds = np.linspace(0, len(pairs), num_shards + 1).round().astype(int)
    paths = []
    for shard in range(num_shards):
        path = output_dir / shard_name(split, shard, num_shards)
        tmp = path.with_suffix(".tfrecord.tmp")
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for index in range(bounds[shard], bounds[shard + 1]):
                image_path, label_path = pairs[index]
                writer.write(make_example(image_path, label_path, index).SerializeToString())
        os.replace(tmp, path)
        paths.append(str(path))
    summary = {
        "split": split,
        "num_examples": len(pairs),
        "num_shards": num_shards,
        "dataset": dataset_name,
        "files": [pathlib.Path(p).name for p in paths],
    }
    (output_dir / f"{split}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return paths


def tfrecord_files(pattern: Union[str, Sequence[str]]) -> List[str]:
    """Expand a file pattern (or a list of paths/patterns) into the sorted list of shard files."""
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(str(p))})
    if not files:
        raise DatasetError(f"no TFRecord files match {pattern!r}")
    return files


def count_records(files: Sequence[str]) -> int:
    """Count the records of the given TFRecord files (reads them once, without parsing)."""
    return int(tf.data.TFRecordDataset(list(files)).reduce(np.int64(0), lambda n, _: n + 1).numpy())


def parse_example(serialized) -> dict:
    """Parse one record: image_bytes, label_bytes (index PNG), filename, height, width, index."""
    features = tf.io.parse_single_example(serialized, _FEATURES)
    return {
        "image_bytes": features[IMAGE_BYTES],
        "label_bytes": features[LABEL_BYTES],
        "filename": features[FILENAME],
        "height": tf.cast(features[HEIGHT], tf.int32),
        "width": tf.cast(features[WIDTH], tf.int32),
        "index": features[INDEX],
    }
