"""Tests of mm_tf.data.datasets (readers, checker) and mm_tf.data.sbd on tiny PNG fixtures."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import scipy.io
from PIL import Image

from mm_tf import common
from mm_tf.data import datasets, sbd
from mm_tf.data.datasets import check_dataset, check_pair, read_dataset
from mm_tf.data.errors import DataCheckError, DatasetError

H, W = 5, 7


# ----------------------------------------------------------------------------- fixtures


def write_image(path, size=(H, W), fmt=None):
    """A random RGB image [h, w, 3] at `path` (format from the extension)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_label(path, values, palette=True):
    """A uint8 [h, w] label map as a VOC palette PNG (or a grey PNG)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        sbd.save_palette_png(np.asarray(values, np.uint8), path)
    else:
        Image.fromarray(np.asarray(values, np.uint8)).save(path)
    return path


def random_label(values, seed=0, size=(H, W)):
    """uint8 [h, w] drawn from `values`."""
    return np.random.default_rng(seed).choice(np.asarray(values, np.uint8), size)


def make_voc(root, splits, labels, image_ext=".jpg"):
    """A VOC2012-like tree: JPEGImages, SegmentationClass palette PNGs, split id lists."""
    root = pathlib.Path(root)
    for stem, values in labels.items():
        write_image(root / "JPEGImages" / f"{stem}{image_ext}")
        write_label(root / "SegmentationClass" / f"{stem}.png", values)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def make_list_dataset(root, labels, list_name="train.txt", image_dir="img", label_dir="lab",
                      palette=False):
    """A folder with `IMAGE LABEL` lines relative to it; returns the list path."""
    root = pathlib.Path(root)
    lines = []
    for stem, values in labels.items():
        write_image(root / image_dir / f"{stem}.png")
        write_label(root / label_dir / f"{stem}.png", values, palette=palette)
        lines.append(f"{image_dir}/{stem}.png {label_dir}/{stem}.png\n")
    (root / list_name).write_text("".join(lines))
    return root / list_name


def counts_by_numpy(label_maps, lut, num_classes):
    """Independent reference: per-train-id pixel counts [num_classes] and ignore count."""
    mapped = np.concatenate([lut[np.asarray(m)].ravel() for m in label_maps])
    counts = [int((mapped == c).sum()) for c in range(num_classes)]
    return counts, int((mapped == common.IGNORE_LABEL).sum())


# ----------------------------------------------------------------------------- VOC family


def test_voc_info_is_standard():
    info = datasets.voc_info()
    assert info.num_classes == 21 and info.ignore_label == 255 and info.background_class == 0
    assert info.class_names[15] == "person" and info.class_names[20] == "tvmonitor"
    assert info.palette.shape == (21, 3) and info.palette.dtype == np.uint8
    # The standard VOC colour map: aeroplane (128,0,0), person (192,128,128), tv (0,64,128).
    assert info.palette[1].tolist() == [128, 0, 0]
    assert info.palette[15].tolist() == [192, 128, 128]
    assert info.palette[20].tolist() == [0, 64, 128]
    assert info.label_lut[:21].tolist() == list(range(21))
    assert info.label_lut[21] == 255 and info.label_lut[255] == 255
    with pytest.raises(ValueError):
        info.label_lut[0] = 3  # Frozen all the way down.


def test_voc_reads_palette_indices_not_rgb(tmp_path):
    values = random_label([0, 1, 15, 255])
    root = make_voc(tmp_path / "VOC2012", {"train": ["a"]}, {"a": values})
    pairs, info = read_dataset("voc", root, "train")
    assert pairs == [(str(root / "JPEGImages/a.jpg"), str(root / "SegmentationClass/a.png"))]
    assert Image.open(pairs[0][1]).mode == "P"  # Would read as colours if converted to RGB.
    stats, errors = check_pair(*pairs[0], info)
    assert errors == []
    counts, ignore = counts_by_numpy([values], info.label_lut, 21)
    assert stats.pixels_per_class.tolist() == counts
    assert stats.ignore_pixels == ignore == int((values == 255).sum())
    assert stats.size == (W, H)


def test_voc_image_extension_autodetect(tmp_path):
    root = make_voc(tmp_path, {"val": ["a", "b"]}, {"a": np.zeros((H, W))}, image_ext=".png")
    make_voc(tmp_path, {}, {"b": np.zeros((H, W))}, image_ext=".jpg")
    write_image(tmp_path / "JPEGImages" / "b.png")  # .jpg wins when both exist.
    pairs, _ = read_dataset("voc", root, "val")
    assert [pathlib.Path(image).name for image, _ in pairs] == ["a.png", "b.jpg"]


def test_voc_aug_both_list_formats_and_val(tmp_path):
    root = make_voc(tmp_path, {"val": ["v"]}, {"v": np.zeros((H, W))})
    for stem in ("x", "y"):
        write_image(root / "JPEGImages" / f"{stem}.jpg")
        write_label(root / "SegmentationClassAug" / f"{stem}.png", np.ones((H, W)))
    aug = root / "ImageSets" / "SegmentationAug" / "train_aug.txt"
    aug.parent.mkdir(parents=True)
    aug.write_text("x\n/JPEGImages/y.jpg /SegmentationClassAug/y.png\n")
    pairs, info = read_dataset("voc_aug", root, "train")
    assert info.name == "voc_aug" and info.num_classes == 21
    assert [pathlib.Path(label).parent.name for _, label in pairs] == ["SegmentationClassAug"] * 2
    assert [pathlib.Path(image).stem for image, _ in pairs] == ["x", "y"]
    val_pairs, _ = read_dataset("voc_aug", root, "val")
    assert val_pairs == [(str(root / "JPEGImages/v.jpg"), str(root / "SegmentationClass/v.png"))]


def test_voc_aug_list_at_root(tmp_path):
    root = make_voc(tmp_path, {}, {})
    write_image(root / "JPEGImages" / "x.jpg")
    write_label(root / "SegmentationClassAug" / "x.png", np.ones((H, W)))
    (root / "train_aug.txt").write_text("/JPEGImages/x.jpg /SegmentationClassAug/x.png\n")
    pairs, _ = read_dataset("voc_aug", root, "train")
    assert len(pairs) == 1


def test_demo_reads_dataset_json(tmp_path):
    labels = {"0000": random_label([0, 1, 2, 255]), "0001": random_label([0, 2], seed=1)}
    root = make_voc(tmp_path, {"train": ["0000", "0001"]}, labels, image_ext=".png")
    spec = {"name": "demo", "num_classes": 3, "class_names": ["bg", "disc", "square"],
            "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]], "ignore_label": 255,
            "background_class": 0}
    (root / "dataset.json").write_text(json.dumps(spec))
    pairs, info = read_dataset("demo", root, "train")
    assert info.class_names == ("bg", "disc", "square") and info.background_class == 0
    assert info.palette[1].tolist() == [255, 0, 0]
    report = check_dataset(pairs, info, workers=2)
    counts, ignore = counts_by_numpy(labels.values(), info.label_lut, 3)
    assert report["pixels_per_class"] == counts and report["ignore_pixels"] == ignore
    assert report["errors"] == [] and report["image_sizes"] == {f"{W}x{H}": 2}


def test_demo_without_json_names_it(tmp_path):
    root = make_voc(tmp_path, {"train": ["a"]}, {"a": np.zeros((H, W))}, image_ext=".png")
    with pytest.raises(DatasetError, match="dataset.json"):
        read_dataset("demo", root, "train")


# ----------------------------------------------------------------------------- Cityscapes


def make_cityscapes(root, split, frames):
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/.../*_gtFine_labelIds.png."""
    for city, stem, values in frames:
        write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", values,
                    palette=False)
    return root


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    from cityscapesscripts.helpers.labels import id2label

    info = datasets.cityscapes_info()
    assert info.num_classes == 19 and info.background_class is None
    assert info.label_lut[7] == 0 and info.label_lut[26] == 13 and info.label_lut[33] == 18
    assert info.label_lut[0] == 255 and info.label_lut[4] == 255 and info.label_lut[34] == 255
    assert info.class_names[0] == "road" and info.class_names[13] == "car"
    assert info.palette[13].tolist() == list(id2label[26].color)
    for label_id, label in id2label.items():  # The whole official table, not a copy.
        if 0 <= label_id < 256:
            expected = 255 if label.trainId in (-1, 255) else label.trainId
            assert info.label_lut[label_id] == expected


