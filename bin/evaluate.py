"""Evaluates a trained segmentation model (bin/train_seg.py) on a split: mIoU, per-class
IoU, pixel accuracy and the confusion matrix; optionally writes palette PNG predictions.

The model comes from --workdir (its model.weights.h5 and model_config.json) or from
--weights + --model_config; the data set, folder and split default to the ones recorded
in model_config.json, and so do --flip, --scales, --window and --stride (the options the
run was evaluated with after training), so with no option it reproduces the mIoU of the
run's summary.json exactly. Examples:
  python bin/evaluate.py --workdir=work/demo_seg
  python bin/evaluate.py --workdir=work/voc_seg --flip --scales=0.75,1.0,1.25 --json
  python bin/evaluate.py --workdir=work/cs_seg --window=512 --predictions_dir=work/cs_pred

With --json the last line of stdout is one JSON object: miou, per_class_iou (by class
name), pixel_acc, mean_acc, confusion_matrix, num_images.
"""

import json
import os

import flagdefs
from absl import app
from absl import flags

FLAGS = flags.FLAGS

flagdefs.define_trained_model_flags()
flags.DEFINE_string("dataset", None, "Data set reader; default: the model config's.")
flags.DEFINE_string("data_dir", None, "Data set root; default: the model config's.")
flags.DEFINE_string("split", None, "Split to evaluate; default: the model config's (val).")
flags.DEFINE_string("list_file", None, "--dataset=list: the IMAGE LABEL list to evaluate.")
# Test-time options default to the ones the run was evaluated with (model_config.json).
flags.DEFINE_bool("flip", None, "Average with the left-right flipped prediction.")
flags.DEFINE_list("scales", None, "Image scales whose probabilities are averaged.")
flags.DEFINE_integer("window", None, "Sliding-window side (0 = whole image in one pass).")
flags.DEFINE_integer("stride", None, "Sliding-window stride (0 = 2/3 of the window).")
flags.DEFINE_integer("max_images", 0, "Evaluate only the first N images (0 = all).")
flags.DEFINE_string("predictions_dir", None,
                    "Write each prediction as a palette PNG named after its image.")
flags.DEFINE_bool("json", False, "Print the scores as one JSON object on the last line.")
flagdefs.define_data_check_flags()


def _inference_config(recorded):
    """InferenceConfig from the flags, each unset one taken from `recorded` (the run's)."""
    from mm_tf import evaluation  # pylint: disable=import-outside-toplevel
    from mm_tf.errors import ConfigError  # pylint: disable=import-outside-toplevel
    default = evaluation.InferenceConfig()
    scales = flagdefs.scales_from_flags(
        tuple(float(s) for s in recorded.get("scales", default.scales)))
    config = evaluation.InferenceConfig(
        flip=bool(FLAGS.flip if FLAGS.flip is not None else recorded.get("flip", False)),
        scales=scales,
        window=int(FLAGS.window if FLAGS.window is not None else recorded.get("window", 0)),
        stride=int(FLAGS.stride if FLAGS.stride is not None else recorded.get("stride", 0)))
    if config.window < 0 or config.stride < 0:
        raise ConfigError("--window and --stride must be >= 0")
    return config


def _print_table(scores, split):
    """Human-readable per-class IoU table."""
    print(f"{split}: mIoU {100 * scores['miou']:.2f}  pixel acc "
          f"{100 * scores['pixel_acc']:.2f}  mean acc {100 * scores['mean_acc']:.2f}  "
          f"({scores['num_images']} images)")
    for name, iou in scores["per_class_iou"].items():
        print(f"  {name:>16s}  {'absent' if iou is None else f'{100 * iou:6.2f}'}")


def main(argv):
    del argv
    with flagdefs.training_errors_as_one_line():
        # Files, data and the data check first, without TensorFlow: a bad path or flag
        # fails in a fraction of a second.
        from mm_tf.data import datasets  # pylint: disable=import-outside-toplevel
        from mm_tf.errors import ConfigError  # pylint: disable=import-outside-toplevel
        weights, config_path = flagdefs.trained_model_paths_from_flags()
        flagdefs.scales_from_flags()  # checked now, used by _inference_config
        try:
            with open(config_path) as f:
                model_config = json.load(f)
            recorded = model_config.get("data", {})
            dataset = FLAGS.dataset or recorded.get("dataset") or model_config["dataset"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{config_path}: not a valid model config ({e})") from e
        data_dir = FLAGS.data_dir or recorded.get("data_dir")
        split = FLAGS.split or recorded.get("split") or "val"
        if not data_dir:
            raise ConfigError("--data_dir: the model config records no data folder; give one")
        list_file = FLAGS.list_file or (recorded.get("list_file") if not FLAGS.split else None)
        pairs, info = datasets.read_dataset(
            dataset, data_dir, split, list_file=list_file,
            num_classes=recorded.get("num_classes") if dataset == "list" else None,
            ignore_label=recorded.get("ignore_label") if dataset == "list" else None)
        if info.num_classes != model_config.get("num_classes"):
            raise ConfigError(f"--dataset={dataset} has {info.num_classes} classes, the model "
                              f"{model_config.get('num_classes')}")
        if FLAGS.max_images:
            pairs = pairs[:FLAGS.max_images]
        info = flagdefs.check_data_from_flags(pairs, info, recorded.get("unknown_labels"))

        # pylint: disable=import-outside-toplevel
        from mm_tf import common
        from mm_tf import evaluation
        from mm_tf import segmenter
        from mm_tf.data import pipeline
        import numpy as np
        from PIL import Image
        flagdefs.check_trained_weights_file(weights)
        network, model_config = segmenter.load_model(weights, config_path)
        inference = _inference_config(model_config.get("inference", {}))

        on_prediction = None
        if FLAGS.predictions_dir:
            os.makedirs(FLAGS.predictions_dir, exist_ok=True)
            # PIL palettes have 256 entries; unused ones stay black.
            palette = np.zeros((256, 3), np.uint8)
            palette[:info.num_classes] = np.asarray(model_config["palette"], np.uint8)

            def on_prediction(batch, prediction):
                name = os.path.basename(batch[common.FILENAME][0].numpy().decode())
                image = Image.fromarray(prediction.astype(np.uint8))  # mode L ...
                image.putpalette(palette.reshape(-1).tolist())  # ... becomes P, indices kept
                image.save(os.path.join(FLAGS.predictions_dir,
                                        os.path.splitext(name)[0] + ".png"))

        eval_input = pipeline.InputConfig(input_mode=model_config["input_mode"])
        scores = evaluation.Evaluator(pipeline.eval_dataset(pairs, info, eval_input),
                                      info.num_classes, model_config["class_names"],
                                      inference, on_prediction).run(network)
    if FLAGS.json:
        keys = ("miou", "per_class_iou", "pixel_acc", "mean_acc", "confusion_matrix",
                "num_images")
        result = {key: scores[key] for key in keys}
        result.update(dataset=dataset, split=split)
        print(json.dumps(result))
    else:
        _print_table(scores, split)
        if FLAGS.predictions_dir:
            print(f"predictions: {FLAGS.predictions_dir}")


if __name__ == "__main__":
    app.run(main)
