"""Flags shared by the mm-tf binaries, and their conversion into mm_tf configs.

Binaries call `define_*` at import time and the `*_from_flags` functions in `main()`;
nothing under `mm_tf/` reads flags.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import math
import os
import pathlib
import sys
from typing import Optional

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _KerasOptionalImports(importlib.abc.MetaPathFinder):
    """Makes Keras' own optional imports of scikit-learn and matplotlib fail as if they
    were not installed; everyone else's imports of them are untouched.

    Keras 3 imports scikit-learn (for `keras.wrappers`) and matplotlib.pyplot (for
    `keras.visualization`) whenever they are installed: 1.5 of the 4.7 s that
    `import tensorflow` takes here (python -X importtime), paid by every binary start.
    The binaries use neither Keras feature; they import both packages themselves where
    they need them (t-SNE, figures), and those imports come from mm_tf's modules.
    """

    _PACKAGES = ("sklearn", "matplotlib")

    def find_spec(self, fullname, path=None, target=None):  # pylint: disable=unused-argument
        """None (the normal search) unless Keras itself imports one of the packages."""
        if fullname.partition(".")[0] not in self._PACKAGES:
            return None
        frame = sys._getframe(1)  # pylint: disable=protected-access
        # Skip the import machinery's frames to the module whose import statement ran.
        while frame is not None and frame.f_globals.get("__name__", "").startswith(
                ("importlib", "_frozen_importlib")):
            frame = frame.f_back
        importer = frame.f_globals.get("__name__", "") if frame is not None else ""
        if importer == "keras" or importer.startswith("keras."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (not imported for "
                                      "Keras by the mm-tf binaries)", name=fullname)
        return None


sys.meta_path.insert(0, _KerasOptionalImports())

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS


def define_data_flags(split_default: str = "train") -> None:
    """--dataset, --data_dir, --split and the generic list-file options."""
    flags.DEFINE_string("dataset", "demo",
                        "voc | voc_aug | cityscapes | camvid | list | demo | images "
                        "(images without labels: proxy pre-training only)")
    flags.DEFINE_string("data_dir", "work/demo_data",
                        "Data set root. For --dataset=demo it is generated there if missing.")
    flags.DEFINE_string("split", split_default, "Split to read (train, val, ...).")
    flags.DEFINE_string("list_file", None, "--dataset=list: the IMAGE LABEL list file.")
    flags.DEFINE_integer("num_classes", None, "--dataset=list: number of classes.")
    flags.DEFINE_integer("ignore_label", None, "--dataset=list: raw ignore value.")
    flags.DEFINE_string("tfrecord_pattern", None,
                        "Read sharded TFRecords (bin/make_tfrecords.py) instead of files.")
    define_data_check_flags()


def define_data_check_flags() -> None:
    """--check_data (the pre-flight check of the listed files) and --unknown_labels."""
    flags.DEFINE_enum("check_data", "quick", ["quick", "full", "off"],
                      "Before the first step: quick = every listed file exists, is a "
                      "complete PNG/JPEG whose header decodes, labels are grey/palette "
                      "PNGs of their image's size (headers only); full = also decode "
                      "every pixel and check the label values (bin/check_dataset.py's "
                      "check); off = none (the input pipeline still stops at a bad file, "
                      "naming it). Every problem is listed, then one error line.")
    flags.DEFINE_enum("unknown_labels", "error", ["error", "ignore"],
                      "Label values outside the data set's classes, ignore value and "
                      "known void ids: error (a bad file, named with its values) or "
                      "ignore (void: such pixels are not trained or scored).")


def _finite_at_least(low: float, strict: bool):
    """A flag validator: the value is a finite number > low (strict) or >= low."""
    return lambda v: (v is not None and math.isfinite(v)
                      and (v > low if strict else v >= low))


def require_positive(name: str) -> None:
    """Registers a parse-time check that the float flag `name` is finite and > 0, so a
    bad value stops the binary with absl's one-line flag error before TensorFlow loads."""
    flags.register_validator(name, _finite_at_least(0.0, strict=True),
                             message="expected a finite number > 0")


def require_nonnegative(name: str) -> None:
    """Registers a parse-time check that the float flag `name` is finite and >= 0 (absl's
    one-line flag error before TensorFlow loads)."""
    flags.register_validator(name, _finite_at_least(0.0, strict=False),
                             message="expected a finite number >= 0")


