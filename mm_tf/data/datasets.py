"""Readers of the supported data set layouts and a TensorFlow-free checker of their files.

`read_dataset(name, data_dir, split)` returns the (image, label) path pairs of a split and
a `DatasetInfo` saying how to interpret the label files: the raw label values of every
data set are mapped to train ids through `DatasetInfo.label_lut`, with
`common.IGNORE_LABEL` (255) for void/unlabelled pixels. The `images` reader gives images
without labels (label path "", `DatasetInfo.has_labels` False) for the proxy tasks.

`check_dataset(pairs, info)` decodes every pair with PIL/numpy and reports all the
problems it finds (corrupt files, size mismatches, unexpected label values) together
with the per-class pixel counts. `check_files(pairs, info, mode)` is the pre-flight check
of the training and evaluation binaries: "quick" reads only file headers and ends
(existence, format, completeness, label mode, sizes), "full" is `check_pair` on every
pair. Both list every problem, not the first.

Example:
    pairs, info = read_dataset("camvid", "../shared/data/camvid", "train")
    report = check_dataset(pairs, info)
    report["pixels_per_class"]  # [11] ints, in class-id order.
"""

import concurrent.futures
import dataclasses
import json
import os
import pathlib
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from mm_tf import common
from mm_tf.data.errors import DataCheckError, DatasetError

Pair = tuple[str, str]

VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

# (name, colour) per CamVid class id, from /work/shared/data/camvid/README.md (SegNet).
CAMVID_CLASSES = (
    ("sky", (128, 128, 128)),
    ("building", (128, 0, 0)),
    ("pole", (192, 192, 128)),
    ("road", (128, 64, 128)),
    ("pavement", (60, 40, 222)),
    ("tree", (128, 128, 0)),
    ("sign/symbol", (192, 128, 128)),
    ("fence", (64, 64, 128)),
    ("car", (64, 0, 128)),
    ("pedestrian", (64, 64, 0)),
    ("bicyclist", (0, 128, 192)),
)
CAMVID_VOID = 11

IMAGE_EXTENSIONS = (".jpg", ".png")  # Tried in this order when a layout names ids only.
UNKNOWN_LABELS = ("error", "ignore")  # DatasetInfo.unknown_labels, --unknown_labels.
CHECK_MODES = ("quick", "full", "off")  # check_files(mode=...), --check_data.


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetInfo:
    """How to interpret a data set's label files.

    Args:
        name: the reader name (`voc`, `cityscapes`, ...).
        num_classes: number of train ids, 0..num_classes-1.
        ignore_label: the data set's raw "ignore/void" value as stored in the files.
        class_names: num_classes names in train-id order.
        palette: uint8 [num_classes, 3] RGB colour per train id.
        background_class: train id of "background" (VOC 0), or None.
        label_lut: uint8 [256]: raw label value -> train id, `common.IGNORE_LABEL` for
            void, ignored or unknown values.
        has_labels: False for image-only data sets (`--dataset=images`), whose pairs have
            an empty label path: usable by the proxy tasks only.
        unknown_labels: what a raw label value outside the data set's classes, ignore
            value and known void ids means: `"error"` (a bad file, reported by the
            checker and by the input pipeline) or `"ignore"` (void, mapped to 255).

    Example:
        train_ids = info.label_lut[np.asarray(Image.open(label_path))]  # [H, W] uint8
    """

    name: str
    num_classes: int
    ignore_label: int
    class_names: tuple[str, ...]
    palette: np.ndarray
    background_class: Optional[int]
    label_lut: np.ndarray
    has_labels: bool = True
    unknown_labels: str = "error"

    def __post_init__(self):
        """Checks the shapes and freezes the arrays (a frozen dataclass must not mutate)."""
        if self.unknown_labels not in UNKNOWN_LABELS:
            raise DatasetError(f"--unknown_labels={self.unknown_labels}: expected one of "
                               f"{', '.join(UNKNOWN_LABELS)}")
        if not 0 < self.num_classes < common.IGNORE_LABEL:
            raise DatasetError(
                f"{self.name}: num_classes must be in [1, 254], got {self.num_classes}")
        if not 0 <= self.ignore_label <= 255:
            raise DatasetError(
                f"{self.name}: ignore_label must be in [0, 255], got {self.ignore_label}")
        if len(self.class_names) != self.num_classes:
            raise DatasetError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        palette = np.asarray(self.palette)
        if palette.shape != (self.num_classes, 3) or palette.dtype != np.uint8:
            raise DatasetError(
                f"{self.name}: palette must be uint8 [{self.num_classes}, 3], "
                f"got {palette.dtype} {list(palette.shape)}")
        lut = np.asarray(self.label_lut)
        if lut.shape != (256,) or lut.dtype != np.uint8:
            raise DatasetError(
                f"{self.name}: label_lut must be uint8 [256], got {lut.dtype} {list(lut.shape)}")
        for field, array in (("palette", palette), ("label_lut", lut)):
            array = array.copy()
            array.setflags(write=False)
            object.__setattr__(self, field, array)
        object.__setattr__(self, "class_names", tuple(self.class_names))


