"""SBD (Hariharan et al. 2011) class masks -> VOC palette PNGs for the `voc_aug` reader.

SBD ships each training mask as `dataset/cls/<id>.mat` holding a `GTcls` struct whose
`Segmentation` field is a uint8 [H, W] map of VOC class ids (0 = background). The
`voc_aug` reader expects them as `SegmentationClassAug/<id>.png` beside VOC's
`JPEGImages`, listed in `ImageSets/SegmentationAug/train_aug.txt`.

Example:
    convert_sbd("benchmark_RELEASE/dataset/cls", "VOC2012/SegmentationClassAug")
    write_train_aug_list("benchmark_RELEASE/dataset", "VOC2012")
"""

import pathlib
from typing import Iterable, Optional

import numpy as np
import scipy.io
from PIL import Image

from mm_tf import common
from mm_tf.data import datasets
from mm_tf.data.errors import DatasetError

NUM_VOC_CLASSES = 21


def load_sbd_mask(mat_path) -> np.ndarray:
    """The `GTcls.Segmentation` class map of one SBD .mat file: uint8 [H, W]."""
    try:
        mat = scipy.io.loadmat(str(mat_path), squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, TypeError) as e:
        raise DatasetError(f"{mat_path}: cannot read SBD .mat file: {e}") from None
    gt = mat.get("GTcls")
    segmentation = getattr(gt, "Segmentation", None)
    if segmentation is None:
        raise DatasetError(f"{mat_path}: expected a 'GTcls' struct with a 'Segmentation' field")
    mask = np.asarray(segmentation)
    if mask.ndim != 2:
        raise DatasetError(
            f"{mat_path}: GTcls.Segmentation must be 2-D, got shape {list(mask.shape)}")
    bad = np.setdiff1d(np.unique(mask), list(range(NUM_VOC_CLASSES)) + [common.IGNORE_LABEL])
    if len(bad):
        raise DatasetError(f"{mat_path}: class ids {bad.tolist()} outside [0, 21) and 255")
    return mask.astype(np.uint8)


def save_palette_png(mask: np.ndarray, path) -> None:
    """Writes a uint8 [H, W] class map as a VOC-palette PNG (indices stored, colours shown)."""
    image = Image.fromarray(np.asarray(mask, np.uint8))  # Mode L: the values as they are.
    # putpalette turns L into P keeping the indices (convert("P") would re-quantise them).
    image.putpalette(datasets.bit_colormap(256).ravel().tolist())
    image.save(str(path), format="PNG")


def convert_sbd(cls_dir, out_dir, ids: Optional[Iterable[str]] = None,
                overwrite: bool = False) -> int:
    """Converts `cls_dir/<id>.mat` (all, or `ids`) to `out_dir/<id>.png`; returns the count."""
    cls_dir = pathlib.Path(cls_dir)
    if not cls_dir.is_dir():
        raise DatasetError(f"SBD class folder not found: {cls_dir} (expected dataset/cls)")
    if ids is None:
        mat_paths = sorted(cls_dir.glob("*.mat"))
    else:
        mat_paths = [cls_dir / f"{stem}.mat" for stem in ids]
    if not mat_paths:
        raise DatasetError(f"{cls_dir}: no .mat files to convert")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for mat_path in mat_paths:
        png_path = out_dir / f"{mat_path.stem}.png"
        if png_path.exists() and not overwrite:
            continue
        if not mat_path.is_file():
            raise DatasetError(f"SBD mask not found: {mat_path}")
        save_palette_png(load_sbd_mask(mat_path), png_path)
        written += 1
    return written


def _read_ids(path: pathlib.Path) -> list[str]:
    """The ids (first field of each non-blank line) of a split list."""
    if not path.is_file():
        raise DatasetError(f"split list not found: {path}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def write_train_aug_list(sbd_dir, voc_dir) -> pathlib.Path:
    """Writes ImageSets/SegmentationAug/train_aug.txt = (SBD train+val + VOC train) - VOC val.

    This is the usual 10582-image list. Ids from VOC train with no SBD mask take VOC's
    own label, copied into SegmentationClassAug, so that every listed id has a label.
    """
    sbd_dir, voc_dir = pathlib.Path(sbd_dir), pathlib.Path(voc_dir)
    voc_sets = voc_dir / "ImageSets" / "Segmentation"
    voc_val = set(_read_ids(voc_sets / "val.txt"))
    ids = set(_read_ids(sbd_dir / "train.txt")) | set(_read_ids(sbd_dir / "val.txt"))
    ids |= set(_read_ids(voc_sets / "train.txt"))
    ids = sorted(ids - voc_val)
    aug_dir = voc_dir / "SegmentationClassAug"
    for stem in ids:
        target = aug_dir / f"{stem}.png"
        if not target.exists():
            source = voc_dir / "SegmentationClass" / f"{stem}.png"
            if not source.is_file():
                raise DatasetError(f"no label for {stem}: neither {target} nor {source} exists")
            with Image.open(source) as label:
                save_palette_png(np.array(label, np.uint8), target)
    list_path = voc_dir / "ImageSets" / "SegmentationAug" / "train_aug.txt"
    list_path.parent.mkdir(parents=True, exist_ok=True)
    list_path.write_text("".join(f"{stem}\n" for stem in ids))
    return list_path
