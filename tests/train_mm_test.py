"""bin/train_mm.py end to end: every experiment flagfile parses against the binary's
flags; one demo run (the demo flagfile with the smoke overlay) stopped by a file damaged
mid-run and then SIGKILLed resumes each time and writes its outputs; bad input is one
clear line; the binaries skip only Keras' own optional imports."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from mm_tf.data import synthetic
from testutil import damage, demo_pairs, error_lines  # tests/ is on sys.path

ROOT = pathlib.Path(__file__).resolve().parents[1]
MM_FLAGFILES = sorted(p.name for p in (ROOT / "flags").glob("*_mm.flags"))


def _train_mm(*args, timeout=300, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "bin/train_mm.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def _demo_args(data_dir, *extra):
    return ["--flagfile=flags/demo_mm.flags", "--flagfile=flags/smoke.flags",
            f"--data_dir={data_dir}", "--verbose=0", *extra]


def test_every_mm_flagfile_parses():
    assert len(MM_FLAGFILES) >= 8, MM_FLAGFILES
    sys.path.insert(0, str(ROOT / "bin"))
    from absl import flags  # pylint: disable=import-outside-toplevel
    import train_mm  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    for name in MM_FLAGFILES:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train_mm", f"--flagfile=flags/{name}", "--workdir=/tmp/x"])
        first_line = (ROOT / "flags" / name).read_text().splitlines()[0]
        assert first_line.startswith("# python bin/train_mm.py --flagfile=flags/" + name), name
        assert flags.FLAGS.margin == 2.1 and flags.FLAGS.weight_decay == 0.0005
    flags.FLAGS.unparse_flags()


def _start_until_checkpoint(args, workdir, step: int, **popen_kwargs) -> subprocess.Popen:
    """Starts bin/train_mm.py and returns it, still running, once it has written the
    checkpoint of `step` (the test fails if the run ends first: raise --steps)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, "bin/train_mm.py", *args], cwd=ROOT, env=env,
                            **popen_kwargs)
    state = pathlib.Path(workdir) / "checkpoints" / "checkpoint"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and f"ckpt-{step}" in state.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before checkpoint {step}; raise --steps"
    return proc


def test_one_demo_run_survives_bad_data_and_sigkill_and_writes_its_outputs(tmp_path):
    """One run's life on a tiny demo set (three processes, each TensorFlow start is
    seconds): with --check_data=off an image truncated while it trains stops it with one
    line naming the image, the newest checkpoint untouched; with the file back the same
    command restores that checkpoint (the resumed step proves it loaded) and is
    SIGKILLed after a later one; the next rerun resumes from that and finishes with the
    demo flagfile's outputs (summary, backbone, TensorBoard, probe, movement)."""
    root = synthetic.generate_demo_dataset(tmp_path / "data", num_train=4, num_val=1,
                                           height=64, width=64)
    image = pathlib.Path(demo_pairs(root, "train")[2][0])
    original = image.read_bytes()
    workdir = tmp_path / "mm"
    args = _demo_args(root, f"--workdir={workdir}", "--steps=24", "--lr_boundaries=12",
                      "--image_every=12", "--check_data=off")
    state = workdir / "checkpoints" / "checkpoint"

    def newest_checkpoint():
        return int(state.read_text().split('"')[1].split("-")[1])  # model_checkpoint_path

    log = tmp_path / "stderr.txt"  # A file, not a pipe: nobody reads it while it runs.
    with open(log, "w") as stderr_file:
        proc = _start_until_checkpoint(args, workdir, 2, stdout=subprocess.DEVNULL,
                                       stderr=stderr_file)
        damage(image, "truncate")  # Every epoch (2 steps) reads every image again.
        proc.wait(timeout=240)
    stderr = log.read_text()
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
    last, errors = error_lines(stderr)
    assert errors == [last] and last.startswith(f"error: {image}: cannot decode image"), \
        stderr[-3000:]
    kept = newest_checkpoint()
    assert f"newest checkpoint kept: {workdir / 'checkpoints'}/ckpt-{kept}" in last
    assert 2 <= kept < 20 and not (workdir / "summary.json").exists()

    image.write_bytes(original)
    proc = _start_until_checkpoint(args, workdir, kept + 2, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = newest_checkpoint()
    assert killed_at >= kept + 2 and not (workdir / "summary.json").exists()

    result = _train_mm(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["resumed_from_step"] == killed_at
    assert summary["graph_nodes"] == summary["global_batch_size"] * summary["patches_per_image"]
    assert (workdir / "backbone.weights.h5").is_file()
    assert list((workdir / "tensorboard" / "train").iterdir())
    # flags/demo_mm.flags turns the probe on: step 0 and the last step are probed.
    steps = [e["step"] for e in summary["probe"]["history"]]
    assert steps[0] == 0 and steps[-1] == 24, steps
    assert summary["movement"]["conv1_1"] > 0


@pytest.mark.parametrize("extra,needle", [
    (["--dataset=camvid", "--data_dir=/nonexistent/camvid"], "/nonexistent/camvid"),
    (["--init=/nonexistent/w.weights.h5"], "/nonexistent/w.weights.h5"),
    (["--frozen_layers=conv9"], "--frozen_layers=conv9: 'conv9' is no conv unit"),
])
def test_bad_input_is_one_clear_line(tmp_path, small_demo_dir, extra, needle):
    result = _train_mm(*_demo_args(small_demo_dir, f"--workdir={tmp_path / 'mm'}", *extra))
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["not_hdf5", "truncated"])
def test_unreadable_init_is_one_line_naming_it(tmp_path, small_demo_dir, kind):
    path = tmp_path / "init.weights.h5"
    if kind == "not_hdf5":
        path.write_text("<html>a download page, not weights</html>\n")
    else:  # A real HDF5 file cut short, as an interrupted copy leaves it.
        with h5py.File(path, "w") as f:
            f.create_dataset("layers/conv2d/vars/0", data=np.ones((3, 3, 3, 4), np.float32))
        path.write_bytes(path.read_bytes()[:1500])
    result = _train_mm(*_demo_args(small_demo_dir, f"--workdir={tmp_path / 'mm'}",
                                   f"--init={path}"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last, errors = error_lines(result.stderr)
    assert errors == [last] and str(path) in last, result.stderr[-3000:]
    assert ("not a Keras .weights.h5" if kind == "not_hdf5" else "truncated or damaged") in last


_STARTUP = """
import sys
sys.path.insert(0, "bin")
import flagdefs  # Every binary imports it first.
import keras
import tensorflow as tf
from keras.src.visualization import plot_image_gallery
from keras.src.wrappers import fixes
# Keras' own optional imports were skipped ...
assert fixes.sklearn is None and plot_image_gallery.plt is None
assert "sklearn" not in sys.modules and "matplotlib" not in sys.modules, sorted(sys.modules)
# ... and everyone else's still work.
from sklearn.manifold import TSNE
import matplotlib.pyplot
from mm_tf.viz import figures
print("ok")
"""


def test_binaries_skip_keras_optional_imports_only():
    result = subprocess.run([sys.executable, "-c", _STARTUP], cwd=ROOT, capture_output=True,
                            text=True, timeout=120,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
