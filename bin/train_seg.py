"""Segmentation fine-tuning (the paper's stage c) and evaluation on the val split.

Defaults are the paper's/release's values (VGG-16 hypercolumn; lr 0.01 x0.1 at 24k and
36k of 40k updates; 6 images x iter_size 2 per update; 512x512 crops with mirroring, no
rescaling). --init takes an M&M run's backbone.weights.h5 (or the proxy task's weights,
or "random" for naive fine-tuning). Examples:
  python bin/train_seg.py --flagfile=flags/demo_seg.flags --workdir=work/demo_seg
  python bin/train_seg.py --flagfile=flags/voc_vgg16_random_seg.flags --workdir=work/voc_seg

Outputs in --workdir: checkpoints/ (a rerun resumes), tensorboard/{train,val},
model.weights.h5 + model_config.json (for bin/evaluate.py) and summary.json. Many GPUs
or machines: --strategy (--batch_size is then the global micro-batch), see
docs/distributed.md.
"""

import os

import flagdefs
from absl import app
from absl import flags

FLAGS = flags.FLAGS

flagdefs.define_data_flags()
flagdefs.define_input_flags()
flagdefs.define_loop_flags(steps=40000, log_every=20, checkpoint_every=1000, image_every=1000)
flagdefs.define_distribution_flags()
# The release's segmentation data layer: batch 6, 512x512 crops, mirroring, no rescaling.
FLAGS.set_default("batch_size", 6)
FLAGS.set_default("crop_size", 512)
FLAGS.set_default("min_scale", 1.0)
FLAGS.set_default("max_scale", 1.0)
flags.DEFINE_string("eval_split", "val", "Split evaluated after training.")
flags.DEFINE_string("eval_list_file", None,
                    "--dataset=list: the IMAGE LABEL list of the evaluation split.")
flags.DEFINE_enum("backbone", "vgg16", ["vgg16", "alexnet"], "Backbone network.")
flags.DEFINE_enum("head", "hypercolumn", ["hypercolumn", "fcn"],
                  "hypercolumn (VGG-16, the paper) or fcn (FCN-32s, the AlexNet setting).")
flags.DEFINE_float("width", 1.0, "Channel multiplier (1.0 = the paper's network).")
flagdefs.require_positive("width")
flags.DEFINE_string("init", "random",
                    "random (naive fine-tuning from scratch), or backbone weights: an M&M "
                    "run's backbone.weights.h5, or proxy-task weights (.weights.h5/.npz).")
flagdefs.define_optimizer_flags(lr_boundaries=[24000, 36000],
                                boundary_unit="Optimizer updates",
                                decay_on="conv/dense kernels")
flags.DEFINE_integer("warmup_steps", 0, "Linear learning-rate warm-up over the first "
                     "updates (0 = none, the paper).")
flags.DEFINE_float("backbone_lr_multiplier", 1.0, "Backbone learning rate relative to the "
                   "head's (Caffe lr_mult; 1.0 = one rate, the paper).")
flags.DEFINE_float("hypercolumn_data_scale", 1.0, "Factor on the raw input (mean-removed, "
                   "0-255) where the hypercolumn classifier reads it (1.0 = the release; "
                   "0.0125 brings its rms of ~80 to the other taps' unit scale).")
flags.DEFINE_float("aux_mm_weight", 0.0, "Weight of an auxiliary M&M loss during fine-"
                   "tuning: SupCon over the pool5 features of patches mixed from each "
                   "micro-batch (0 = none, the paper; beyond it).")
flagdefs.require_nonnegative("aux_mm_weight")
flags.DEFINE_float("aux_mm_temperature", 0.1, "Temperature of the auxiliary SupCon loss.")
flagdefs.require_positive("aux_mm_temperature")
flagdefs.define_mix_flags(prefix="aux_mm_", what="Auxiliary patches")
flags.DEFINE_integer("iter_size", 2,
                     "Micro-batches of --batch_size images per optimizer update (Caffe's "
                     "iter_size; gradients averaged). --steps counts updates.")
