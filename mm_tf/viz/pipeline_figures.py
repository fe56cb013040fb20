"""The figures of a bin/pipeline.py work folder, found from its report.json.

`make_figures(workdir)` reads report.json, picks an M&M arm (default: the first
`<init>+mm` arm, the paper's graph) and its naive twin `<init>`, and writes into
workdir/figures/:

  tsne.png          pool5 features of the online probe's fixed banks of train and val
                    patches (`mm_tf.probe.sample_bank`: the M&M run's crops and mix
                    settings, fixed seed) before vs after M&M, each panel titled with
                    its 5-NN accuracy (train: leave-one-out; val: against the train
                    bank, the probe's knn_val). "After" is the M&M
                    stage's backbone.weights.h5; "before" is its init: the proxy /
                    ImageNet weights file, or for a random init the run's own Glorot
                    draw, rebuilt by `tuner.build_backbone_from` from the run's --seed
                    (runs before this fix drew unseeded: their "before" is a draw from
                    the same distribution only).
  qualitative.png   image | ground truth | naive | M&M for the val images where the two
                    arms' segmentation predictions differ most (each run's recorded
                    test-time options).
  gradcam.png       Grad-CAM (tf-keras-vis) of both segmentation networks for one class
                    (default: the non-background class with most pixels in those images),
                    scored over the pixels each network predicts as that class.
  graph_size.png    only when the given reports hold M&M (graph) arms of at least two
                    graph sizes; see `mm_tf.viz.figures` for how to run such a study.

and the projector log dir workdir/projector/ (before_mm, after_mm of the val bank;
`mm_tf.viz.projector`),
then embeds the PNGs in report.md (`mm_tf.report.embed_figures`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from mm_tf import common
from mm_tf import evaluation
from mm_tf import files
from mm_tf import mix as mix_lib
from mm_tf import probe
from mm_tf import report as report_lib
from mm_tf import segmenter
from mm_tf import tuner as tuner_lib
from mm_tf.data import datasets
from mm_tf.data import pipeline
from mm_tf.errors import ConfigError
from mm_tf.viz import figures
from mm_tf.viz import projector


@dataclasses.dataclass(frozen=True)
class FigureConfig:
    """What `make_figures` draws.

    Args:
      mm_arm: the M&M arm to show (default: the first `<init>+mm` arm with a naive twin,
        else any M&M arm with one).
      max_images: val images predicted for the qualitative grid and Grad-CAM (0 = all).
      rows: images in the qualitative grid and the Grad-CAM figure.
      max_patches: patches per split (train, val) in the t-SNE and the projector (val),
        rounded down to whole crops of patches_per_image patches.
      seed: seed of the patch banks and of t-SNE.
      perplexity: t-SNE perplexity (capped for small samples).
      gradcam_class: class name for Grad-CAM (default: see module docstring).
      gradcam_layer: backbone layer of the Grad-CAM (default: the last ReLU before pool5).
      projector: also write workdir/projector.
      graph_workdirs: pipeline folders whose reports join this one in the graph-size
        study.
      train_split: the split of the train bank (same data set as the evaluation split).
    """

    mm_arm: Optional[str] = None
    max_images: int = 0
    rows: int = 4
    max_patches: int = 600
    seed: int = 0
    perplexity: float = 30.0
    gradcam_class: Optional[str] = None
    gradcam_layer: Optional[str] = None
    projector: bool = True
    graph_workdirs: tuple = ()
    train_split: str = "train"


def read_report(workdir: str) -> dict:
    """workdir/report.json, or ConfigError saying how to make it."""
    path = os.path.join(workdir, "report.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: --workdir must be a finished bin/pipeline.py "
                          "folder")
    with open(path) as f:
        return json.load(f)


def pick_arms(report: dict, mm_arm: Optional[str] = None):
    """(naive arm, M&M arm) names: `mm_arm` and its twin, else the first `<init>+mm` arm
    whose naive twin ran, else the first M&M arm with a twin."""
    arms = report["arms"]
    with_mm = [name for name, arm in arms.items() if "mm" in arm["stages"]]
    if mm_arm is not None:
        if mm_arm not in with_mm:
            raise ConfigError(f"--mm_arm={mm_arm}: not an M&M arm of this report "
                              f"({with_mm or 'none'})")
        candidates = [mm_arm]
    else:
        candidates = ([n for n in with_mm if n.endswith("+mm")]
                      + [n for n in with_mm if not n.endswith("+mm")])
    for name in candidates:
        twin = report_lib.naive_twin(name)
        if twin in arms:
            return twin, name
    raise ConfigError(f"no M&M arm with its naive twin among {sorted(arms)} (e.g. run the "
                      "arms random and random+mm)")


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def mm_summary(report: dict, arm: str) -> dict:
    """summary.json of `arm`'s M&M stage."""
    return _read_json(os.path.join(report["arms"][arm]["stages"]["mm"]["workdir"],
                                   "summary.json"))