def test_cityscapes_reader_and_counts(tmp_path):
    frames = [("aachen", "aachen_000000_000019", random_label([0, 7, 26, 33, 4])),
              ("bremen", "bremen_000001_000019", random_label([7, 8, 23], seed=2))]
    root = make_cityscapes(tmp_path, "val", frames)
    pairs, info = read_dataset("cityscapes", root, "val")
    assert [pathlib.Path(label).name for _, label in pairs] == [
        "aachen_000000_000019_gtFine_labelIds.png", "bremen_000001_000019_gtFine_labelIds.png"]
    report = check_dataset(pairs, info, workers=2)
    counts, ignore = counts_by_numpy([f[2] for f in frames], info.label_lut, 19)
    assert report["errors"] == []
    assert report["pixels_per_class"] == counts and report["ignore_pixels"] == ignore
    assert ignore == sum(int(np.isin(f[2], [0, 4]).sum()) for f in frames)


def test_cityscapes_unknown_id_is_an_error(tmp_path):
    root = make_cityscapes(tmp_path, "train", [("ulm", "ulm_0", np.full((H, W), 40))])
    pairs, info = read_dataset("cityscapes", root, "train")
    stats, errors = check_pair(*pairs[0], info)
    assert stats is None and "ulm_0_gtFine_labelIds.png" in errors[0] and "40" in errors[0]


