"""Arms and stages of an M&M experiment, run resumably.

An arm is a named chain `init[+mm[_mode]]`, e.g. `random`, `random+mm`,
`random+mm_random`, `colorization+mm`: an initialisation (random, a proxy task trained
here, or ImageNet weights given by path), an optional M&M stage with a triplet mode,
then segmentation fine-tuning and evaluation. Arms share the stages they have in common
(the colorization pre-training of `colorization` and `colorization+mm` runs once).

Each stage is one run of a repo binary in its own process (memory is returned between
stages, and each binary keeps its own checkpoints), with its output in its own folder.
A stage whose output file exists is skipped, so a killed pipeline rerun with the same
command continues where it stopped; a stage killed midway resumes from its checkpoints.

Distribution (`PipelineConfig.distribution`, e.g. `--strategy=mirrored`) applies to the
M&M and fine-tuning stages. Under `--strategy=multi_worker` the same pipeline command runs
on every machine (its `TF_CONFIG` names the task): every worker joins the M&M and
fine-tuning stages, while proxy pre-training, evaluation and the reports run on the chief
alone and the other workers wait for their outputs in the shared work folder.

Seeds (`PipelineConfig.seeds`, `--seeds=0,1,2`): every arm runs once per seed, each seed
in its own folder `seed<s>/` with its own report; the top folder's report gives per arm
the mean and sample sd of mIoU over seeds and per M&M arm the paired delta to its naive
twin for each seed. A proxy stage is shared by all seeds (pre-training is the start the
study compares from, as ImageNet weights would be); the seed sets the random init, the
data order and the stateless M&M randomness of the M&M and fine-tuning stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

from mm_tf import files
from mm_tf.errors import ConfigError

INITS = ("random", "colorization", "jigsaw", "imagenet")
# Arm suffix -> bin/train_mm.py --triplet_mode.
MM_MODES = {"mm": "graph", "mm_random": "random", "mm_semihard": "graph_semihard"}
PROXY_BINARIES = {"colorization": "bin/pretrain_colorization.py",
                  "jigsaw": "bin/pretrain_jigsaw.py"}
# Flags that define the network a proxy task trains; later stages of its arms must match.
NETWORK_FLAGS = ("backbone", "width", "input_mode")
# keras.applications.VGG16 converted by bin/convert_keras_vgg16.py.
IMAGENET_NETWORK = ("--backbone=vgg16", "--width=1.0", "--input_mode=rgb")


class PipelineError(RuntimeError):
    """A stage failed; the message names the stage and its log file."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: `init` (random|colorization|jigsaw|imagenet) and an optional M&M mode."""

    name: str
    init: str
    mm_mode: Optional[str] = None


