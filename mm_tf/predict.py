"""Prediction on image files: exported SavedModels or training run folders, alone or as
an ensemble, written as palette PNG label maps, colour overlays and (Cityscapes) the
official submission format.

A model is either a SavedModel written by bin/export.py (its `serving_default`
signature; flip / scales are those baked in) or a bin/train_seg.py run folder
(model.weights.h5 + model_config.json; run through `export.SegmentationServer`, the same
code the export saves, with test-time options given here). An ensemble averages the
models' class probabilities, then takes the argmax.

Images are decoded with `tf.io.decode_image`, the decoder of the evaluation pipeline, so
a prediction here equals the one bin/evaluate.py scores. Images of different sizes are
grouped by size (read from the file headers) and each group is predicted in batches of
up to `batch_size`: one network call never mixes sizes, and no padding touches the
network input.

Outputs under `output_dir` (NAME: the image path relative to an input folder, or the
file's stem for a glob or a list file, always with .png):
  labels/NAME.png        palette PNG (PIL mode P): index = train id, the data set's colours
  overlays/NAME.png      the image blended with the label colours (alpha `overlay_alpha`)
  submission/NAME.png    Cityscapes only: labelIds (uint8, mode L) via the official
                         cityscapesscripts trainId2label table, the format of the
                         benchmark server and of evalPixelLevelSemanticLabeling.py, which
                         finds `<city>_<seq>_<frame>*.png` anywhere below its folder
  predictions.json       models, inputs and output folders of the call

Example:
    predictors = [load_predictor("work/export/mm"), load_predictor("work/seg/random+mm")]
    inputs = list_inputs("data/val_images")
    predict_files(Ensemble(predictors), inputs, "work/pred")
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from mm_tf import evaluation
from mm_tf import export
from mm_tf import files
from mm_tf import summaries
from mm_tf.errors import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
LABELS_DIR = "labels"
OVERLAYS_DIR = "overlays"
SUBMISSION_DIR = "submission"
_GLOB_CHARS = "*?["


# ----------------------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Predictor:
    """One model: `probabilities(images uint8 [B,H,W,3]) -> float32 [B,H,W,K]`.

    Attributes:
      name: where it was loaded from.
      kind: "saved_model" or "run".
      fn: uint8 images -> dict with PROBABILITIES.
      class_names, palette ([K,3] uint8), dataset: from the model card / model config.
      inference: the test-time options it runs with.
    """

    name: str
    kind: str
    fn: Callable
    class_names: List[str]
    palette: np.ndarray
    dataset: str
    inference: dict

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def probabilities(self, images) -> np.ndarray:
        """uint8 [B,H,W,3] -> float32 [B,H,W,K]."""
        out = self.fn(tf.convert_to_tensor(images, tf.uint8))
        return out[export.PROBABILITIES].numpy()


def _run_folder_hint(path: str) -> str:
    """Names the seg folders of a pipeline work folder (what --model wants there)."""
    seg = os.path.join(path, "seg")
    if os.path.isdir(seg):
        arms = sorted(os.listdir(seg))
        return f"; a pipeline folder: give one of its arms, e.g. {os.path.join(seg, arms[0])}" \
            if arms else ""
    return ""


def load_predictor(path: str, flip: Optional[bool] = None,
                   scales: Optional[Sequence[float]] = None) -> Predictor:
    """A Predictor from a SavedModel folder (bin/export.py) or a bin/train_seg.py run
    folder. `flip` / `scales` apply to run folders (each unset one: as the run was
    evaluated, model_config.json); a SavedModel has its own baked in, and setting either
    is an error."""
    from mm_tf import segmenter  # pylint: disable=import-outside-toplevel
    if export.is_saved_model(path):
        if flip is not None or scales is not None:
            raise ConfigError(f"--model={path} is a SavedModel: flip/scales were baked in "
                              "at export (bin/export.py --flip --scales); they cannot be "
                              "changed here")
        loaded = tf.saved_model.load(path)
        card = export.load_model_card(path)
        signature = loaded.signatures[export.SERVING_DEFAULT]
        return Predictor(path, "saved_model", lambda images: signature(images=images),
                         list(card["class_names"]), np.asarray(card["palette"], np.uint8),
                         card.get("dataset") or "", card.get("inference", {}))
    if os.path.isfile(os.path.join(path, segmenter.MODEL_CONFIG)):
        network, model_config = segmenter.load_trained_model(path)
        recorded = model_config.get("inference", {})
        inference = evaluation.InferenceConfig(
            flip=bool(recorded.get("flip", False) if flip is None else flip),
            scales=tuple(float(s) for s in (recorded.get("scales", (1.0,)) if scales is None
                                            else scales)))
        server = export.SegmentationServer(network, model_config["input_mode"], inference)
        return Predictor(path, "run", server.serve, list(model_config["class_names"]),
                         np.asarray(model_config["palette"], np.uint8),
                         model_config.get("dataset") or "",
                         {"flip": server.flip, "scales": list(server.scales)})
    raise ConfigError(f"--model={path}: neither a SavedModel (saved_model.pb, see "
                      f"bin/export.py) nor a bin/train_seg.py run folder "
                      f"({segmenter.MODEL_CONFIG} + {segmenter.MODEL_WEIGHTS})"
                      + _run_folder_hint(path))


class Ensemble:
    """Averages the class probabilities of several predictors (same classes, in order).

    Example:
      ensemble = Ensemble([load_predictor(a), load_predictor(b)])
      labels = ensemble.probabilities(images).argmax(-1)
    """

    def __init__(self, predictors: Sequence[Predictor]):
        if not predictors:
            raise ConfigError("give at least one --model")
        first = predictors[0]
        for other in predictors[1:]:
            if other.class_names != first.class_names:
                raise ConfigError(f"--model={other.name} has classes {other.class_names}, "
                                  f"--model={first.name} {first.class_names}: an ensemble "
                                  "needs the same classes in the same order")
        self.predictors = list(predictors)
        self.class_names = first.class_names
        self.palette = first.palette
        self.dataset = first.dataset
        self.num_classes = first.num_classes

    def probabilities(self, images) -> np.ndarray:
        """uint8 [B,H,W,3] -> float32 [B,H,W,K], the mean over the models."""
        total = None
        for predictor in self.predictors:
            probs = predictor.probabilities(images)
            total = probs if total is None else total + probs
        return total / np.float32(len(self.predictors))


# ----------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InputImage:
    """An image to predict: its path and the output name (relative, without extension)."""

    path: str
    name: str


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_inputs(spec: str) -> List[InputImage]:
    """The images of `spec`: a folder (searched recursively; names keep the subfolders),
    a glob pattern (`**` recursive) or a list file (one path a line, extra fields such as
    a label path ignored, relative paths relative to the list's folder, # comments)."""
    if os.path.isdir(spec):
        found = []
        for folder, _, names in os.walk(spec):
            for name in names:
                if _is_image(name):
                    path = os.path.join(folder, name)
                    found.append(InputImage(path, os.path.splitext(
                        os.path.relpath(path, spec))[0]))
        images = sorted(found, key=lambda image: image.name)
        where = f"folder {spec}"
    elif any(c in spec for c in _GLOB_CHARS):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if _is_image(p))
        images = [InputImage(p, os.path.splitext(os.path.basename(p))[0]) for p in paths]
        where = f"pattern {spec}"
    elif os.path.isfile(spec):
        root = os.path.dirname(os.path.abspath(spec))
        images = []
        with open(spec) as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields or fields[0].startswith("#"):
                    continue
                path = fields[0] if os.path.isabs(fields[0]) else os.path.join(root, fields[0])
                if not os.path.isfile(path):
                    raise ConfigError(f"{spec}:{number}: image not found: {path}")
                images.append(InputImage(path, os.path.splitext(os.path.basename(path))[0]))
        where = f"list file {spec}"
    else:
        raise ConfigError(f"--inputs={spec}: no such folder or list file, and no glob "
                          "pattern")
    if not images:
        raise ConfigError(f"--inputs: the {where} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    seen = {}
    for image in images:
        if image.name in seen:
            raise ConfigError(f"--inputs: {seen[image.name]} and {image.path} would both be "
                              f"written as {image.name}.png; give their folder instead")
        seen[image.name] = image.path
    return images


def size_batches(images: Sequence[InputImage], batch_size: int) -> List[List[int]]:
    """Indices of `images` in batches of one size each (sizes from the file headers),
    groups in order of first appearance, at most `batch_size` per batch."""
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    groups = {}
    for index, image in enumerate(images):
        with Image.open(image.path) as opened:
            groups.setdefault(opened.size, []).append(index)
    return [indices[i:i + batch_size] for indices in groups.values()
            for i in range(0, len(indices), batch_size)]


def read_image(path: str) -> np.ndarray:
    """uint8 [H,W,3] RGB, decoded as the evaluation pipeline decodes."""
    return tf.io.decode_image(tf.io.read_file(path), channels=3, dtype=tf.uint8,
                              expand_animations=False).numpy()


# ----------------------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------------------

def palette_image(labels, palette) -> Image.Image:
    """Label ids [H,W] -> PIL mode P image whose palette holds the data set's colours
    (unused entries black), so the PNG stores the ids and shows the colours."""
    table = np.zeros((256, 3), np.uint8)
    colours = np.asarray(palette, np.uint8)
    table[:len(colours)] = colours
    image = Image.fromarray(np.asarray(labels, np.uint8))
    image.putpalette(table.reshape(-1).tolist())  # mode L -> P, indices kept.
    return image


def overlay(image, labels, palette, alpha: float = 0.5) -> np.ndarray:
    """uint8 [H,W,3] image blended with the label colours: (1-alpha) image + alpha colour."""
    colours = summaries.colorize(labels, palette).astype(np.float32)
    mixed = (1.0 - alpha) * np.asarray(image, np.float32) + alpha * colours
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def cityscapes_label_ids(train_ids) -> np.ndarray:
    """Cityscapes trainIds [H,W] -> labelIds uint8 [H,W] through the official
    cityscapesscripts.helpers.labels.trainId2label table (255 -> 0 'unlabeled')."""
    from cityscapesscripts.helpers.labels import trainId2label  # pylint: disable=import-outside-toplevel
    lut = np.zeros(256, np.uint8)
    for train_id, label in trainId2label.items():
        if 0 <= train_id < 256 and label.id >= 0:
            lut[train_id] = label.id
    return lut[np.asarray(train_ids, np.int64)]


def _save_png(image: Image.Image, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)


class _Progress:
    """A progress bar on stderr when it is a terminal: tqdm if installed, else a counter."""

    def __init__(self, total: int, enabled: bool):
        self._bar = None
        self._total, self._done = total, 0
        self._enabled = enabled and sys.stderr.isatty()
        if self._enabled:
            try:
                from tqdm import tqdm  # pylint: disable=import-outside-toplevel
                self._bar = tqdm(total=total, unit="img")
            except ImportError:
                pass

    def update(self, count: int) -> None:
        self._done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self._enabled:
            print(f"\r{self._done}/{self._total} images", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            print(file=sys.stderr)


def predict_files(model, images: Sequence[InputImage], output_dir: str, *,
                  batch_size: int = 4, overlays: bool = True, overlay_alpha: float = 0.5,
                  submission: Optional[bool] = None, progress: bool = True,
                  on_prediction: Optional[Callable] = None) -> dict:
    """Predicts every image with `model` (a Predictor or Ensemble) and writes the outputs
    described in the module docstring. Returns the JSON-ready manifest.

    Args:
      submission: write Cityscapes labelIds; None = when the model's data set is
        cityscapes.
      on_prediction: optional callback(InputImage, labels int32 [H,W]).
    """
    if submission is None:
        submission = model.dataset == "cityscapes"
    if submission and model.dataset != "cityscapes":
        raise ConfigError(f"--submission writes Cityscapes labelIds; the model's data set "
                          f"is {model.dataset!r}")
    if not 0.0 <= overlay_alpha <= 1.0:
        raise ConfigError(f"--overlay_alpha must be in [0, 1], got {overlay_alpha}")
    bar = _Progress(len(images), progress)
    try:
        for batch in size_batches(images, batch_size):
            pixels = np.stack([read_image(images[i].path) for i in batch])
            labels = model.probabilities(pixels).argmax(axis=-1).astype(np.int32)
            for k, index in enumerate(batch):
                item = images[index]
                _save_png(palette_image(labels[k], model.palette),
                          os.path.join(output_dir, LABELS_DIR, item.name + ".png"))
                if overlays:
                    _save_png(Image.fromarray(overlay(pixels[k], labels[k], model.palette,
                                                      overlay_alpha)),
                              os.path.join(output_dir, OVERLAYS_DIR, item.name + ".png"))
                if submission:
                    _save_png(Image.fromarray(cityscapes_label_ids(labels[k])),
                              os.path.join(output_dir, SUBMISSION_DIR, item.name + ".png"))
                if on_prediction:
                    on_prediction(item, labels[k])
            bar.update(len(batch))
    finally:
        bar.close()
    predictors = getattr(model, "predictors", [model])
    manifest = {
        "models": [{"path": os.path.abspath(p.name), "kind": p.kind,
                    "inference": p.inference} for p in predictors],
        "dataset": model.dataset,
        "class_names": list(model.class_names),
        "num_images": len(images),
        "outputs": {"labels": LABELS_DIR, "overlays": OVERLAYS_DIR if overlays else None,
                    "submission": SUBMISSION_DIR if submission else None},
    }
    files.write_json_atomic(os.path.join(output_dir, "predictions.json"), manifest)
    return manifest


def label_files(output_dir: str, images: Iterable[InputImage]) -> List[str]:
    """Paths of the label PNGs `predict_files` writes for `images`."""
    return [os.path.join(output_dir, LABELS_DIR, image.name + ".png") for image in images]
