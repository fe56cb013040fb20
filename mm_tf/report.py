"""The pipeline's reports: report.json (machine-readable), report.md (a table of arms
with each M&M arm's delta over its naive twin, per-class IoU) and the bar chart it
embeds. A multi-seed pipeline's top report (`combine_seeds`) gives per arm the mean and
sample sd over seeds and per M&M arm the paired delta to its naive twin for each seed."""

from __future__ import annotations

import dataclasses
import json
import math
import os

from typing import Optional

from mm_tf import files


def naive_twin(arm_name: str) -> str:
    """'random+mm_random' -> 'random': the same start without M&M."""
    return arm_name.partition("+")[0]


def build_report(config, arm_stages: dict, stages: dict, seconds: dict) -> dict:
    """Collects each arm's evaluation and stage times into the report dict."""
    arms = {}
    for arm, keys in arm_stages.items():
        with open(stages[keys["eval"]].output) as f:
            scores = json.load(f)
        arm_seconds = sum(seconds.get(k) or 0.0 for k in keys.values())
        arms[arm] = {
            "miou": scores["miou"],
            "per_class_iou": scores["per_class_iou"],
            "pixel_acc": scores["pixel_acc"],
            "num_images": scores.get("num_images"),
            "seconds": arm_seconds,
            "stages": {kind: {"key": key, "workdir": stages[key].workdir,
                              "seconds": seconds.get(key)} for kind, key in keys.items()},
        }
    return {"arms": arms, "config": dataclasses.asdict(config)}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _sample_sd(values) -> Optional[float]:
    """Sample standard deviation (n - 1), None for fewer than two values."""
    values = list(values)
    if len(values) < 2:
        return None
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def combine_seeds(per_seed: dict, config) -> dict:
    """{seed (str): one seed's report} -> the report over seeds.

    Per arm: `per_seed_miou` {seed: mIoU}, `mean_miou`, `sd_miou` (sample sd, None for
    one seed), `miou` (= the mean, so that readers of one-seed reports work), the mean
    `pixel_acc` and `per_class_iou` (a class absent in every seed stays None),
    `seconds` (each stage counted once: seeds share the proxy stage), `per_seed` (each
    seed's arm entry) and `stages` (the first seed's, which bin/figures.py draws). Per
    M&M arm whose naive twin ran: `naive_twin`, `paired_delta` {seed: mIoU minus the
    twin's}, `mean_delta` and `positive_deltas` (how many are > 0). mIoU are fractions.
    """
    seeds = list(per_seed)
    arms = {}
    for name in per_seed[seeds[0]]["arms"]:
        runs = {seed: per_seed[seed]["arms"][name] for seed in seeds}
        mious = {seed: run["miou"] for seed, run in runs.items()}
        classes = list(runs[seeds[0]]["per_class_iou"])
        per_class = {}
        for c in classes:
            present = [run["per_class_iou"][c] for run in runs.values()
                       if run["per_class_iou"].get(c) is not None]
            per_class[c] = _mean(present) if present else None
        stage_seconds = {stage["key"]: stage["seconds"] or 0.0
                         for run in runs.values() for stage in run["stages"].values()}
        arms[name] = {
            "miou": _mean(mious.values()),
            "mean_miou": _mean(mious.values()),
            "sd_miou": _sample_sd(mious.values()),
            "per_seed_miou": mious,
            "pixel_acc": _mean(run["pixel_acc"] for run in runs.values()),
            "per_class_iou": per_class,
            "num_images": runs[seeds[0]].get("num_images"),
            "seconds": sum(stage_seconds.values()),
            "stages": runs[seeds[0]]["stages"],
            "per_seed": runs,
        }
    for name, arm in arms.items():
        twin = naive_twin(name)
        if twin == name or twin not in arms:
            continue
        deltas = {seed: arm["per_seed_miou"][seed] - arms[twin]["per_seed_miou"][seed]
                  for seed in seeds}
        arm.update(naive_twin=twin, paired_delta=deltas, mean_delta=_mean(deltas.values()),
                   positive_deltas=sum(d > 0 for d in deltas.values()))
        arm["beyond_seed_spread"] = _beyond_seed_spread(arm, arms[twin])
    return {"seeds": seeds, "arms": arms, "config": dataclasses.asdict(config)}