def define_input_flags() -> None:
    """Training input pipeline flags (defaults: the paper's M&M settings)."""
    flags.DEFINE_integer("batch_size", 16, "Images per step, global: split among the "
                         "replicas of --strategy (it must divide by their number).",
                         lower_bound=1)
    flags.DEFINE_integer("crop_size", 512, "Square training crop.", lower_bound=1)
    flags.DEFINE_float("min_scale", 0.5, "Random scale lower bound.")
    flags.DEFINE_float("max_scale", 2.0, "Random scale upper bound.")
    require_positive("min_scale")
    flags.register_multi_flags_validator(
        ["min_scale", "max_scale"],
        lambda f: f["max_scale"] is not None and math.isfinite(f["max_scale"])
        and f["min_scale"] <= f["max_scale"],
        message="expected --min_scale <= --max_scale (a random scale is drawn between them)")
    flags.DEFINE_enum("input_mode", "rgb", ["rgb", "grey"],
                      "rgb (mean-subtracted) or grey (colorization models' input).")


def define_loop_flags(steps: int, log_every: int = 20, checkpoint_every: int = 200,
                      image_every: int = 500) -> None:
    """Run length, logging and checkpoint cadence, seed, work folder, XLA."""
    flags.DEFINE_string("workdir", None, "Run folder (checkpoints, TensorBoard, outputs).")
    flags.DEFINE_integer("steps", steps, "Optimizer steps.", lower_bound=1)
    flags.DEFINE_integer("log_every", log_every, "Steps per logging window.", lower_bound=1)
    flags.DEFINE_integer("checkpoint_every", checkpoint_every, "Steps between checkpoints "
                         "(a multiple of --log_every; 0 = only at the end).")
    flags.DEFINE_integer("image_every", image_every, "Steps between image summaries (a "
                         "multiple of --log_every; 0 = none).")
    # training.LoopConfig's rule, checked here too: the error comes before TensorFlow loads.
    for name in ("checkpoint_every", "image_every"):
        flags.register_multi_flags_validator(
            [name, "log_every"],
            lambda f, name=name: (f[name] is not None and f[name] >= 0 and bool(f["log_every"])
                                  and f[name] % f["log_every"] == 0),
            message=f"expected --{name} a non-negative multiple of --log_every")
    flags.DEFINE_integer("seed", 0, "Base seed of data order and stateless randomness.",
                         lower_bound=0, upper_bound=2**31 - 1)
    flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
    flags.DEFINE_integer("verbose", 2, "Keras fit verbosity (0, 1, 2).")


# MixConfig's fields and the flags of define_mix_flags that set them (before the prefix).
MIX_FLAGS = {"patches_per_image": "patches_per_image", "patch_size": "patch_size",
             "min_side": "min_patch", "max_side": "max_patch",
             "background_fraction": "background_fraction",
             "background_class": "background_class", "class_balanced": "class_balanced",
             "oversample": "oversample", "max_overlap": "max_overlap"}


def define_mix_flags(prefix: str = "", what: str = "Patches") -> None:
    """The mix step's flags (mm_tf.mix.MixConfig; defaults: the release's), named
    `{prefix}patches_per_image` etc., checked at parse time so that a bad value stops the
    binary with absl's one-line flag error naming the flag, before TensorFlow loads."""
    name = {field: prefix + flag for field, flag in MIX_FLAGS.items()}
    flags.DEFINE_integer(name["patches_per_image"], 9,
                         f"{what} per image (release 9, paper 10).", lower_bound=1)
    flags.DEFINE_integer(name["patch_size"], 128, f"Side the {what.lower()} are resized to.",
                         lower_bound=1)
    flags.DEFINE_integer(name["min_side"], 64, "Smallest sampled patch side (even).")
    flags.DEFINE_integer(name["max_side"], 256, "Largest sampled patch side (even).")
    flags.DEFINE_float(name["background_fraction"], 0.1,
                       "Share of patches centred on background.")
    flags.DEFINE_integer(name["background_class"], None, "Background class id; default: "
                         "the data set's (VOC 0, else none).", lower_bound=0, upper_bound=254)
    flags.DEFINE_bool(name["class_balanced"], False,
                      "Pick a present class uniformly, then a pixel.")
    flags.DEFINE_integer(name["oversample"], 5, "Candidate over-sampling before "
                         "de-duplication.", lower_bound=1)
    flags.DEFINE_float(name["max_overlap"], 0.6,
                       "Skip a candidate covered more than this by kept ones.")
    flags.register_validator(name["min_side"], lambda v: v is not None and v >= 2 and v % 2 == 0,
                             message="expected an even integer >= 2")
    flags.register_multi_flags_validator(
        [name["min_side"], name["max_side"]],
        lambda f: (f[name["max_side"]] is not None and f[name["max_side"]] % 2 == 0
                   and f[name["max_side"]] >= (f[name["min_side"]] or 0)),
        message=f"expected an even --{name['max_side']} >= --{name['min_side']}")
    for field in ("background_fraction", "max_overlap"):
        flags.register_validator(name[field], lambda v: v is not None and 0.0 <= v <= 1.0,
                                 message="expected a fraction in [0, 1]")


