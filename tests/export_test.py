"""mm_tf/export.py and bin/export.py: the SavedModel reloads in a plain-TensorFlow
process (no mm_tf import) and its signatures equal the eager Keras model, flip and
multi-scale averaging included, on odd sizes and sizes that are not multiples of the
network stride; serve_bytes handles PNG and JPEG of mixed sizes in one call."""

import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mm_tf import common
from mm_tf import evaluation
from mm_tf import export
from mm_tf import segmenter
from mm_tf.data import pipeline
from mm_tf.models import heads

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = ((97, 131), (64, 90))  # Odd; even but no multiple of 32 (the network stride).
INFERENCE = evaluation.InferenceConfig(flip=True, scales=(0.75, 1.0))
TOLERANCE = 1e-4

# Runs in a fresh interpreter from a folder outside the repo: plain TensorFlow only.
RELOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    model_dir, inputs, outputs = sys.argv[1:4]
    encoded = [open(path, "rb").read() for path in sys.argv[4:]]
    served = tf.saved_model.load(model_dir)
    data = np.load(inputs)
    result = {}
    for key in sorted(data.files):
        if key.startswith("images_"):
            out = served.signatures["serving_default"](images=tf.constant(data[key]))
            for name, value in out.items():
                result[f"{key}/{name}"] = value.numpy()
    out = served.signatures["serve_bytes"](image_bytes=tf.constant(encoded))
    for name, value in out.items():
        result[f"bytes/{name}"] = value.numpy()
    meta = served.signatures["metadata"]()
    np.savez(outputs, **result)
    print(json.dumps({
        "mm_tf_imported": any(m == "mm_tf" or m.startswith("mm_tf.") for m in sys.modules),
        "signatures": sorted(served.signatures),
        "class_names": [c.decode() for c in meta["class_names"].numpy()],
        "palette": meta["palette"].numpy().tolist(),
        "input_mode": meta["input_mode"].numpy().decode(),
        "dataset": meta["dataset"].numpy().decode(),
    }))
