"""TensorBoard projector of patch features, e.g. one backbone before and after M&M tuning.

The patches are a fixed bank of the online probe (`mm_tf.probe.sample_bank`: the mix
step on seeded crops, the same seed always gives the same patches). Each backbone maps
the patches to pool5 features, flattened and L2-normalised (`probe.backbone_embeddings`):
the space in which the triplet loss ranks them. The log dir then holds

  embeddings.ckpt-1.*      one variable [N, D] per backbone, e.g. `before_mm`, `after_mm`
  checkpoint               (the projector finds the newest checkpoint through it)
  metadata.tsv             a header and N rows, shared by every embedding:
                           class<TAB>class_id<TAB>image
  sprite.png               the N patches, `thumb` x `thumb` pixels each, row-major in a
                           grid ceil(sqrt(N)) thumbnails wide
  projector_config.pbtxt   tensorboard.plugins.projector.ProjectorConfig

Open it with `tensorboard --logdir=<log dir>`, tab "Projector"; colour by `class`.

Example:
    bank = probe.sample_bank(val_pairs, info, input_config, mix_config, 20, split="val")
    write_backbone_projector("work/projector", {"before_mm": before, "after_mm": after},
                             bank, info.class_names)
"""

from __future__ import annotations

import math
import os
import re
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from mm_tf import probe

METADATA_FILE = "metadata.tsv"
SPRITE_FILE = "sprite.png"
CHECKPOINT_PREFIX = "embeddings.ckpt"
METADATA_COLUMNS = ("class", "class_id", "image")
# TensorBoard's projector reads sprites up to 8192 x 8192 pixels.
MAX_SPRITE_SIDE = 8192


def sprite(thumbnails, thumb: int) -> np.ndarray:
    """uint8 [N,h,w,3] -> one uint8 sprite [rows*thumb, cols*thumb, 3], cols =
    ceil(sqrt(N)), thumbnails resized to thumb x thumb, row-major, black fill."""
    count = len(thumbnails)
    cols = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / cols))
    if max(rows, cols) * thumb > MAX_SPRITE_SIDE:
        raise ValueError(f"{count} thumbnails of {thumb} px exceed the projector's "
                         f"{MAX_SPRITE_SIDE} px sprite; use fewer patches or a smaller thumb")
    grid = np.zeros((rows * thumb, cols * thumb, 3), np.uint8)
    for i, tile in enumerate(thumbnails):
        small = np.asarray(Image.fromarray(np.asarray(tile, np.uint8)).resize(
            (thumb, thumb), Image.BILINEAR))
        r, c = divmod(i, cols)
        grid[r * thumb:(r + 1) * thumb, c * thumb:(c + 1) * thumb] = small
    return grid


def write_projector(log_dir: str, embeddings: Mapping[str, np.ndarray], labels,
                    class_names: Sequence[str], thumbnails=None,
                    sources: Optional[Sequence[str]] = None, thumb: int = 32) -> dict:
    """Writes the projector files described in the module docstring.

    Args:
      log_dir: folder to write (created).
      embeddings: name -> float [N,D]; names are variable names ([A-Za-z0-9_]+); every
        embedding has the same N (they share the metadata and the sprite).
      labels: int [N] class ids; class_names: names by id.
      thumbnails: optional uint8 [N,h,w,3] for the sprite.
      sources: optional N image paths (metadata column `image`).
      thumb: sprite thumbnail side in pixels.

    Returns:
      dict of the written paths (config, metadata, sprite or None, checkpoint).
    """
    from tensorboard.plugins import projector  # pylint: disable=import-outside-toplevel

    labels = np.asarray(labels, np.int64)
    count = len(labels)
    if not embeddings:
        raise ValueError("write_projector: no embedding")
    for name, values in embeddings.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"embedding name {name!r}: use letters, digits and _")
        if np.asarray(values).ndim != 2 or len(values) != count:
            raise ValueError(f"embedding {name!r} has shape {np.shape(values)}; expected "
                             f"[{count}, D] (one row per label)")
    os.makedirs(log_dir, exist_ok=True)
    sources = list(sources) if sources is not None else [""] * count
    with open(os.path.join(log_dir, METADATA_FILE), "w") as f:
        # Several columns: the first line is the header (a single column has none).
        f.write("\t".join(METADATA_COLUMNS) + "\n")
        for label, source in zip(labels, sources):
            name = class_names[label] if 0 <= label < len(class_names) else "ignore"
            f.write(f"{_tsv(name)}\t{int(label)}\t{_tsv(os.path.basename(source))}\n")
    sprite_path = None
    if thumbnails is not None:
        if len(thumbnails) != count:
            raise ValueError(f"{len(thumbnails)} thumbnails for {count} labels")
        sprite_path = os.path.join(log_dir, SPRITE_FILE)
        Image.fromarray(sprite(thumbnails, thumb)).save(sprite_path)
    variables = {name: tf.Variable(np.asarray(values, np.float32), name=name,
                                   trainable=False) for name, values in embeddings.items()}
    checkpoint = tf.train.Checkpoint(**variables)
    checkpoint_path = checkpoint.save(os.path.join(log_dir, CHECKPOINT_PREFIX))
    config = projector.ProjectorConfig()
    for name in embeddings:
        embedding = config.embeddings.add()
        embedding.tensor_name = f"{name}/.ATTRIBUTES/VARIABLE_VALUE"
        embedding.metadata_path = METADATA_FILE  # Relative: resolved in log_dir.
        if sprite_path:
            embedding.sprite.image_path = SPRITE_FILE
            embedding.sprite.single_image_dim.extend([thumb, thumb])
    projector.visualize_embeddings(log_dir, config)
    return {"config": os.path.join(log_dir, "projector_config.pbtxt"),
            "metadata": os.path.join(log_dir, METADATA_FILE), "sprite": sprite_path,
            "checkpoint": checkpoint_path}


def _tsv(text: str) -> str:
    """A metadata cell: tabs and newlines would break the TSV."""
    return re.sub(r"[\t\r\n]", " ", text)


def write_backbone_projector(log_dir: str, named_backbones: Mapping[str, object],
                             bank: probe.PatchBank, class_names: Sequence[str],
                             thumb: int = 32) -> dict:
    """Embeds the patches of `bank` with each backbone (name -> functional backbone) and
    writes one projector log dir holding every embedding (e.g. before_mm and after_mm)."""
    embeddings = {name: probe.backbone_embeddings(backbone, bank.patches)
                  for name, backbone in named_backbones.items()}
    return write_projector(log_dir, embeddings, bank.labels, class_names,
                           bank.thumbnails, bank.sources(), thumb)