# ---------------------------------------------------------------------------------------
# Colour maps and lookup tables.


def bit_colormap(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bits of the index spread over R, G, B): uint8 [n, 3]."""
    colors = np.zeros((num_colors, 3), np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colors[index] = (r, g, b)
    return colors


def identity_lut(num_classes: int) -> np.ndarray:
    """uint8 [256]: v -> v for v < num_classes, every other value (ignore too) -> 255."""
    lut = np.full(256, common.IGNORE_LABEL, np.uint8)
    lut[:num_classes] = np.arange(num_classes, dtype=np.uint8)
    return lut


def _indexed_info(name, class_names, palette, ignore_label, background_class) -> DatasetInfo:
    """DatasetInfo of a data set whose label files store train ids directly."""
    num_classes = len(class_names)
    return DatasetInfo(
        name=name,
        num_classes=num_classes,
        ignore_label=ignore_label,
        class_names=tuple(class_names),
        palette=np.asarray(palette, np.uint8).reshape(num_classes, 3),
        background_class=background_class,
        label_lut=identity_lut(num_classes),
    )


def voc_info(name: str = "voc") -> DatasetInfo:
    """PASCAL VOC 2012: 21 classes, raw 255 = ignore (object boundaries), background 0."""
    return _indexed_info(name, VOC_CLASS_NAMES, bit_colormap(21), common.IGNORE_LABEL, 0)


def camvid_info() -> DatasetInfo:
    """CamVid (SegNet 11 classes): raw 11 = void -> ignore, no background class."""
    names = [name for name, _ in CAMVID_CLASSES]
    colors = [color for _, color in CAMVID_CLASSES]
    return _indexed_info("camvid", names, colors, CAMVID_VOID, None)


def cityscapes_info() -> DatasetInfo:
    """Cityscapes 19 classes, LUT labelId -> trainId from the official cityscapesscripts table."""
    from cityscapesscripts.helpers.labels import labels  # Deferred: only this reader needs it.

    lut = np.full(256, common.IGNORE_LABEL, np.uint8)
    names, colors = {}, {}
    for label in labels:
        if label.id < 0:  # The license plate (-1) never appears in labelIds files.
            continue
        if label.trainId in (-1, common.IGNORE_LABEL):
            continue
        lut[label.id] = label.trainId
        names[label.trainId] = label.name
        colors[label.trainId] = label.color
    num_classes = len(names)
    if sorted(names) != list(range(num_classes)):
        raise DatasetError(f"cityscapesscripts trainIds are not 0..N-1: {sorted(names)}")
    return DatasetInfo(
        name="cityscapes",
        num_classes=num_classes,
        ignore_label=0,  # labelId 0 "unlabeled"; ids 1-6, 9, 10, ... are void too (LUT).
        class_names=tuple(names[i] for i in range(num_classes)),
        palette=np.array([colors[i] for i in range(num_classes)], np.uint8),
        background_class=None,
        label_lut=lut,
    )


# ---------------------------------------------------------------------------------------
# Small path helpers; every failure names the path (and the flag when there is one).


def _require_dir(path: pathlib.Path, what: str) -> pathlib.Path:
    """Returns `path` if it is a directory, else raises DatasetError naming it."""
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path} (expected a directory)")
    return path


def _require_file(path: pathlib.Path, what: str) -> pathlib.Path:
    """Returns `path` if it is a file, else raises DatasetError naming it."""
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    return path


def _data_root(data_dir) -> pathlib.Path:
    """The absolute data set folder of `--data_dir`, which must exist."""
    if data_dir is None or str(data_dir) == "":
        raise DatasetError("--data_dir is required (the data set folder)")
    # abspath, not resolve(): normalises ".." but keeps the symlinks the user chose.
    return _require_dir(pathlib.Path(os.path.abspath(data_dir)), "--data_dir")


def _read_lines(list_path: pathlib.Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) of the non-blank, non-comment lines."""
    lines = []
    with open(list_path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if fields and not fields[0].startswith("#"):
                lines.append((number, fields))
    return lines


def _find_image(folder: pathlib.Path, stem: str) -> Optional[pathlib.Path]:
    """The first of folder/stem.jpg, folder/stem.png that exists, else None."""
    for ext in IMAGE_EXTENSIONS:
        path = folder / (stem + ext)
        if path.is_file():
            return path
    return None


def _existing_pair(image: pathlib.Path, label: pathlib.Path, where: str) -> Pair:
    """(image, label) as strings once both exist; DatasetError naming the missing one."""
    for what, path in (("image", image), ("label", label)):
        if not path.is_file():
            raise DatasetError(f"{where}: {what} not found: {path}")
    return str(image), str(label)


def _pair_from_ids(root, stem, label_dirs, where) -> Pair:
    """(image, label) of id `stem` in a VOC-like layout; DatasetError if either is missing."""
    image = _find_image(root / "JPEGImages", stem)
    if image is None:
        raise DatasetError(
            f"{where}: image of '{stem}' not found: {root / 'JPEGImages' / stem}"
            f"{{{','.join(IMAGE_EXTENSIONS)}}}")
    for label_dir in label_dirs:
        label = root / label_dir / (stem + ".png")
        if label.is_file():
            return str(image), str(label)
    expected = root / label_dirs[0] / f"{stem}.png"
    raise DatasetError(f"{where}: label of '{stem}' not found: {expected}")


def _all_pairs(lines, make_pair: Callable) -> list:
    """[make_pair(line) for line in lines] (pairs, or images); the DatasetError of every bad line (a missing
    file, a malformed line) is collected and raised together as one DataCheckError."""
    pairs, problems = [], []
    for line in lines:
        try:
            pairs.append(make_pair(line))
        except DatasetError as e:
            problems.append(str(e))
    if problems:
        raise DataCheckError(problems)
    return pairs


def _nonempty(pairs: list[Pair], what: str) -> list[Pair]:
    """`pairs`, or DatasetError naming `what` when the split has no example."""
    if not pairs:
        raise DatasetError(f"{what} is empty: expected at least one (image, label) pair")
    return pairs


def _check_no_overrides(info: DatasetInfo, list_file, num_classes, ignore_label) -> None:
    """Rejects --list_file/--num_classes/--ignore_label that contradict a fixed data set."""
    if list_file is not None:
        raise DatasetError(f"--list_file is only used with --dataset=list, not {info.name}")
    if num_classes is not None and num_classes != info.num_classes:
        raise DatasetError(
            f"--num_classes={num_classes} but {info.name} has {info.num_classes} classes")
    if ignore_label is not None and ignore_label != info.ignore_label:
        raise DatasetError(
            f"--ignore_label={ignore_label} but {info.name} stores ignore as {info.ignore_label}")


# ---------------------------------------------------------------------------------------
# Readers: (data_dir, split, list_file, num_classes, ignore_label) -> (pairs, info).


def _voc_pairs(root: pathlib.Path, split: str, label_dirs: Sequence[str]) -> list[Pair]:
    """Pairs of a VOC `ImageSets/Segmentation/<split>.txt` id list."""
    list_path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    _require_file(list_path, f"split list of --split={split}")
    pairs = _all_pairs(_read_lines(list_path), lambda line: _pair_from_ids(
        root, line[1][0], label_dirs, f"{list_path}:{line[0]}"))
    return _nonempty(pairs, f"split list {list_path}")


def _read_voc(data_dir, split, *, list_file, num_classes, ignore_label):
    """PASCAL VOC 2012 (`VOCdevkit/VOC2012`): JPEGImages + SegmentationClass palette PNGs."""
    info = voc_info()
    _check_no_overrides(info, list_file, num_classes, ignore_label)
    return _voc_pairs(_data_root(data_dir), split, ["SegmentationClass"]), info


def _aug_list_path(root: pathlib.Path) -> pathlib.Path:
    """The SBD-augmented train list: ImageSets/SegmentationAug/train_aug.txt or ./train_aug.txt."""
    candidates = [root / "ImageSets" / "SegmentationAug" / "train_aug.txt", root / "train_aug.txt"]
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetError(
        f"voc_aug train list not found: expected {candidates[0]} or {candidates[1]} "
        "(see bin/convert_sbd.py)")


def _aug_line_pair(root, fields, where) -> Pair:
    """A train_aug.txt line: `name` or `/JPEGImages/x.jpg /SegmentationClassAug/x.png`."""
    if len(fields) == 1:
        return _pair_from_ids(root, fields[0], ["SegmentationClassAug"], where)
    if len(fields) != 2:
        raise DatasetError(f"{where}: expected 'NAME' or 'IMAGE LABEL', got {' '.join(fields)!r}")
    # The usual distribution writes the paths with a leading '/', relative to VOC2012.
    image, label = (root / field.lstrip("/") for field in fields)
    return _existing_pair(image, label, where)


def _read_voc_aug(data_dir, split, *, list_file, num_classes, ignore_label):
    """VOC + SBD (10582 train images in SegmentationClassAug); val is the VOC val list."""
    info = voc_info("voc_aug")
    _check_no_overrides(info, list_file, num_classes, ignore_label)
    root = _data_root(data_dir)
    if split in ("train", "train_aug"):
        list_path = _aug_list_path(root)
        pairs = _all_pairs(_read_lines(list_path), lambda line: _aug_line_pair(
            root, line[1], f"{list_path}:{line[0]}"))
        return _nonempty(pairs, f"split list {list_path}"), info
    # Evaluation keeps VOC's own fine labels (with their 255 boundaries) when present.
    return _voc_pairs(root, split, ["SegmentationClass", "SegmentationClassAug"]), info


def _read_cityscapes(data_dir, split, *, list_file, num_classes, ignore_label):
    """Cityscapes fine: leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine labelIds."""
    info = cityscapes_info()
    _check_no_overrides(info, list_file, num_classes, ignore_label)
    root = _data_root(data_dir)
    image_root = _require_dir(root / "leftImg8bit" / split, f"Cityscapes images of --split={split}")
    label_root = _require_dir(root / "gtFine" / split, f"Cityscapes labels of --split={split}")

    def pair(image: pathlib.Path) -> Pair:
        stem = image.name[: -len("_leftImg8bit.png")]
        label = label_root / image.parent.name / f"{stem}_gtFine_labelIds.png"
        _require_file(label, f"label of {image}")
        return str(image), str(label)

    pairs = _all_pairs(sorted(image_root.glob("*/*_leftImg8bit.png")), pair)
    return _nonempty(pairs, f"Cityscapes split {image_root}"), info


def _list_pairs(list_path: pathlib.Path, root: pathlib.Path) -> list[Pair]:
    """Pairs of an `IMAGE LABEL` list file, both paths relative to `root`."""

    def pair(line) -> Pair:
        number, fields = line
        where = f"{list_path}:{number}"
        if len(fields) != 2:
            raise DatasetError(f"{where}: expected 'IMAGE LABEL', got {' '.join(fields)!r}")
        return _existing_pair(root / fields[0], root / fields[1], where)

    return _nonempty(_all_pairs(_read_lines(list_path), pair), f"split list {list_path}")


def _read_camvid(data_dir, split, *, list_file, num_classes, ignore_label):
    """CamVid in the SegNet layout: <split>.txt lists `IMAGE LABEL` relative to data_dir."""
    info = camvid_info()
    _check_no_overrides(info, list_file, num_classes, ignore_label)
    root = _data_root(data_dir)
    list_path = _require_file(root / f"{split}.txt", f"split list of --split={split}")
    return _list_pairs(list_path, root), info


def _read_list(data_dir, split, *, list_file, num_classes, ignore_label):
    """A generic `IMAGE LABEL` list (paths relative to the list's folder); classes from flags."""
    if list_file is None:
        list_path = _require_file(_data_root(data_dir) / f"{split}.txt",
                                  f"split list of --split={split} (or give --list_file)")
    else:
        list_path = _require_file(pathlib.Path(os.path.abspath(list_file)), "--list_file")
    if num_classes is None:
        raise DatasetError("--dataset=list needs --num_classes")
    if not 0 < num_classes < common.IGNORE_LABEL:
        raise DatasetError(f"--num_classes must be in [1, 254], got {num_classes}")
    ignore_label = common.IGNORE_LABEL if ignore_label is None else ignore_label
    if not num_classes <= ignore_label <= 255:
        raise DatasetError(
            f"--ignore_label must be in [num_classes={num_classes}, 255], got {ignore_label}")
    names = [f"class_{i}" for i in range(num_classes)]
    info = _indexed_info("list", names, bit_colormap(num_classes), ignore_label, None)
    return _list_pairs(list_path, list_path.parent), info


def _demo_info(root: pathlib.Path) -> DatasetInfo:
    """DatasetInfo of the synthetic demo from its `dataset.json`."""
    path = _require_file(root / "dataset.json", "demo description")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        info = _indexed_info(
            "demo", spec["class_names"], spec["palette"], int(spec.get("ignore_label", 255)),
            spec.get("background_class"))
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(
            f"{path}: expected {{'num_classes', 'class_names', 'palette', 'ignore_label', "
            f"'background_class'}}: {e}") from None
    if "num_classes" in spec and spec["num_classes"] != info.num_classes:
        raise DatasetError(
            f"{path}: num_classes={spec['num_classes']} but {info.num_classes} class names")
    return info


def _read_demo(data_dir, split, *, list_file, num_classes, ignore_label):
    """The synthetic demo (mm_tf.data.synthetic): a VOC layout plus a dataset.json."""
    root = _data_root(data_dir)
    info = _demo_info(root)
    _check_no_overrides(info, list_file, num_classes, ignore_label)
    return _voc_pairs(root, split, ["SegmentationClass"]), info


IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png")
NO_LABEL = ""  # The label path of an image-only pair.


def images_info() -> DatasetInfo:
    """DatasetInfo of image-only data: one placeholder class, every pixel ignored."""
    return DatasetInfo(name="images", num_classes=1, ignore_label=common.IGNORE_LABEL,
                       class_names=("unlabelled",), palette=np.zeros((1, 3), np.uint8),
                       background_class=None,
                       label_lut=np.full(256, common.IGNORE_LABEL, np.uint8),
                       has_labels=False)


def _read_images(data_dir, split, *, list_file, num_classes, ignore_label):
    """Images without labels, for the proxy tasks: every .jpg/.jpeg/.png below
    `data_dir/split/` (any depth, e.g. ImageNet's train/<synset>/*.JPEG), or the image
    paths listed one per line in --list_file or `data_dir/split.txt` (relative to the
    list's folder). Pairs are (image_path, "")."""
    if num_classes is not None or ignore_label is not None:
        raise DatasetError("--dataset=images has no labels: drop --num_classes/--ignore_label")
    root = _data_root(data_dir)
    if list_file is not None or not (root / split).is_dir():
        list_path = _require_file(
            pathlib.Path(os.path.abspath(list_file)) if list_file else root / f"{split}.txt",
            f"--dataset=images: a folder {root / split} of images or a list of image paths")

        def listed_image(line) -> pathlib.Path:
            number, fields = line
            image = list_path.parent / fields[0]
            if not image.is_file():
                raise DatasetError(f"{list_path}:{number}: image {image} not found")
            return image

        images = _all_pairs(_read_lines(list_path), listed_image)
    else:
        images = sorted(p for p in (root / split).rglob("*")
                        if p.suffix.lower() in IMAGE_FILE_SUFFIXES and p.is_file())
    pairs = _nonempty([(str(image), NO_LABEL) for image in images],
                      f"images of --split={split} in {root}")
    return pairs, images_info()


READERS: dict[str, Callable] = {
    "voc": _read_voc,
    "voc_aug": _read_voc_aug,
    "cityscapes": _read_cityscapes,
    "camvid": _read_camvid,
    "list": _read_list,
    "demo": _read_demo,
    "images": _read_images,
}


def read_dataset(name: str, data_dir, split: str, *, list_file=None, num_classes=None,
                 ignore_label=None) -> tuple[list[Pair], DatasetInfo]:
    """The (image_path, label_path) str pairs of `split` and the data set's DatasetInfo."""
    reader = READERS.get(name)
    if reader is None:
        raise DatasetError(f"unknown --dataset={name!r}; known: {', '.join(sorted(READERS))}")
    return reader(data_dir, split, list_file=list_file, num_classes=num_classes,
                  ignore_label=ignore_label)


# ---------------------------------------------------------------------------------------
# Checker: pure PIL/numpy, so it runs anywhere and in threads.


@dataclasses.dataclass(frozen=True)
class PairStats:
    """What one good pair contributes: pixels per train id, ignored pixels, (width, height)."""

    pixels_per_class: np.ndarray  # int64 [num_classes]
    ignore_pixels: int
    size: tuple[int, int]


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

# What a complete file starts and ends with. TensorFlow's decoders fail on a cut-short
# file without naming it, so the quick check and the input pipeline look for the end
# marker among the last END_WINDOW bytes (a little padding after it is tolerated).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # The IEND chunk's type and CRC: the last 8 bytes of a PNG.
JPEG_SIGNATURE = b"\xff\xd8"
JPEG_END = b"\xff\xd9"  # End-of-image marker.
END_WINDOW = 64
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP")  # What tf.io.decode_image reads.


def _truncation(path: str) -> Optional[str]:
    """Why the PNG/JPEG at `path` is cut short (its end marker is missing), or None."""
    with open(path, "rb") as f:
        head = f.read(len(PNG_SIGNATURE))
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - END_WINDOW))
        tail = f.read()
    if head.startswith(PNG_SIGNATURE) and PNG_END not in tail:
        return "truncated PNG (no IEND chunk at its end)"
    if head.startswith(JPEG_SIGNATURE) and JPEG_END not in tail:
        return "truncated JPEG (no end-of-image marker at its end)"
    return None