def parse_arm(name: str) -> Arm:
    """'random+mm_random' -> Arm('random+mm_random', 'random', 'random')."""
    init, _, suffix = name.partition("+")
    if init not in INITS:
        raise ConfigError(f"--arms: {name!r} starts with {init!r}; expected one of {INITS}")
    if suffix and suffix not in MM_MODES:
        raise ConfigError(f"--arms: {name!r} ends with {suffix!r}; expected one of "
                          f"{tuple(MM_MODES)} after '+'")
    return Arm(name, init, MM_MODES[suffix] if suffix else None)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What to run and with which settings.

    Args:
      arms: arm names (see module docstring).
      workdir: the pipeline's folder; every stage writes below it.
      mm_flagfile / seg_flagfile: settings of the M&M and fine-tuning stages.
      proxy_flagfiles: init name -> flagfile of its proxy pre-training (colorization,
        jigsaw).
      imagenet_weights: backbone weights for the `imagenet` init (a path; nothing
        downloads).
      stage_args: extra arguments for every stage (e.g. --data_dir=...).
      overlays: flagfiles appended to every stage (e.g. flags/smoke.flags); flags a stage
        does not define are ignored by it (absl --undefok).
      distribution: flags of the M&M and fine-tuning stages' distribution, e.g.
        ("--strategy=mirrored", "--num_cpu_devices=2") (see docs/distributed.md).
      mm_args: extra arguments of the M&M stages only (e.g. --graph_scope=replica).
      python: interpreter that runs the stage binaries.
      repo_root: folder holding bin/.
      poll_seconds: how often a non-chief worker looks for the chief's stage outputs.
      seeds: run every arm once per seed (`--seeds=0,1,2`): seed s's stages live in
        `workdir/seed<s>/` and get `--seed=s` (one random init and one data order shared
        by the arms of that seed); proxy pre-training runs once for all seeds, in
        `workdir/proxy/`. Empty: one run with the flagfiles' seed, in `workdir/`.
      seed: the seed of this (per-seed) plan, passed as --seed to its M&M and
        fine-tuning stages; None: the flagfiles' seed. Set by `seed_configs`.
      proxy_root: folder holding `proxy/` (default: `workdir`); per-seed plans share
        the top folder's proxies.
    """

    arms: tuple
    workdir: str
    mm_flagfile: str
    seg_flagfile: str
    proxy_flagfiles: dict = dataclasses.field(default_factory=dict)
    imagenet_weights: Optional[str] = None
    stage_args: tuple = ()
    overlays: tuple = ()
    distribution: tuple = ()
    mm_args: tuple = ()
    python: str = sys.executable
    repo_root: str = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    poll_seconds: float = 5.0
    seeds: tuple = ()
    seed: Optional[int] = None
    proxy_root: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Stage:
    """One resumable step: run `command` in `workdir`; done when `output` exists."""

    key: str
    kind: str  # proxy | mm | seg | eval
    workdir: str
    command: tuple
    output: str


def _flag_names(flagfile: str) -> list:
    """Names of the flags a flagfile sets (for --undefok)."""
    names = []
    with open(flagfile) as f:
        for line in f:
            match = re.match(r"\s*--(?:no)?([A-Za-z0-9_]+)", line)
            if match and match.group(1) != "flagfile":
                names.append(match.group(1))
    return names


def _flagfile_values(flagfile: str, repo_root: str) -> dict:
    """{flag: value} set by a flagfile, following nested --flagfile lines (later wins)."""
    values = {}
    with open(os.path.join(repo_root, flagfile)) as f:
        for line in f:
            match = re.match(r"\s*--([A-Za-z0-9_]+)=(\S+)", line)
            if not match:
                continue
            if match.group(1) == "flagfile":
                values.update(_flagfile_values(match.group(2), repo_root))
            else:
                values[match.group(1)] = match.group(2)
    return values


def _network_args(flagfile: str, repo_root: str) -> tuple:
    """The --backbone/--width/--input_mode a proxy flagfile trains, as stage arguments."""
    values = _flagfile_values(flagfile, repo_root)
    return tuple(f"--{name}={values[name]}" for name in NETWORK_FLAGS if name in values)


def _overlay_args(config: PipelineConfig) -> list:
    args, names = [], []
    for overlay in config.overlays:
        _require_file(config, overlay, "--overlay")
        path = os.path.join(config.repo_root, overlay)
        args.append(f"--flagfile={path}")
        names += _flag_names(path)
    if names:
        args.append("--undefok=" + ",".join(sorted(set(names))))
    return args


def _require_file(config: PipelineConfig, path: str, flag: str) -> None:
    """Raises ConfigError naming `flag` when `path` (relative to the repo) is no file."""
    if not os.path.isfile(os.path.join(config.repo_root, path)):
        raise ConfigError(f"{flag}={path}: file not found")


def plan(config: PipelineConfig):
    """Config -> (stages in run order without duplicates, {arm name: {kind: stage key}})."""
    arms = [parse_arm(a) for a in config.arms]
    if not arms:
        raise ConfigError("--arms is empty")
    _require_file(config, config.mm_flagfile, "--mm_flagfile")
    _require_file(config, config.seg_flagfile, "--seg_flagfile")
    extra = list(config.stage_args) + _overlay_args(config)
    root = os.path.abspath(config.workdir)
    proxy_root = os.path.abspath(config.proxy_root or config.workdir)
    # A per-seed plan's keys carry its seed, so the stages of all seeds stay distinct.
    prefix = "" if config.seed is None else f"{seed_name(config.seed)}/"
    seed_args = () if config.seed is None else (f"--seed={config.seed}",)
    stages, by_key, arm_stages = [], {}, {}

    def add(stage):
        if stage.key not in by_key:
            by_key[stage.key] = stage
            stages.append(stage)
        return stage.key

    for arm in arms:
        keys = {}
        init_weights = "random"
        network_args = ()
        if arm.init in PROXY_BINARIES:
            flagfile = config.proxy_flagfiles.get(arm.init)
            if not flagfile:
                raise ConfigError(f"arm {arm.name!r} needs --{arm.init}_flagfile")
            _require_file(config, flagfile, f"--{arm.init}_flagfile")
            folder = os.path.join(proxy_root, "proxy", arm.init)
            keys["proxy"] = add(Stage(
                f"proxy/{arm.init}", "proxy", folder,
                (PROXY_BINARIES[arm.init], f"--flagfile={flagfile}", f"--workdir={folder}",
                 *extra), os.path.join(folder, "summary.json")))
            init_weights = os.path.join(folder, "backbone.weights.h5")
            network_args = _network_args(flagfile, config.repo_root)
        elif arm.init == "imagenet":
            if not config.imagenet_weights:
                raise ConfigError(f"arm {arm.name!r} needs --imagenet_weights (a path)")
            init_weights = os.path.abspath(config.imagenet_weights)
            network_args = IMAGENET_NETWORK
        chain = arm.init
        seg_init = init_weights
        if arm.mm_mode:
            chain = f"{arm.init}+mm_{arm.mm_mode}"
            folder = os.path.join(root, "mm", f"{arm.init}_{arm.mm_mode}")
            keys["mm"] = add(Stage(
                f"{prefix}mm/{arm.init}_{arm.mm_mode}", "mm", folder,
                ("bin/train_mm.py", f"--flagfile={config.mm_flagfile}",
                 f"--init={init_weights}", f"--triplet_mode={arm.mm_mode}", *network_args,
                 f"--workdir={folder}", *extra, *seed_args, *config.distribution,
                 *config.mm_args),
                os.path.join(folder, "summary.json")))
            seg_init = os.path.join(folder, "backbone.weights.h5")
        seg_dir = os.path.join(root, "seg", chain)
        keys["seg"] = add(Stage(
            f"{prefix}seg/{chain}", "seg", seg_dir,
            ("bin/train_seg.py", f"--flagfile={config.seg_flagfile}", f"--init={seg_init}",
             *network_args, f"--workdir={seg_dir}", *extra, *seed_args,
             *config.distribution),
            os.path.join(seg_dir, "summary.json")))
        keys["eval"] = add(Stage(
            f"{prefix}eval/{chain}", "eval", seg_dir,
            ("bin/evaluate.py", f"--workdir={seg_dir}", "--json"),
            os.path.join(seg_dir, "eval.json")))
        arm_stages[arm.name] = keys
    return stages, arm_stages


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _stage_seconds(stage: Stage) -> Optional[float]:
    """Wall seconds a finished stage took (recorded beside its output)."""
    record = os.path.join(stage.workdir, f".{stage.kind}_stage.json")
    if os.path.isfile(record):
        with open(record) as f:
            return float(json.load(f)["seconds"])
    return None


def _run_stage(stage: Stage, config: PipelineConfig) -> float:
    """Runs one stage's binary, logging to workdir/logs; returns its wall seconds."""
    os.makedirs(stage.workdir, exist_ok=True)
    log_dir = os.path.join(os.path.abspath(config.workdir), "logs")
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, stage.key.replace("/", "_").replace("+", "_") + ".log")
    started = time.time()
    with open(log_path, "a") as log:
        result = subprocess.run([config.python, *stage.command], cwd=config.repo_root,
                                stdout=subprocess.PIPE if stage.kind == "eval" else log,
                                stderr=log, text=True, check=False,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if result.returncode:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-8:])
        raise PipelineError(f"stage {stage.key} failed (exit {result.returncode}); "
                            f"log: {log_path}\n{tail}")
    if stage.kind == "eval":
        scores = json.loads(result.stdout.strip().splitlines()[-1])
        files.write_json_atomic(stage.output, scores)
    seconds = time.time() - started
    files.write_json_atomic(os.path.join(stage.workdir, f".{stage.kind}_stage.json"),
                {"seconds": seconds, "command": list(stage.command)})
    return seconds