def _tune_config(summary: dict) -> tuner_lib.TuneConfig:
    """The TuneConfig an M&M stage ran with, from its summary.json."""
    fields = {f.name for f in dataclasses.fields(tuner_lib.TuneConfig)}
    tune = {k: v for k, v in summary["config"]["tune"].items() if k in fields}
    if "lr_boundaries" in tune:
        tune["lr_boundaries"] = tuple(tune["lr_boundaries"])
    return tuner_lib.TuneConfig(**tune)


def before_backbone(summary: dict) -> keras.Model:
    """The M&M stage's starting backbone (see module docstring for a random init)."""
    return tuner_lib.build_backbone_from(_tune_config(summary))


def after_backbone(summary: dict) -> keras.Model:
    """The M&M stage's tuned backbone (its backbone.weights.h5)."""
    return tuner_lib.build_backbone_from(
        dataclasses.replace(_tune_config(summary), init=summary["backbone_weights"]))


def graph_study_points(reports: Sequence[dict], triplet_mode: str = "graph") -> list:
    """(nodes per graph, val mIoU, seconds per M&M step) of every arm of `reports` whose
    M&M stage used `triplet_mode`. Seconds per step = the stage's training-loop seconds
    (summary.json, tracing included) / the steps it ran."""
    points = []
    for report in reports:
        for name, arm in report["arms"].items():
            if "mm" not in arm["stages"]:
                continue
            summary = mm_summary(report, name)
            if summary["config"]["tune"].get("triplet_mode") != triplet_mode:
                continue
            steps = max(1, int(summary["steps"]) - int(summary.get("resumed_from_step", 0)))
            points.append((int(summary["graph_nodes"]), float(arm["miou"]),
                           float(summary["seconds"]) / steps))
    return points


