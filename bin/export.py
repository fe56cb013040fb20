"""Exports a trained segmentation model (bin/train_seg.py) as a TensorFlow SavedModel.

The SavedModel serves uint8 RGB images of any size (`serving_default`: images uint8
[batch, height, width, 3]) and encoded PNG/JPEG strings (`serve_bytes`: image_bytes
string [batch], mixed sizes allowed, padded outputs plus heights/widths), normalises
inside with the model's input mode, and returns `labels` int32 [b,h,w] and
`probabilities` float32 [b,h,w,K] at the input size. Left-right flip and multi-scale
averaging are baked in by flag; by default the options the run was evaluated with
(model_config.json) are used, as bin/evaluate.py does. Sliding windows are not exported.
Assets: class_names.txt, palette.txt, model_card.json (data set, classes, the run's mIoU,
training command and configuration). See mm_tf/export.py for the signatures.

  python bin/export.py --workdir=work/demo_seg --output_dir=work/demo_seg_export
  python bin/export.py --workdir=work/demo/pipeline/seg/random+mm_graph \
      --output_dir=work/export/mm --flip --scales=0.75,1.0,1.25
  python bin/export.py --weights=run/model.weights.h5 --model_config=run/model_config.json \
      --output_dir=work/export/run

Reload anywhere with plain TensorFlow:
  served = tf.saved_model.load("work/demo_seg_export")
  served.signatures["serving_default"](images=uint8_images)["labels"]
"""

import json
import os

import flagdefs
from absl import app
from absl import flags

FLAGS = flags.FLAGS

flagdefs.define_trained_model_flags()
flags.DEFINE_string("output_dir", None, "The SavedModel folder to write (replaced if it "
                    "holds an earlier export).")
flags.DEFINE_bool("flip", None, "Bake in left-right flip averaging; default: as evaluated.")
flags.DEFINE_list("scales", None, "Bake in these image scales; default: as evaluated.")
flags.mark_flag_as_required("output_dir")


def main(argv):
    del argv
    # Imported here so --help is instant and flag errors come before TensorFlow loads.
    from mm_tf import evaluation
    from mm_tf import export
    from mm_tf import segmenter
    from mm_tf.errors import ConfigError

    try:
        weights, config_path = flagdefs.trained_model_paths_from_flags()
        flagdefs.check_trained_weights_file(weights)
        network, model_config = segmenter.load_model(weights, config_path)
        recorded = model_config.get("inference", {})
        scales = flagdefs.scales_from_flags(
            tuple(float(s) for s in recorded.get("scales", [1.0])))
        flip = FLAGS.flip if FLAGS.flip is not None else recorded.get("flip", False)
        if recorded.get("window"):
            print(f"note: the run was evaluated with --window={recorded['window']}; the "
                  "export runs whole images (sliding windows are not exported)")
        inference = evaluation.InferenceConfig(flip=bool(flip), scales=scales)
        run_dir = FLAGS.workdir or os.path.dirname(os.path.abspath(config_path))
        card = export.export_saved_model(
            network, model_config, FLAGS.output_dir, inference, run_dir=run_dir,
            source={"weights": os.path.abspath(weights),
                    "model_config": os.path.abspath(config_path)})
    except ConfigError as e:
        flagdefs.fail(str(e))
    miou = (card.get("evaluation") or {}).get("miou")
    print(f"exported {card['dataset']} {card['model']['backbone']}/{card['model']['head']} "
          f"(flip={card['inference']['flip']}, scales={card['inference']['scales']}"
          + (f", run mIoU {100 * miou:.2f}%" if miou is not None else "")
          + f") to {os.path.abspath(FLAGS.output_dir)}")
    print(json.dumps({"output_dir": os.path.abspath(FLAGS.output_dir),
                      "signatures": sorted(card["signatures"])}))


if __name__ == "__main__":
    app.run(main)