# Stages every worker of a multi-worker run takes part in; the others run on the chief.
DISTRIBUTED_KINDS = ("mm", "seg")


def is_chief_task(environ=None) -> bool:
    """Whether this process is the chief of the cluster in TF_CONFIG (no TF_CONFIG: yes).
    The chief is task "chief", or worker 0 when the cluster has no "chief" task."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG")
    if not raw:
        return True
    try:
        tf_config = json.loads(raw)
        task = tf_config.get("task", {})
        kind, index = task.get("type"), int(task.get("index", 0))
    except (ValueError, AttributeError, TypeError) as e:
        raise ConfigError(f"TF_CONFIG is not a JSON object with a task: {e}") from None
    if "chief" in tf_config.get("cluster", {}):
        return kind == "chief"
    return kind == "worker" and index == 0


def _wait_for_chief(stage: Stage, config: PipelineConfig, log) -> None:
    """Blocks until the chief has written `stage`'s output (multi-worker, non-chief)."""
    log(f"waiting for the chief to finish {stage.key} ({stage.output})")
    while not os.path.isfile(stage.output):
        time.sleep(config.poll_seconds)


def seed_name(seed: int) -> str:
    """7 -> 'seed7': the folder and stage-key prefix of one seed's stages."""
    return f"seed{seed}"


