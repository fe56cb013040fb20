"""bin/pretrain_colorization.py and bin/pretrain_jigsaw.py end to end: every proxy
flagfile parses against its binary, tiny runs write weights + summary.json and a rerun
with more steps resumes; the weights load into segmentation models (and change their
output) and a mismatched model names the layer; bad input is one clear line."""

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from mm_tf import common
from mm_tf.models import heads, weights

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGFILES = {
    "pretrain_colorization": ["demo_colorization.flags",
                              "voc_vgg16_colorization_pretrain.flags",
                              "camvid_cpu_colorization_pretrain.flags"],
    "pretrain_jigsaw": ["demo_jigsaw.flags", "voc_alexnet_jigsaw_pretrain.flags"],
}
# Smoke settings on top of the demo flagfiles: tiny networks, 2 images of 32-48 px. The
# colorization run uses AlexNet (half VGG-16's start-up); tests/colorization_test.py
# trains the VGG-16 model in-process.
TINY = ["--verbose=0", "--batch_size=2", "--log_every=1", "--checkpoint_every=1",
        "--image_every=2", "--lr_boundaries=3"]
COLOR_TINY = ["--flagfile=flags/demo_colorization.flags", "--backbone=alexnet",
              "--width=0.0625", "--crop_size=32",
              "--points_per_image=16", "--hidden_units=16", *TINY]
JIGSAW_TINY = ["--flagfile=flags/demo_jigsaw.flags", "--width=0.125", "--crop_size=48",
               "--num_permutations=10", "--fc_units=16", *TINY]  # Tiles: auto, 12 px.