""")


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    return env


def _model_config(input_mode="rgb"):
    return {"backbone": "vgg16", "head": "hypercolumn", "width": 0.0625,
            "input_mode": input_mode, "num_classes": 5, "ignore_label": 255,
            "dataset": "demo", "class_names": ["background", "disc", "square", "triangle",
                                               "ring"],
            "palette": [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]],
            "data": {"dataset": "demo", "split": "val"},
            "inference": {"flip": False, "scales": [1.0], "window": 0, "stride": 0}}


def _network(input_mode="rgb", seed=1):
    """A tiny hypercolumn network with non-trivial BN statistics."""
    keras.utils.set_random_seed(seed)
    network = heads.build_segmentation_model("vgg16", "hypercolumn", 5, input_mode=input_mode,
                                             width=0.0625)
    rng = np.random.default_rng(seed)
    for variable in network.non_trainable_variables:  # BN moving mean / variance.
        shape = variable.shape
        value = (rng.uniform(0.5, 2.0, shape) if "variance" in variable.path
                 else rng.normal(0.0, 0.2, shape))
        variable.assign(value.astype(np.float32))
    return network


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return {size: rng.integers(0, 256, (2, *size, 3), dtype=np.uint8) for size in SIZES}


def _reference(network, images, input_mode="rgb", inference=INFERENCE):
    """Eager per-image probabilities [B,H,W,K] via evaluation.predict_probabilities."""
    fn = lambda x: tf.cast(network(x, training=False), tf.float32)  # noqa: E731
    return np.concatenate([
        evaluation.predict_probabilities(fn, pipeline.normalize(image[None], input_mode),
                                         network.num_classes, inference)
        for image in images])


def _assert_labels_match(labels, probs_ref):
    """Labels equal the reference argmax wherever the top two are not a near tie."""
    top2 = np.sort(probs_ref, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2 * TOLERANCE
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(labels[clear], probs_ref.argmax(-1)[clear])


def _png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run folder exported by bin/export.py with --flip --scales=0.75,1.0, and the
    outputs of its signatures computed in a plain-TensorFlow subprocess."""
    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    network = _network()
    segmenter.save_network_weights(network, str(run / segmenter.MODEL_WEIGHTS))
    (run / segmenter.MODEL_CONFIG).write_text(json.dumps(_model_config()))
    (run / "summary.json").write_text(json.dumps(
        {"steps": 6, "seconds": 1.0, "config": {"seg": {"width": 0.0625}},
         "eval": {"miou": 0.25, "pixel_acc": 0.5, "mean_acc": 0.4, "num_images": 4,
                  "per_class_iou": {"background": 0.5}}}))
    (run / ".seg_stage.json").write_text(json.dumps(
        {"seconds": 1.0, "command": ["bin/train_seg.py", "--flagfile=flags/demo_seg.flags"]}))
    out = root / "saved"
    result = subprocess.run(
        [sys.executable, "bin/export.py", f"--workdir={run}", f"--output_dir={out}",
         "--flip", "--scales=0.75,1.0"], cwd=ROOT, env=_env(), capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    images = _images()
    png_image, jpeg_image = images[SIZES[0]][0], images[SIZES[1]][1]
    encoded = [root / "a.png", root / "b.jpg"]
    encoded[0].write_bytes(_png(png_image))
    encoded[1].write_bytes(_jpeg(jpeg_image))
    inputs = root / "inputs.npz"
    np.savez(inputs, **{f"images_{h}x{w}": v for (h, w), v in images.items()})
    script = root / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    outputs = root / "outputs.npz"
    reload = subprocess.run([sys.executable, str(script), str(out), str(inputs), str(outputs),
                             *map(str, encoded)],
                            cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert reload.returncode == 0, reload.stderr[-3000:]
    jpeg_decoded = tf.io.decode_jpeg(encoded[1].read_bytes(), channels=3).numpy()
    return {"network": network, "dir": out, "images": images, "png": png_image,
            "jpeg": jpeg_decoded, "outputs": dict(np.load(outputs)),
            "info": json.loads(reload.stdout.strip().splitlines()[-1]),
            "cli": result.stdout}


def test_reloads_without_mm_tf_and_has_the_signatures(exported):
    info = exported["info"]
    assert info["mm_tf_imported"] is False
    assert info["signatures"] == ["metadata", "serve_bytes", "serving_default"]
    config = _model_config()
    assert info["class_names"] == config["class_names"]
    assert info["palette"] == config["palette"]
    assert info["input_mode"] == "rgb" and info["dataset"] == "demo"


def test_serving_default_equals_the_keras_model(exported):
    outputs = exported["outputs"]
    for (h, w), images in exported["images"].items():
        probs = outputs[f"images_{h}x{w}/probabilities"]
        labels = outputs[f"images_{h}x{w}/labels"]
        assert probs.shape == (2, h, w, 5) and probs.dtype == np.float32
        assert labels.shape == (2, h, w) and labels.dtype == np.int32
        reference = _reference(exported["network"], images)
        np.testing.assert_allclose(probs, reference, atol=TOLERANCE)
        _assert_labels_match(labels, reference)


def test_serve_bytes_mixed_sizes_png_and_jpeg(exported):
    outputs = exported["outputs"]
    heights, widths = outputs["bytes/heights"], outputs["bytes/widths"]
    np.testing.assert_array_equal(heights, [SIZES[0][0], SIZES[1][0]])
    np.testing.assert_array_equal(widths, [SIZES[0][1], SIZES[1][1]])
    labels, probs = outputs["bytes/labels"], outputs["bytes/probabilities"]
    big = (max(heights), max(widths))
    assert labels.shape == (2, *big) and probs.shape == (2, *big, 5)
    for i, image in enumerate((exported["png"], exported["jpeg"])):
        h, w = heights[i], widths[i]
        reference = _reference(exported["network"], image[None])[0]
        np.testing.assert_allclose(probs[i, :h, :w], reference, atol=TOLERANCE)
        _assert_labels_match(labels[i, :h, :w][None], reference[None])
    # The smaller image is padded: label -1, probabilities 0.
    h, w = heights[1], widths[1]
    assert (labels[1, h:] == export.PAD_LABEL).all() and (labels[1, :, w:] == -1).all()
    assert (probs[1, h:] == 0).all() and (probs[1, :, w:] == 0).all()


def test_assets_and_model_card(exported):
    assets = exported["dir"] / "assets"
    config = _model_config()
    assert (assets / export.CLASS_NAMES_FILE).read_text().splitlines() == config["class_names"]
    palette = [[int(v) for v in line.split()]
               for line in (assets / export.PALETTE_FILE).read_text().splitlines()]
    assert palette == config["palette"]
    card = export.load_model_card(str(exported["dir"]))
    assert card["dataset"] == "demo" and card["class_names"] == config["class_names"]
    assert card["inference"] == {"flip": True, "scales": [0.75, 1.0]}
    assert card["evaluation"]["miou"] == 0.25 and card["evaluation"]["source"] == "summary.json"
    assert card["training"]["command"][0] == "bin/train_seg.py"
    assert card["training"]["config"] == {"seg": {"width": 0.0625}}
    assert card["input"]["input_mode"] == "rgb"
    assert "exported" in exported["cli"]


def test_grey_server_normalises_like_the_pipeline():
    network = _network("grey", seed=3)
    server = export.SegmentationServer(network, common.INPUT_GREY,
                                       evaluation.InferenceConfig(scales=(1.0, 1.25)))
    images = _images(seed=5)[SIZES[0]]
    out = server.serve(tf.constant(images))
    reference = _reference(network, images, "grey", evaluation.InferenceConfig(
        scales=(1.0, 1.25)))
    np.testing.assert_allclose(out[export.PROBABILITIES].numpy(), reference, atol=TOLERANCE)


def test_rejects_what_it_cannot_export(tmp_path):
    from mm_tf.errors import ConfigError
    with pytest.raises(ConfigError, match="window"):
        export.check_inference(evaluation.InferenceConfig(window=64))
    with pytest.raises(ConfigError, match="scales"):
        export.check_inference(evaluation.InferenceConfig(scales=(0.0,)))
    (tmp_path / "keep.txt").write_text("not a model")
    with pytest.raises(ConfigError, match="not a SavedModel"):
        export.export_saved_model(_network(), _model_config(), str(tmp_path))