def _resolve(path: str, report: dict) -> str:
    """A data path recorded by a stage (relative to the repo the pipeline ran in)."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(report.get("config", {}).get("repo_root", ""), path)


def val_data(model_config: dict, report: dict, split: Optional[str] = None):
    """(pairs, info) of the split a seg run was evaluated on (its model_config.json), or
    of `split` of the same data set."""
    data = model_config.get("data", {})
    dataset = data.get("dataset") or model_config["dataset"]
    list_file = data.get("list_file")
    return datasets.read_dataset(
        dataset, _resolve(data.get("data_dir"), report), split or data.get("split") or "val",
        list_file=_resolve(list_file, report) if list_file else None,
        num_classes=data.get("num_classes") if dataset == "list" else None,
        ignore_label=data.get("ignore_label") if dataset == "list" else None)


def figure_banks(summary: dict, train_pairs, val_pairs, info, input_mode: str,
                 config: FigureConfig) -> dict:
    """{"train": PatchBank, "val": PatchBank}: the probe's banks (`probe.sample_bank`)
    with the M&M stage's crops and mix settings, max_patches // patches_per_image crops
    per split, seeded by `config.seed`."""
    mix_config = mix_lib.MixConfig(**summary["config"]["mix"])
    fields = {f.name for f in dataclasses.fields(pipeline.InputConfig)}
    recorded = {k: v for k, v in summary["config"].get("input", {}).items() if k in fields}
    # The banks read the pairs found here, whatever source the stage trained from.
    recorded.update(input_mode=input_mode, source=pipeline.SOURCE_FILES)
    recorded.pop("tfrecord_pattern", None)
    bank = dict(input_config=pipeline.InputConfig(**recorded), mix_config=mix_config,
                num_images=max(1, config.max_patches // mix_config.patches_per_image),
                seed=config.seed)
    return {"train": probe.sample_bank(train_pairs, info, split="train", **bank),
            "val": probe.sample_bank(val_pairs, info, split="val", **bank)}


def _inference(model_config: dict) -> evaluation.InferenceConfig:
    recorded = model_config.get("inference", {})
    return evaluation.InferenceConfig(
        flip=bool(recorded.get("flip", False)),
        scales=tuple(recorded.get("scales", (1.0,))),
        window=int(recorded.get("window", 0)), stride=int(recorded.get("stride", 0)))


def _predict_all(network, model_config, batches) -> list:
    """Argmax predictions [H,W] of every batch (one image each)."""
    fn = tf.function(lambda x: tf.cast(network(x, training=False), tf.float32),
                     reduce_retracing=True)
    inference = _inference(model_config)
    return [np.argmax(evaluation.predict_probabilities(
        fn, batch[common.IMAGE], network.num_classes, inference)[0], axis=-1)
        for batch in batches]


def _gradcam_class(config: FigureConfig, info, truths) -> int:
    if config.gradcam_class is not None:
        if config.gradcam_class not in info.class_names:
            raise ConfigError(f"--gradcam_class={config.gradcam_class}: expected one of "
                              f"{list(info.class_names)}")
        return info.class_names.index(config.gradcam_class)
    counts = np.zeros(info.num_classes, np.int64)
    for truth in truths:
        values = np.asarray(truth).ravel()
        counts += np.bincount(values[values < info.num_classes], minlength=info.num_classes)
    if info.background_class is not None and counts.sum() > counts[info.background_class]:
        counts[info.background_class] = -1
    return int(np.argmax(counts))


def make_figures(workdir: str, config: FigureConfig = FigureConfig(),
                 log=print) -> dict:
    """Writes the figures (and projector) of a pipeline work folder; returns a manifest
    {figure name: path or the reason it was skipped, ...} also saved as
    figures/figures.json."""
    workdir = os.path.abspath(workdir)
    report = read_report(workdir)
    naive, mm = pick_arms(report, config.mm_arm)
    out = os.path.join(workdir, report_lib.FIGURES_DIR)
    os.makedirs(out, exist_ok=True)
    manifest = {"naive_arm": naive, "mm_arm": mm}
    log(f"figures of {workdir}: naive arm {naive!r} vs M&M arm {mm!r}")

    summary = mm_summary(report, mm)
    seg = {arm: report["arms"][arm]["stages"]["seg"]["workdir"] for arm in (naive, mm)}
    networks = {arm: segmenter.load_trained_model(seg[arm]) for arm in (naive, mm)}
    model_config = networks[mm][1]
    pairs, info = val_data(model_config, report)
    input_mode = model_config["input_mode"]

    # t-SNE and projector: pool5 features of the probe's fixed train and val banks (the
    # M&M run's crops and mix settings) before / after M&M.
    train_pairs, _ = val_data(model_config, report, split=config.train_split)
    banks = figure_banks(summary, train_pairs, pairs, info, input_mode, config)
    tuned = {"before_mm": before_backbone(summary), "after_mm": after_backbone(summary)}
    features = {(name, split): probe.backbone_embeddings(b, banks[split].patches)
                for name, b in tuned.items() for split in banks}
    scores = {name: probe.probe_metrics(features[name, "train"], banks["train"].labels,
                                        features[name, "val"], banks["val"].labels)
              for name in tuned}
    titles = {"before_mm": "before M&M (init)", "after_mm": f"after M&M ({mm})"}
    panels, accuracies = [], []
    for split, how, key in (("train", "leave-one-out", "knn_train_loo"),
                            ("val", "in the train bank", probe.KNN_VAL)):
        for name in tuned:
            panels.append((f"{titles[name]}: {split} patches ({how})",
                           features[name, split], banks[split].labels))
            accuracies.append(scores[name][key])
    path = os.path.join(out, "tsne.png")
    figures.tsne_figure(panels, info.class_names, info.palette, path, accuracies=accuracies,
                        columns=len(tuned), seed=config.seed, perplexity=config.perplexity)
    manifest.update(tsne=path, patches={split: len(b) for split, b in banks.items()},
                    knn_accuracy=scores)
    log(f"  tsne.png: {len(banks['train'])} train and {len(banks['val'])} val patches")
    if config.projector:
        projector_dir = os.path.join(workdir, "projector")
        projector.write_projector(projector_dir,
                                  {name: features[name, "val"] for name in tuned},
                                  banks["val"].labels, info.class_names,
                                  banks["val"].thumbnails, banks["val"].sources())
        manifest["projector"] = projector_dir
        log(f"  projector: tensorboard --logdir={projector_dir}")

    # Qualitative grid: where the naive and M&M predictions differ most.
    used = pairs[:config.max_images] if config.max_images else pairs
    batches = list(pipeline.eval_dataset(used, info, pipeline.InputConfig(
        input_mode=input_mode)))
    predictions = {arm: _predict_all(networks[arm][0], networks[arm][1], batches)
                   for arm in (naive, mm)}
    truths = [batch[common.LABEL][0].numpy() for batch in batches]
    chosen = figures.most_different(predictions[naive], predictions[mm], truths, config.rows)
    rows = [{"image": batches[i][common.RAW_IMAGE][0].numpy(), "truth": truths[i],
             "predictions": [predictions[naive][i], predictions[mm][i]],
             "name": os.path.basename(used[i][0])} for i in chosen]
    path = os.path.join(out, "qualitative.png")
    figures.qualitative_figure(rows, info.class_names, info.palette, path,
                               titles=("image", "ground truth", f"naive ({naive})",
                                       f"M&M ({mm})"))
    manifest.update(qualitative=path, qualitative_images=[row["name"] for row in rows])
    log(f"  qualitative.png: {len(rows)} of {len(batches)} images")

    # Grad-CAM of both segmentation networks on those images; each network's score is
    # its mean logit of the class over the pixels it predicts as the class (the whole
    # image when there is none).
    class_index = _gradcam_class(config, info, [row["truth"] for row in rows])
    layer = config.gradcam_layer or figures.gradcam_layer(networks[mm][0].backbone)
    cams = []
    for title, arm in (("naive", naive), ("M&M", mm)):
        network = networks[arm][0]
        model = figures.gradcam_model(network, with_region=True)
        maps = []
        for i in chosen:
            region = predictions[arm][i] == class_index
            if not region.any():
                region = np.ones_like(region)
            maps.append(figures.gradcam(network, batches[i][common.IMAGE], class_index,
                                        layer=layer, region=region[None].astype(np.float32),
                                        model=model)[0])
        cams.append((title, maps))
    path = os.path.join(out, "gradcam.png")
    figures.gradcam_figure([row["image"] for row in rows], [row["truth"] for row in rows],
                           cams, class_index, info.class_names, info.palette, path,
                           layer=layer)
    manifest.update(gradcam=path, gradcam_class=info.class_names[class_index],
                    gradcam_layer=layer, gradcam_empty={
                        title: int(sum(not np.asarray(m).any() for m in maps))
                        for title, maps in cams})
    log(f"  gradcam.png: class {info.class_names[class_index]!r} at {layer}")

    # Graph-size study.
    reports = [report] + [read_report(os.path.abspath(d)) for d in config.graph_workdirs
                          if os.path.abspath(d) != workdir]
    points = graph_study_points(reports)
    manifest["graph_points"] = points
    if len({nodes for nodes, _, _ in points}) >= 2:
        path = os.path.join(out, "graph_size.png")
        figures.graph_size_figure(points, path)
        manifest["graph_size"] = path
        log(f"  graph_size.png: {len(points)} M&M arms")
    else:
        manifest["graph_size"] = ("skipped: the reports hold M&M (graph) arms of "
                                  f"{len({n for n, _, _ in points})} graph size(s); give "
                                  "--graph_workdirs of pipelines run with other --batch_size")
        stale = os.path.join(out, "graph_size.png")
        if os.path.exists(stale):
            os.remove(stale)
        log(f"  graph_size.png: {manifest['graph_size']}")

    files.write_json_atomic(os.path.join(out, "figures.json"), manifest)
    manifest["embedded"] = report_lib.embed_figures(workdir)
    return manifest
