"""TensorBoard projector of patch features, e.g. one backbone before and after M&M tuning.

A fixed set of labelled patches is sampled from a data set's (validation) images with the
mix step itself (`mm_tf.mix.sample_patches`; the stateless seed of image i is derived
from (seed, i), so the same seed always gives the same patches). Each backbone maps the
patches to pool5 features, flattened and L2-normalised: the space in which the triplet
loss ranks them. The log dir then holds

  embeddings.ckpt-1.*      one variable [N, D] per backbone, e.g. `before_mm`, `after_mm`
  checkpoint               (the projector finds the newest checkpoint through it)
  metadata.tsv             a header and N rows, shared by every embedding:
                           class<TAB>class_id<TAB>image
  sprite.png               the N patches, `thumb` x `thumb` pixels each, row-major in a
                           grid ceil(sqrt(N)) thumbnails wide
  projector_config.pbtxt   tensorboard.plugins.projector.ProjectorConfig

Open it with `tensorboard --logdir=<log dir>`, tab "Projector"; colour by `class`.

Example:
    patches = sample_patch_set(val_pairs, info, mix_config, "rgb", seed=0, max_images=20)
    write_projector("work/projector", {"before_mm": pool5_embeddings(before, patches.patches),
                                       "after_mm": pool5_embeddings(after, patches.patches)},
                    patches.labels, info.class_names, patches.thumbnails, patches.sources)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from mm_tf import common
from mm_tf import losses
from mm_tf import mix as mix_lib
from mm_tf.data import pipeline
from mm_tf.models import backbones

METADATA_FILE = "metadata.tsv"
SPRITE_FILE = "sprite.png"
CHECKPOINT_PREFIX = "embeddings.ckpt"
METADATA_COLUMNS = ("class", "class_id", "image")
# TensorBoard's projector reads sprites up to 8192 x 8192 pixels.
MAX_SPRITE_SIDE = 8192
# Salts the per-image patch seeds apart from the training streams.
_PATCH_SALT = 0x9A7C


@dataclasses.dataclass
class PatchSet:
    """Valid labelled patches of a fixed sample, N of them.

    Attributes:
      patches: float32 [N,S,S,C] normalised network input (what M&M feeds the backbone).
      thumbnails: uint8 [N,S,S,3] the same crops of the RGB image (for sprites, figures).
      labels: int32 [N] train id of each patch's centre pixel.
      image_index: int32 [N] index of the source image in the given pairs.
      sources: N image paths.
    """

    patches: np.ndarray
    thumbnails: np.ndarray
    labels: np.ndarray
    image_index: np.ndarray
    sources: list

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def sample_patch_set(pairs, info, mix_config: mix_lib.MixConfig, input_mode: str, *,
                     seed: int = 0, max_images: Optional[int] = None,
                     max_patches: Optional[int] = None) -> PatchSet:
    """Samples patches image by image with `mix_config` (the M&M run's) -> PatchSet.

    Each image is sampled on its own, so images of any size mix. The network input and
    the RGB image are cropped together (stacked as channels): the boxes, and the zero
    (mean) padding outside the image, are those M&M training sees.
    """
    pairs = list(pairs)[:max_images] if max_images else list(pairs)
    if not pairs:
        raise ValueError("sample_patch_set: no (image, label) pairs")
    # Per-image eager calls: the TF crop is faster than the XLA-friendly gathers there.
    config = dataclasses.replace(mix_config, use_gather_resize=False)
    dataset = pipeline.eval_dataset(pairs, info, pipeline.InputConfig(input_mode=input_mode))
    base = tf.constant([seed, _PATCH_SALT], tf.int32)
    parts, total = [], 0
    for index, batch in enumerate(dataset):
        image = batch[common.IMAGE]
        channels = int(image.shape[-1])
        stacked = tf.concat([image, tf.cast(batch[common.RAW_IMAGE], tf.float32)], axis=-1)
        seed_i = tf.random.experimental.stateless_fold_in(base, index)
        sampled = mix_lib.sample_patches(stacked, batch[common.LABEL], seed_i, config)
        valid = sampled.valid.numpy()
        crops = sampled.patches.numpy()[valid]
        labels = sampled.labels.numpy()[valid].astype(np.int32)
        if max_patches is not None:
            keep = max(0, max_patches - total)
            crops, labels = crops[:keep], labels[:keep]
        parts.append((crops[..., :channels],
                      np.clip(np.round(crops[..., channels:]), 0, 255).astype(np.uint8),
                      labels, np.full(len(labels), index, np.int32)))
        total += len(labels)
        if max_patches is not None and total >= max_patches:
            break
    if total == 0:
        raise ValueError("sample_patch_set: no valid patch (every sampled image is all "
                         "ignore?)")
    patches, thumbnails, labels, image_index = (np.concatenate(p) for p in zip(*parts))
    return PatchSet(patches.astype(np.float32), thumbnails, labels, image_index,
                    [str(pairs[i][0]) for i in image_index])


def pool5_embeddings(backbone, patches, batch_size: int = 64) -> np.ndarray:
    """Patches float32 [N,S,S,C] -> float32 [N,D]: the backbone's pool5 features in
    inference mode, flattened and L2-normalised (`losses.l2_normalize_flat`, the
    triplet loss's space)."""
    features = backbones.pool5_model(backbone)
    rows = []
    for start in range(0, len(patches), batch_size):
        batch = tf.convert_to_tensor(patches[start:start + batch_size], tf.float32)
        rows.append(losses.l2_normalize_flat(features(batch, training=False)).numpy())
    return np.concatenate(rows)


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
                             patch_set: PatchSet, class_names: Sequence[str],
                             thumb: int = 32) -> dict:
    """Embeds `patch_set` with each backbone (name -> functional backbone) and writes one
    projector log dir holding every embedding (e.g. before_mm and after_mm)."""
    embeddings = {name: pool5_embeddings(backbone, patch_set.patches)
                  for name, backbone in named_backbones.items()}
    return write_projector(log_dir, embeddings, patch_set.labels, class_names,
                           patch_set.thumbnails, patch_set.sources, thumb)