def seed_configs(config: PipelineConfig) -> list:
    """[(seed, per-seed config)] for `config.seeds`, or [(None, config)] without seeds.
    Each per-seed config writes into `workdir/seed<s>/` and shares `workdir/proxy/`."""
    if not config.seeds:
        return [(None, config)]
    seeds = [int(s) for s in config.seeds]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds={','.join(map(str, seeds))}: a seed is listed twice")
    if any(a.startswith("--seed=") for a in config.stage_args):
        raise ConfigError("--stage_arg=--seed=...: with --seeds each seed's stages get "
                          "their own --seed; give the seeds with --seeds only")
    root = os.path.abspath(config.workdir)
    return [(seed, dataclasses.replace(config, seeds=(), seed=seed,
                                       workdir=os.path.join(root, seed_name(seed)),
                                       proxy_root=root)) for seed in seeds]


def run(config: PipelineConfig, log: Callable[[str], None] = print) -> dict:
    """Runs every stage not yet done, then writes report.json and report.md; returns the
    report dict (None on a non-chief worker of a multi-worker run, which writes no
    report). With `config.seeds`, each seed's folder gets its own report and `workdir`
    the report over seeds (`mm_tf.report.combine_seeds`). Raises PipelineError when a
    stage fails (finished stages stay done)."""
    from mm_tf import report as report_lib  # pylint: disable=import-outside-toplevel

    plans = [(seed, seed_config, *plan(seed_config))
             for seed, seed_config in seed_configs(config)]
    stages = list({s.key: s for _, _, seed_stages, _ in plans for s in seed_stages}.values())
    chief = is_chief_task()
    seconds = {s.key: _stage_seconds(s) for s in stages if os.path.isfile(s.output)}
    started = time.time()
    for index, stage in enumerate(stages, 1):
        prefix = f"[{index}/{len(stages)}] {stage.key}"
        if os.path.isfile(stage.output):
            log(f"{prefix}: done already, skipped")
            continue
        if not chief and stage.kind not in DISTRIBUTED_KINDS:
            _wait_for_chief(stage, config, log)
            continue
        log(f"{prefix}: running (elapsed {_format_seconds(time.time() - started)}"
            f"{_eta(stages, stages[index - 1:], seconds)})")
        seconds[stage.key] = _run_stage(stage, config)
        if not chief:
            # The chief writes the outputs the next stage reads after the last step.
            _wait_for_chief(stage, config, log)
        log(f"{prefix}: finished in {_format_seconds(seconds[stage.key])}")
    if not chief:
        return None
    reports = {}
    for seed, seed_config, seed_stages, arm_stages in plans:
        report = report_lib.build_report(seed_config, arm_stages,
                                         {s.key: s for s in seed_stages}, seconds)
        report_lib.write_reports(report, os.path.abspath(seed_config.workdir))
        if seed is None:
            return report
        reports[str(seed)] = report
    report = report_lib.combine_seeds(reports, config)
    report_lib.write_reports(report, os.path.abspath(config.workdir))
    return report


def _eta(stages: Sequence[Stage], remaining: Sequence[Stage], seconds: dict) -> str:
    """', ETA ~Xm' from the mean seconds of finished stages of the same kind."""
    known = {}
    for stage in stages:
        if seconds.get(stage.key) is not None:
            known.setdefault(stage.kind, []).append(seconds[stage.key])
    if not known:
        return ""
    overall = sum(sum(v) for v in known.values()) / sum(len(v) for v in known.values())
    total = sum(sum(known[s.kind]) / len(known[s.kind]) if s.kind in known else overall
                for s in remaining)
    return f", ETA ~{_format_seconds(total)}"
