"""End-to-end tests of bin/check_dataset.py and bin/convert_sbd.py run as subprocesses."""

import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

from datasets_test import make_list_dataset, random_label, write_sbd_mat

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_bin(script, *args):
    """Runs bin/<script> from the repo root -> CompletedProcess (text stdout/stderr)."""
    return subprocess.run([sys.executable, f"bin/{script}", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_good_data_prints_table_and_json_last(tmp_path):
    labels = {"a": random_label([0, 1, 11]), "b": random_label([3, 10], seed=1)}
    make_list_dataset(tmp_path, labels)
    result = run_bin("check_dataset.py", "--dataset=camvid", f"--data_dir={tmp_path}",
                     "--split=train", "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.split()[1:2] == ["sky"] for line in lines)  # The class table.
    report = json.loads(lines[-1])
    assert report["num_images"] == 2 and report["errors"] == []
    assert report["num_classes"] == 11 and report["class_names"][0] == "sky"
    mapped = np.concatenate([v.ravel() for v in labels.values()])
    assert report["pixels_per_class"] == [int((mapped == c).sum()) for c in range(11)]
    assert report["ignore_pixels"] == int((mapped == 11).sum())
    assert set(report) >= {"num_images", "num_classes", "class_names", "pixels_per_class",
                           "ignore_pixels", "image_sizes", "errors"}


def test_bad_pairs_exit_nonzero_with_all_errors(tmp_path):
    make_list_dataset(tmp_path, {"a": np.zeros((5, 7)), "b": np.full((5, 7), 42),
                                 "c": np.zeros((5, 7))})
    (tmp_path / "img" / "c.png").write_bytes(b"\x89PNG truncated")
    result = run_bin("check_dataset.py", "--dataset=list", f"--list_file={tmp_path / 'train.txt'}",
                     "--num_classes=3", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["errors"]) == 2
    assert "lab/b.png" in report["errors"][0] and "img/c.png" in report["errors"][1]
    assert "2 errors:" in result.stdout


def test_dataset_error_is_clean_message(tmp_path):
    result = run_bin("check_dataset.py", "--dataset=camvid", f"--data_dir={tmp_path}/missing")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --data_dir not found:") and "missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_convert_sbd_binary(tmp_path):
    (tmp_path / "sbd" / "cls").mkdir(parents=True)
    mask = random_label([0, 7])
    write_sbd_mat(tmp_path / "sbd" / "cls" / "2008_000002.mat", mask)
    result = run_bin("convert_sbd.py", f"--sbd_dir={tmp_path / 'sbd'}",
                     f"--voc_dir={tmp_path / 'VOC2012'}")
    assert result.returncode == 0, result.stderr
    png = tmp_path / "VOC2012" / "SegmentationClassAug" / "2008_000002.png"
    np.testing.assert_array_equal(np.asarray(Image.open(png)), mask)
