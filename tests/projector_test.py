"""mm_tf/viz/projector.py: a well-formed TensorBoard projector log dir of a probe bank with two embeddings (config parses, metadata rows = embeddings, the
checkpoint holds the tensors, sprite size)."""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from PIL import Image
from tensorboard.plugins import projector as tb_projector

from mm_tf import mix as mix_lib
from mm_tf import probe
from mm_tf.data import datasets
from mm_tf.data import pipeline
from mm_tf.models import backbones
from mm_tf.viz import projector

MIX = mix_lib.MixConfig(patches_per_image=4, patch_size=32, min_side=16, max_side=48,
                        background_class=0)


@pytest.fixture(scope="module")
def sample(small_demo_dir):
    pairs, info = datasets.read_dataset("demo", small_demo_dir, "val")
    return pairs, info, probe.sample_bank(pairs, info, pipeline.InputConfig(crop_size=64),
                                          MIX, 3, seed=3, split="val")


def test_projector_log_dir_is_well_formed(sample, tmp_path):
    _, info, patches = sample
    keras.utils.set_random_seed(0)
    before = backbones.build_backbone("vgg16", width=0.0625)
    after = backbones.build_backbone("vgg16", width=0.0625)
    paths = projector.write_backbone_projector(
        str(tmp_path), {"before_mm": before, "after_mm": after}, patches, info.class_names,
        thumb=16)
    count = len(patches)

    config = text_format.Parse((tmp_path / "projector_config.pbtxt").read_text(),
                               tb_projector.ProjectorConfig())
    assert [e.tensor_name for e in config.embeddings] == [
        "before_mm/.ATTRIBUTES/VARIABLE_VALUE", "after_mm/.ATTRIBUTES/VARIABLE_VALUE"]
    for embedding in config.embeddings:
        assert embedding.metadata_path == projector.METADATA_FILE
        assert embedding.sprite.image_path == projector.SPRITE_FILE
        assert list(embedding.sprite.single_image_dim) == [16, 16]

    rows = (tmp_path / projector.METADATA_FILE).read_text().splitlines()
    assert rows[0].split("\t") == list(projector.METADATA_COLUMNS)
    assert len(rows) - 1 == count
    assert [r.split("\t")[0] for r in rows[1:]] == [info.class_names[i] for i in patches.labels]
    assert rows[1].split("\t")[2] == "val crop 0"

    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest == paths["checkpoint"]
    reader = tf.train.load_checkpoint(latest)
    for embedding, backbone in zip(config.embeddings, (before, after)):
        values = reader.get_tensor(embedding.tensor_name)
        assert values.shape[0] == count
        np.testing.assert_allclose(values, probe.backbone_embeddings(backbone, patches.patches),
                                   atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)

    cols = math.ceil(math.sqrt(count))
    with Image.open(tmp_path / projector.SPRITE_FILE) as image:
        assert image.size == (cols * 16, math.ceil(count / cols) * 16)


def test_rejects_mismatched_embeddings(tmp_path):
    with pytest.raises(ValueError, match="one row per label"):
        projector.write_projector(str(tmp_path), {"a": np.zeros((3, 4))}, [0, 1], ["x", "y"])
    with pytest.raises(ValueError, match="letters"):
        projector.write_projector(str(tmp_path), {"a b": np.zeros((2, 4))}, [0, 1], ["x", "y"])
    assert not os.path.exists(tmp_path / projector.METADATA_FILE)
