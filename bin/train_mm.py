"""M&M tuning (the paper's stage b): mix patches, match them in a class-wise connected
graph, tune the backbone up to pool5 with the triplet loss.

Defaults are the paper's/release's values. Examples:
  python bin/train_mm.py --flagfile=flags/demo_mm.flags --workdir=work/demo_mm
  python bin/train_mm.py --flagfile=flags/voc_vgg16_random_mm.flags --workdir=work/voc_mm
  python bin/train_mm.py --flagfile=flags/voc_vgg16_random_mm_4gpu.flags \
      --workdir=work/voc_mm_4gpu   # 4 GPUs, one 144-node graph over the global batch

Outputs in --workdir: checkpoints/ (a rerun resumes), tensorboard/train,
backbone.weights.h5 (for bin/train_seg.py --init) and summary.json. Many GPUs or
machines: --strategy, --graph_scope, docs/distributed.md. --probe_every=N probes the
features on fixed train/--probe_split patch banks (probe_history.json, TensorBoard
probe/*); --keep_best_probe keeps the best probed step's backbone (mm_tf/probe.py).
"""

import flagdefs
from absl import app
from absl import flags

FLAGS = flags.FLAGS

flagdefs.define_data_flags()
flagdefs.define_input_flags()
flagdefs.define_loop_flags(steps=8000, log_every=20, checkpoint_every=200, image_every=500)
flagdefs.define_distribution_flags()
flags.DEFINE_enum("graph_scope", "global", ["global", "replica"],
                  "global: one graph over the whole (global) batch, gathered across "
                  "replicas; replica: one graph per replica's share of the batch. Equal "
                  "on one device.")
flags.DEFINE_enum("backbone", "vgg16", ["vgg16", "alexnet"], "Backbone network.")
flags.DEFINE_float("width", 1.0, "Channel multiplier (1.0 = the paper's network).")
flagdefs.require_positive("width")
flags.DEFINE_string("init", "random", "random, or a backbone weights file (.weights.h5/.npz).")
flagdefs.define_mix_flags()
flags.DEFINE_enum("triplet_mode", "graph", ["graph", "random", "graph_semihard"],
                  "Triplet selection: the paper's graph, random triplets, or semi-hard.")
flags.DEFINE_float("margin", 2.1, "Triplet margin alpha.")
flags.DEFINE_enum("loss", "triplet", ["triplet", "supcon", "soft_triplet"],
                  "triplet: the paper's loss on the graph's triplets; supcon: supervised "
                  "contrastive over all the graph's nodes (Khosla et al. 2020); "
                  "soft_triplet: softplus of the triplets' distance gap over 2 tau.")
flags.DEFINE_float("temperature", 0.1, "Temperature tau of --loss=supcon|soft_triplet.")
flags.DEFINE_float("color_jitter", 0.0, "Photometric jitter strength of each mixed patch "
                   "(SimCLR's colour distortion; 0 = none, the paper).")
flags.DEFINE_float("random_grey", 0.0, "Probability that a mixed patch is made grey "
                   "(RGB input; 0 = never, the paper).")
flags.DEFINE_list("frozen_layers", [], "Backbone conv units kept at --init during M&M: "
                  "names (conv1_1) or VGG blocks (conv1 = conv1_1, conv1_2); their BN "
                  "normalises with its moving statistics. Empty = all tuned (the paper).")
flags.DEFINE_float("blend_start", 0.0, "Fraction of --init in the written backbone: "
                   "f * W_init + (1 - f) * W_tuned for every variable (weight-space "
                   "ensembling, WiSE-FT; 0 = the tuned weights, the paper).")
flags.register_validator("blend_start", lambda f: f is not None and 0 <= f < 1,
                         message="expected a fraction in [0, 1)")
flagdefs.define_optimizer_flags(lr_boundaries=[6000])
flagdefs.define_probe_flags()
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    with flagdefs.training_errors_as_one_line(resume_dir=FLAGS.workdir):
        flagdefs.check_init_file()
        # Data first, without TensorFlow: a bad file fails in seconds, all listed at once.
        pairs, info = flagdefs.dataset_from_flags()
        info = flagdefs.check_data_from_flags(pairs, info)
        # Imported here so --help is instant and flag errors come before TensorFlow loads.
        from mm_tf import tuner  # pylint: disable=import-outside-toplevel
        # Before any op: logical devices and the multi-worker runtime need an untouched TF.
        strategy = flagdefs.strategy_from_flags()
        loop = flagdefs.loop_config_from_flags()
        loop.validate()
        config = tuner.TuneConfig(
            backbone=FLAGS.backbone, width=FLAGS.width, input_mode=FLAGS.input_mode,
            init=FLAGS.init, triplet_mode=FLAGS.triplet_mode, margin=FLAGS.margin,
            seed=FLAGS.seed, jit_compile=FLAGS.jit_compile, graph_scope=FLAGS.graph_scope,
            precision=FLAGS.precision, loss=FLAGS.loss, temperature=FLAGS.temperature,
            color_jitter=FLAGS.color_jitter, random_grey=FLAGS.random_grey,
            frozen_layers=tuple(FLAGS.frozen_layers), blend_start=FLAGS.blend_start,
            **flagdefs.optimizer_kwargs_from_flags())
        config.validate()
        probe = flagdefs.probe_config_from_flags()
        probe.validate(loop.log_every)
        probe_pairs = None
        if probe.enabled:
            probe_pairs = flagdefs.dataset_from_flags(FLAGS.probe_split)[0]
            flagdefs.check_data_from_flags(probe_pairs, info)
        mix_config = flagdefs.mix_config_from_flags(info.background_class)
        summary = tuner.run_tuning(FLAGS.workdir, pairs, info,
                                   flagdefs.input_config_from_flags(), mix_config, config,
                                   loop, strategy=strategy, probe=probe,
                                   probe_pairs=probe_pairs)
    print(f"M&M tuning done: {summary['steps']} steps in {summary['seconds']:.1f}s on "
          f"{summary['num_replicas']} replica(s), {summary['graph_nodes']} nodes per graph; "
          f"backbone weights: {summary['backbone_weights']}")


if __name__ == "__main__":
    app.run(main)