flags.DEFINE_enum("class_weighting", "none", ["none", "median_frequency"],
                  "Cross-entropy class weights (median frequency from the train labels).")
flags.DEFINE_integer("bn_recompute_batches", 0,
                     "After training, set BN statistics to their mean over this many "
                     "training batches (0 = the paper's moving averages).")
flags.DEFINE_list("eval_scales", ["1.0"],
                  "Image scales of the final evaluation (probabilities averaged); e.g. 0.5 "
                  "when training crops were taken at half resolution.")
flags.DEFINE_integer("eval_window", 0, "Sliding-window side for the final evaluation (0 = "
                     "whole image).")
flags.DEFINE_integer("eval_stride", 0, "Sliding-window stride (0 = 2/3 of the window).")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    from mm_tf.data import datasets

    with flagdefs.training_errors_as_one_line(resume_dir=FLAGS.workdir):
        flagdefs.check_init_file()
        # Data first, without TensorFlow: a bad file fails in seconds, all listed at once.
        train_pairs, info = flagdefs.dataset_from_flags()
        val_pairs, _ = datasets.read_dataset(
            FLAGS.dataset, FLAGS.data_dir, FLAGS.eval_split, list_file=FLAGS.eval_list_file,
            num_classes=FLAGS.num_classes, ignore_label=FLAGS.ignore_label)
        info = flagdefs.check_data_from_flags(train_pairs + val_pairs, info)
        # Imported here so --help is instant and flag errors come before TensorFlow loads.
        from mm_tf import evaluation  # pylint: disable=import-outside-toplevel
        from mm_tf import segmenter  # pylint: disable=import-outside-toplevel
        # Before any op: logical devices and the multi-worker runtime need an untouched TF.
        strategy = flagdefs.strategy_from_flags()
        aux_mix = flagdefs.mix_config_from_flags(info.background_class, prefix="aux_mm_")
        config = segmenter.SegConfig(
            backbone=FLAGS.backbone, head=FLAGS.head, width=FLAGS.width,
            input_mode=FLAGS.input_mode, init=FLAGS.init, iter_size=FLAGS.iter_size,
            class_weighting=FLAGS.class_weighting, seed=FLAGS.seed,
            jit_compile=FLAGS.jit_compile, bn_recompute_batches=FLAGS.bn_recompute_batches,
            precision=FLAGS.precision, warmup_steps=FLAGS.warmup_steps,
            backbone_lr_multiplier=FLAGS.backbone_lr_multiplier,
            hypercolumn_data_scale=FLAGS.hypercolumn_data_scale,
            aux_mm_weight=FLAGS.aux_mm_weight, aux_mm_temperature=FLAGS.aux_mm_temperature,
            aux_mm_mix=aux_mix, **flagdefs.optimizer_kwargs_from_flags())
        # Where bin/evaluate.py finds the evaluation data by default.
        data = {"dataset": FLAGS.dataset, "data_dir": os.path.abspath(FLAGS.data_dir),
                "split": FLAGS.eval_split, "num_classes": FLAGS.num_classes,
                "ignore_label": FLAGS.ignore_label, "unknown_labels": FLAGS.unknown_labels,
                "list_file": (os.path.abspath(FLAGS.eval_list_file)
                              if FLAGS.eval_list_file else None)}
        summary = segmenter.run_segmentation(
            FLAGS.workdir, train_pairs, val_pairs, info, flagdefs.input_config_from_flags(),
            config, flagdefs.loop_config_from_flags(),
            evaluation.InferenceConfig(scales=tuple(float(x) for x in FLAGS.eval_scales),
                                       window=FLAGS.eval_window, stride=FLAGS.eval_stride),
            data=data, strategy=strategy)
    print(f"segmentation done: {summary['steps']} steps in {summary['seconds']:.1f}s; "
          f"{FLAGS.eval_split} mIoU {100 * summary['eval']['miou']:.2f} "
          f"({summary['eval']['num_images']} images); model: {summary['model_weights']}")


if __name__ == "__main__":
    app.run(main)