def _beyond_seed_spread(arm: dict, twin: dict) -> Optional[bool]:
    """True when every paired delta is > 0 and their mean exceeds both arms' seed sd;
    None with one seed (no spread to compare with)."""
    if arm["sd_miou"] is None or twin["sd_miou"] is None:
        return None
    return (arm["positive_deltas"] == len(arm["paired_delta"])
            and arm["mean_delta"] > max(arm["sd_miou"], twin["sd_miou"]))


def verdict_lines(report: dict) -> list:
    """One line per M&M arm of a multi-seed report: its mean paired delta against the
    seed-to-seed sd of it and its naive twin, and whether the gain is beyond that spread."""
    lines = []
    for name, arm in report["arms"].items():
        if arm.get("beyond_seed_spread") is None:
            continue
        twin = report["arms"][arm["naive_twin"]]
        n = len(arm["paired_delta"])
        verdict = ("a gain beyond the seed-to-seed spread" if arm["beyond_seed_spread"]
                   else "not beyond the seed-to-seed spread")
        lines.append(f"`{name}` vs `{arm['naive_twin']}`: {100 * arm['mean_delta']:+.1f} "
                     f"mean over {n} seeds, {arm['positive_deltas']}/{n} positive; seed sd "
                     f"{100 * arm['sd_miou']:.1f} and {100 * twin['sd_miou']:.1f}: {verdict}.")
    return lines


def _bar_chart(report: dict, path: str) -> None:
    """Writes a PNG bar chart of mIoU per arm (naive arms grey, M&M arms coloured)."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    names = list(report["arms"])
    values = [100 * report["arms"][n]["miou"] for n in names]
    colours = ["#9e9e9e" if "+" not in n else "#1f77b4" for n in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.2), dpi=100)
    bars = ax.bar(names, values, color=colours)
    points = []
    for i, name in enumerate(names):
        for value in report["arms"][name].get("per_seed_miou", {}).values():
            points.append((i, 100 * value))
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="black", s=14,
                   zorder=3, label="one seed")
        ax.legend(loc="upper left", fontsize=8)
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.1f}", ha="center",
                va="bottom", fontsize=9)
    ax.set_ylabel("val mIoU (%)")
    ax.set_ylim(0, max(values + [p[1] for p in points] + [1.0]) * 1.2)
    seeds = report.get("seeds")
    ax.set_title(f"mean mIoU over {len(seeds)} seeds" if seeds else "mIoU per arm")
    fig.autofmt_xdate(rotation=20)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _seed_rows(report: dict) -> list:
    """The arms table of a multi-seed report: mean +- sd, per-seed values, paired deltas."""
    arms, seeds = report["arms"], report["seeds"]
    lines = [f"Seeds: {', '.join(seeds)}. mIoU in %: mean +- sample sd over seeds; paired "
             "delta = this arm's mIoU minus its naive twin's on the same seed.", "",
             "| arm | mIoU mean +- sd | per seed | paired delta per seed | mean delta | "
             "deltas > 0 | pixel acc | minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, arm in arms.items():
        sd = "" if arm["sd_miou"] is None else f" +- {100 * arm['sd_miou']:.1f}"
        per_seed = ", ".join(f"{100 * arm['per_seed_miou'][s]:.1f}" for s in seeds)
        deltas = mean_delta = positive = ""
        if "paired_delta" in arm:
            deltas = ", ".join(f"{100 * arm['paired_delta'][s]:+.1f}" for s in seeds)
            mean_delta = f"{100 * arm['mean_delta']:+.1f} vs `{arm['naive_twin']}`"
            positive = f"{arm['positive_deltas']}/{len(seeds)}"
        lines.append(f"| `{name}` | {100 * arm['mean_miou']:.1f}{sd} | {per_seed} | "
                     f"{deltas} | {mean_delta} | {positive} | {100 * arm['pixel_acc']:.1f} "
                     f"| {arm['seconds'] / 60:.1f} |")
    verdicts = verdict_lines(report)
    return lines + ([""] + verdicts if verdicts else [])


def markdown(report: dict, chart_name: str = "report_miou.png") -> str:
    """The report as Markdown: arms table (over seeds, when it has them), per-class IoU
    table (of the means over seeds), embedded chart."""
    arms = report["arms"]
    if "seeds" in report:
        return _markdown_tail(["# M&M pipeline report", ""] + _seed_rows(report), arms,
                              chart_name, "Per-class IoU of the means over seeds")
    lines = ["# M&M pipeline report", "",
             "| arm | mIoU (%) | delta vs naive twin | pixel acc (%) | seconds |",
             "| --- | --- | --- | --- | --- |"]
    for name, arm in arms.items():
        twin = naive_twin(name)
        delta = ""
        if twin != name and twin in arms:
            delta = f"{100 * (arm['miou'] - arms[twin]['miou']):+.1f} vs `{twin}`"
        lines.append(f"| `{name}` | {100 * arm['miou']:.1f} | {delta} | "
                     f"{100 * arm['pixel_acc']:.1f} | {arm['seconds']:.0f} |")
    return _markdown_tail(lines, arms, chart_name, "Per-class IoU")


def _markdown_tail(lines: list, arms: dict, chart_name: str, title: str) -> str:
    """Appends the per-class IoU table and the chart to the arms table's lines."""
    classes = list(next(iter(arms.values()))["per_class_iou"])
    lines = lines + ["", f"{title} (%; '-' = class absent from the split and never "
                     "predicted):", "",
                     "| arm | " + " | ".join(classes) + " |",
                     "| --- |" + " --- |" * len(classes)]
    for name, arm in arms.items():
        cells = ["-" if arm["per_class_iou"][c] is None
                 else f"{100 * arm['per_class_iou'][c]:.1f}" for c in classes]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", f"![mIoU per arm]({chart_name})", ""]
    return "\n".join(lines)


