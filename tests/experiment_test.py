"""Pipeline planning and reports: arms parse, shared stages run once, bad arms and
missing flagfiles are clear errors, report.md carries the delta over the naive twin."""

import json
import pathlib

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
               "--arms=random,random+mm", f"--workdir={tmp_path / 'pipe'}",
               "--overlay=flags/smoke.flags", f"--stage_arg=--data_dir={small_demo_dir}",
               # The training stages on two logical CPU devices: the pipeline's
               # distribution flags reach them (smoke batches of 2 split 1 + 1).
               "--strategy=mirrored", "--num_cpu_devices=2"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    first = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert first.stdout.count(": running") == 5  # seg, eval, mm, seg, eval
    report = json.loads((tmp_path / "pipe" / "report.json").read_text())
    assert set(report["arms"]) == {"random", "random+mm"}
    for arm in report["arms"].values():
        assert 0.0 <= arm["miou"] <= 1.0 and arm["seconds"] > 0
        assert set(arm["per_class_iou"]) >= {"background"}
    assert report["arms"]["random+mm"]["stages"]["mm"]["key"] == "mm/random_graph"
    mm_summary = json.loads((tmp_path / "pipe" / "mm" / "random_graph" / "summary.json")
                            .read_text())
    assert mm_summary["num_replicas"] == 2 and mm_summary["strategy"] == "mirrored"
    markdown = (tmp_path / "pipe" / "report.md").read_text()
    assert "vs `random`" in markdown and (tmp_path / "pipe" / "report_miou.png").is_file()
    again = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("done already, skipped") == 5
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
