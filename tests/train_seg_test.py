"""bin/train_seg.py end to end: every segmentation flagfile parses against the binary's
flags with the paper's settings, the demo flagfile trains a few steps and writes the
model, its config and summary.json, and bad input is one clear line."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from mm_tf.data import synthetic
from testutil import damage, demo_pairs, error_lines  # tests/ is on sys.path

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEG_FLAGFILES = sorted(p.name for p in (ROOT / "flags").glob("*_seg.flags"))
# flags/smoke.flags's values spelled out, with fine-tuning's own smoke settings (two
# micro-batches per update, a 2-batch BN recompute, quiet Keras).
SMOKE = ["--steps=2", "--log_every=1", "--checkpoint_every=1", "--image_every=2",
         "--lr_boundaries=1", "--batch_size=2", "--iter_size=2", "--crop_size=64",
         "--width=0.0625", "--bn_recompute_batches=2", "--verbose=0"]


def _train_seg(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "bin/train_seg.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _demo_args(tmp_path, *extra):
    return ["--flagfile=flags/demo_seg.flags", f"--data_dir={tmp_path / 'data'}", *SMOKE,
            *extra]


# Parsed in a subprocess: bin/train_mm.py (imported by its own test) defines flags of the
# same names, and absl refuses a second definition in one process.
_PARSE = """
import json, sys
sys.path.insert(0, "bin")
from absl import flags
import train_seg
names = ["steps", "learning_rate", "lr_boundaries", "momentum", "weight_decay",
         "batch_size", "iter_size", "crop_size", "head", "backbone", "init", "eval_split",
         "input_mode"]
parsed = {}
for arg in sys.argv[1:]:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train_seg", "--workdir=/tmp/x"] + ([arg] if arg else []))
    parsed[arg] = {n: flags.FLAGS[n].value for n in names}