def test_cityscapes_missing_label_names_it(tmp_path):
    root = make_cityscapes(tmp_path, "train", [("ulm", "ulm_0", np.zeros((H, W)))])
    (root / "gtFine/train/ulm/ulm_0_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetError, match="ulm_0_gtFine_labelIds.png"):
        read_dataset("cityscapes", root, "train")


# ----------------------------------------------------------------------------- CamVid, list


def test_camvid_void_is_ignore(tmp_path):
    labels = {"f1": random_label([0, 3, 10, 11]), "f2": random_label([11, 5], seed=3)}
    make_list_dataset(tmp_path, labels, list_name="train.txt", image_dir="train",
                      label_dir="trainannot")
    pairs, info = read_dataset("camvid", tmp_path, "train")
    assert info.num_classes == 11 and info.ignore_label == 11 and info.background_class is None
    assert info.class_names[4] == "pavement" and info.palette[4].tolist() == [60, 40, 222]
    assert info.label_lut[11] == 255 and info.label_lut[10] == 10
    report = check_dataset(pairs, info, workers=2)
    counts, ignore = counts_by_numpy(labels.values(), info.label_lut, 11)
    assert report["pixels_per_class"] == counts
    assert report["ignore_pixels"] == ignore == sum(int((v == 11).sum()) for v in labels.values())


def test_list_reader_relative_to_list_folder(tmp_path):
    labels = {"p": random_label([0, 1, 2, 200])}
    list_path = make_list_dataset(tmp_path / "sub", labels, list_name="mine.txt")
    pairs, info = read_dataset("list", None, "train", list_file=list_path, num_classes=3,
                               ignore_label=200)
    assert pairs == [(str(tmp_path / "sub/img/p.png"), str(tmp_path / "sub/lab/p.png"))]
    assert info.num_classes == 3 and info.ignore_label == 200 and info.label_lut[200] == 255
    assert info.palette.tolist() == datasets.bit_colormap(3).tolist()
    stats, errors = check_pair(*pairs[0], info)
    assert errors == [] and stats.ignore_pixels == int((labels["p"] == 200).sum())


def test_list_reader_flag_errors(tmp_path):
    list_path = make_list_dataset(tmp_path, {"p": np.zeros((H, W))})
    with pytest.raises(DatasetError, match="--num_classes"):
        read_dataset("list", None, "train", list_file=list_path)
    with pytest.raises(DatasetError, match="--ignore_label"):
        read_dataset("list", None, "train", list_file=list_path, num_classes=3, ignore_label=1)
    with pytest.raises(DatasetError, match="--list_file"):
        read_dataset("camvid", tmp_path, "train", list_file=list_path)
    with pytest.raises(DatasetError, match="--num_classes=5"):
        read_dataset("camvid", tmp_path, "train", num_classes=5)


# ----------------------------------------------------------------------------- bad inputs


def test_images_reader_folder_and_list(tmp_path):
    # A folder of images at any depth (ImageNet's train/<synset>/*.JPEG), suffixes in any
    # case; other files are not images.
    write_image(tmp_path / "train" / "n01" / "a.JPEG", fmt="JPEG")
    write_image(tmp_path / "train" / "n02" / "b.png")
    (tmp_path / "train" / "n02" / "notes.txt").write_text("not an image")
    pairs, info = read_dataset("images", tmp_path, "train")
    assert [pathlib.Path(p).name for p, _ in pairs] == ["a.JPEG", "b.png"]
    assert all(label == "" for _, label in pairs)
    assert not info.has_labels and info.name == "images"
    assert (info.label_lut == common.IGNORE_LABEL).all()
    # Or a list of image paths relative to the list's folder (no split folder needed).
    (tmp_path / "val.txt").write_text("train/n02/b.png\n# a comment\n")
    pairs, _ = read_dataset("images", tmp_path, "val")
    assert pairs == [(str(tmp_path / "train" / "n02" / "b.png"), "")]
    # Image-only pairs check without labels: sizes counted, every pixel "ignore".
    summary = check_dataset(pairs, info)
    assert summary["num_bad_pairs"] == 0 and summary["ignore_pixels"] == H * W


def test_images_reader_errors_name_the_cause(tmp_path):
    with pytest.raises(DatasetError, match="test.txt"):
        read_dataset("images", tmp_path, "test")
    (tmp_path / "val.txt").write_text("missing.jpg\n")
    with pytest.raises(DatasetError, match="val.txt:1.*missing.jpg"):
        read_dataset("images", tmp_path, "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        read_dataset("images", tmp_path, "empty")
    with pytest.raises(DatasetError, match="--num_classes"):
        read_dataset("images", tmp_path, "empty", num_classes=3)


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(DatasetError, match="voc_aug") as e:
        read_dataset("coco", tmp_path, "train")
    assert "cityscapes" in str(e.value) and "'coco'" in str(e.value)


def test_missing_data_dir(tmp_path):
    with pytest.raises(DatasetError, match=r"--data_dir.*nowhere"):
        read_dataset("voc", tmp_path / "nowhere", "train")
    with pytest.raises(DatasetError, match="--data_dir is required"):
        read_dataset("camvid", None, "train")


def test_missing_split_list(tmp_path):
    make_voc(tmp_path, {"train": ["a"]}, {"a": np.zeros((H, W))})
    with pytest.raises(DatasetError, match=r"--split=val.*val\.txt"):
        read_dataset("voc", tmp_path, "val")
    with pytest.raises(DatasetError, match=r"train_aug\.txt"):
        read_dataset("voc_aug", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"leftImg8bit[/\\]test"):
        read_dataset("cityscapes", tmp_path, "test")


def test_missing_file_in_list_names_file_and_line(tmp_path):
    make_list_dataset(tmp_path, {"a": np.zeros((H, W)), "b": np.zeros((H, W))})
    (tmp_path / "lab" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"train\.txt:2: label not found: .*lab/b\.png"):
        read_dataset("camvid", tmp_path, "train")
    (tmp_path / "img" / "a.png").unlink()
    with pytest.raises(DataCheckError) as raised:  # Every missing file, not the first.
        read_dataset("camvid", tmp_path, "train")
    assert [p.split(": ")[1] for p in raised.value.problems] == ["image not found",
                                                                  "label not found"]
    assert str(raised.value).startswith("2 data problems; the first: ")
    assert str(raised.value).endswith("img/a.png")
    make_voc(tmp_path / "voc", {"train": ["a", "gone"]}, {"a": np.zeros((H, W))})
    with pytest.raises(DatasetError, match=r"train\.txt:2: image of 'gone' not found"):
        read_dataset("voc", tmp_path / "voc", "train")


def test_malformed_list_line(tmp_path):
    (tmp_path / "train.txt").write_text("only_one_field\n")
    with pytest.raises(DatasetError, match=r"train\.txt:1: expected 'IMAGE LABEL'"):
        read_dataset("camvid", tmp_path, "train")


def test_empty_split(tmp_path):
    (tmp_path / "train.txt").write_text("\n# nothing here\n")
    with pytest.raises(DatasetError, match=r"train\.txt is empty"):
        read_dataset("camvid", tmp_path, "train")
    (tmp_path / "leftImg8bit" / "val" / "ulm").mkdir(parents=True)
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"leftImg8bit[/\\]val is empty"):
        read_dataset("cityscapes", tmp_path, "val")


def one_pair(tmp_path, values=None, image_size=(H, W)):
    """A single CamVid-like pair on disk; returns (image_path, label_path, info)."""
    values = np.zeros((H, W)) if values is None else values
    image = write_image(tmp_path / "img.png", size=image_size)
    label = write_label(tmp_path / "lab.png", values, palette=False)
    return str(image), str(label), datasets.camvid_info()


def test_corrupt_image_names_file(tmp_path):
    image, label, info = one_pair(tmp_path)
    pathlib.Path(image).write_bytes(b"not an image at all")
    stats, errors = check_pair(image, label, info)
    assert stats is None and len(errors) == 1
    assert errors[0].startswith(image) and "cannot decode image" in errors[0]


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_names_file(tmp_path, suffix):
    image = write_image(tmp_path / f"big{suffix}", size=(64, 64))
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    label = write_label(tmp_path / "lab.png", np.zeros((64, 64)))
    stats, errors = check_pair(str(image), str(label), datasets.camvid_info())
    assert stats is None and errors[0].startswith(str(image)) and "decode" in errors[0]


def test_size_mismatch_names_both(tmp_path):
    image, label, info = one_pair(tmp_path, image_size=(H + 1, W))
    stats, errors = check_pair(image, label, info)
    assert stats is None
    assert errors == [f"{label}: label size {W}x{H} differs from image {image} size {W}x{H + 1}"]


def test_out_of_range_label_names_values(tmp_path):
    values = np.zeros((H, W))
    values[0, :3] = 12
    values[1, 0] = 254
    image, label, info = one_pair(tmp_path, values)
    stats, errors = check_pair(image, label, info)
    assert stats is None and len(errors) == 1
    assert errors[0] == (f"{label}: label values 12 (3 px), 254 (1 px) outside [0, 11) "
                         "or ignore 11 (--unknown_labels=ignore treats such values as void)")


def test_rgb_label_is_rejected(tmp_path):
    image, _, info = one_pair(tmp_path)
    label = write_image(tmp_path / "rgb_label.png")  # Random colours: not class colours.
    stats, errors = check_pair(image, str(label), info)
    assert stats is None and errors[0].startswith(str(label))
    assert "label is an RGB colour image" in errors[0] and "CamVid" not in errors[0]


def test_colour_coded_label_is_named_as_such(tmp_path):
    image, _, info = one_pair(tmp_path)
    ids = random_label(range(11), seed=3)
    label = tmp_path / "colour.png"
    Image.fromarray(info.palette[ids]).save(label)  # [H, W, 3] class colours, as LabeledApproved.
    for mode in ("quick", "full"):
        errors = datasets.check_files([(image, str(label))], info, mode)
        assert len(errors) == 1 and errors[0].startswith(str(label)), errors
        assert "100% of its pixels have camvid's class colours" in errors[0]
        assert "colour-coded label" in errors[0]


def test_quick_check_reads_headers_and_ends_only(tmp_path):
    """quick finds truncation, sizes and modes; label values need full."""
    labels = {f"f{i}": np.zeros((H, W)) for i in range(4)}
    labels["f2"] = np.full((H, W), 40)  # Outside CamVid's 0..11.
    make_list_dataset(tmp_path, labels)
    big = write_image(tmp_path / "img" / "f0.png", size=(64, 64))
    big.write_bytes(big.read_bytes()[:-20])  # Cut short: the IEND chunk is gone.
    write_image(tmp_path / "img" / "f3.png", size=(2, 2))
    pairs, info = read_dataset("camvid", tmp_path, "train")
    quick = datasets.check_files(pairs, info, "quick", workers=2)
    assert len(quick) == 2, quick
    assert quick[0].startswith(str(big)) and "truncated PNG" in quick[0]
    assert "lab/f3.png: label size 7x5 differs" in quick[1]
    full = datasets.check_files(pairs, info, "full", workers=2)
    assert [e.split(":")[0] for e in full] == [str(big), str(tmp_path / "lab" / "f2.png"),
                                               str(tmp_path / "lab" / "f3.png")]
    assert "label values 40 (35 px)" in full[1]
    assert datasets.check_files(pairs, info, "off") == []
    with pytest.raises(DatasetError, match="--check_data=fast"):
        datasets.check_files(pairs, info, "fast")


def test_unknown_labels_ignore_accepts_every_value(tmp_path):
    image, label, info = one_pair(tmp_path, np.full((H, W), 40))
    assert datasets.check_files([(image, label)], info, "full")
    ignoring = dataclasses.replace(info, unknown_labels="ignore")
    assert datasets.check_files([(image, label)], ignoring, "full") == []
    stats, _ = check_pair(image, label, ignoring)
    assert stats.ignore_pixels == H * W  # 40 is void: the LUT sends it to ignore.
    with pytest.raises(DatasetError, match="--unknown_labels=void"):
        dataclasses.replace(info, unknown_labels="void")


def test_check_dataset_reports_every_error(tmp_path):
    labels = {f"f{i}": np.zeros((H, W)) for i in range(5)}
    labels["f3"] = np.full((H, W), 99)
    make_list_dataset(tmp_path, labels)
    (tmp_path / "img" / "f1.png").write_bytes(b"garbage")
    write_image(tmp_path / "img" / "f4.png", size=(2, 2))
    pairs, info = read_dataset("camvid", tmp_path, "train")
    report = check_dataset(pairs, info, workers=2)
    assert report["num_images"] == 5 and report["num_bad_pairs"] == 3
    assert len(report["errors"]) == 3
    assert "f1.png" in report["errors"][0] and "f3.png" in report["errors"][1]
    assert "f4.png" in report["errors"][2]
    # Only the good pairs are counted.
    assert report["pixels_per_class"][0] == 2 * H * W
    json.dumps(report)  # JSON-ready as it is.


# ----------------------------------------------------------------------------- SBD


def write_sbd_mat(path, mask):
    """A .mat shaped like SBD's cls/*.mat: struct GTcls with a Segmentation field."""
    gt = {"Segmentation": np.asarray(mask, np.uint8),
          "CategoriesPresent": np.unique(mask[mask > 0]).astype(np.uint8),
          "Boundaries": np.empty((21, 1), dtype=object)}
    for i in range(21):
        gt["Boundaries"][i, 0] = np.zeros((1, 1), np.uint8)
    scipy.io.savemat(str(path), {"GTcls": gt})


def test_sbd_conversion_feeds_voc_aug(tmp_path):
    mask = random_label([0, 3, 15, 20])
    sbd_dir = tmp_path / "sbd"
    (sbd_dir / "cls").mkdir(parents=True)
    write_sbd_mat(sbd_dir / "cls" / "2008_000002.mat", mask)
    (sbd_dir / "train.txt").write_text("2008_000002\n")
    (sbd_dir / "val.txt").write_text("")
    voc = make_voc(tmp_path / "VOC2012", {"train": ["2007_000032"], "val": ["2007_000033"]},
                   {"2007_000032": random_label([0, 1]), "2007_000033": np.zeros((H, W))})
    write_image(voc / "JPEGImages" / "2008_000002.jpg")

    np.testing.assert_array_equal(sbd.load_sbd_mask(sbd_dir / "cls" / "2008_000002.mat"), mask)
    assert sbd.convert_sbd(sbd_dir / "cls", voc / "SegmentationClassAug") == 1
    assert sbd.convert_sbd(sbd_dir / "cls", voc / "SegmentationClassAug") == 0  # Kept.
    converted = Image.open(voc / "SegmentationClassAug" / "2008_000002.png")
    assert converted.mode == "P"
    np.testing.assert_array_equal(np.asarray(converted), mask)

    list_path = sbd.write_train_aug_list(sbd_dir, voc)
    assert list_path.read_text().split() == ["2007_000032", "2008_000002"]
    pairs, info = read_dataset("voc_aug", voc, "train")
    report = check_dataset(pairs, info, workers=2)
    assert report["errors"] == [] and report["num_images"] == 2


def test_sbd_bad_mat_names_file(tmp_path):
    path = tmp_path / "x.mat"
    scipy.io.savemat(str(path), {"other": np.zeros((2, 2))})
    with pytest.raises(DatasetError, match=r"x\.mat.*GTcls"):
        sbd.load_sbd_mask(path)
    write_sbd_mat(path, np.full((2, 2), 30))
    with pytest.raises(DatasetError, match=r"x\.mat.*\[30\]"):
        sbd.load_sbd_mask(path)


# ----------------------------------------------------------------------------- real CamVid

# The README's train pixel counts, in millions, as printed (rounded to the shown decimals).
CAMVID_README_MILLIONS = ["10.7", "14.8", "0.62", "20.1", "2.85", "6.17", "0.74", "0.71",
                          "3.72", "0.41", "0.18"]
CAMVID_README_VOID = "2.50"


def matches_rounded(count, printed):
    """True if `count` pixels rounds to the README figure `printed` (millions)."""
    decimals = len(printed.split(".")[1])
    return round(count / 1e6, decimals) == float(printed)


def test_real_camvid_train(camvid_dir):
    pairs, info = read_dataset("camvid", camvid_dir, "train")
    report = check_dataset(pairs, info)
    assert report["num_images"] == 367 and report["errors"] == []
    assert report["image_sizes"] == {"480x360": 367}
    # Independent count: raw values straight from PIL + numpy, void (11) counted apart.
    raw = np.zeros(256, np.int64)
    for _, label in pairs:
        raw += np.bincount(np.asarray(Image.open(label)).ravel(), minlength=256)
    assert report["pixels_per_class"] == raw[:11].tolist()
    assert report["ignore_pixels"] == raw[11] and raw[12:].sum() == 0
    for count, printed in zip(report["pixels_per_class"], CAMVID_README_MILLIONS):
        assert matches_rounded(count, printed), (count, printed)
    assert matches_rounded(report["ignore_pixels"], CAMVID_README_VOID)