def _probe(path: str, what: str, formats: Sequence[str]):
    """((width, height), mode, None) read from the header of `path`, after checking that
    it exists, is in one of `formats` and is not cut short; else (None, None, error)."""
    try:
        with Image.open(path) as image:
            size, mode, file_format = image.size, image.mode, image.format
        if file_format not in formats:
            return None, None, (f"{path}: {what} is {file_format}; expected "
                                f"{' or '.join(formats)}")
        cut = _truncation(path)
        if cut:
            return None, None, f"{path}: cannot decode {what}: {cut}"
        return size, mode, None
    except FileNotFoundError:
        return None, None, f"{path}: {what} not found"
    except _DECODE_ERRORS as e:
        return None, None, f"{path}: cannot decode {what}: {e}"


def _colour_share(label: Image.Image, palette: np.ndarray) -> float:
    """Share of the pixels of an RGB(A) label whose colour is one of `palette`'s [K, 3]."""
    codes = np.asarray(label.convert("RGB"), np.int64).reshape(-1, 3) @ (65536, 256, 1)
    return float(np.isin(codes, np.asarray(palette, np.int64) @ (65536, 256, 1)).mean())


def _label_mode_error(path: str, mode: str, info: DatasetInfo) -> str:
    """The error of a label PNG that is neither single-channel nor palette; names the
    common mistake of colour-coded labels when its colours are the class colours."""
    if mode not in ("RGB", "RGBA"):
        return f"{path}: label must be a single-channel or palette PNG, got mode {mode}"
    message = (f"{path}: label is an {mode} colour image; expected class ids (a "
               "single-channel or palette PNG)")
    try:
        with Image.open(path) as label:
            share = _colour_share(label, info.palette)
    except _DECODE_ERRORS:
        return message
    if share < 0.5:
        return message + " (colour-coded labels must be converted to class ids)"
    return (f"{message}: {share:.0%} of its pixels have {info.name}'s class colours, so it "
            "is a colour-coded label (such as CamVid's LabeledApproved images or a VOC "
            "palette saved as RGB); use the index label PNGs, or convert the colours to "
            "class ids")


