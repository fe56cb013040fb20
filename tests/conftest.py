"""Pytest setup shared by every test: quiet TensorFlow logs, a repo-root import path,
and the location of the optional real data (`../shared/data/camvid`)."""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CAMVID_DIR = REPO_ROOT.parent / "shared" / "data" / "camvid"


@pytest.fixture
def camvid_dir():
    """The real CamVid folder, or a clean skip when ../shared is not beside the repo."""
    if not (CAMVID_DIR / "train.txt").is_file():
        pytest.skip(f"real CamVid not found at {CAMVID_DIR}")
    return CAMVID_DIR


@pytest.fixture(scope="session")
def small_demo_dir(tmp_path_factory):
    """A small embedded demo data set (16 train, 4 val images), made once per session."""
    from mm_tf.data import synthetic  # pylint: disable=import-outside-toplevel
    return synthetic.generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data",
                                           num_train=16, num_val=4)
