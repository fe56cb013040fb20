"""Pipeline planning and reports: arms parse, shared stages run once, bad arms and
missing flagfiles are clear errors, report.md carries the delta over the naive twin."""

import dataclasses
import json
import pathlib
import sys

import numpy as np
import pytest

from mm_tf import experiment
from mm_tf import report as report_lib
from mm_tf.errors import ConfigError


def _config(tmp_path, arms, **kwargs):
    kwargs.setdefault("proxy_flagfiles", {"colorization": "flags/demo_colorization.flags",
                                          "jigsaw": "flags/demo_jigsaw.flags"})
    return experiment.PipelineConfig(arms=tuple(arms), workdir=str(tmp_path),
                                     mm_flagfile="flags/demo_mm.flags",
                                     seg_flagfile="flags/demo_mm.flags", **kwargs)


def test_parse_arm():
    assert experiment.parse_arm("random") == experiment.Arm("random", "random", None)
    assert experiment.parse_arm("random+mm").mm_mode == "graph"
    assert experiment.parse_arm("jigsaw+mm_random").mm_mode == "random"
    assert experiment.parse_arm("colorization+mm_semihard").mm_mode == "graph_semihard"
    with pytest.raises(ConfigError, match="expected one of"):
        experiment.parse_arm("imagenette+mm")
    with pytest.raises(ConfigError, match="mm_hard"):
        experiment.parse_arm("random+mm_hard")


def test_arms_share_common_stages(tmp_path):
    stages, arms = experiment.plan(_config(
        tmp_path, ["colorization", "colorization+mm", "random", "random+mm",
                   "random+mm_random"]))
    keys = [s.key for s in stages]
    assert len(keys) == len(set(keys))
    assert keys.count("proxy/colorization") == 1
    assert arms["colorization"]["proxy"] == arms["colorization+mm"]["proxy"]
    assert arms["random+mm"]["mm"] != arms["random+mm_random"]["mm"]
    # Every stage comes after the stages it reads from.
    order = {k: i for i, k in enumerate(keys)}
    for keys_of_arm in arms.values():
        chain = [keys_of_arm[k] for k in ("proxy", "mm", "seg", "eval") if k in keys_of_arm]
        assert [order[k] for k in chain] == sorted(order[k] for k in chain)
    by_key = {s.key: s for s in stages}
    mm = by_key[arms["colorization+mm"]["mm"]]
    assert any(a.endswith("proxy/colorization/backbone.weights.h5") for a in mm.command)
    assert "--input_mode=grey" in mm.command and "--backbone=vgg16" in mm.command
    jigsaw_stages, jigsaw_arms = experiment.plan(_config(tmp_path, ["jigsaw+mm"]))
    jigsaw_seg = {s.key: s for s in jigsaw_stages}[jigsaw_arms["jigsaw+mm"]["seg"]]
    assert "--backbone=alexnet" in jigsaw_seg.command  # the proxy's network carries on
    seg = by_key[arms["random+mm"]["seg"]]
    assert any(a.endswith("mm/random_graph/backbone.weights.h5") for a in seg.command)
    assert "--init=random" in by_key[arms["random"]["seg"]].command


def test_overlays_pass_undefok(tmp_path):
    stages, _ = experiment.plan(_config(tmp_path, ["random+mm"],
                                        overlays=("flags/smoke.flags",)))
    command = stages[0].command
    undefok = [a for a in command if a.startswith("--undefok=")]
    assert undefok and "patch_size" in undefok[0] and "steps" in undefok[0]


def test_distribution_flags_reach_the_training_stages_only(tmp_path):
    stages, _ = experiment.plan(_config(
        tmp_path, ["colorization+mm"],
        distribution=("--strategy=mirrored", "--num_cpu_devices=2"),
        mm_args=("--graph_scope=replica",)))
    by_kind = {s.kind: s.command for s in stages}
    for kind in ("mm", "seg"):
        assert "--strategy=mirrored" in by_kind[kind] and "--num_cpu_devices=2" in by_kind[kind]
    for kind in ("proxy", "eval"):
        assert not any(a.startswith("--strategy") for a in by_kind[kind])
    assert "--graph_scope=replica" in by_kind["mm"]
    assert not any(a.startswith("--graph_scope") for a in by_kind["seg"])


@pytest.mark.parametrize("tf_config,chief", [
    (None, True),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "chief", "index": 0}},
     True),
    ({"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}},
     False),
])
def test_is_chief_task(tf_config, chief):
    environ = {} if tf_config is None else {"TF_CONFIG": json.dumps(tf_config)}
    assert experiment.is_chief_task(environ) is chief


def test_bad_tf_config_names_it():
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        experiment.is_chief_task({"TF_CONFIG": "[1, 2]"})


