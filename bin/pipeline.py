"""Runs arms of an M&M experiment end to end and writes report.json / report.md.

Each arm is `init[+mm[_mode]]` (random, colorization, jigsaw, imagenet; +mm = the
paper's graph, +mm_random = random triplets, +mm_semihard). Stages that arms share run
once; finished stages are skipped on a rerun, so a killed pipeline continues.

  python bin/pipeline.py --flagfile=flags/demo.flags --workdir=work/demo/pipeline
  python bin/pipeline.py --flagfile=flags/camvid_cpu.flags --workdir=work/camvid_cpu
  python bin/pipeline.py --flagfile=flags/demo.flags --seeds=0,1 --workdir=work/demo2

--seeds=0,1,2 runs every arm for every seed (workdir/seed<s>/, resumable per arm and
seed) and reports per arm the mean and sd over seeds, and per M&M arm the paired delta to
its naive twin on each seed.

--strategy/--num_cpu_devices/--precision/--jit_compile go to the M&M and fine-tuning
stages (--graph_scope to M&M). With --strategy=multi_worker run the same command on every
machine with its TF_CONFIG: all workers train together; proxy pre-training, evaluation
and the report run on the chief (docs/distributed.md).
"""

import os

import flagdefs
from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_list("arms", ["random", "random+mm", "random+mm_random"], "Arms to run.")
flags.DEFINE_string("workdir", None, "Pipeline folder (stages, logs, reports).")
flags.DEFINE_string("mm_flagfile", "flags/demo_mm.flags", "Settings of the M&M stages.")
flags.DEFINE_string("seg_flagfile", "flags/demo_seg.flags", "Settings of fine-tuning.")
flags.DEFINE_string("colorization_flagfile", None, "Settings of colorization pre-training.")
flags.DEFINE_string("jigsaw_flagfile", None, "Settings of jigsaw pre-training.")
flags.DEFINE_string("imagenet_weights", None, "Backbone weights for the imagenet arm.")
flags.DEFINE_list("seeds", [], "Run every arm once per seed (e.g. 0,1,2), each seed in "
                  "workdir/seed<s>/; the report gives mean +- sd and paired deltas. "
                  "Empty: one run with the flagfiles' --seed.")
flags.register_validator(
    "seeds", lambda seeds: all(s.isdigit() and int(s) < 2**31 for s in seeds),
    message="expected whole numbers in [0, 2**31), e.g. 0,1,2")
flags.DEFINE_multi_string("stage_arg", [], "Extra argument for every stage (repeatable), "
                          "e.g. --stage_arg=--data_dir=/data/camvid.")
flags.DEFINE_multi_string("overlay", [], "Flagfile appended to every stage (repeatable), "
                          "e.g. --overlay=flags/smoke.flags.")
flagdefs.define_distribution_flags()
flags.DEFINE_bool("jit_compile", None, "Compile the M&M and fine-tuning steps with XLA "
                  "(unset: as their flagfiles say).")
flags.DEFINE_enum("graph_scope", None, ["global", "replica"],
                  "M&M graph over the global batch or per replica (unset: the M&M "
                  "flagfile's, else global).")
flags.mark_flag_as_required("workdir")


def _distribution_args():
    """The distribution flags given on the command line, as stage arguments."""
    args = []
    for name in ("strategy", "num_cpu_devices", "precision", "jit_compile"):
        if FLAGS[name].present:
            value = FLAGS[name].value
            args.append(f"--{name}" if value is True else
                        f"--no{name}" if value is False else f"--{name}={value}")
    return tuple(args)


def main(argv):
    del argv
    from mm_tf import experiment  # pylint: disable=import-outside-toplevel
    from mm_tf.errors import ConfigError  # pylint: disable=import-outside-toplevel

    seeds = tuple(int(s) for s in FLAGS.seeds)  # checked at parse time
    flagdefs.check_workdir(FLAGS.workdir)
    proxies = {name: path for name, path in (("colorization", FLAGS.colorization_flagfile),
                                             ("jigsaw", FLAGS.jigsaw_flagfile)) if path}
    config = experiment.PipelineConfig(
        arms=tuple(FLAGS.arms), workdir=FLAGS.workdir, mm_flagfile=FLAGS.mm_flagfile,
        seg_flagfile=FLAGS.seg_flagfile, proxy_flagfiles=proxies,
        imagenet_weights=FLAGS.imagenet_weights, stage_args=tuple(FLAGS.stage_arg),
        overlays=tuple(FLAGS.overlay), distribution=_distribution_args(),
        mm_args=(f"--graph_scope={FLAGS.graph_scope}",) if FLAGS.graph_scope else (),
        repo_root=str(flagdefs.REPO_ROOT), seeds=seeds)
    try:
        report = experiment.run(config)
    except (ConfigError, experiment.PipelineError) as e:
        flagdefs.fail(str(e))
    if report is None:
        print("this worker's stages are done; the chief writes the report")
        return
    workdir = os.path.abspath(FLAGS.workdir)
    for name, arm in report["arms"].items():
        spread = "" if arm.get("sd_miou") is None else f" +- {100 * arm['sd_miou']:.1f}"
        delta = "" if "paired_delta" not in arm else (
            f", paired delta {100 * arm['mean_delta']:+.1f} vs {arm['naive_twin']} "
            f"({arm['positive_deltas']}/{len(arm['paired_delta'])} seeds > 0)")
        print(f"{name:>24s}: mIoU {100 * arm['miou']:.1f}%{spread}{delta}  "
              f"({arm['seconds']:.0f}s)")
    print(f"report: {os.path.join(workdir, 'report.md')} (and report.json)")


if __name__ == "__main__":
    app.run(main)
