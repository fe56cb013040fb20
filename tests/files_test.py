"""Atomic file writes: the file appears whole, with no temp file left beside it."""

import json

from mm_tf import files


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    files.write_json_atomic(str(path), {"a": 1})
    files.write_json_atomic(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_write_json_atomic_keeps_class_order(tmp_path):
    # Per-class IoU dicts are read back into report tables: alphabetical order would
    # shuffle the columns away from class ids.
    scores = {"sky": 0.9, "building": 0.5, "road": 0.8}
    path = tmp_path / "scores.json"
    files.write_json_atomic(str(path), {"per_class_iou": scores})
    assert list(json.loads(path.read_text())["per_class_iou"]) == ["sky", "building", "road"]


def test_write_text_atomic(tmp_path):
    path = tmp_path / "report.md"
    files.write_text_atomic(str(path), "# hi\n")
    assert path.read_text() == "# hi\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