def _run(binary, *args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, f"bin/{binary}.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _train_twice(binary, base_args, workdir):
    """Runs 2 steps, then reruns the same command with --steps=4; returns both summaries."""
    summaries = []
    for steps in (2, 4):
        result = _run(binary, *base_args, f"--workdir={workdir}", f"--steps={steps}")
        assert result.returncode == 0, result.stderr[-3000:]
        summaries.append(json.loads((workdir / "summary.json").read_text()))
    return summaries


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "demo"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Both binaries' two-run chains, side by side (each run is mostly TF start-up):
    {"colorization": (workdir, summaries), "jigsaw": (workdir, summaries)}."""
    from mm_tf.data import synthetic  # pylint: disable=import-outside-toplevel
    synthetic.generate_demo_dataset(data_dir)  # Once, not by both binaries at once.
    # Jigsaw reads the same pictures as an image-only data set (--dataset=images): every
    # image file below data_dir/JPEGImages, no labels.
    chains = {"colorization": ("pretrain_colorization",
                               [*COLOR_TINY, f"--data_dir={data_dir}"]),
              "jigsaw": ("pretrain_jigsaw",
                         [*JIGSAW_TINY, "--dataset=images", f"--data_dir={data_dir}",
                          "--split=JPEGImages"])}
    with concurrent.futures.ThreadPoolExecutor(len(chains)) as pool:
        futures = {}
        for name, (binary, args) in chains.items():
            workdir = tmp_path_factory.mktemp(name)
            futures[name] = (workdir, pool.submit(_train_twice, binary, args, workdir))
        return {name: (workdir, future.result()) for name, (workdir, future) in futures.items()}


@pytest.fixture(scope="module")
def colorization_run(runs):
    return runs["colorization"]


@pytest.fixture(scope="module")
def jigsaw_run(runs):
    return runs["jigsaw"]


def test_every_proxy_flagfile_parses():
    for binary, names in FLAGFILES.items():
        for name in names:
            first_line = (ROOT / "flags" / name).read_text().splitlines()[0]
            assert first_line.startswith(
                f"# python bin/{binary}.py --flagfile=flags/{name} --workdir="), name
        # One process per binary: both define --backbone, --width, ... (absl is global).
        script = (
            "import sys; sys.path.insert(0, 'bin'); import " + binary + "\n"
            "from absl import flags\n"
            f"for name in {names!r}:\n"
            "    flags.FLAGS.unparse_flags()\n"
            "    flags.FLAGS(['x', '--flagfile=flags/' + name, '--workdir=/tmp/x'])\n"
            "    print(name, flags.FLAGS.steps, flags.FLAGS.input_mode)\n")
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        modes = {line.split()[0]: line.split()[2] for line in result.stdout.splitlines()}
        expected = "grey" if binary == "pretrain_colorization" else "rgb"
        assert set(modes.values()) == {expected}, modes


def test_colorization_trains_resumes_and_writes_outputs(colorization_run):
    workdir, (first, second) = colorization_run
    assert first["steps"] == 2 and first["resumed_from_step"] == 0
    assert second["steps"] == 4 and second["resumed_from_step"] == 2
    assert second["input_mode"] == "grey" and second["color_bins"]["num_hue_bins"] == 32
    assert np.isfinite(second["metrics"]["loss"])
    # Layer movement is measured from the first run's start, across the resume.
    assert second["movement_from_step"] == 0
    layer = next(iter(first["movement"]))  # the first conv layer of the tiny backbone
    assert second["movement"][layer] > first["movement"][layer] > 0
    assert (workdir / "backbone.weights.h5").is_file()
    assert list((workdir / "tensorboard" / "train").iterdir())


def test_jigsaw_trains_resumes_and_keeps_its_permutations(jigsaw_run):
    workdir, (first, second) = jigsaw_run
    assert first["steps"] == 2 and second["steps"] == 4 and second["resumed_from_step"] == 2
    perms = np.load(workdir / "permutations.npy")
    assert perms.shape == (10, 9)
    assert second["min_hamming_distance"] == first["min_hamming_distance"] >= 6
    assert second["config"]["dataset"] == "images"
    assert (workdir / "backbone.weights.h5").is_file()


@pytest.mark.parametrize("which,backbone,input_mode,width", [
    ("colorization", "alexnet", common.INPUT_GREY, 0.0625),
    ("jigsaw", "alexnet", common.INPUT_RGB, 0.125),
])
def test_proxy_weights_load_into_a_segmentation_model(request, which, backbone, input_mode,
                                                      width):
    workdir, _ = request.getfixturevalue(f"{which}_run")
    model = heads.build_segmentation_model(backbone, "hypercolumn", 5, input_mode,
                                           width=width)
    images = tf.random.stateless_normal([1, 64, 64, 3 if input_mode == "rgb" else 1], [1, 2])
    before = model(images, training=False).numpy()
    weights.load_backbone_weights(model.backbone, workdir / "backbone.weights.h5")
    after = model(images, training=False).numpy()
    assert np.abs(after - before).max() > 1e-4


def test_mismatched_model_names_the_layer(colorization_run, jigsaw_run):
    rgb_alexnet = heads.build_segmentation_model("alexnet", "hypercolumn", 5, common.INPUT_RGB,
                                                 width=0.0625)
    # Grey colorization weights into an rgb network: conv1 reads 3 channels, not 1.
    with pytest.raises(weights.WeightsMismatchError, match="'conv1'") as caught:
        weights.load_backbone_weights(rgb_alexnet.backbone,
                                      colorization_run[0] / "backbone.weights.h5")
    assert caught.value.layer == "conv1"
    # AlexNet jigsaw weights into a VGG-16: the first VGG layer is missing from the file.
    vgg = heads.build_segmentation_model("vgg16", "fcn", 5, common.INPUT_RGB, width=0.0625)
    with pytest.raises(weights.WeightsMismatchError, match="'conv1_1' is missing"):
        weights.load_backbone_weights(vgg.backbone, jigsaw_run[0] / "backbone.weights.h5")


def test_bad_input_is_one_clear_line(tmp_path, data_dir):
    cases = [
        ("pretrain_colorization", [*COLOR_TINY, "--input_mode=rgb"], "--input_mode=grey"),
        ("pretrain_jigsaw", [*JIGSAW_TINY, "--tile_size=40"], "--tile_size=40"),
        ("pretrain_colorization", [*COLOR_TINY, "--dataset=camvid",
                                   "--data_dir=/nonexistent/cv"], "/nonexistent/cv"),
    ]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(
            # The test's data follows the flagfile, which names work/demo_data.
            lambda case: _run(case[0], case[1][0], f"--data_dir={data_dir}", *case[1][1:],
                              f"--workdir={tmp_path / case[0]}", "--steps=2"), cases))
    for (binary, _, needle), result in zip(cases, results):
        assert result.returncode != 0, binary
        assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr
