"""Small file helpers with no TensorFlow import (the pipeline orchestrator uses them)."""

import json
import os
import tempfile


def write_json_atomic(path: str, payload: dict) -> None:
    """Writes `payload` as JSON to `path` through a temp file + rename, so readers never
    see half a file. Keys keep their order: per-class scores stay in class-id order."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` through a temp file + rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    """The JSON object in `path` (one written by `write_json_atomic`)."""
    with open(path) as f:
        return json.load(f)
