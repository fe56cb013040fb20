"""Helpers shared by the tests: run a binary in a subprocess, read its JSON line, the
demo data set's DatasetInfo and file pairs built without the reader, and damaged files."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

from mm_tf.data import synthetic
from mm_tf.data.datasets import DatasetInfo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_binary(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python script args...` from the repo root with quiet TF logs; captures text."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def last_json(stdout: str) -> dict:
    """The JSON object a binary prints as its last line (its --json output)."""
    return json.loads(stdout.strip().splitlines()[-1])


def demo_info(label_lut=None) -> DatasetInfo:
    """The demo's DatasetInfo, built directly (identity LUT unless one is given)."""
    if label_lut is None:
        label_lut = np.full(256, 255, np.uint8)
        label_lut[: synthetic.NUM_CLASSES] = np.arange(synthetic.NUM_CLASSES)
    return DatasetInfo(
        name="demo",
        num_classes=synthetic.NUM_CLASSES,
        ignore_label=255,
        class_names=synthetic.CLASS_NAMES,
        palette=synthetic.PALETTE,
        background_class=0,
        label_lut=np.asarray(label_lut, np.uint8),
    )


def demo_pairs(root: pathlib.Path, split: str):
    """(image, label) path pairs of a generated demo split, in list order."""
    ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    return [
        (str(root / "JPEGImages" / f"{i}.png"), str(root / "SegmentationClass" / f"{i}.png"))
        for i in ids
    ]


def damage(path, how: str) -> None:
    """Damages one demo data file in place, as files get damaged in practice: "truncate"
    (its first 1000 bytes), "shrink" (a label cut to its top quarter), "values" (25
    label pixels of value 40, outside the demo's classes), "colour" (an index label saved
    as the RGB colours of the demo palette)."""
    path = pathlib.Path(path)
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
        return
    with Image.open(path) as label:
        ids = np.array(label)  # uint8 [H, W] palette indices
    if how == "shrink":
        _save_palette_label(ids[: ids.shape[0] // 4], path)
    elif how == "values":
        ids.reshape(-1)[:25] = 40
        _save_palette_label(ids, path)
    elif how == "colour":
        palette = np.zeros((256, 3), np.uint8)
        palette[: synthetic.NUM_CLASSES] = synthetic.PALETTE
        Image.fromarray(palette[ids]).save(path)
    else:
        raise ValueError(f"unknown damage {how!r}")


def _save_palette_label(ids, path) -> None:
    """Writes uint8 [H, W] class ids as a palette PNG, as the demo stores labels."""
    image = Image.fromarray(np.asarray(ids, np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[: synthetic.NUM_CLASSES] = synthetic.PALETTE
    image.putpalette(palette.reshape(-1).tolist())
    image.save(path)


def error_lines(stderr: str) -> tuple:
    """(the last line of stderr, the lines that start with "error:")."""
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else "", [line for line in lines if line.startswith("error:")]