def _size_error(image_path, image_size, label_path, label_size) -> str:
    """The error of a label whose (width, height) differs from its image's."""
    return (f"{label_path}: label size {label_size[0]}x{label_size[1]} differs from "
            f"image {image_path} size {image_size[0]}x{image_size[1]}")


def probe_pair(image_path: str, label_path: str, info: DatasetInfo) -> list[str]:
    """The quick check of one pair from the file headers and ends, without decoding
    pixels: both files exist, are complete and decodable formats, the label is a
    single-channel or palette PNG, and both have one size. -> error strings ([] if good)."""
    image_size, _, image_error = _probe(image_path, "image", IMAGE_FORMATS)
    if label_path == NO_LABEL:  # An image-only pair: the image is all there is to check.
        return [image_error] if image_error else []
    label_size, mode, label_error = _probe(label_path, "label", ("PNG",))
    errors = [e for e in (image_error, label_error) if e]
    if label_error:
        return errors
    if mode not in ("P", "L"):
        errors.append(_label_mode_error(label_path, mode, info))
    if image_size is not None and image_size != label_size:
        errors.append(_size_error(image_path, image_size, label_path, label_size))
    return errors


def _decode_image(path: str):
    """((width, height), None) of a fully decoded image, or (None, error naming `path`)."""
    try:
        with Image.open(path) as image:
            image.load()  # Decodes everything: a truncated file fails here, not later.
            return image.size, None
    except _DECODE_ERRORS as e:
        return None, f"{path}: cannot decode image: {e}"


