"""Tests of mm_tf.data.pipeline (and the preview of its batches) on tiny generated data."""

import dataclasses
import io
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mm_tf import common
from mm_tf.data import pipeline, preview, synthetic
from mm_tf.data import datasets
from mm_tf.data.datasets import bit_colormap
from testutil import demo_info, demo_pairs  # tests/ is on sys.path (prepend import mode)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return synthetic.generate_demo_dataset(
        tmp_path_factory.mktemp("demo"), num_train=12, num_val=3, height=40, width=56, seed=5
    )


SMALL = dict(crop_size=32, batch_size=4, shuffle_buffer=None)


def take(ds, n):
    """The first n batches as dicts of numpy arrays."""
    return [{k: v.numpy() for k, v in batch.items()} for batch in ds.take(n)]


def test_normalize_by_hand():
    pixel = np.array([[[[10, 20, 30]], [[255, 0, 128]]]], np.uint8)  # [1, 2, 1, 3]
    rgb = pipeline.normalize(pixel, common.INPUT_RGB).numpy()
    np.testing.assert_allclose(rgb[0, 0, 0], [10 - 123.68, 20 - 116.779, 30 - 103.939], rtol=1e-6)
    np.testing.assert_allclose(rgb[0, 1, 0], [255 - 123.68, 0 - 116.779, 128 - 103.939], rtol=1e-6)
    grey = tf.function(lambda x: pipeline.normalize(x, common.INPUT_GREY))(pixel).numpy()
    assert grey.shape == (1, 2, 1, 1) and grey.dtype == np.float32
    np.testing.assert_allclose(
        grey[0, :, 0, 0], [20 / 255 - 0.4488, (383 / 3) / 255 - 0.4488], rtol=1e-5
    )
    with pytest.raises(ValueError, match="input_mode"):
        pipeline.normalize(pixel, "bgr")
    with pytest.raises(ValueError, match="RGB"):
        pipeline.normalize(np.zeros([2, 2, 1], np.uint8), common.INPUT_RGB)


def test_input_config_validates():
    with pytest.raises(ValueError, match="input_mode"):
        pipeline.InputConfig(input_mode="hsv")
    with pytest.raises(ValueError, match="source"):
        pipeline.InputConfig(source="lmdb")
    with pytest.raises(ValueError, match="min_scale"):
        pipeline.InputConfig(min_scale=2.0, max_scale=1.0)


@pytest.mark.parametrize("input_mode,channels", [(common.INPUT_RGB, 3), (common.INPUT_GREY, 1)])
def test_train_batches_shapes_and_values(demo_root, input_mode, channels):
    config = pipeline.InputConfig(input_mode=input_mode, seed=1, **SMALL)
    ds = pipeline.train_dataset(
        demo_pairs(demo_root, "train"), demo_info(), config, include_raw_image=True
    )
    assert ds.element_spec[common.IMAGE].shape.as_list() == [4, 32, 32, channels]
    assert ds.element_spec[common.LABEL].shape.as_list() == [4, 32, 32]
    for batch in take(ds, 4):  # 16 > 12 examples: crosses an epoch boundary (repeat).
        assert batch[common.IMAGE].dtype == np.float32 and batch[common.LABEL].dtype == np.int32
        assert batch[common.RAW_IMAGE].dtype == np.uint8
        assert set(np.unique(batch[common.LABEL])) <= set(range(synthetic.NUM_CLASSES)) | {255}
        # The raw image is the augmented image rounded to uint8: normalising it is IMAGE.
        np.testing.assert_allclose(
            pipeline.normalize(batch[common.RAW_IMAGE], input_mode).numpy(),
            batch[common.IMAGE],
            atol=0.51 if channels == 3 else 0.51 / 255,
        )


def test_image_only_pairs_give_the_same_images_and_ignore_labels(demo_root):
    # --dataset=images pairs have no label file: the images (and their augmentation) are
    # those of the labelled pairs, every label pixel is ignore.
    config = pipeline.InputConfig(seed=3, **SMALL)
    pairs = demo_pairs(demo_root, "train")
    labelled = take(pipeline.train_dataset(pairs, demo_info(), config), 2)
    image_only = take(pipeline.train_dataset([(image, "") for image, _ in pairs],
                                             datasets.images_info(), config), 2)
    for a, b in zip(labelled, image_only):
        np.testing.assert_array_equal(a[common.IMAGE], b[common.IMAGE])
        assert (b[common.LABEL] == common.IGNORE_LABEL).all()


def test_train_is_deterministic_per_seed(demo_root):
    pairs, info = demo_pairs(demo_root, "train"), demo_info()
    runs = [
        take(pipeline.train_dataset(pairs, info, pipeline.InputConfig(seed=s, **SMALL)), 4)
        for s in (7, 7, 8)
    ]
    for a, b in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(a[common.IMAGE], b[common.IMAGE])
        np.testing.assert_array_equal(a[common.LABEL], b[common.LABEL])
    assert not np.array_equal(runs[0][0][common.IMAGE], runs[2][0][common.IMAGE])
    # Every epoch is augmented afresh: batch 3 revisits epoch-1 images with other draws.
    assert not any(
        np.array_equal(runs[0][3][common.IMAGE][i], runs[0][0][common.IMAGE][j])
        for i in range(4)
        for j in range(4)
    )


def test_train_without_repeat_drops_remainder(demo_root):
    config = pipeline.InputConfig(repeat=False, **{**SMALL, "batch_size": 5})
    assert (
        len(take(pipeline.train_dataset(demo_pairs(demo_root, "train"), demo_info(), config), 10))
        == 2
    )


def test_eval_keeps_full_images_and_reads_palette_indices(demo_root):
    pairs = demo_pairs(demo_root, "val")
    lut = np.full(256, 255, np.uint8)
    lut[:5] = [0, 3, 2, 1, 255]  # A non-identity LUT: class 4 becomes ignore, 1 <-> 3.
    # Raw 4 is then a value outside the classes: void by choice, not an error.
    info = dataclasses.replace(demo_info(lut), unknown_labels="ignore")
    batches = take(pipeline.eval_dataset(pairs, info, pipeline.InputConfig()), 10)
    assert len(batches) == len(pairs)
    for batch, (image_path, label_path) in zip(batches, pairs, strict=True):
        assert batch[common.IMAGE].shape == (1, 40, 56, 3)
        assert batch[common.FILENAME][0].decode() == image_path
        assert (batch[common.HEIGHT][0], batch[common.WIDTH][0]) == (40, 56)
        np.testing.assert_array_equal(
            batch[common.RAW_IMAGE][0], np.asarray(Image.open(image_path))
        )
        with Image.open(label_path) as label:
            assert label.mode == "P"
            np.testing.assert_array_equal(batch[common.LABEL][0], lut[np.asarray(label)])


def write_png(path, array, mode=None):
    Image.fromarray(np.asarray(array, np.uint8), mode=mode).save(path)
    return str(path)


def test_eval_pads_mixed_sizes_and_reads_grey_labels(tmp_path):
    rng = np.random.default_rng(0)
    pairs = []
    for i, (h, w) in enumerate([(10, 14), (12, 9)]):
        label = rng.integers(0, 5, size=(h, w))
        pairs.append(
            (
                write_png(tmp_path / f"i{i}.png", rng.integers(0, 256, size=(h, w, 3))),
                write_png(tmp_path / f"l{i}.png", label),
            )
        )  # mode "L": ids stored directly
    config = pipeline.InputConfig(input_mode=common.INPUT_GREY)
    (batch,) = take(pipeline.eval_dataset(pairs, demo_info(), config, batch_size=2), 5)
    assert batch[common.IMAGE].shape == (2, 12, 14, 1)
    np.testing.assert_array_equal(batch[common.HEIGHT], [10, 12])
    np.testing.assert_array_equal(batch[common.WIDTH], [14, 9])
    np.testing.assert_array_equal(
        batch[common.LABEL][0, :10, :14], np.asarray(Image.open(pairs[0][1]))
    )
    assert (batch[common.LABEL][0, 10:] == 255).all() and (
        batch[common.LABEL][1, :, 9:] == 255
    ).all()


def _one_line_failure(pairs, info, train=False):
    """data_error_message of the error the first batch of `pairs` raises."""
    config = pipeline.InputConfig(crop_size=8, batch_size=1)
    ds = (pipeline.train_dataset(pairs, info, config) if train
          else pipeline.eval_dataset(pairs, info, config))
    with pytest.raises(tf.errors.OpError) as raised:
        take(ds, 1)
    return pipeline.data_error_message(raised.value)


def test_bad_files_fail_with_one_line_naming_them(tmp_path):
    image = write_png(tmp_path / "image.png", np.zeros((8, 8, 3)))
    rgb_label = write_png(tmp_path / "rgb.png", np.zeros((8, 8, 3)))
    assert _one_line_failure([(image, rgb_label)], demo_info()) == (
        f"{rgb_label}: label is an RGB colour image; expected class ids (a single-channel or "
        "palette PNG): colour-coded labels must be converted to class ids")
    small_label = write_png(tmp_path / "small.png", np.zeros((4, 8)))
    line = _one_line_failure([(image, small_label)], demo_info(), train=True)
    assert line == (f"{small_label}: label size (height, width) 4 8 differs from the "
                    f"image size 8 8 of {image}")
    cut = tmp_path / "cut.png"
    cut.write_bytes(pathlib.Path(image).read_bytes()[:-12])
    label = write_png(tmp_path / "label.png", np.zeros((8, 8)))
    assert _one_line_failure([(str(cut), label)], demo_info()) == (
        f"{cut}: cannot decode image: the file is cut short (no end marker)")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"GIF? no, garbage")
    assert _one_line_failure([(str(garbage), label)], demo_info(), train=True).startswith(
        f"{garbage}: cannot decode image: not a PNG, JPEG")
    gone = tmp_path / "gone.png"
    assert str(gone) in _one_line_failure([(str(gone), label)], demo_info())
    assert pipeline.data_error_message(ValueError("x")) is None
    assert pipeline.data_error_message(tf.errors.InternalError(None, None, "x")) is None


