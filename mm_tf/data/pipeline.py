"""The tf.data input pipeline: decode, then parse into train or eval batches.

Two sources give the same examples in the same order: `"files"` (a list of
`(image_path, label_path)` pairs from `read_dataset`) and `"tfrecord"` (a file pattern of
shards written by `mm_tf.data.tfrecords`). Both are shuffled with the same seed and
buffer, then numbered after `repeat`, and each example's augmentation seed is derived
from `(config.seed, its position in the stream)`: the same seed therefore gives
identical batches from either source, and re-running it gives the same batches again.

Palette label PNGs (PASCAL VOC's `SegmentationClass`): measured with TF 2.21,
`tf.io.decode_png` expands the palette, so `channels=0/3` returns the palette *colours*
and `channels=1` returns their *luminance* (e.g. index 1 -> 125, 255 -> 128) -- never
the indices. The class ids of a palette PNG are therefore read with PIL in a
`tf.numpy_function`, chosen in-graph from the PNG header's colour type (byte 25, value
3); single-channel PNGs (CamVid, Cityscapes, SBD-converted VOC) stay on the fast native
`decode_png` path, and RGB label PNGs are rejected instead of being silently read as
luminance. The TFRecord writer stores every label as a single-channel index PNG, so the
TFRecord source never needs PIL.

Bad files fail as assertions that name the file: before decoding, an image must be a
PNG, JPEG, GIF or BMP and a PNG/JPEG must end with its end marker (TensorFlow's own
decoders fail on a cut-short file without naming it); a label must be a grey or palette
PNG of its image's size, with values allowed by `datasets.valid_raw_values(info)` (one
[256]-entry gather and a reduction per element; nothing when `info.unknown_labels` is
"ignore"). `data_error_message` turns such a failure, raised from an iterator, into one
line for the user.
"""

import dataclasses
import io
import re
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
from PIL import Image

from mm_tf import common
from mm_tf.data import augment as augment_lib
from mm_tf.data import datasets
from mm_tf.data import tfrecords

SOURCE_FILES = "files"
SOURCE_TFRECORD = "tfrecord"
SOURCES = (SOURCE_FILES, SOURCE_TFRECORD)

# Salts the augmentation seeds so that they do not coincide with the model's step seeds
# `[base_seed, step]` when both use the same base seed.
_AUGMENT_SALT = 0x5EED
# PNG layout: 8-byte signature, IHDR length (4), "IHDR" (4), width (4), height (4),
# bit depth (1), colour type (1).
_PNG_SIGNATURE = datasets.PNG_SIGNATURE
_PNG_COLOR_TYPE_OFFSET = 25
_PNG_PALETTE = 3
_PNG_RGB_TYPES = (2, 6)
# The first bytes of the formats tf.io.decode_image reads (datasets.IMAGE_FORMATS).
_IMAGE_SIGNATURES = (datasets.PNG_SIGNATURE, datasets.JPEG_SIGNATURE, b"GIF8", b"BM")

Pairs = Sequence[Tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """Knobs of the input pipeline (train and eval).

    Args:
      crop_size: side S of the square training crops.
      batch_size: training batch size B (remainders are dropped).
      min_scale, max_scale: range of the random rescaling before cropping.
      flip: random left-right mirroring.
      input_mode: `common.INPUT_RGB` (3 channels) or `common.INPUT_GREY` (1 channel).
      seed: seeds shuffling and every augmentation; the same seed repeats exactly.
      deterministic: `tf.data.Options.deterministic` (False lets parallel maps reorder
        elements for speed; each element's augmentation still depends only on its seed).
      shuffle_buffer: shuffle buffer in examples; None shuffles the whole data set. With
        the TFRecord source the buffer holds serialized records (memory ~ buffer x record).
      repeat: repeat the training data forever.
      num_parallel_calls: parallelism of the decode/augment map.
      source: `"files"` (pairs of paths) or `"tfrecord"` (a shard file pattern).
      pad_fill: pad value of images smaller than the crop: "mean" (0 after
        normalisation), "zeros", or a number.

    Example:
      config = InputConfig(crop_size=64, batch_size=4, seed=1)
      batches = train_dataset(pairs, info, config)
    """

    crop_size: int = 512
    batch_size: int = 16
    min_scale: float = 0.5
    max_scale: float = 2.0
    flip: bool = True
    input_mode: str = common.INPUT_RGB
    seed: int = 0
    deterministic: bool = True
    shuffle_buffer: Optional[int] = None
    repeat: bool = True
    num_parallel_calls: int = tf.data.AUTOTUNE
    source: str = SOURCE_FILES
    pad_fill: Union[str, float] = augment_lib.FILL_MEAN

    def __post_init__(self):
        if self.input_mode not in common.INPUT_MODES:
            raise ValueError(
                f"input_mode must be one of {common.INPUT_MODES}, got {self.input_mode!r}"
            )
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.crop_size < 1 or self.batch_size < 1:
            raise ValueError(
                f"crop_size and batch_size must be >= 1, got {self.crop_size}, {self.batch_size}"
            )
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(
                f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}"
            )
        if self.shuffle_buffer is not None and self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be None or >= 1, got {self.shuffle_buffer}")


def normalize(image, input_mode: str) -> tf.Tensor:
    """Turn RGB [..., H, W, 3] (uint8 or float 0..255) into network input float32 [..., H, W, C]."""
    image = tf.cast(image, tf.float32)
    if image.shape[-1] is not None and image.shape[-1] != 3:
        raise ValueError(f"normalize expects RGB images [..., 3], got shape {image.shape}")
    if input_mode == common.INPUT_RGB:
        return image - tf.constant(common.RGB_MEAN, tf.float32)
    if input_mode == common.INPUT_GREY:
        grey = tf.reduce_mean(image, axis=-1, keepdims=True)
        return grey / 255.0 - common.GREY_SHIFT
    raise ValueError(f"input_mode must be one of {common.INPUT_MODES}, got {input_mode!r}")


def _palette_indices(png_bytes) -> np.ndarray:
    """Read a palette PNG's indices uint8 [H, W] with PIL (tf.io.decode_png gives colours)."""
    if isinstance(png_bytes, np.ndarray):  # Eager numpy_function passes a 0-d object array.
        png_bytes = png_bytes.item()
    with Image.open(io.BytesIO(png_bytes)) as img:
        if img.mode != "P":
            raise ValueError(f"expected a palette PNG, PIL reads mode {img.mode!r}")
        return np.asarray(img, dtype=np.uint8)


def _has_marker_at_end(data, marker: bytes) -> tf.Tensor:
    """bool []: `marker` occurs among the last `datasets.END_WINDOW` bytes of string []."""
    length = tf.strings.length(data)
    tail = tf.strings.substr(data, tf.maximum(length - datasets.END_WINDOW, 0),
                             datasets.END_WINDOW)
    starts = tf.range(tf.maximum(tf.strings.length(tail) - len(marker) + 1, 0))
    windows = tf.strings.substr(tf.fill(tf.shape(starts), tail), starts,
                                tf.fill(tf.shape(starts), len(marker)))
    return tf.reduce_any(tf.equal(windows, marker))


def _is_complete(data) -> tf.Tensor:
    """bool []: string [] is not a PNG or JPEG cut short (the rule of the quick check)."""
    png_cut = tf.logical_and(tf.equal(tf.strings.substr(data, 0, 8), datasets.PNG_SIGNATURE),
                             tf.logical_not(_has_marker_at_end(data, datasets.PNG_END)))
    jpeg_cut = tf.logical_and(
        tf.equal(tf.strings.substr(data, 0, 2), datasets.JPEG_SIGNATURE),
        tf.logical_not(_has_marker_at_end(data, datasets.JPEG_END)))
    return tf.logical_not(tf.logical_or(png_cut, jpeg_cut))


def _file_assert(condition, filename, what: str):
    """An assertion whose message reads "<filename>: <what>" (see data_error_message)."""
    return tf.debugging.Assert(condition, [filename, ": " + what])