def _decode_label(path: str):
    """(uint8 [H, W] raw label values, None) or (None, error): palette PNGs give indices."""
    try:
        with Image.open(path) as label:
            label.load()
            return np.array(label, dtype=np.uint8), None
    except _DECODE_ERRORS as e:
        return None, f"{path}: cannot decode label: {e}"


def _known_raw_values(name: str) -> list[int]:
    """Raw values legitimate in `name`'s files although the LUT sends them to ignore."""
    if name == "cityscapes":  # Every official labelId (void-like ids 1-6, 9, 10, ... too).
        from cityscapesscripts.helpers.labels import labels

        return [label.id for label in labels if label.id >= 0]
    return []


def valid_raw_values(info: DatasetInfo) -> np.ndarray:
    """bool [256]: raw values allowed in label files (a train id, the ignore value, known
    void; every value when `info.unknown_labels == "ignore"`)."""
    if info.unknown_labels == "ignore":
        return np.ones(256, bool)
    valid = info.label_lut != common.IGNORE_LABEL
    valid[info.ignore_label] = True
    valid[_known_raw_values(info.name)] = True
    return valid


def describe_valid(info: DatasetInfo) -> str:
    """Human description of the allowed raw label values, for error messages."""
    known = _known_raw_values(info.name)
    if known:
        return f"the {info.name} label ids {min(known)}..{max(known)}"
    return f"[0, {info.num_classes}) or ignore {info.ignore_label}"


