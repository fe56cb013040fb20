r"""Colorization pretraining (the paper's stage a, Larsson et al.): a grey backbone with a
hypercolumn head learns to predict hue/chroma histograms at random pixels. No labels.

Examples:
  python bin/pretrain_colorization.py --flagfile=flags/demo_colorization.flags \
      --workdir=work/demo_colorization
  python bin/pretrain_colorization.py \
      --flagfile=flags/camvid_cpu_colorization_pretrain.flags \
      --workdir=work/camvid_cpu_colorization

--split takes a comma-separated list (e.g. train,val): only images are read.
Outputs in --workdir: checkpoints/ (a rerun resumes; a rerun with a larger --steps
continues), tensorboard/train (losses, grey | true | predicted colour images),
backbone.weights.h5 (for --init of bin/train_mm.py and bin/train_seg.py with
--input_mode=grey) and summary.json.
"""

import flagdefs
from absl import app
from absl import flags

FLAGS = flags.FLAGS

flagdefs.define_data_flags()
flagdefs.define_input_flags()
flagdefs.define_loop_flags(steps=100000, log_every=20, checkpoint_every=1000,
                           image_every=1000)
# Colorization networks read grey input; the crop is the classic ImageNet one.
FLAGS.set_default("input_mode", "grey")
FLAGS.set_default("crop_size", 224)
flags.DEFINE_enum("backbone", "vgg16", ["vgg16", "alexnet"], "Backbone network.")
flags.DEFINE_float("width", 1.0, "Channel multiplier of backbone and head (1.0 = paper).")
flagdefs.require_positive("width")
flags.DEFINE_integer("num_chroma_bins", 32, "Chroma histogram bins.")
flags.DEFINE_integer("num_hue_bins", 32, "Hue histogram bins.")
flags.DEFINE_float("bin_sigma", 0.5, "Soft-encoding Gaussian width, in bin widths.")
flags.DEFINE_integer("bin_neighbours", 5, "Bins that carry soft-encoded target mass.")
flags.DEFINE_integer("points_per_image", 128, "Pixels sampled per image and step.")
flags.DEFINE_integer("hidden_units", 0, "Head hidden width; 0 = 1024 x width.")
flags.DEFINE_float("hue_weight", 5.0, "Weight lambda_H of the chroma-weighted hue loss.")
flagdefs.define_optimizer_flags()
flags.DEFINE_float("preview_temperature", 0.38,
                   "Annealed-mean temperature of the TensorBoard colour preview.")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    with flagdefs.training_errors_as_one_line(resume_dir=FLAGS.workdir):
        # Data first, without TensorFlow: a bad file fails in seconds, all listed at once.
        pairs, info = flagdefs.images_from_flags()
        info = flagdefs.check_data_from_flags(pairs, info)
        # Imported here so --help is instant and flag errors come before TensorFlow loads.
        from mm_tf.proxy import colorization  # pylint: disable=import-outside-toplevel
        config = colorization.ColorizationConfig(
            backbone=FLAGS.backbone, width=FLAGS.width,
            num_chroma_bins=FLAGS.num_chroma_bins, num_hue_bins=FLAGS.num_hue_bins,
            sigma=FLAGS.bin_sigma, neighbours=FLAGS.bin_neighbours,
            points_per_image=FLAGS.points_per_image, hidden_units=FLAGS.hidden_units or None,
            hue_weight=FLAGS.hue_weight, preview_temperature=FLAGS.preview_temperature,
            seed=FLAGS.seed, jit_compile=FLAGS.jit_compile,
            **flagdefs.optimizer_kwargs_from_flags())
        summary = colorization.run_colorization(
            FLAGS.workdir, pairs, info, flagdefs.input_config_from_flags(), config,
            flagdefs.loop_config_from_flags())
    print(f"colorization done: {summary['steps']} steps in {summary['seconds']:.1f}s; "
          f"backbone weights (grey input): {summary['backbone_weights']}")


if __name__ == "__main__":
    app.run(main)