def test_failures_inside_a_function_and_unnamed_ones_are_one_line(tmp_path):
    """Keras fit reads the iterator inside a tf.function, whose errors read differently;
    a file damaged in its middle fails in TensorFlow's decoder, which names no file."""
    image = write_png(tmp_path / "image.png", np.random.default_rng(0).integers(
        0, 256, (32, 32, 3)))
    values = np.zeros((32, 32))
    values[0, 0] = 40
    label = write_png(tmp_path / "label.png", values)
    ds = pipeline.eval_dataset([(image, label)], demo_info(), pipeline.InputConfig())

    @tf.function
    def first(iterator):
        return next(iterator)[common.LABEL]

    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        first(iter(ds))
    assert pipeline.data_error_message(raised.value).startswith(f"{label}: label values 40 ")
    data = bytearray(pathlib.Path(image).read_bytes())
    data[100:140] = bytes(40)  # Inside the compressed pixels; signature and end intact.
    pathlib.Path(image).write_bytes(bytes(data))
    line = _one_line_failure([(image, write_png(tmp_path / "ok.png", np.zeros((32, 32))))],
                             demo_info())
    assert line.startswith(pipeline.UNNAMED_DATA_ERROR), line
    assert "{{" not in line and "[[" not in line and "\n" not in line, line


def test_label_values_outside_the_classes_fail_unless_ignored(tmp_path):
    values = np.zeros((8, 8))
    values[0, :3] = [40, 41, 254]  # Demo classes are 0..4, ignore 255.
    image = write_png(tmp_path / "image.png", np.zeros((8, 8, 3)))
    label = write_png(tmp_path / "label.png", values)
    assert _one_line_failure([(image, label)], demo_info(), train=True) == (
        f"{label}: label values 40 41 254 outside [0, 5) or ignore 255 "
        "(--unknown_labels=ignore treats such values as void)")
    ignoring = dataclasses.replace(demo_info(), unknown_labels="ignore")
    (batch,) = take(pipeline.eval_dataset([(image, label)], ignoring, pipeline.InputConfig()), 1)
    assert (batch[common.LABEL][0, 0, :3] == 255).all() and (batch[common.LABEL][0, 1:] == 0).all()


def test_label_value_check_is_the_same_eagerly_and_in_a_function(tmp_path):
    raw = tf.constant([[0, 4], [255, 9]], tf.uint8)
    def check(label):
        return pipeline.check_label_values(label, demo_info(), "x.png")

    for run in (check, tf.function(check)):
        np.testing.assert_array_equal(run(raw[:, :1]), raw[:, :1])
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)x\.png.*values.*9"):
            run(raw)


def test_palette_png_decoding_needs_pil():
    """Records the measured fact behind decode_label: decode_png gives colours, not indices."""
    indices = np.array([[0, 1], [2, 255]], np.uint8)
    label = Image.fromarray(indices, mode="P")
    palette = bit_colormap(256)
    label.putpalette(palette.reshape(-1).tolist())
    buf = io.BytesIO()
    label.save(buf, format="PNG")
    png = buf.getvalue()
    np.testing.assert_array_equal(tf.io.decode_png(png, channels=3).numpy(), palette[indices])
    assert not np.array_equal(tf.io.decode_png(png, channels=1).numpy()[..., 0], indices)
    np.testing.assert_array_equal(pipeline.decode_label(png).numpy(), indices)
    np.testing.assert_array_equal(tf.function(pipeline.decode_label)(png).numpy(), indices)


def test_write_preview_grid(tmp_path):
    images = np.stack([np.full((6, 5, 3), 10 * (b + 1), np.uint8) for b in range(3)])
    labels = np.zeros((3, 6, 5), np.int32)
    labels[:, 0, 0] = 255
    labels[1] = 1
    path = preview.write_preview(images, labels, synthetic.PALETTE, tmp_path / "p" / "preview.png")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * 6 + 2 * 2, 2 * 5 + 2, 3)  # rows = batch, image | labels, 2-pixel gaps
    np.testing.assert_array_equal(grid[8, 0], [20, 20, 20])  # row 1's image
    np.testing.assert_array_equal(grid[0, 7], [255, 255, 255])  # ignore in white
    np.testing.assert_array_equal(grid[9, 8], synthetic.PALETTE[1])
    np.testing.assert_array_equal(grid[20, 8], synthetic.PALETTE[0])
    with pytest.raises(ValueError, match="expected images"):
        preview.write_preview(images[0], labels, synthetic.PALETTE, tmp_path / "bad.png")