UNKNOWN_LABELS_HINT = "--unknown_labels=ignore treats such values as void"


def _label_errors(histogram: np.ndarray, info: DatasetInfo, path: str) -> list[str]:
    """Errors for raw values outside the data set's allowed set (histogram: int64 [256])."""
    bad = np.flatnonzero((histogram > 0) & ~valid_raw_values(info))
    if not len(bad):
        return []
    shown = ", ".join(f"{v} ({histogram[v]} px)" for v in bad[:8])
    more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
    return [f"{path}: label values {shown}{more} outside {describe_valid(info)}"
            f" ({UNKNOWN_LABELS_HINT})"]


def check_pair(image_path: str, label_path: str, info: DatasetInfo):
    """Checks one pair (probe_pair, then decodes every pixel and checks the label values)
    -> (PairStats, []) if it is good, else (None, error strings)."""
    errors = probe_pair(image_path, label_path, info)
    if errors:
        return None, errors
    image_size, image_error = _decode_image(image_path)
    if label_path == NO_LABEL:
        if image_error:
            return None, [image_error]
        return PairStats(np.zeros(info.num_classes, np.int64),
                         image_size[0] * image_size[1], image_size), []
    raw, label_error = _decode_label(label_path)  # uint8 [H, W]
    errors = [e for e in (image_error, label_error) if e]
    if raw is None:
        return None, errors
    label_size = (raw.shape[1], raw.shape[0])  # Equal to the image's: probe_pair checked.
    histogram = np.bincount(raw.ravel(), minlength=256).astype(np.int64)  # [256]
    errors += _label_errors(histogram, info, label_path)
    if errors:
        return None, errors
    per_train_id = np.zeros(256, np.int64)
    np.add.at(per_train_id, info.label_lut, histogram)  # Sums raw values sharing a train id.
    stats = PairStats(
        pixels_per_class=per_train_id[: info.num_classes],
        ignore_pixels=int(per_train_id[common.IGNORE_LABEL]),
        size=label_size)
    return stats, errors