def write_reports(report: dict, workdir: str) -> None:
    """Writes report.json, report.md and report_miou.png into `workdir`."""
    files.write_json_atomic(os.path.join(workdir, "report.json"), report)
    _bar_chart(report, os.path.join(workdir, "report_miou.png"))
    files.write_text_atomic(os.path.join(workdir, "report.md"), markdown(report))
    # Figures from an earlier bin/figures.py run stay embedded when the report is rewritten.
    embed_figures(workdir)


# ----------------------------------------------------------------------------------------
# Figures (bin/figures.py writes them into workdir/figures/).
# ----------------------------------------------------------------------------------------

FIGURES_DIR = "figures"
# Known figures in report order, with their captions; other PNGs follow alphabetically.
FIGURE_CAPTIONS = {
    "tsne.png": "t-SNE of pool5 patch features (val patches from the mix step) before and "
                "after M&M tuning, coloured by class",
    "qualitative.png": "Validation images where the naive and M&M predictions differ most",
    "gradcam.png": "Grad-CAM of the segmentation networks for one class",
    "graph_size.png": "Graph-size study: val mIoU and seconds per M&M step vs nodes per "
                      "graph",
}
_FIGURES_MARKER = "<!-- figures: written by mm_tf.report.embed_figures -->"


def figure_names(workdir: str) -> list:
    """PNG names in workdir/figures/, known figures first (FIGURE_CAPTIONS order)."""
    folder = os.path.join(workdir, FIGURES_DIR)
    if not os.path.isdir(folder):
        return []
    found = sorted(n for n in os.listdir(folder) if n.lower().endswith(".png"))
    known = [n for n in FIGURE_CAPTIONS if n in found]
    return known + [n for n in found if n not in FIGURE_CAPTIONS]


def figures_markdown(workdir: str) -> str:
    """A '## Figures' section embedding workdir/figures/*.png ('' if there is none)."""
    names = figure_names(workdir)
    if not names:
        return ""
    lines = ["## Figures", ""]
    for name in names:
        caption = FIGURE_CAPTIONS.get(name, os.path.splitext(name)[0].replace("_", " "))
        lines += [f"{caption}:", "", f"![{caption}]({FIGURES_DIR}/{name})", ""]
    return "\n".join(lines)


def embed_figures(workdir: str) -> list:
    """Appends (or replaces) the figures section of workdir/report.md; returns the
    embedded PNG names. The section starts at a marker comment, so repeated calls and
    reports rewritten by `write_reports` stay consistent."""
    path = os.path.join(workdir, "report.md")
    text = ""
    if os.path.isfile(path):
        with open(path) as f:
            text = f.read()
    text = text.split(_FIGURES_MARKER)[0].rstrip("\n") + "\n"
    section = figures_markdown(workdir)
    if section:
        text += "\n" + _FIGURES_MARKER + "\n" + section
    files.write_text_atomic(path, text)
    return figure_names(workdir)
