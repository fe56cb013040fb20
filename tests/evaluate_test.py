"""bin/evaluate.py: reproduces the mIoU and confusion matrix of a bin/train_seg.py run's
summary.json from the saved model, writes palette PNG predictions named after the
images, accepts --weights + --model_config, and reports bad input in one line."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from testutil import last_json, run_binary  # tests/ is on sys.path (prepend import mode)


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_demo_dir):
    """A short bin/train_seg.py run on the small demo data (4 val images; the full demo
    set's generation and evaluation are train_seg_test's): (workdir, summary)."""
    root = tmp_path_factory.mktemp("evaluate")
    workdir = root / "seg"
    result = run_binary("bin/train_seg.py", "--flagfile=flags/demo_seg.flags",
                        f"--data_dir={small_demo_dir}", f"--workdir={workdir}", "--steps=6",
                        "--log_every=3", "--checkpoint_every=3", "--image_every=0",
                        "--lr_boundaries=3", "--batch_size=2", "--iter_size=2", "--crop_size=64",
                        "--width=0.0625", "--bn_recompute_batches=2", "--verbose=0")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, json.loads((workdir / "summary.json").read_text())


def test_reproduces_the_summary_miou_exactly(run):
    workdir, summary = run
    result = run_binary("bin/evaluate.py", f"--workdir={workdir}", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = last_json(result.stdout)
    assert scores["miou"] == summary["eval"]["miou"]
    assert scores["confusion_matrix"] == summary["eval"]["confusion_matrix"]
    assert scores["num_images"] == summary["eval"]["num_images"] > 0
    assert scores["per_class_iou"] == summary["eval"]["per_class_iou"]
    assert set(scores["per_class_iou"]) == {"background", "disc", "square", "triangle", "ring"}
    assert scores["split"] == "val" and scores["dataset"] == "demo"


def test_predictions_are_palette_pngs_named_after_the_images(run, tmp_path):
    workdir, _ = run
    out = tmp_path / "pred"
    result = run_binary("bin/evaluate.py", f"--weights={workdir / 'model.weights.h5'}",
                        f"--model_config={workdir / 'model_config.json'}", "--max_images=3",
                        "--flip", "--scales=0.75,1.0", f"--predictions_dir={out}", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = last_json(result.stdout)
    assert scores["num_images"] == 3
    model_config = json.loads((workdir / "model_config.json").read_text())
    val_ids = (pathlib.Path(model_config["data"]["data_dir"]) / "ImageSets" /
               "Segmentation" / "val.txt").read_text().split()[:3]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.png" for i in val_ids)
    with Image.open(out / f"{val_ids[0]}.png") as image:
        assert image.mode == "P"
        palette = np.array(image.getpalette()[:15]).reshape(5, 3)
        prediction = np.asarray(image)
    np.testing.assert_array_equal(palette, model_config["palette"])
    assert prediction.max() < 5
    label = pathlib.Path(model_config["data"]["data_dir"]) / "SegmentationClass" / \
        f"{val_ids[0]}.png"
    with Image.open(label) as truth:
        assert prediction.shape == (truth.size[1], truth.size[0])


def test_sliding_window_runs(run):
    workdir, _ = run
    result = run_binary("bin/evaluate.py", f"--workdir={workdir}", "--window=64", "--stride=32",
                        "--max_images=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mIoU" in result.stdout and "background" in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["--workdir={empty}"], "model_config.json"),
    (["--weights={empty}/w.weights.h5"], "--model_config"),
    (["--workdir={run}", "--scales=0,1"], "--scales"),
    (["--workdir={run}", "--data_dir=/nonexistent/demo"], "/nonexistent/demo"),
])
def test_bad_input_is_one_clear_line(run, tmp_path, args, needle):
    workdir, _ = run
    args = [a.format(empty=tmp_path, run=workdir) for a in args]
    result = run_binary("bin/evaluate.py", *args)
    assert result.returncode != 0
    assert needle in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_weights_of_another_model_are_one_clear_line(run, tmp_path):
    workdir, _ = run
    model_config = json.loads((workdir / "model_config.json").read_text())
    model_config["width"] = 0.25
    wider = tmp_path / "model_config.json"
    wider.write_text(json.dumps(model_config))
    result = run_binary("bin/evaluate.py", f"--weights={workdir / 'model.weights.h5'}",
                        f"--model_config={wider}")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not fit" in errors[0] and "conv" in errors[0], \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr
