"""Predicts label maps for image files with one model or an ensemble.

--model (repeatable) is a SavedModel from bin/export.py or a bin/train_seg.py run folder
(e.g. a pipeline arm's seg/<arm>); several models are ensembled by averaging their class
probabilities. --inputs is a folder (searched recursively), a glob pattern or a list
file (one image path a line; relative to the list's folder; extra fields ignored).
Writes under --output_dir: labels/NAME.png (palette PNGs in the data set's colours),
overlays/NAME.png and, for Cityscapes models, submission/NAME.png (labelIds, the official
submission format). Images of different sizes are predicted in separate calls (grouped
by size, --batch_size per call).

  python bin/predict.py --model=work/export/mm --inputs=work/demo_data/JPEGImages \
      --output_dir=work/pred
  python bin/predict.py --model=work/demo/pipeline/seg/random+mm_graph \
      --model=work/export/other --inputs='photos/*.jpg' --output_dir=work/pred_ens
  python bin/predict.py --model=work/export/cityscapes \
      --inputs=data/cityscapes/leftImg8bit/test --output_dir=work/cs_test

--flip/--scales apply to run folders only (default: the options the run was evaluated
with); a SavedModel runs with the options baked in at export.
"""

import json
import os

import flagdefs
from absl import app
from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_multi_string("model", None, "SavedModel (bin/export.py) or bin/train_seg.py "
                          "run folder; repeat to ensemble.")
flags.DEFINE_string("inputs", None, "Image folder, glob pattern or list file.")
flags.DEFINE_string("output_dir", None, "Where labels/, overlays/, submission/ go.")
flags.DEFINE_integer("batch_size", 4, "Images (of one size) per network call.")
flags.DEFINE_bool("overlays", True, "Write colour overlays.")
flags.DEFINE_float("overlay_alpha", 0.5, "Weight of the label colours in the overlays.")
flags.DEFINE_enum("submission", "auto", ["auto", "yes", "no"],
                  "Cityscapes labelIds submission PNGs (auto: for Cityscapes models).")
flags.DEFINE_bool("flip", None, "Run folders: average with the flipped prediction.")
flags.DEFINE_list("scales", None, "Run folders: image scales whose probabilities are "
                  "averaged.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["model", "inputs", "output_dir"])


def main(argv):
    del argv
    # Imported here so --help is instant and flag errors come before TensorFlow loads.
    from mm_tf import predict
    from mm_tf.errors import ConfigError

    try:
        images = predict.list_inputs(FLAGS.inputs)
        scales = flagdefs.scales_from_flags()
        predictors = [predict.load_predictor(path, FLAGS.flip, scales) for path in FLAGS.model]
        model = predict.Ensemble(predictors)
        submission = {"auto": None, "yes": True, "no": False}[FLAGS.submission]
        manifest = predict.predict_files(
            model, images, FLAGS.output_dir, batch_size=FLAGS.batch_size,
            overlays=FLAGS.overlays, overlay_alpha=FLAGS.overlay_alpha,
            submission=submission, progress=FLAGS.progress)
    except ConfigError as e:
        flagdefs.fail(str(e))
    print(f"{manifest['num_images']} images, {len(predictors)} model(s) -> "
          f"{os.path.abspath(FLAGS.output_dir)}")
    print(json.dumps({"output_dir": os.path.abspath(FLAGS.output_dir),
                      "num_images": manifest["num_images"],
                      "outputs": manifest["outputs"]}))


if __name__ == "__main__":
    app.run(main)