def _map_pairs(check: Callable, pairs: Sequence[Pair], workers: Optional[int]) -> list:
    """[check(image, label) for each pair], in pair order, on a pool of threads."""
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    # PIL releases the GIL while inflating/decoding, so threads overlap the I/O and zlib.
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: check(pair[0], pair[1]), pairs))


def check_files(pairs: Sequence[Pair], info: DatasetInfo, mode: str = "quick",
                workers: Optional[int] = None) -> list[str]:
    """The pre-flight check of training and evaluation: every problem of `pairs`, one
    string each naming its file ([] when all are good; a pair listed twice is checked
    once). mode "quick": `probe_pair`
    (headers and file ends); "full": `check_pair` (every pixel, label values); "off": []."""
    if mode not in CHECK_MODES:
        raise DatasetError(f"--check_data={mode}: expected one of {', '.join(CHECK_MODES)}")
    if mode == "off":
        return []
    pairs = list(dict.fromkeys(tuple(pair) for pair in pairs))  # Each file once.
    if mode == "quick":
        results = _map_pairs(lambda i, l: probe_pair(i, l, info), pairs, workers)
    else:
        results = [errors for _, errors in
                   _map_pairs(lambda i, l: check_pair(i, l, info), pairs, workers)]
    return [error for errors in results for error in errors]


def check_dataset(pairs: Sequence[Pair], info: DatasetInfo, workers: Optional[int] = None) -> dict:
    """Checks every pair (all errors, not the first) -> JSON-ready summary dict."""
    results = _map_pairs(lambda i, l: check_pair(i, l, info), pairs, workers)
    pixels = np.zeros(info.num_classes, np.int64)
    ignore_pixels, sizes, errors, num_bad = 0, {}, [], 0
    for stats, pair_errors in results:
        errors.extend(pair_errors)
        if stats is None:
            num_bad += 1
            continue
        pixels += stats.pixels_per_class
        ignore_pixels += stats.ignore_pixels
        key = f"{stats.size[0]}x{stats.size[1]}"
        sizes[key] = sizes.get(key, 0) + 1
    return {
        "dataset": info.name,
        "num_images": len(pairs),
        "num_bad_pairs": num_bad,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "pixels_per_class": [int(p) for p in pixels],
        "ignore_pixels": int(ignore_pixels),
        "image_sizes": dict(sorted(sizes.items())),
        "errors": errors,
    }
