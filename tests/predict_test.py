"""bin/predict.py and mm_tf/predict.py: prediction PNGs score the mIoU bin/evaluate.py
reports; an ensemble of a model with itself equals the model; a SavedModel and its run
folder predict alike; mixed sizes, list files, globs, overlays and the Cityscapes
submission ids."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
from PIL import Image

from mm_tf import evaluation
from mm_tf import export
from mm_tf import predict
from mm_tf import segmenter
from mm_tf.data import datasets
from mm_tf.models import heads

from testutil import last_json, run_binary  # tests/ is on sys.path (prepend import mode)


@pytest.fixture(scope="module")
def setup(small_demo_dir, tmp_path_factory):
    """A tiny demo run folder (Glorot weights, random BN statistics so that the
    predictions vary), its SavedModel, and an input folder of the val images plus one
    image of another size."""
    root = tmp_path_factory.mktemp("predict")
    val_pairs, info = datasets.read_dataset("demo", small_demo_dir, "val")
    keras.utils.set_random_seed(0)
    network = heads.build_segmentation_model("vgg16", "hypercolumn", info.num_classes,
                                             width=0.0625)
    rng = np.random.default_rng(0)
    for variable in network.non_trainable_variables:
        value = (rng.uniform(0.5, 2.0, variable.shape) if "variance" in variable.path
                 else rng.normal(0.0, 0.2, variable.shape))
        variable.assign(value.astype(np.float32))
    run = root / "run"
    config = segmenter.SegConfig(backbone="vgg16", head="hypercolumn", width=0.0625)
    model_config = segmenter.model_config_dict(
        config, info, {"dataset": "demo", "data_dir": str(small_demo_dir), "split": "val"})
    segmenter.save_network_weights(network, str(run / segmenter.MODEL_WEIGHTS))
    (run / segmenter.MODEL_CONFIG).write_text(json.dumps(model_config))
    saved = root / "saved"
    export.export_saved_model(network, model_config, str(saved), run_dir=str(run))
    inputs = root / "inputs"
    inputs.mkdir()
    for image, _ in val_pairs:
        shutil.copy(image, inputs / os.path.basename(image))
    with Image.open(val_pairs[0][0]) as first:
        first.crop((0, 0, 77, 61)).save(inputs / "other_size.png")
    return {"run": run, "saved": saved, "inputs": inputs, "pairs": val_pairs, "info": info}


def _miou(pairs, info, label_dir):
    matrix = np.zeros((info.num_classes, info.num_classes), np.int64)
    for image, label in pairs:
        stem = os.path.splitext(os.path.basename(image))[0]
        with Image.open(label_dir / f"{stem}.png") as png:
            assert png.mode == "P"
            prediction = np.asarray(png)
        with Image.open(label) as truth:
            truth = info.label_lut[np.asarray(truth)]
        matrix += evaluation.confusion_matrix(truth, prediction, info.num_classes).numpy()
    return evaluation.scores_from_confusion(matrix)["miou"], matrix


def test_prediction_pngs_score_the_evaluate_miou(setup, tmp_path):
    result = run_binary("bin/evaluate.py", f"--workdir={setup['run']}", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = last_json(result.stdout)
    out = tmp_path / "single"
    result = run_binary("bin/predict.py", f"--model={setup['saved']}",
                        f"--inputs={setup['inputs']}",
                        f"--output_dir={out}", "--batch_size=3", "--noprogress")
    assert result.returncode == 0, result.stderr[-3000:]
    miou, matrix = _miou(setup["pairs"], setup["info"], out / "labels")
    assert len(np.flatnonzero(matrix.sum(0))) > 1  # Not one class everywhere.
    assert miou == pytest.approx(scores["miou"], abs=1e-6)
    np.testing.assert_array_equal(matrix, scores["confusion_matrix"])
    # Mixed sizes: the odd one out has its own size, label map and overlay.
    with Image.open(out / "labels" / "other_size.png") as png:
        assert png.size == (77, 61)
        palette = np.array(png.getpalette()[:15]).reshape(5, 3)
    np.testing.assert_array_equal(palette, setup["info"].palette)
    with Image.open(out / "overlays" / "other_size.png") as png:
        assert png.mode == "RGB" and png.size == (77, 61)
    manifest = json.loads((out / "predictions.json").read_text())
    assert manifest["num_images"] == len(setup["pairs"]) + 1
    assert manifest["outputs"]["submission"] is None

    # An ensemble of the model with itself equals the model; a list file as input.
    listing = tmp_path / "val.txt"
    listing.write_text("# image label\n" + "".join(
        f"{os.path.relpath(image, tmp_path)} {label}\n" for image, label in setup["pairs"]))
    ensemble = tmp_path / "ensemble"
    result = run_binary("bin/predict.py", f"--model={setup['saved']}", f"--model={setup['saved']}",
                        f"--inputs={listing}", f"--output_dir={ensemble}", "--nooverlays",
                        "--batch_size=3",
                        "--noprogress")
    assert result.returncode == 0, result.stderr[-3000:]
    for image, _ in setup["pairs"]:
        name = os.path.splitext(os.path.basename(image))[0] + ".png"
        with Image.open(out / "labels" / name) as a, Image.open(ensemble / "labels" / name) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not (ensemble / "overlays").exists()


def test_run_folder_equals_its_saved_model(setup):
    from_run = predict.load_predictor(str(setup["run"]))
    from_saved = predict.load_predictor(str(setup["saved"]))
    assert from_run.class_names == from_saved.class_names == list(setup["info"].class_names)
    images = np.stack([predict.read_image(p) for p, _ in setup["pairs"][:2]])
    a, b = from_run.probabilities(images), from_saved.probabilities(images)
    np.testing.assert_allclose(a, b, atol=1e-5)
    same = predict.Ensemble([from_run, from_run]).probabilities(images)
    np.testing.assert_array_equal(same, a)
    flipped = predict.load_predictor(str(setup["run"]), flip=True)
    assert flipped.inference == {"flip": True, "scales": [1.0]}
    from mm_tf.errors import ConfigError
    with pytest.raises(ConfigError, match="baked in"):
        predict.load_predictor(str(setup["saved"]), flip=True)


def test_inputs_from_folder_glob_and_list(tmp_path):
    (tmp_path / "a" / "x").mkdir(parents=True)
    for name in ("a/one.png", "a/x/two.jpg", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    folder = predict.list_inputs(str(tmp_path / "a"))
    assert [i.name for i in folder] == ["one", os.path.join("x", "two")]
    pattern = predict.list_inputs(str(tmp_path / "a" / "**" / "*.*"))
    assert sorted(i.name for i in pattern) == ["one", "two"]
    (tmp_path / "list.txt").write_text("a/one.png label.png\n\na/x/two.jpg\n")
    listed = predict.list_inputs(str(tmp_path / "list.txt"))
    assert [i.path for i in listed] == [str(tmp_path / "a/one.png"),
                                        str(tmp_path / "a/x/two.jpg")]
    (tmp_path / "b" / "y").mkdir(parents=True)
    (tmp_path / "b" / "one.png").write_bytes(b"")
    (tmp_path / "b" / "y" / "one.png").write_bytes(b"")
    from mm_tf.errors import ConfigError
    with pytest.raises(ConfigError, match="both be written"):
        predict.list_inputs(str(tmp_path / "**" / "one.png"))
    with pytest.raises(ConfigError, match="no such folder"):
        predict.list_inputs(str(tmp_path / "missing"))


def test_size_batches_never_mix_sizes(tmp_path):
    sizes = [(8, 6), (5, 7), (8, 6), (8, 6), (5, 7)]
    images = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (w, h)).save(path)
        images.append(predict.InputImage(str(path), str(i)))
    assert predict.size_batches(images, 2) == [[0, 2], [3], [1, 4]]


def test_cityscapes_submission_ids():
    train_ids = np.array([[0, 1, 10], [13, 18, 255]])
    np.testing.assert_array_equal(predict.cityscapes_label_ids(train_ids),
                                  [[7, 8, 23], [26, 33, 0]])


def test_overlay_and_palette_image():
    image = np.full((2, 3, 3), 100, np.uint8)
    labels = np.array([[0, 1, 1], [1, 0, 255]])
    palette = np.array([[0, 0, 0], [200, 100, 0]], np.uint8)
    mixed = predict.overlay(image, labels, palette, alpha=0.5)
    np.testing.assert_array_equal(mixed[0, 1], [150, 100, 50])
    np.testing.assert_array_equal(mixed[0, 0], [50, 50, 50])
    png = predict.palette_image(labels, palette)
    assert png.mode == "P" and np.asarray(png)[1, 2] == 255