def mix_config_from_flags(default_background: Optional[int], prefix: str = ""):
    """MixConfig from define_mix_flags(prefix)'s flags; the background class defaults to
    `default_background` (the data set's)."""
    from mm_tf import mix  # pylint: disable=import-outside-toplevel
    kwargs = {field: FLAGS[prefix + flag].value for field, flag in MIX_FLAGS.items()}
    if kwargs["background_class"] is None:
        kwargs["background_class"] = default_background
    return mix.MixConfig(**kwargs)


def define_probe_flags() -> None:
    """The online probe of M&M tuning (mm_tf/probe.py); off unless --probe_every > 0."""
    flags.DEFINE_integer("probe_every", 0, "Steps between probes of the features (k-NN "
                         "accuracy and collapse measures on fixed patch banks), a multiple "
                         "of --log_every; 0 = off.")
    flags.DEFINE_string("probe_split", "val", "Held-out split of the probe's second bank.")
    flags.DEFINE_integer("probe_images", 64, "Crops sampled per split for the probe banks "
                         "(each gives --patches_per_image patches).")
    flags.DEFINE_integer("probe_seed", 0, "Seed of the probe banks (independent of --seed).")
    flags.DEFINE_integer("probe_k", 5, "Neighbours of the probe's k-NN accuracies.")
    flags.DEFINE_bool("keep_best_probe", False, "Write the backbone of the step with the "
                      "best probe/knn_val as backbone.weights.h5 (the last step's as "
                      "backbone_last.weights.h5). Model selection on --probe_split.")


def probe_config_from_flags():
    """ProbeConfig from the probe flags."""
    from mm_tf import probe  # pylint: disable=import-outside-toplevel
    return probe.ProbeConfig(every=FLAGS.probe_every, split=FLAGS.probe_split,
                             images=FLAGS.probe_images, seed=FLAGS.probe_seed,
                             k=FLAGS.probe_k, keep_best=FLAGS.keep_best_probe)


def define_optimizer_flags(lr_boundaries=(), boundary_unit: str = "Steps",
                           decay_on: str = "conv kernels") -> None:
    """SGD with momentum, a step schedule and coupled L2 decay (defaults: the paper's)."""
    flags.DEFINE_float("learning_rate", 0.01, "Base learning rate.")
    flags.DEFINE_list("lr_boundaries", [str(b) for b in lr_boundaries],
                      f"{boundary_unit} where the lr is multiplied by lr_decay.")
    flags.DEFINE_float("lr_decay", 0.1, "Learning-rate step factor.")
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
    flags.DEFINE_float("weight_decay", 5e-4, f"Coupled L2 weight decay on {decay_on}.")
    require_positive("learning_rate")
    require_positive("lr_decay")
    flags.register_validator("lr_boundaries", _increasing_steps,
                             message="expected increasing whole numbers >= 1")
    flags.register_validator("momentum", lambda m: m is not None and 0 <= m < 1,
                             message="expected a number in [0, 1)")
    flags.register_validator("weight_decay", _finite_at_least(0.0, strict=False),
                             message="expected a finite number >= 0")


def _increasing_steps(values) -> bool:
    """True when every value is a whole number >= 1 and each exceeds the one before."""
    try:
        steps = [int(v) for v in values]
    except (TypeError, ValueError):
        return False
    return all(b >= 1 for b in steps) and all(a < b for a, b in zip(steps, steps[1:]))


def optimizer_kwargs_from_flags() -> dict:
    """The optimizer flags as keyword arguments of the stages' config dataclasses."""
    boundaries = tuple(int(b) for b in FLAGS.lr_boundaries)  # checked at parse time
    return dict(learning_rate=FLAGS.learning_rate, lr_boundaries=boundaries,
                lr_decay=FLAGS.lr_decay, momentum=FLAGS.momentum,
                weight_decay=FLAGS.weight_decay)


def define_distribution_flags() -> None:
    """Strategy, logical CPU devices and numeric precision (see docs/distributed.md)."""
    flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                      "default: one device. mirrored: one replica per local GPU (or per "
                      "logical CPU device, --num_cpu_devices). multi_worker: replicas on "
                      "every machine listed in the TF_CONFIG environment variable. "
                      "--batch_size stays the global batch, split among the replicas.")
    flags.DEFINE_integer("num_cpu_devices", 0,
                         "With --strategy=mirrored on a machine without GPU: split the CPU "
                         "into this many logical devices, one replica each (tests, "
                         "benchmarks). 0 = one CPU device.")
    flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
                      "Keras dtype policy: layers compute in 16 bits with float32 "
                      "variables; distances and losses stay float32. mixed_float16 adds "
                      "dynamic loss scaling.")


def define_trained_model_flags() -> None:
    """--workdir of a bin/train_seg.py run, or --weights and --model_config."""
    flags.DEFINE_string("workdir", None, "A bin/train_seg.py run folder (e.g. a pipeline "
                        "arm's seg/<arm> folder).")
    flags.DEFINE_string("weights", None, "Model weights (.weights.h5); default: --workdir's.")
    flags.DEFINE_string("model_config", None, "model_config.json; default: --workdir's.")


def trained_model_paths_from_flags():
    """(weights path, model config path) from --weights/--model_config or --workdir, both
    files checked to exist (TensorFlow-free: call it before TensorFlow loads).
    Raises mm_tf.errors.ConfigError when neither names a model or a file is missing."""
    # pylint: disable=import-outside-toplevel
    from mm_tf import common
    from mm_tf.errors import ConfigError
    weights, config = FLAGS.weights, FLAGS.model_config
    if FLAGS.workdir:
        weights = weights or os.path.join(FLAGS.workdir, common.MODEL_WEIGHTS)
        config = config or os.path.join(FLAGS.workdir, common.MODEL_CONFIG)
    if not (weights and config):
        raise ConfigError("give --workdir of a bin/train_seg.py run, or both --weights and "
                          "--model_config")
    for path in (config, weights):
        if not os.path.isfile(path):
            raise ConfigError(f"{path} does not exist (a bin/train_seg.py run's --workdir "
                              f"holds {common.MODEL_CONFIG} and {common.MODEL_WEIGHTS}; or "
                              "give --weights and --model_config)")
    return weights, config


def check_init_file() -> None:
    """Raises mm_tf.errors.ConfigError naming --init unless it is 'random' or an existing
    file (TensorFlow-free: the training binaries call it before TensorFlow loads; the
    file's format is checked when it is loaded)."""
    from mm_tf.errors import ConfigError  # pylint: disable=import-outside-toplevel
    if FLAGS.init != "random" and not os.path.isfile(FLAGS.init):
        raise ConfigError(f"--init={FLAGS.init}: no such weights file (expected 'random' "
                          "or a backbone .weights.h5/.npz file)")


def check_trained_weights_file(weights: str) -> None:
    """Raises mm_tf.errors.ConfigError (naming `weights`) unless it is a readable Keras
    weights file (loads TensorFlow)."""
    # pylint: disable=import-outside-toplevel
    from mm_tf.errors import ConfigError
    from mm_tf.models import weights as weights_lib
    try:
        weights_lib.check_weights_file(weights)
    except weights_lib.WeightsFileError as e:
        raise ConfigError(str(e)) from None


def scales_from_flags(default=None):
    """--scales as a tuple of positive floats, or `default` when the flag is unset.
    Raises mm_tf.errors.ConfigError naming the flag."""
    from mm_tf.errors import ConfigError  # pylint: disable=import-outside-toplevel
    if FLAGS.scales is None:
        return default
    try:
        scales = tuple(float(s) for s in FLAGS.scales)
    except ValueError as e:
        raise ConfigError(f"--scales={','.join(FLAGS.scales)}: {e}") from None
    if not scales or min(scales) <= 0:
        raise ConfigError(f"--scales must be positive numbers, got {list(scales)}")
    return scales


def strategy_from_flags():
    """The flagged tf.distribute strategy. Call it first in main(): logical CPU devices
    and the multi-worker runtime must be set up before TensorFlow runs any op.
    Raises mm_tf.errors.ConfigError naming the flag."""
    from mm_tf import distribute  # pylint: disable=import-outside-toplevel
    return distribute.make_strategy(FLAGS.strategy, FLAGS.num_cpu_devices)


def _make_missing_demo_data() -> None:
    """Generates the demo data set in --data_dir when --dataset=demo and none is there."""
    if FLAGS.dataset == "demo" and not os.path.isfile(
            os.path.join(FLAGS.data_dir, "dataset.json")):
        # Only a missing demo set is generated; one made with other sizes is kept.
        from mm_tf.data import synthetic  # pylint: disable=import-outside-toplevel
        synthetic.generate_demo_dataset(FLAGS.data_dir)


def dataset_from_flags(split=None):
    """Reads the flagged data set (--split, or `split`): (pairs, info); generates the demo
    data if needed."""
    from mm_tf.data import datasets  # pylint: disable=import-outside-toplevel
    _make_missing_demo_data()
    return datasets.read_dataset(FLAGS.dataset, FLAGS.data_dir, split or FLAGS.split,
                                 list_file=FLAGS.list_file, num_classes=FLAGS.num_classes,
                                 ignore_label=FLAGS.ignore_label)


def images_from_flags():
    """The images of every split in --split (comma-separated) for proxy tasks, which never
    read labels: (pairs, info); generates the demo data if needed."""
    from mm_tf import proxy  # pylint: disable=import-outside-toplevel
    _make_missing_demo_data()
    return proxy.read_image_pairs(FLAGS.dataset, FLAGS.data_dir, FLAGS.split,
                                  list_file=FLAGS.list_file, num_classes=FLAGS.num_classes,
                                  ignore_label=FLAGS.ignore_label)


# (pairs, info) of every check_data_from_flags call, for naming the file behind a
# decoder error that TensorFlow reports without it (see training_errors_as_one_line).
_CHECKED_DATA = []


def check_data_from_flags(pairs, info, recorded_unknown_labels: Optional[str] = None):
    """The --check_data pre-flight check of `pairs` (TensorFlow-free: call it before the
    strategy, so a bad file fails in seconds) with `info` under --unknown_labels (or, when
    that flag is not given, `recorded_unknown_labels` if set: a trained run's); returns
    that info. Raises mm_tf.data.errors.DataCheckError listing every problem."""
    # pylint: disable=import-outside-toplevel
    import dataclasses
    import time
    from mm_tf.data import datasets
    from mm_tf.data.errors import DataCheckError
    unknown_labels = FLAGS.unknown_labels
    if recorded_unknown_labels and not FLAGS["unknown_labels"].present:
        unknown_labels = recorded_unknown_labels
    info = dataclasses.replace(info, unknown_labels=unknown_labels)
    _CHECKED_DATA.append((pairs, info))
    # TFRecords hold copies, checked when they were written (bin/make_tfrecords.py).
    if FLAGS.check_data == "off" or getattr(FLAGS, "tfrecord_pattern", None):
        return info
    started = time.perf_counter()
    problems = datasets.check_files(pairs, info, FLAGS.check_data)
    if problems:
        raise DataCheckError(problems)
    print(f"data check ({FLAGS.check_data}): {len(set(map(tuple, pairs)))} pairs good in "
          f"{time.perf_counter() - started:.2f} s", flush=True)
    return info


def input_config_from_flags(**overrides):
    """InputConfig from the input flags (plus the seed and TFRecord source)."""
    from mm_tf.data import pipeline  # pylint: disable=import-outside-toplevel
    kwargs = dict(crop_size=FLAGS.crop_size, batch_size=FLAGS.batch_size,
                  min_scale=FLAGS.min_scale, max_scale=FLAGS.max_scale,
                  input_mode=FLAGS.input_mode, seed=FLAGS.seed)
    if FLAGS.tfrecord_pattern:
        kwargs.update(source="tfrecord", tfrecord_pattern=FLAGS.tfrecord_pattern)
    kwargs.update(overrides)
    return pipeline.InputConfig(**kwargs)


def loop_config_from_flags():
    """LoopConfig from the loop flags."""
    from mm_tf import training  # pylint: disable=import-outside-toplevel
    return training.LoopConfig(steps=FLAGS.steps, log_every=FLAGS.log_every,
                               checkpoint_every=FLAGS.checkpoint_every,
                               image_every=FLAGS.image_every, verbose=FLAGS.verbose)


def _data_error_line(error: Exception, resume_dir: Optional[str]) -> Optional[str]:
    """The one line of a failure of the input pipeline (None for other errors), naming
    the file (found by a full check when TensorFlow's message does not) and the newest
    checkpoint of `resume_dir`, which the failure left as it was."""
    # pylint: disable=import-outside-toplevel
    if "tensorflow" not in sys.modules:  # No TensorFlow, no TensorFlow error.
        return None
    import tensorflow as tf
    from mm_tf.data import datasets, pipeline
    line = pipeline.data_error_message(error)
    if line is None:
        return None
    if line.startswith(pipeline.UNNAMED_DATA_ERROR):
        print(f"{line}\nlooking for the file with --check_data=full ...", file=sys.stderr)
        found = [problem for pairs, info in _CHECKED_DATA
                 for problem in datasets.check_files(pairs, info, "full")]
        line = found[0] if found else line + " (a full check of the files finds no problem)"
    latest = resume_dir and tf.train.latest_checkpoint(os.path.join(resume_dir, "checkpoints"))
    if latest:
        line += (f" [newest checkpoint kept: {latest}; fix the file and rerun the same "
                 "command to resume from it]")
    return line


@contextlib.contextmanager
def training_errors_as_one_line(resume_dir: Optional[str] = None):
    """Turns what a user of a binary can fix — bad data (each problem of a pre-flight
    check on its own line first), flags or weights, a file the input pipeline cannot
    read, a diverged run — into one `error:` line and exit 2 instead of a traceback.
    `resume_dir`: the run folder whose newest checkpoint a data failure names."""
    # pylint: disable=import-outside-toplevel
    from mm_tf.data.errors import DataCheckError, DatasetError
    from mm_tf.errors import CheckpointError, ConfigError
    if resume_dir:
        check_workdir(resume_dir)
    try:
        yield
    except DataCheckError as e:
        fail(str(e), e.problems)
    except (DatasetError, ConfigError, CheckpointError) as e:
        fail(str(e))
    except Exception as e:  # pylint: disable=broad-except
        # Looked up, not imported: importing these modules loads TensorFlow, and an
        # exception of a module not imported yet cannot have been raised.
        for module, name in (("mm_tf.models.weights", "WeightsMismatchError"),
                             ("mm_tf.training", "TrainingDivergedError")):
            if module in sys.modules and isinstance(e, getattr(sys.modules[module], name)):
                fail(str(e))
        line = _data_error_line(e, resume_dir) or _workdir_error_line(e, resume_dir)
        if line is None:
            raise
        fail(line)


def check_workdir(workdir: str) -> None:
    """Exits with one error line when `workdir`, or the nearest of its ancestors that
    exists, is a file: a run folder could not be made there."""
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):  # its nearest existing ancestor; '/' exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(f"--workdir={workdir}: {existing} is a file, not a folder (expected a run "
             "folder to resume, or a new path)")


def _workdir_error_line(error: Exception, workdir: Optional[str]) -> Optional[str]:
    """The one line of an OSError on a path inside `workdir` (a folder that cannot be
    made or written, a full disk), None for any other error."""
    if not (workdir and isinstance(error, OSError) and error.filename):
        return None
    root = os.path.abspath(workdir)
    path = os.path.abspath(os.fsdecode(error.filename))
    if os.path.commonpath([root, path]) != root:
        return None
    return f"--workdir={workdir}: cannot write {path}: {error.strerror or error}"


MAX_PROBLEMS_SHOWN = 50


def fail(message: str, problems=()) -> None:
    """Prints `problems`, when there are several, one a line (up to MAX_PROBLEMS_SHOWN;
    a single one is the message), then a one-line error for the user, and exits 2."""
    problems = problems if len(problems) > 1 else ()
    for problem in problems[:MAX_PROBLEMS_SHOWN]:
        print(f"  {problem}", file=sys.stderr)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        print(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more (bin/check_dataset.py "
              "--json lists them all)", file=sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    if "tensorflow" in sys.modules:
        # Not through the interpreter's teardown: after an input pipeline failed mid-run,
        # its last garbage collection can deadlock destroying a tf.data map iterator
        # (MapAndBatchDatasetOp ~Iterator waits for a call that never ends; 1 run in 8
        # of tests/train_mm_test.py's damaged-file case, gdb). Checkpoints and weights
        # are written atomically and TensorBoard events flushed as each summary block
        # closes (`as_default`), so only the streams need flushing.
        from absl import logging  # pylint: disable=import-outside-toplevel
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(2)