print(json.dumps(parsed))
"""


def _parse(*args):
    """Flag values of bin/train_seg.py for each argument (one flagfile or '' each)."""
    result = subprocess.run([sys.executable, "-c", _PARSE, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_seg_flagfile_parses_with_the_paper_settings():
    assert len(SEG_FLAGFILES) >= 10, SEG_FLAGFILES
    parsed = _parse(*[f"--flagfile=flags/{name}" for name in SEG_FLAGFILES])
    for name in SEG_FLAGFILES:
        f = parsed[f"--flagfile=flags/{name}"]
        lines = (ROOT / "flags" / name).read_text().splitlines()
        assert lines[0].startswith("# python bin/train_seg.py --flagfile=flags/" + name), name
        assert f["momentum"] == 0.9 and f["weight_decay"] == 0.0005, name
        if name.startswith(("voc_", "cityscapes_")):
            assert "Table" in lines[1], name
            assert f["steps"] == 40000 and f["learning_rate"] == 0.01, name
            assert f["lr_boundaries"] == ["24000", "36000"], name
            assert f["crop_size"] == 512 and f["eval_split"] == "val", name
            # M&M runs' backbones, except the ImageNet reference (converted weights).
            want = ("imagenet.weights.h5" if "imagenet" in name else
                    name.replace("_seg.flags", "_mm/backbone.weights.h5"))
            assert f["init"].endswith(want), (name, f["init"])
            assert f["head"] == ("fcn" if f["backbone"] == "alexnet" else "hypercolumn"), name
            assert f["input_mode"] == ("grey" if "colorization" in name else "rgb"), name


def test_binary_defaults_are_the_paper_values():
    f = _parse("")[""]
    assert (f["steps"], f["learning_rate"], f["lr_boundaries"], f["batch_size"],
            f["iter_size"], f["crop_size"], f["head"], f["eval_split"]) == (
                40000, 0.01, ["24000", "36000"], 6, 2, 512, "hypercolumn", "val")


def test_demo_flagfile_trains_and_writes_the_model(tmp_path):
    """Also the --unknown_labels=ignore case and the auxiliary M&M loss (one run for all,
    TF start-up is ~10 s): a label with values outside the classes trains, those pixels
    void; the auxiliary loss is logged and its mix recorded with the demo's background."""
    workdir = tmp_path / "seg"
    synthetic.generate_demo_dataset(tmp_path / "data")  # What the binary would generate.
    damage(demo_pairs(tmp_path / "data", "train")[0][1], "values")
    result = _train_seg(*_demo_args(tmp_path, f"--workdir={workdir}",
                                    "--unknown_labels=ignore", "--aux_mm_weight=0.5",
                                    "--aux_mm_patch_size=32", "--aux_mm_min_patch=16",
                                    "--aux_mm_max_patch=32", "--aux_mm_class_balanced"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mIoU" in result.stdout and "data check (quick): 250 pairs good" in result.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["images_per_update"] == 4
    assert summary["metrics"]["aux_mm_loss"] > 0
    aux_mix = summary["config"]["seg"]["aux_mm_mix"]
    assert summary["config"]["seg"]["aux_mm_weight"] == 0.5
    assert (aux_mix["patch_size"], aux_mix["class_balanced"], aux_mix["background_class"]) \
        == (32, True, 0)
    assert summary["eval"]["num_images"] > 0 and 0.0 <= summary["eval"]["miou"] <= 1.0
    model_config = json.loads((workdir / "model_config.json").read_text())
    assert model_config["dataset"] == "demo" and model_config["head"] == "hypercolumn"
    assert model_config["data"]["split"] == "val"
    assert model_config["data"]["data_dir"] == str(tmp_path / "data")
    assert model_config["data"]["unknown_labels"] == "ignore"  # bin/evaluate.py reuses it.
    assert (workdir / "model.weights.h5").is_file()
    assert list((workdir / "tensorboard" / "val").iterdir())


@pytest.fixture
def wide_backbone(tmp_path):
    """Backbone weights of a wider VGG-16 than the smoke run's (a mismatched --init)."""
    from mm_tf.models import backbones  # pylint: disable=import-outside-toplevel
    from mm_tf.models import weights  # pylint: disable=import-outside-toplevel
    path = tmp_path / "wide.weights.h5"
    weights.save_backbone_weights(backbones.build_backbone("vgg16", width=0.25), str(path))
    return path


@pytest.mark.parametrize("extra,needle", [
    (["--dataset=camvid", "--data_dir=/nonexistent/camvid"], "/nonexistent/camvid"),
    (["--init=/nonexistent/w.weights.h5"], "--init=/nonexistent/w.weights.h5"),
    (["--eval_split=nosuchsplit"], "nosuchsplit"),
])
def test_bad_input_is_one_clear_line(tmp_path, extra, needle):
    result = _train_seg(*_demo_args(tmp_path, f"--workdir={tmp_path / 'seg'}", *extra))
    assert result.returncode != 0
    assert needle in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_mismatched_init_names_the_layer(tmp_path, wide_backbone):
    result = _train_seg(*_demo_args(tmp_path, f"--workdir={tmp_path / 'seg'}",
                                    f"--init={wide_backbone}"))
    assert result.returncode != 0
    assert "layer 'conv1_1'" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- bad data, one line each


@pytest.fixture
def tiny_demo(tmp_path):
    """A fresh 4 + 2 image demo data set that a test may damage: (root, train pairs)."""
    root = synthetic.generate_demo_dataset(tmp_path / "tiny", num_train=4, num_val=2,
                                           height=64, width=64)
    return root, demo_pairs(root, "train")


def _seg_on(root, tmp_path, *extra):
    return _train_seg("--flagfile=flags/demo_seg.flags", f"--data_dir={root}", *SMOKE,
                      f"--workdir={tmp_path / 'seg'}", *extra)


def _assert_one_line_naming(result, path, needle):
    """Non-zero exit, no traceback, and a last line that is the one error, naming `path`."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last, errors = error_lines(result.stderr)
    assert errors == [last] and str(path) in last and needle in last, result.stderr[-3000:]


@pytest.mark.parametrize("damage_kind,which,needle,extra", [
    ("truncate", 0, "truncated PNG", []),
    ("shrink", 1, "label size 64x16 differs from image", []),
    ("colour", 1, "is a colour-coded label", []),
    ("missing", 1, "not found", []),
    ("values", 1, "label values 40 (25 px)", ["--check_data=full"]),
])
def test_preflight_check_names_the_file(tiny_demo, tmp_path, damage_kind, which, needle,
                                        extra):
    """Each problem the pre-flight check finds ends the run before TensorFlow starts."""
    root, pairs = tiny_demo
    path = pathlib.Path(pairs[2][which])
    if damage_kind == "missing":
        path.unlink()
    else:
        damage(path, damage_kind)
    started = time.time()
    result = _seg_on(root, tmp_path, *extra)
    _assert_one_line_naming(result, path, needle)
    assert not (tmp_path / "seg" / "checkpoints").exists()
    assert time.time() - started < 60


def test_preflight_lists_every_problem_then_one_line(tiny_demo, tmp_path):
    root, pairs = tiny_demo
    damage(pairs[0][0], "truncate")
    damage(pairs[1][1], "shrink")
    damage(pairs[3][1], "values")
    result = _seg_on(root, tmp_path, "--check_data=full")
    _assert_one_line_naming(result, pairs[0][0], "error: 3 data problems; the first: ")
    listed = [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]
    assert [line.split(":")[0] for line in listed] == [pairs[0][0], pairs[1][1], pairs[3][1]]


def test_out_of_range_labels_stop_training(tiny_demo, tmp_path):
    """The quick check reads no pixels: the input pipeline finds the values and names
    them (--unknown_labels=ignore: test_demo_flagfile_trains_and_writes_the_model). A
    val label: the TensorBoard preview reads the val images before the first step, so
    the run stops before the train step is traced (~15 s less)."""
    root, _ = tiny_demo
    label = demo_pairs(root, "val")[1][1]
    damage(label, "values")
    result = _seg_on(root, tmp_path)
    assert "data check (quick): 6 pairs good" in result.stdout
    _assert_one_line_naming(result, label, "label values 40 outside [0, 5) or ignore 255")
