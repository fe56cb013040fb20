"""The pipeline's reports: report.json (machine-readable), report.md (a table of arms
with each M&M arm's delta over its naive twin, per-class IoU) and the bar chart it
embeds."""

from __future__ import annotations

import dataclasses
import json
import os

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
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.1f}", ha="center",
                va="bottom", fontsize=9)
    ax.set_ylabel("val mIoU (%)")
    ax.set_ylim(0, max(values + [1.0]) * 1.2)
    ax.set_title("mIoU per arm")
    fig.autofmt_xdate(rotation=20)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(report: dict, chart_name: str = "report_miou.png") -> str:
    """The report as Markdown: arms table, per-class IoU table, embedded chart."""
    arms = report["arms"]
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
    classes = list(next(iter(arms.values()))["per_class_iou"])
    lines += ["", "Per-class IoU (%; '-' = class absent from the split and never predicted):",
              "", "| arm | " + " | ".join(classes) + " |",
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
