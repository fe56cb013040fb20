"""Draws the figures of a finished bin/pipeline.py work folder into <workdir>/figures/
and embeds them in its report.md: t-SNE of train and val patch features (the online
probe's banks, titled with their 5-NN accuracies) before vs after M&M, the
images where naive and M&M predictions differ most, Grad-CAM of both segmentation
networks, and (with reports of several graph sizes) the graph-size study; also writes a
TensorBoard projector log dir <workdir>/projector (before_mm, after_mm embeddings).

  python bin/figures.py --workdir=work/demo/pipeline
  tensorboard --logdir=work/demo/pipeline/projector      # tab "Projector"

Graph-size study: one pipeline per M&M batch size (nodes = batch x patches per image),
each with an M&M flagfile that includes the base one and overrides --batch_size:

  printf -- '--flagfile=flags/demo_mm.flags\\n--batch_size=4\\n' > /tmp/mm_b4.flags
  python bin/pipeline.py --flagfile=flags/demo.flags --arms=random+mm \\
      --mm_flagfile=/tmp/mm_b4.flags --workdir=work/graph/b4
  ... (b8, b16 likewise), then
  python bin/figures.py --workdir=work/demo/pipeline \\
      --graph_workdirs=work/graph/b4,work/graph/b8,work/graph/b16
"""

import json

import flagdefs
from absl import app
from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "A finished bin/pipeline.py folder (report.json).")
flags.DEFINE_string("mm_arm", None, "M&M arm to show (default: the first <init>+mm arm).")
flags.DEFINE_integer("max_images", 0, "Val images predicted for the grid (0 = all).")
flags.DEFINE_integer("rows", 4, "Images in the qualitative grid and Grad-CAM figure.")
flags.DEFINE_integer("max_patches", 600, "Patches per split (train, val) in the t-SNE and "
                     "the projector (val), in whole crops.")
flags.DEFINE_string("train_split", "train", "Split of the train patch bank.")
flags.DEFINE_integer("seed", 0, "Seed of the patch banks and t-SNE.")
flags.DEFINE_float("perplexity", 30.0, "t-SNE perplexity.")
flags.DEFINE_string("gradcam_class", None, "Class name for Grad-CAM (default: the "
                    "non-background class with most pixels in the shown images).")
flags.DEFINE_string("gradcam_layer", None, "Backbone layer for Grad-CAM (default: the "
                    "last ReLU before pool5, e.g. conv5_3_relu).")
flags.DEFINE_bool("projector", True, "Also write <workdir>/projector.")
flags.DEFINE_list("graph_workdirs", [], "Pipeline folders of other M&M batch sizes for "
                  "the graph-size study.")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    # Imported here so --help is instant and flag errors come before TensorFlow loads.
    from mm_tf.data.errors import DatasetError
    from mm_tf.errors import ConfigError
    from mm_tf.models.weights import WeightsMismatchError
    from mm_tf.viz import pipeline_figures

    config = pipeline_figures.FigureConfig(
        mm_arm=FLAGS.mm_arm, max_images=FLAGS.max_images, rows=FLAGS.rows,
        max_patches=FLAGS.max_patches, seed=FLAGS.seed, perplexity=FLAGS.perplexity,
        gradcam_class=FLAGS.gradcam_class, gradcam_layer=FLAGS.gradcam_layer,
        projector=FLAGS.projector, train_split=FLAGS.train_split,
        graph_workdirs=tuple(FLAGS.graph_workdirs))
    try:
        manifest = pipeline_figures.make_figures(FLAGS.workdir, config)
    except (ConfigError, DatasetError, WeightsMismatchError) as e:
        flagdefs.fail(str(e))
    print(f"report: {FLAGS.workdir}/report.md embeds {', '.join(manifest['embedded'])}")
    print(json.dumps({key: manifest[key] for key in ("naive_arm", "mm_arm", "embedded")}))


if __name__ == "__main__":
    app.run(main)