def test_non_chief_worker_trains_and_waits_for_the_chief(tmp_path, monkeypatch):
    # A non-chief worker runs only the distributed stages (M&M, fine-tuning) and waits for
    # the chief's outputs of the others; "the chief" here is the log callback, which
    # writes each awaited output when the worker starts waiting for it.
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}))
    calls = tmp_path / "calls.txt"
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/sh\necho "$1" >> {calls}\n')
    fake_python.chmod(0o755)
    config = _config(tmp_path / "pipeline", ["colorization+mm"],
                     distribution=("--strategy=multi_worker",), python=str(fake_python),
                     poll_seconds=0.01)
    stages, _ = experiment.plan(config)
    outputs = {s.key: s.output for s in stages}
    awaited = []

    def chief(message):
        if message.startswith("waiting for the chief to finish "):
            key = message.split()[6]
            awaited.append(key)
            pathlib.Path(outputs[key]).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(outputs[key]).write_text("{}")

    assert experiment.run(config, log=chief) is None
    assert calls.read_text().split() == ["bin/train_mm.py", "bin/train_seg.py"]
    assert awaited == ["proxy/colorization", "mm/colorization_graph",
                       "seg/colorization+mm_graph", "eval/colorization+mm_graph"]
    assert not (tmp_path / "pipeline" / "report.md").exists()


