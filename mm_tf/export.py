"""Export a trained segmentation network as a SavedModel that serves uint8 images.

One core function, `SegmentationServer.serve(images uint8 [B,H,W,3])`, normalises the
images with the network's input mode (`mm_tf.data.pipeline.normalize`, the training
normalisation), runs the network at every configured scale (and flipped, if asked),
averages the softmax probabilities exactly as `mm_tf.evaluation.predict_probabilities`
does and returns

  labels         int32   [B,H,W]     argmax class per pixel
  probabilities  float32 [B,H,W,K]   averaged class probabilities

at the size of the input. Thin wrappers feed it:

  serving_default  images: uint8 [batch, height, width, 3] (any size, one size per call)
  serve_bytes      image_bytes: string [batch], encoded PNG or JPEG (BMP/GIF decode too);
                   images of one call may differ in size. Each image is decoded and
                   predicted on its own (so a result never depends on its batch mates),
                   then labels are padded with -1 and probabilities with 0 to the largest
                   height and width of the call; `heights` and `widths` int32 [batch] give
                   each image's own size (crop `labels[i, :heights[i], :widths[i]]`).
  metadata         no input: class_names string [K], palette uint8 [K,3], input_mode,
                   dataset (string scalars).

The SavedModel reloads with plain `tf.saved_model.load` (no mm_tf, no Keras import
needed). Its assets hold `class_names.txt` (one name a line), `palette.txt` ("r g b" a
line) and `model_card.json` (data set, classes, palette, input, baked-in test-time
options, the run's mIoU, the training command and configuration).

Example:
    network, model_config = segmenter.load_trained_model("work/demo_seg")
    export_saved_model(network, model_config, "work/demo_seg_export",
                       evaluation.InferenceConfig(flip=True), run_dir="work/demo_seg")
    served = tf.saved_model.load("work/demo_seg_export")
    out = served.signatures["serving_default"](images=tf.zeros([1, 97, 131, 3], tf.uint8))
    out["labels"].shape  # (1, 97, 131)
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from typing import Optional

import numpy as np
import tensorflow as tf

from mm_tf import common
from mm_tf import evaluation
from mm_tf.data import pipeline
from mm_tf.errors import ConfigError

# Signature names and their output keys.
SERVING_DEFAULT = "serving_default"
SERVE_BYTES = "serve_bytes"
METADATA = "metadata"
IMAGES = "images"
IMAGE_BYTES = "image_bytes"
LABELS = "labels"
PROBABILITIES = "probabilities"
HEIGHTS = "heights"
WIDTHS = "widths"
# serve_bytes: label value of the padding around images smaller than the call's largest.
PAD_LABEL = -1

# Asset file names (SavedModel `assets/` folder).
CLASS_NAMES_FILE = "class_names.txt"
PALETTE_FILE = "palette.txt"
MODEL_CARD_FILE = "model_card.json"
MODEL_CARD_FORMAT = "mm-tf segmentation SavedModel v1"


def check_inference(inference: evaluation.InferenceConfig) -> evaluation.InferenceConfig:
    """Returns `inference` if it can be baked into a SavedModel, else raises ConfigError."""
    scales = tuple(float(s) for s in inference.scales)
    if not scales or min(scales) <= 0:
        raise ConfigError(f"--scales must be positive numbers, got {list(inference.scales)}")
    if inference.window:
        raise ConfigError(f"sliding-window inference (window={inference.window}) is not "
                          "exported; export whole-image inference (window 0)")
    return evaluation.InferenceConfig(flip=bool(inference.flip), scales=scales)


class SegmentationServer(tf.Module):
    """A segmentation network behind uint8-image and encoded-image entry points.

    Args:
      network: a Keras model, images float32 [B,H,W,C] -> logits [B,H,W,K] (a
        `mm_tf.models.heads.SegmentationModel`), with `num_classes`.
      input_mode: common.INPUT_RGB or common.INPUT_GREY, the network's input.
      inference: test-time options baked in (flip, scales; no sliding window).
      class_names, palette, dataset: served by `metadata` (palette uint8 [K,3]).

    Example:
      server = SegmentationServer(network, "rgb", evaluation.InferenceConfig(flip=True))
      server.serve(tf.zeros([2, 97, 131, 3], tf.uint8))["labels"].shape  # (2, 97, 131)
    """

    def __init__(self, network, input_mode: str,
                 inference: evaluation.InferenceConfig = evaluation.InferenceConfig(),
                 class_names=None, palette=None, dataset: str = "", name=None):
        super().__init__(name=name)
        if input_mode not in common.INPUT_MODES:
            raise ConfigError(f"input_mode must be one of {common.INPUT_MODES}, got "
                              f"{input_mode!r}")
        inference = check_inference(inference)
        self.network = network
        self.num_classes = int(network.num_classes)
        self.input_mode = input_mode
        self.flip = inference.flip
        self.scales = inference.scales
        names = list(class_names) if class_names is not None else [
            str(i) for i in range(self.num_classes)]
        colours = (np.zeros((self.num_classes, 3), np.uint8) if palette is None
                   else np.asarray(palette, np.uint8).reshape(-1, 3))
        if len(names) != self.num_classes or colours.shape[0] != self.num_classes:
            raise ConfigError(f"{len(names)} class names and {colours.shape[0]} palette "
                              f"colours for a network of {self.num_classes} classes")
        self._class_names = names
        self._palette = colours
        self._dataset = dataset
        self.serve = tf.function(self._serve, input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.uint8, name=IMAGES)])
        self.serve_bytes = tf.function(self._serve_bytes, input_signature=[
            tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)])
        self.metadata = tf.function(self._metadata, input_signature=[])

    def probabilities(self, images):
        """Normalised images float32 [B,H,W,C] -> probabilities float32 [B,H,W,K],
        averaged over scales and flips in the order and with the ops of
        `evaluation.predict_probabilities` (so both agree to float rounding)."""
        size = tf.shape(images)[1:3]
        total, views = None, 0
        for scale in self.scales:
            if scale == 1.0:
                scaled = images
            else:
                # Python's round() and tf.round both round halves to even.
                scaled_size = tf.maximum(1, tf.cast(
                    tf.round(tf.cast(size, tf.float64) * scale), tf.int32))
                scaled = tf.image.resize(images, scaled_size, "bilinear")
            for flipped in ((False, True) if self.flip else (False,)):
                view = tf.reverse(scaled, [2]) if flipped else scaled
                logits = tf.cast(self.network(view, training=False), tf.float32)
                probs = tf.nn.softmax(logits)
                if flipped:
                    probs = tf.reverse(probs, [2])
                if scale != 1.0:
                    probs = tf.image.resize(probs, size, "bilinear")
                total = probs if total is None else total + probs
                views += 1
        return total / float(views)

    def _serve(self, images):
        """uint8 [B,H,W,3] -> {labels int32 [B,H,W], probabilities float32 [B,H,W,K]}."""
        probs = self.probabilities(pipeline.normalize(images, self.input_mode))
        return {LABELS: tf.argmax(probs, axis=-1, output_type=tf.int32),
                PROBABILITIES: probs}

    def _serve_bytes(self, image_bytes):
        """Encoded images string [B] -> labels, probabilities padded to the largest image
        of the call, and each image's heights, widths int32 [B] (see module docstring)."""
        count = tf.shape(image_bytes)[0]
        labels = tf.TensorArray(tf.int32, size=count, infer_shape=False,
                                element_shape=tf.TensorShape([None, None]))
        probs = tf.TensorArray(tf.float32, size=count, infer_shape=False,
                               element_shape=tf.TensorShape([None, None, self.num_classes]))
        sizes = tf.TensorArray(tf.int32, size=count, element_shape=tf.TensorShape([2]))
        for i in tf.range(count):
            image = tf.io.decode_image(image_bytes[i], channels=3, dtype=tf.uint8,
                                       expand_animations=False)
            image = tf.ensure_shape(image, [None, None, 3])
            # The traced `serve` function is called, not retraced: one network graph.
            out = self.serve(image[None])
            labels = labels.write(i, out[LABELS][0])
            probs = probs.write(i, out[PROBABILITIES][0])
            sizes = sizes.write(i, tf.shape(image)[:2])
        sizes = sizes.stack()
        largest = tf.reduce_max(sizes, axis=0)
        padded_labels = tf.TensorArray(tf.int32, size=count,
                                       element_shape=tf.TensorShape([None, None]))
        padded_probs = tf.TensorArray(tf.float32, size=count,
                                      element_shape=tf.TensorShape([None, None,
                                                                    self.num_classes]))
        for i in tf.range(count):
            pad = largest - sizes[i]
            padding = [[0, pad[0]], [0, pad[1]]]
            padded_labels = padded_labels.write(
                i, tf.pad(labels.read(i), padding, constant_values=PAD_LABEL))
            padded_probs = padded_probs.write(i, tf.pad(probs.read(i), padding + [[0, 0]]))
        return {LABELS: padded_labels.stack(), PROBABILITIES: padded_probs.stack(),
                HEIGHTS: sizes[:, 0], WIDTHS: sizes[:, 1]}

    def _metadata(self):
        """() -> class_names string [K], palette uint8 [K,3], input_mode, dataset."""
        return {"class_names": tf.constant(self._class_names, tf.string),
                "palette": tf.constant(self._palette, tf.uint8),
                "input_mode": tf.constant(self.input_mode),
                "dataset": tf.constant(self._dataset)}