def decode_image(image_bytes, filename="") -> tf.Tensor:
    """Decode a whole PNG/JPEG/GIF/BMP file into uint8 [H, W, 3], first asserting (naming
    `filename`) that it is one of those formats and, for PNG/JPEG, not cut short."""
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    known = tf.reduce_any([tf.equal(tf.strings.substr(image_bytes, 0, len(signature)),
                                    signature) for signature in _IMAGE_SIGNATURES])
    checks = [
        _file_assert(known, filename, "cannot decode image: not a PNG, JPEG, GIF or BMP file"),
        _file_assert(_is_complete(image_bytes), filename,
                     "cannot decode image: the file is cut short (no end marker)"),
    ]
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8,
                                   expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def decode_label(label_bytes, filename="") -> tf.Tensor:
    """Decode a label PNG (single-channel ids or palette indices) into uint8 [H, W] raw values."""
    label_bytes = tf.convert_to_tensor(label_bytes, tf.string)
    header_ok = tf.equal(tf.strings.substr(label_bytes, 0, 8), _PNG_SIGNATURE)
    color_type = tf.io.decode_raw(
        tf.strings.substr(label_bytes, _PNG_COLOR_TYPE_OFFSET, 1), tf.uint8
    )[0]
    is_rgb = tf.reduce_any(tf.equal(color_type, tf.constant(_PNG_RGB_TYPES, tf.uint8)))
    checks = [
        _file_assert(header_ok, filename, "label is not a PNG file"),
        _file_assert(tf.logical_not(is_rgb), filename,
                     "label is an RGB colour image; expected class ids (a single-channel or "
                     "palette PNG): colour-coded labels must be converted to class ids"),
        _file_assert(_is_complete(label_bytes), filename,
                     "cannot decode label: the file is cut short (no IEND chunk)"),
    ]
    with tf.control_dependencies(checks):
        is_palette = tf.equal(color_type, _PNG_PALETTE)

    def palette():
        return tf.numpy_function(_palette_indices, [label_bytes], tf.uint8, stateful=False)

    def grey():
        return tf.io.decode_png(label_bytes, channels=1, dtype=tf.uint8)[..., 0]

    label = tf.cond(is_palette, palette, grey)
    return tf.ensure_shape(label, [None, None])


def decode_pair(image_bytes, label_bytes, filename="", label_name=None):
    """Decode image and label bytes into image uint8 [H, W, 3] and raw label uint8 [H, W].
    Empty label bytes (an image-only pair) give a label of `common.IGNORE_LABEL` only.
    Failures name `filename` (the image) or `label_name` (default: `filename`)."""
    label_name = filename if label_name is None else label_name
    image = decode_image(image_bytes, filename)
    label = tf.cond(
        tf.equal(tf.strings.length(label_bytes), 0),
        lambda: tf.fill(tf.shape(image)[:2], tf.constant(common.IGNORE_LABEL, tf.uint8)),
        lambda: decode_label(label_bytes, label_name))
    image_size = tf.shape(image)[:2]
    label_size = tf.shape(label)
    with tf.control_dependencies(
        [
            tf.debugging.Assert(
                tf.reduce_all(tf.equal(image_size, label_size)),
                [label_name, ": label size (height, width) ", label_size,
                 " differs from the image size ", image_size, " of ", filename],
            )
        ]
    ):
        image = tf.identity(image)
    return tf.ensure_shape(image, [None, None, 3]), label


def check_label_values(label, info, label_name="") -> tf.Tensor:
    """Raw label uint8 [H, W], unchanged, asserting (naming `label_name` and the values)
    that every value is allowed by `datasets.valid_raw_values(info)`."""
    valid = datasets.valid_raw_values(info)
    if valid.all():  # unknown_labels="ignore": every value is void or a class.
        return label
    allowed = tf.gather(tf.constant(valid), tf.cast(label, tf.int32))  # bool [H, W]

    def fail():
        values, _ = tf.unique(tf.boolean_mask(label, tf.logical_not(allowed)))
        message = [label_name, ": label values ", tf.sort(tf.cast(values, tf.int32)),
                   f" outside {datasets.describe_valid(info)} "
                   f"({datasets.UNKNOWN_LABELS_HINT})"]
        # Computed only on failure: the values are gathered in this branch alone.
        with tf.control_dependencies([tf.debugging.Assert(False, message, summarize=16)]):
            return tf.identity(label)

    return tf.cond(tf.reduce_all(allowed), lambda: label, fail)


def map_label(label, label_lut) -> tf.Tensor:
    """Map raw label values uint8 [H, W] to train ids uint8 [H, W] via a [256] LUT (255 ignore)."""
    return tf.gather(tf.constant(np.asarray(label_lut, np.uint8)), tf.cast(label, tf.int32))