@pytest.mark.parametrize("arms,kwargs,needle", [
    (["colorization"], {"proxy_flagfiles": {}}, "--colorization_flagfile"),
    (["imagenet"], {}, "--imagenet_weights"),
    ([], {}, "--arms"),
])
def test_plan_errors_name_the_flag(tmp_path, arms, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        experiment.plan(_config(tmp_path, arms, **kwargs))


def test_missing_flagfile_is_named(tmp_path):
    config = experiment.PipelineConfig(arms=("random",), workdir=str(tmp_path),
                                       mm_flagfile="flags/nope.flags",
                                       seg_flagfile="flags/demo_mm.flags")
    with pytest.raises(ConfigError, match="--mm_flagfile=flags/nope.flags"):
        experiment.plan(config)


def test_report_markdown_and_chart(tmp_path):
    report = {"arms": {
        "random": {"miou": 0.30, "pixel_acc": 0.8, "seconds": 10.0,
                   "per_class_iou": {"sky": 0.5, "car": None}},
        "random+mm": {"miou": 0.355, "pixel_acc": 0.85, "seconds": 20.0,
                      "per_class_iou": {"sky": 0.6, "car": 0.11}},
    }, "config": {}}
    text = report_lib.markdown(report)
    assert "+5.5 vs `random`" in text
    assert "| `random` | 50.0 | - |" in text
    report_lib.write_reports(report, str(tmp_path))
    assert json.loads((tmp_path / "report.json").read_text())["arms"]["random"]["miou"] == 0.30
    png = (tmp_path / "report_miou.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "![mIoU per arm](report_miou.png)" in (tmp_path / "report.md").read_text()


def test_pipeline_binary_writes_reports_and_skips_finished_stages(tmp_path, small_demo_dir):
    import os  # pylint: disable=import-outside-toplevel
    import pathlib  # pylint: disable=import-outside-toplevel
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel

    root = pathlib.Path(__file__).resolve().parents[1]
    command = [sys.executable, "bin/pipeline.py", "--flagfile=flags/demo.flags",
               # One M&M arm (3 stages) and one seed (demo.flags has two) keep this
               # end-to-end run short; reports over several arms, seeds and their
               # deltas are checked in-process above.
               "--arms=random+mm", "--seeds=", f"--workdir={tmp_path / 'pipe'}",
               "--overlay=flags/smoke.flags", f"--stage_arg=--data_dir={small_demo_dir}",
               # The training stages on two logical CPU devices: the pipeline's
               # distribution flags reach them (smoke batches of 2 split 1 + 1).
               "--strategy=mirrored", "--num_cpu_devices=2"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    first = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert first.stdout.count(": running") == 3  # mm, seg, eval
    report = json.loads((tmp_path / "pipe" / "report.json").read_text())
    assert set(report["arms"]) == {"random+mm"}
    for arm in report["arms"].values():
        assert 0.0 <= arm["miou"] <= 1.0 and arm["seconds"] > 0
        assert set(arm["per_class_iou"]) >= {"background"}
    assert report["arms"]["random+mm"]["stages"]["mm"]["key"] == "mm/random_graph"
    mm_summary = json.loads((tmp_path / "pipe" / "mm" / "random_graph" / "summary.json")
                            .read_text())
    # Both training binaries ran on two logical CPUs: one global graph over both
    # replicas' patches (smoke batch 2 = 1 + 1), the fine-tune's model written.
    assert mm_summary["num_replicas"] == 2 and mm_summary["strategy"] == "mirrored"
    assert mm_summary["per_replica_batch_size"] == 1 and mm_summary["graph_scope"] == "global"
    assert mm_summary["graph_nodes"] == 2 * mm_summary["patches_per_image"]
    assert mm_summary["metrics"]["valid_patches"] == mm_summary["graph_nodes"]
    assert mm_summary["steps"] == 2 and np.isfinite(mm_summary["metrics"]["loss"])
    seg_dir = tmp_path / "pipe" / report["arms"]["random+mm"]["stages"]["seg"]["key"]
    seg_summary = json.loads((seg_dir / "summary.json").read_text())
    assert seg_summary["strategy"] == "mirrored" and seg_summary["num_replicas"] == 2
    assert seg_summary["steps"] == 2 and np.isfinite(seg_summary["metrics"]["loss"])
    assert (seg_dir / "model.weights.h5").is_file()
    markdown = (tmp_path / "pipe" / "report.md").read_text()
    assert "`random+mm`" in markdown and (tmp_path / "pipe" / "report_miou.png").is_file()
    again = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("done already, skipped") == 3
    assert ": running" not in again.stdout
    assert json.loads((tmp_path / "pipe" / "report.json").read_text())["arms"] == report["arms"]


def test_rewritten_report_keeps_embedded_figures(tmp_path):
    report = {"arms": {"random": {"miou": 0.3, "pixel_acc": 0.8, "seconds": 1.0,
                                  "per_class_iou": {"sky": 0.5}}}, "config": {}}
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "tsne.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    report_lib.write_reports(report, str(tmp_path))
    report_lib.write_reports(report, str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert text.count("](figures/tsne.png)") == 1 and "| `random` | 30.0 |" in text


def test_seeds_plan_one_folder_and_seed_flag_per_seed_and_share_the_proxy(tmp_path):
    config = _config(tmp_path, ["colorization", "colorization+mm"], seeds=(0, 1))
    plans = experiment.seed_configs(config)
    assert [seed for seed, _ in plans] == [0, 1]
    keys = []
    for seed, seed_config in plans:
        stages, arms = experiment.plan(seed_config)
        by_key = {s.key: s for s in stages}
        assert arms["colorization"]["proxy"] == "proxy/colorization"
        proxy = by_key["proxy/colorization"]
        assert proxy.workdir == str(tmp_path / "proxy" / "colorization")
        assert not any(a.startswith("--seed=") for a in proxy.command)
        for kind in ("mm", "seg", "eval"):
            stage = by_key[arms["colorization+mm"][kind]]
            assert stage.key.startswith(f"seed{seed}/{kind}/")
            assert stage.workdir.startswith(str(tmp_path / f"seed{seed}") + "/")
            assert (f"--seed={seed}" in stage.command) == (kind != "eval")
        keys += [s.key for s in stages]
    # The shared proxy is planned by both seeds; every other stage is distinct.
    assert keys.count("proxy/colorization") == 2 and len(set(keys)) == len(keys) - 1


@pytest.mark.parametrize("kwargs,needle", [
    ({"seeds": (0, 0)}, "listed twice"),
    ({"seeds": (0, 1), "stage_args": ("--seed=3",)}, "--seeds only"),
])
def test_seed_errors_name_the_flag(tmp_path, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        experiment.seed_configs(_config(tmp_path, ["random"], **kwargs))


def _seed_report(seed: int, mious: dict) -> dict:
    """One seed's report: per arm its own seg stage and a proxy shared by all seeds."""
    return {"arms": {name: {"miou": miou, "pixel_acc": 0.5 + miou / 2, "seconds": 70.0,
                            "per_class_iou": {"sky": miou, "car": None},
                            "stages": {"proxy": {"key": "proxy/colorization", "seconds": 10.0},
                                       "seg": {"key": f"seed{seed}/seg/{name}",
                                               "seconds": 60.0}}}
                     for name, miou in mious.items()}}


def test_combine_seeds_mean_sd_and_paired_deltas_by_hand(tmp_path):
    per_seed = {"0": _seed_report(0, {"random": 0.30, "random+mm": 0.36}),
                "1": _seed_report(1, {"random": 0.34, "random+mm": 0.33}),
                "2": _seed_report(2, {"random": 0.26, "random+mm": 0.33})}
    report = report_lib.combine_seeds(per_seed, _config(tmp_path, ["random"]))
    naive, mm = report["arms"]["random"], report["arms"]["random+mm"]
    assert report["seeds"] == ["0", "1", "2"]
    assert naive["per_seed_miou"] == {"0": 0.30, "1": 0.34, "2": 0.26}
    assert naive["mean_miou"] == pytest.approx(0.30) and naive["miou"] == naive["mean_miou"]
    assert naive["sd_miou"] == pytest.approx(0.04)  # deviations .00, +.04, -.04 over n-1=2
    assert "paired_delta" not in naive
    assert mm["naive_twin"] == "random"
    assert mm["paired_delta"] == pytest.approx({"0": 0.06, "1": -0.01, "2": 0.07})
    assert mm["mean_delta"] == pytest.approx(0.04) and mm["positive_deltas"] == 2
    assert mm["per_class_iou"] == {"sky": pytest.approx(0.34), "car": None}
    assert naive["seconds"] == 190.0  # three seg stages and the shared proxy once
    text = report_lib.markdown(report)
    assert "| `random+mm` | 34.0 +- 1.7 | 36.0, 33.0, 33.0 | +6.0, -1.0, +7.0 | " \
           "+4.0 vs `random` | 2/3 |" in text
    assert "Per-class IoU of the means over seeds" in text
    # One seed's delta is negative: not beyond the spread (sd 1.7 and 4.0 against +4.0).
    assert mm["beyond_seed_spread"] is False
    assert ("`random+mm` vs `random`: +4.0 mean over 3 seeds, 2/3 positive; seed sd 1.7 "
            "and 4.0: not beyond the seed-to-seed spread.") in text
    steady = report_lib.combine_seeds(
        {"0": _seed_report(0, {"random": 0.30, "random+mm": 0.36}),
         "1": _seed_report(1, {"random": 0.31, "random+mm": 0.38})},
        _config(tmp_path, ["random"]))
    assert steady["arms"]["random+mm"]["beyond_seed_spread"] is True
    assert "+6.5 mean over 2 seeds, 2/2 positive; seed sd 1.4 and 0.7: a gain beyond" \
        in report_lib.markdown(steady)
    report_lib.write_reports(report, str(tmp_path))
    assert (tmp_path / "report_miou.png").read_bytes()[:4] == b"\x89PNG"
    one = report_lib.combine_seeds({"5": per_seed["0"]}, _config(tmp_path, ["random"]))
    assert one["arms"]["random"]["sd_miou"] is None
    assert one["arms"]["random+mm"]["beyond_seed_spread"] is None
    assert "seed-to-seed spread" not in report_lib.markdown(one)


_FAKE_STAGE = '''
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[2:] if a.startswith("--") and "=" in a)
workdir = args["workdir"]
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.txt"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1].endswith("evaluate.py"):
    # mIoU from the seed and the arm, as the seg stage recorded them.
    with open(os.path.join(workdir, "summary.json")) as f:
        run = json.load(f)
    miou = 0.3 + 0.01 * run["seed"] + (0.05 if run["mm"] else 0.0)
    print(json.dumps({"miou": miou, "pixel_acc": 0.8, "num_images": 2,
                      "per_class_iou": {"a": miou, "b": None}}))
else:
    name = "backbone.weights.h5" if "train_mm" in sys.argv[1] else "model.weights.h5"
    open(os.path.join(workdir, name), "w").close()
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({"seed": int(args.get("seed", 0)),
                   "mm": "mm" in args.get("init", "")}, f)
'''


def test_two_seed_run_reports_over_seeds_and_a_rerun_skips_every_stage(tmp_path):
    # A stand-in interpreter runs the stages, so the orchestration is tested in
    # seconds; test_pipeline_binary_writes_reports_... above runs the real stages.
    fake = tmp_path / "fake_python.py"
    fake.write_text(_FAKE_STAGE)
    config = dataclasses.replace(
        _config(tmp_path / "pipe", ["random", "random+mm"], seeds=(0, 2)),
        python=str(_python_wrapper(tmp_path, fake)))
    lines = []
    report = experiment.run(config, log=lines.append)
    assert sum(": running" in line for line in lines) == 10  # 2 seeds x (seg, eval, mm, seg, eval)
    assert report["seeds"] == ["0", "2"]
    assert report["arms"]["random"]["per_seed_miou"] == pytest.approx({"0": 0.30, "2": 0.32})
    assert report["arms"]["random+mm"]["paired_delta"] == pytest.approx({"0": 0.05, "2": 0.05})
    assert report["arms"]["random+mm"]["positive_deltas"] == 2
    on_disk = json.loads((tmp_path / "pipe" / "report.json").read_text())
    assert on_disk["arms"]["random+mm"]["mean_delta"] == pytest.approx(0.05)
    seed2 = json.loads((tmp_path / "pipe" / "seed2" / "report.json").read_text())
    assert seed2["arms"]["random"]["miou"] == pytest.approx(0.32)
    assert "seeds" not in seed2
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 10
    again = []
    assert experiment.run(config, log=again.append)["arms"] == on_disk["arms"]
    assert sum("done already, skipped" in line for line in again) == 10
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 10


def _python_wrapper(tmp_path, script):
    """An executable that runs `script` with this interpreter, in place of python."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper
