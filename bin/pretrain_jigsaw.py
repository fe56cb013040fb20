r"""Jigsaw-puzzle pretraining (the paper's stage a, Noroozi & Favaro 2016): a shared
AlexNet trunk per tile learns which of P far-apart permutations shuffled 9 tiles of a
crop. No labels.

Examples:
  python bin/pretrain_jigsaw.py --flagfile=flags/demo_jigsaw.flags --workdir=work/demo_jigsaw
  python bin/pretrain_jigsaw.py --flagfile=flags/voc_alexnet_jigsaw_pretrain.flags \
      --workdir=work/voc_alexnet_jigsaw

--crop_size is the puzzle's side (225: 3 x 3 cells of 75 px, 64 px tiles); --split
takes a comma-separated list (only images are read). Outputs in --workdir: checkpoints/
(a rerun resumes; a rerun with a larger --steps continues), permutations.npy (the
permutation set, reused on resume), tensorboard/train (losses, accuracy, puzzles with
their predicted solution), backbone.weights.h5 (rgb input, for --init) and summary.json.
"""

import flagdefs
from absl import app
from absl import flags

FLAGS = flags.FLAGS

flagdefs.define_data_flags()
flagdefs.define_input_flags()
flagdefs.define_loop_flags(steps=350000, log_every=20, checkpoint_every=1000,
                           image_every=1000)
# Noroozi & Favaro: 225 x 225 crops, batches of 256; tiles are normalised on their own,
# so the pipeline's input mode does not matter (rgb keeps its 3 channels).
FLAGS.set_default("crop_size", 225)
FLAGS.set_default("batch_size", 256)
flags.DEFINE_enum("backbone", "alexnet", ["alexnet", "vgg16"], "Trunk network.")
flags.DEFINE_float("width", 1.0, "Channel multiplier of the trunk and fc7 (1.0 = paper).")
flagdefs.require_positive("width")
flags.DEFINE_integer("tile_size", 0, "Tile side inside a cell of crop_size // 3; 0 = 64/75 "
                     "of the cell (64 for --crop_size=225), less if the jitter needs it.")
flags.DEFINE_integer("channel_jitter", 2, "Largest spatial shift of a colour channel, px.")
flags.DEFINE_integer("num_permutations", 1000, "Permutation classes P.")
flags.DEFINE_enum("permutation_criterion", "min", ["min", "sum"],
                  "Greedy selection: max-min Hamming distance, or max summed distance.")
flags.DEFINE_integer("fc_units", 0, "fc7 width; 0 = 4096 x width.")
flags.DEFINE_float("dropout", 0.5, "Dropout after fc7.")
flags.register_validator("dropout", lambda p: p is not None and 0 <= p < 1,
                         message="expected a rate in [0, 1)")
flagdefs.define_optimizer_flags()
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    with flagdefs.training_errors_as_one_line(resume_dir=FLAGS.workdir):
        # Data first, without TensorFlow: a bad file fails in seconds, all listed at once.
        pairs, info = flagdefs.images_from_flags()
        info = flagdefs.check_data_from_flags(pairs, info)
        # Imported here so --help is instant and flag errors come before TensorFlow loads.
        from mm_tf.proxy import jigsaw  # pylint: disable=import-outside-toplevel
        config = jigsaw.JigsawConfig(
            backbone=FLAGS.backbone, width=FLAGS.width, tile_size=FLAGS.tile_size,
            channel_jitter=FLAGS.channel_jitter, num_permutations=FLAGS.num_permutations,
            permutation_criterion=FLAGS.permutation_criterion,
            fc_units=FLAGS.fc_units or None, dropout=FLAGS.dropout, seed=FLAGS.seed,
            jit_compile=FLAGS.jit_compile, **flagdefs.optimizer_kwargs_from_flags())
        summary = jigsaw.run_jigsaw(FLAGS.workdir, pairs, info,
                                    flagdefs.input_config_from_flags(), config,
                                    flagdefs.loop_config_from_flags())
    print(f"jigsaw done: {summary['steps']} steps in {summary['seconds']:.1f}s; "
          f"{summary['num_permutations']} permutations (min Hamming distance "
          f"{summary['min_hamming_distance']}); backbone weights (rgb input): "
          f"{summary['backbone_weights']}")


if __name__ == "__main__":
    app.run(main)