def _read_example(ref, info, source: str):
    """One reference -> (image uint8 [H, W, 3], train ids uint8 [H, W], image filename []),
    every check of the module applied."""
    image_bytes, label_bytes, filename, label_name = _load(ref, source)
    image, label = decode_pair(image_bytes, label_bytes, filename, label_name)
    label = check_label_values(label, info, label_name)
    return image, map_label(label, info.label_lut), filename


# What TensorFlow puts before an error of an iterator's input function, on its line.
_WRAPPERS = (r"\{\{function_node [^}]*\}\}",
             r"Error in user-defined function passed to \S+ transformation with iterator: "
             r"\S+: ",
             r"\[Op:IteratorGetNext\].*")
_ASSERTION = "assertion failed: ["
UNNAMED_DATA_ERROR = "reading the data failed: "  # A message that may not name the file.


def data_error_message(error: Exception) -> Optional[str]:
    """One line for the user from a failure of this pipeline raised by an iterator (an
    assertion naming the file, or a decoder's or reader's own error); None when `error`
    is no such failure. The line names the file whenever TensorFlow's message does."""
    if not isinstance(error, tf.errors.OpError):
        return None
    message = error.message or ""
    if "IteratorGetNext" not in message and "assertion failed" not in message:
        return None
    if _ASSERTION in message:
        # Assert prints each part of our message as "[part]", separated by spaces.
        body = message[message.index(_ASSERTION) + len(_ASSERTION):].split("\n")[0]
        return "".join(body[:body.rfind("]")].split("] ["))
    # Eagerly: "{{function_node ...}} <error>\n\t [[node]]"; in a tf.function, lines of
    # "Graph execution error: Detected at node ..." come first. The error's own line is
    # the last before the node list.
    lines = [line for line in message.split("\n\t [[")[0].splitlines() if line.strip()]
    text = lines[-1] if lines else message
    for wrapper in _WRAPPERS:
        text = re.sub(wrapper, "", text)
    return f"{UNNAMED_DATA_ERROR}{' '.join(text.split())}"


def _examples(pairs, config: InputConfig) -> Tuple[tf.data.Dataset, int]:
    """Return the unshuffled references in data-set order and their count, for either source."""
    if config.source == SOURCE_FILES:
        if isinstance(pairs, (str, bytes)):
            raise ValueError(
                "source='files' expects a list of (image_path, label_path) pairs, got a string"
            )
        pairs = [(str(image), str(label)) for image, label in pairs]
        if not pairs:
            raise ValueError("no (image, label) pairs given")
        images, labels = zip(*pairs, strict=True)
        refs = tf.data.Dataset.from_tensor_slices(
            {"image_path": list(images), "label_path": list(labels)}
        )
        return refs, len(pairs)
    files = tfrecords.tfrecord_files(pairs)
    # Shards are read one after another, in name order, so that the stream has the order
    # of the pairs the shards were written from (parallel interleaving would not).
    return tf.data.TFRecordDataset(files), tfrecords.count_records(files)


def _load(ref, source: str):
    """Read one reference into encoded image bytes, label bytes, the image file name and
    the label's (a TFRecord names only the image)."""
    if source == SOURCE_FILES:
        # An image-only pair (--dataset=images) has an empty label path: no label file.
        label_bytes = tf.cond(tf.equal(ref["label_path"], ""), lambda: tf.constant(b""),
                              lambda: tf.io.read_file(ref["label_path"]))
        return (tf.io.read_file(ref["image_path"]), label_bytes, ref["image_path"],
                ref["label_path"])
    example = tfrecords.parse_example(ref)
    return (example["image_bytes"], example["label_bytes"], example["filename"],
            example["filename"])


def element_seed(base_seed: int, index) -> tf.Tensor:
    """Derive the int32 [2] augmentation seed of stream element `index` from the base seed."""
    base = tf.constant([base_seed, _AUGMENT_SALT], tf.int32)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def _options(config: InputConfig, distributed: bool = False) -> tf.data.Options:
    """Build the tf.data options of a pipeline.

    distributed: the training stream, which Keras `fit` splits among replicas and
    workers. Its auto-shard policy is DATA: every worker runs the same stream and keeps
    its own part of each global batch. FILE sharding (the AUTO default for file readers)
    would need at least one file per worker, would shard the TFRecord shards before the
    shuffle, and would number each worker's examples from 0 (equal augmentation seeds on
    every worker); DATA keeps the single-device stream exactly, at the cost of every
    worker decoding every image. The stream is the same on every worker only with
    `deterministic=True` (the default).
    """
    options = tf.data.Options()
    options.deterministic = config.deterministic
    if distributed:
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
    return options


