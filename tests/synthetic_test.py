"""Tests of mm_tf.data.synthetic: determinism, idempotence and the demo's properties."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mm_tf.data import datasets, synthetic

SMALL = dict(num_train=5, num_val=2, height=32, width=40)


def file_bytes(root: pathlib.Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = synthetic.generate_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    b = synthetic.generate_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    c = synthetic.generate_demo_dataset(tmp_path / "c", seed=4, **SMALL)
    files_a = file_bytes(a)
    assert len(files_a) == 2 * 7 + 4  # images, labels, 2 lists, dataset.json, generator.json
    assert files_a == file_bytes(b)
    assert files_a["JPEGImages/train_0000.png"] != file_bytes(c)["JPEGImages/train_0000.png"]


def test_layout_is_readable_as_demo(tmp_path):
    root = synthetic.generate_demo_dataset(tmp_path / "demo", seed=0, **SMALL)
    spec = json.loads((root / "dataset.json").read_text())
    assert spec == {
        "name": "demo",
        "num_classes": 5,
        "class_names": list(synthetic.CLASS_NAMES),
        "palette": synthetic.PALETTE.tolist(),
        "ignore_label": 255,
        "background_class": 0,
    }
    pairs, info = datasets.read_dataset("demo", root, "val")
    assert len(pairs) == 2 and info.num_classes == 5 and info.background_class == 0
    with Image.open(pairs[0][1]) as label, Image.open(pairs[0][0]) as image:
        assert label.mode == "P" and image.mode == "RGB" and image.size == (40, 32)


def test_idempotent_and_regenerates_on_new_parameters(tmp_path):
    root = synthetic.generate_demo_dataset(tmp_path / "demo", seed=0, **SMALL)
    stamp = (root / "JPEGImages" / "train_0000.png").stat().st_mtime_ns
    assert synthetic.generate_demo_dataset(tmp_path / "demo", seed=0, **SMALL) == root
    assert (root / "JPEGImages" / "train_0000.png").stat().st_mtime_ns == stamp
    synthetic.generate_demo_dataset(tmp_path / "demo", seed=0, **{**SMALL, "num_train": 3})
    assert len((root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()) == 3
    assert not (root / "JPEGImages" / "train_0004.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # No temporary folder left behind.
    other = tmp_path / "not_demo"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a demo"):
        synthetic.generate_demo_dataset(other, **SMALL)


def test_scene_properties():
    labels, objects = [], []
    for i in range(30):
        image, label, objs = synthetic.render_example(synthetic.example_rng(0, "train", i), 48, 64)
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8 and label.shape == (48, 64)
        assert 1 <= len(objs) <= 4
        labels.append(label)
        objects += objs
    values = np.unique(np.stack(labels))
    assert set(values) == set(range(synthetic.NUM_CLASSES)) | {255}  # every class, and ignore
    ignore_share = np.mean(np.stack(labels) == 255)
    assert 0.001 < ignore_share < 0.1  # A thin ring, not a band.
    # Colours are shared: every object class uses colours that some other class uses too.
    colours = {c: set() for c in range(1, synthetic.NUM_CLASSES)}
    for obj in objects:
        colours[obj["class_id"]].update(obj["colours"])
    for c, used in colours.items():
        assert any(used & other for d, other in colours.items() if d != c)


def test_binary_writes_demo(tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            str(repo / "bin" / "make_demo_data.py"),
            f"--output_dir={tmp_path / 'd'}",
            "--num_train=2",
            "--num_val=1",
            "--size=24x32",
        ],
        check=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
        capture_output=True,
    )
    assert (tmp_path / "d" / "SegmentationClass" / "val_0000.png").is_file()


def test_concurrent_generators_write_the_data_set_once(tmp_path):
    # Binaries defaulting to work/demo_data start together in parallel tests and pipelines:
    # a late generator must not rename a finished data set away under its readers.
    out, go = tmp_path / "demo", tmp_path / "go"
    script = (
        "import pathlib, time\n"
        "from mm_tf.data import synthetic\n"
        "print('ready', flush=True)\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.005)\n"
        f"synthetic.generate_demo_dataset({str(out)!r}, num_train=40, num_val=4, height=32,"
        " width=40)\n"
    )
    repo = pathlib.Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=repo, stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    inodes, missing = set(), []
    while any(proc.poll() is None for proc in procs):
        try:
            inodes.add(out.stat().st_ino)
            if (out / "generator.json").exists():  # Complete: every listed file must stay.
                missing += [i for i in (out / "ImageSets/Segmentation/train.txt").read_text()
                            .split() if not (out / "JPEGImages" / f"{i}.png").exists()]
        except FileNotFoundError as error:
            if inodes:  # The folder vanished after it had been in place.
                missing.append(str(error))
    assert [proc.wait() for proc in procs] == [0, 0, 0, 0]
    inodes.add(out.stat().st_ino)
    assert len(inodes) == 1 and not missing, (inodes, missing[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "go"]  # No lock file.