# ----------------------------------------------------------------------------------------
# The model card.
# ----------------------------------------------------------------------------------------

def _read_json(path: str) -> Optional[dict]:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def build_model_card(model_config: dict, inference: evaluation.InferenceConfig,
                     run_dir: Optional[str] = None, source: Optional[dict] = None) -> dict:
    """JSON-ready description of an exported model.

    Args:
      model_config: the run's model_config.json contents (`segmenter.model_config_dict`).
      inference: the test-time options baked into the export.
      run_dir: the bin/train_seg.py run folder, if any: its eval.json (bin/evaluate.py,
        written by the pipeline) or summary.json give the mIoU, summary.json the training
        configuration, and `.seg_stage.json` (the pipeline's record) the command.
      source: where the weights came from (paths), recorded as is.
    """
    card = {
        "format": MODEL_CARD_FORMAT,
        "dataset": model_config.get("dataset"),
        "num_classes": int(model_config["num_classes"]),
        "class_names": list(model_config["class_names"]),
        "palette": [[int(c) for c in colour] for colour in model_config["palette"]],
        "ignore_label": model_config.get("ignore_label", common.IGNORE_LABEL),
        "input": {"dtype": "uint8", "shape": ["batch", "height", "width", 3],
                  "channels": "RGB", "input_mode": model_config["input_mode"],
                  "normalization": ("RGB minus the ImageNet mean" if
                                    model_config["input_mode"] == common.INPUT_RGB else
                                    f"mean of RGB / 255 - {common.GREY_SHIFT}")},
        "model": {key: model_config.get(key) for key in ("backbone", "head", "width")},
        "inference": {"flip": inference.flip, "scales": list(inference.scales)},
        "signatures": {
            SERVING_DEFAULT: {"inputs": {IMAGES: "uint8 [batch, height, width, 3]"},
                              "outputs": {LABELS: "int32 [batch, height, width]",
                                          PROBABILITIES: "float32 [batch, height, width, K]"}},
            SERVE_BYTES: {"inputs": {IMAGE_BYTES: "string [batch] (PNG/JPEG)"},
                          "outputs": {LABELS: f"int32 [batch, H, W], {PAD_LABEL} in padding",
                                      PROBABILITIES: "float32 [batch, H, W, K], 0 in padding",
                                      HEIGHTS: "int32 [batch]", WIDTHS: "int32 [batch]"}},
            METADATA: {"inputs": {}, "outputs": {"class_names": "string [K]",
                                                 "palette": "uint8 [K, 3]",
                                                 "input_mode": "string",
                                                 "dataset": "string"}},
        },
        "data": model_config.get("data", {}),
        "evaluation": None,
        "training": None,
        "source": dict(source or {}),
        "exported": {"utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "tensorflow": tf.__version__},
    }
    try:
        import keras  # pylint: disable=import-outside-toplevel
        card["exported"]["keras"] = keras.__version__
    except ImportError:  # pragma: no cover
        pass
    if run_dir:
        eval_json = _read_json(os.path.join(run_dir, "eval.json"))
        summary = _read_json(os.path.join(run_dir, "summary.json"))
        stage = _read_json(os.path.join(run_dir, ".seg_stage.json"))
        scores, origin = None, None
        if eval_json is not None:
            scores, origin = eval_json, "eval.json"
        elif summary is not None and "eval" in summary:
            scores, origin = summary["eval"], "summary.json"
        if scores is not None:
            card["evaluation"] = {
                "source": origin,
                "split": scores.get("split", model_config.get("data", {}).get("split")),
                "miou": scores.get("miou"), "pixel_acc": scores.get("pixel_acc"),
                "mean_acc": scores.get("mean_acc"), "num_images": scores.get("num_images"),
                "per_class_iou": scores.get("per_class_iou"),
                # The options the mIoU was measured with (may differ from the export's).
                "inference": model_config.get("inference"),
            }
        if summary is not None or stage is not None:
            card["training"] = {
                "command": (stage or {}).get("command"),
                "steps": (summary or {}).get("steps"),
                "seconds": (summary or {}).get("seconds"),
                "config": (summary or {}).get("config"),
            }
    return card


def load_model_card(saved_model_dir: str) -> dict:
    """The model card of an exported SavedModel (reads assets/model_card.json)."""
    path = os.path.join(saved_model_dir, "assets", MODEL_CARD_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{saved_model_dir}: no assets/{MODEL_CARD_FILE} (not an mm-tf "
                          "export; see bin/export.py)")
    with open(path) as f:
        return json.load(f)


def is_saved_model(path: str) -> bool:
    """True when `path` is a SavedModel folder."""
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


# ----------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------

def export_saved_model(network, model_config: dict, output_dir: str,
                       inference: evaluation.InferenceConfig = evaluation.InferenceConfig(),
                       run_dir: Optional[str] = None, source: Optional[dict] = None) -> dict:
    """Writes `network` as a SavedModel with signatures serving_default, serve_bytes and
    metadata, and the assets class_names.txt, palette.txt, model_card.json.

    The folder is written beside `output_dir` and renamed into place, so a failed export
    leaves no half-written model; an existing export at `output_dir` is replaced, any
    other non-empty folder is refused.

    Args:
      network: the trained network (images float32 [B,H,W,C] -> logits [B,H,W,K]).
      model_config: its model_config.json contents.
      output_dir: the SavedModel folder to write.
      inference: flip / scales baked into every signature.
      run_dir: the training run folder (for the model card's mIoU and command).
      source: paths of the weights and model config (for the model card).

    Returns:
      The model card dict.
    """
    inference = check_inference(inference)
    output_dir = os.path.abspath(output_dir)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not is_saved_model(output_dir):
        raise ConfigError(f"--output_dir={output_dir} exists and is not a SavedModel; "
                          "give a new or empty folder")
    if int(model_config["num_classes"]) != int(network.num_classes):
        raise ConfigError(f"model config has {model_config['num_classes']} classes, the "
                          f"network {network.num_classes}")
    card = build_model_card(model_config, inference, run_dir, source)
    server = SegmentationServer(network, model_config["input_mode"], inference,
                                class_names=model_config["class_names"],
                                palette=model_config["palette"],
                                dataset=model_config.get("dataset") or "")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_dir)}.tmp_")
    try:
        asset_dir = os.path.join(staging, "_assets_src")
        os.makedirs(asset_dir)
        texts = {
            CLASS_NAMES_FILE: "".join(f"{name}\n" for name in card["class_names"]),
            PALETTE_FILE: "".join(f"{r} {g} {b}\n" for r, g, b in card["palette"]),
            MODEL_CARD_FILE: json.dumps(card, indent=2) + "\n",
        }
        for name, text in texts.items():
            with open(os.path.join(asset_dir, name), "w") as f:
                f.write(text)
        # Tracked assets are copied into the SavedModel's assets/ folder on save.
        server.assets = {name.replace(".", "_"): tf.saved_model.Asset(
            os.path.join(asset_dir, name)) for name in texts}
        model_dir = os.path.join(staging, "model")
        tf.saved_model.save(server, model_dir, signatures={
            SERVING_DEFAULT: server.serve.get_concrete_function(),
            SERVE_BYTES: server.serve_bytes.get_concrete_function(),
            METADATA: server.metadata.get_concrete_function(),
        })
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(model_dir, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card