def train_dataset(
    pairs, info, config: InputConfig, include_raw_image: bool = False
) -> tf.data.Dataset:
    """Build augmented training batches {IMAGE: float32 [B,S,S,C], LABEL: int32 [B,S,S]}.

    Args:
      pairs: list of `(image_path, label_path)` for `source="files"`, or a TFRecord file
        pattern / list of shard paths for `source="tfrecord"`.
      info: the data set's `DatasetInfo` (its `label_lut` maps raw values to train ids).
      config: an `InputConfig`.
      include_raw_image: also yield RAW_IMAGE, the augmented image uint8 [B,S,S,3] (previews).
    """
    refs, num_examples = _examples(pairs, config)
    buffer = config.shuffle_buffer or num_examples
    ds = refs.shuffle(buffer, seed=config.seed, reshuffle_each_iteration=True)
    if config.repeat:
        ds = ds.repeat()
    # Numbering after shuffle+repeat makes every epoch's draw different yet fixed by the seed.
    ds = ds.enumerate()

    # Autograph is off for the map functions: every branch they take on a tensor is an
    # explicit tf.cond, and converting the ~20 functions they call cost seconds per
    # process (each training binary and test builds several pipelines).
    @tf.autograph.experimental.do_not_convert
    def parse(index, ref):
        image, label, _ = _read_example(ref, info, config.source)
        image, label = augment_lib.augment(
            image,
            label,
            element_seed(config.seed, index),
            config.crop_size,
            config.min_scale,
            config.max_scale,
            config.flip,
            config.pad_fill,
        )
        features = {
            common.IMAGE: normalize(image, config.input_mode),
            common.LABEL: tf.cast(label, tf.int32),
        }
        if include_raw_image:
            features[common.RAW_IMAGE] = tf.cast(
                tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8
            )
        return features

    ds = ds.map(parse, num_parallel_calls=config.num_parallel_calls)
    # Whole batches only: every replica gets batch_size / replicas images, and shapes
    # stay static for XLA.
    ds = ds.batch(config.batch_size, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(config, distributed=True))


def eval_dataset(pairs, info, config: InputConfig, batch_size: int = 1) -> tf.data.Dataset:
    """Build full-size eval batches: IMAGE, LABEL, RAW_IMAGE, FILENAME, HEIGHT, WIDTH.

    Shapes: IMAGE float32 [B,H,W,C], LABEL int32 [B,H,W], RAW_IMAGE uint8 [B,H,W,3],
    FILENAME string [B], HEIGHT and WIDTH int32 [B].
    One pass, in data-set order, no augmentation. With `batch_size > 1` images of
    different sizes are padded at the bottom/right to the largest of the batch (image 0,
    label 255); HEIGHT and WIDTH keep each image's own size.
    """
    refs, _ = _examples(pairs, config)

    @tf.autograph.experimental.do_not_convert  # as in train_dataset
    def parse(ref):
        image, label, filename = _read_example(ref, info, config.source)
        size = tf.shape(image)
        return {
            common.IMAGE: normalize(image, config.input_mode),
            common.LABEL: tf.cast(label, tf.int32),
            common.RAW_IMAGE: image,
            common.FILENAME: filename,
            common.HEIGHT: size[0],
            common.WIDTH: size[1],
        }

    ds = refs.map(parse, num_parallel_calls=config.num_parallel_calls)
    if batch_size == 1:
        ds = ds.batch(1)
    else:
        ds = ds.padded_batch(
            batch_size,
            padding_values={
                common.IMAGE: 0.0,
                common.LABEL: common.IGNORE_LABEL,
                common.RAW_IMAGE: tf.constant(0, tf.uint8),
                common.FILENAME: "",
                common.HEIGHT: 0,
                common.WIDTH: 0,
            },
        )
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(config))
