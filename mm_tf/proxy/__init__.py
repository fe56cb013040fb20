"""Self-supervised proxy tasks: the starts M&M tuning builds on (paper stage a).

* `color`: sRGB <-> Lab <-> LCh in TensorFlow, hue/chroma bins, soft encoding/decoding.
* `colorization`: Larsson et al.'s colorization (grey VGG-16 + hypercolumn head).
* `permutations`, `jigsaw`: Noroozi & Favaro's jigsaw puzzles (AlexNet trunk per tile).

Both tasks use the images only; `read_image_pairs` pools several splits of a data set
(e.g. CamVid train + val) because no labels are read.
"""

from typing import Sequence, Union

from mm_tf.data import datasets
from mm_tf.data.errors import DatasetError


def read_image_pairs(name: str, data_dir, splits: Union[str, Sequence[str]], **kwargs):
    """Pairs of every split in `splits` ("train,val" or a list), concatenated in order,
    and the data set's DatasetInfo: (list of (image_path, label_path), info)."""
    if isinstance(splits, str):
        splits = [s.strip() for s in splits.split(",")]
    splits = [s for s in splits if s]
    if not splits:
        raise DatasetError("--split names no split (expected e.g. 'train' or 'train,val')")
    pairs, info = [], None
    for split in splits:
        split_pairs, info = datasets.read_dataset(name, data_dir, split, **kwargs)
        pairs.extend(split_pairs)
    return pairs, info
