"""Atomic file writes: the file appears whole, with no temp file left beside it."""

import json

from mm_tf import files


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    files.write_json_atomic(str(path), {"a": 1})
    files.write_json_atomic(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_write_text_atomic(tmp_path):
    path = tmp_path / "report.md"
    files.write_text_atomic(str(path), "# hi\n")
    assert path.read_text() == "# hi\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
