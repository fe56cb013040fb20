"""mm_tf/viz/pipeline_figures.py (bin/figures.py's work): on a miniature pipeline folder
(report.json, an M&M stage, two seg runs; tiny untrained networks) it finds the arms and
weights, writes every figure and the projector, and embeds them in report.md; a second
pipeline of another graph size adds the graph-size study."""

import json
import os

import keras
import numpy as np
import pytest

from mm_tf import report as report_lib
from mm_tf import segmenter
from mm_tf.data import datasets
from mm_tf.errors import ConfigError
from mm_tf.models import backbones
from mm_tf.viz import pipeline_figures

MIX = {"patches_per_image": 4, "patch_size": 32, "min_side": 16, "max_side": 48,
       "background_fraction": 0.25, "background_class": 0, "ignore_label": 255,
       "oversample": 5, "max_overlap": 0.6, "class_balanced": False,
       "use_gather_resize": False}


def _pipeline(root, data_dir, info, batch, seed):
    """A pipeline folder with arms `random` and `random+mm` of M&M batch `batch`."""
    keras.utils.set_random_seed(seed)
    mm_dir = root / "mm" / "random_graph"
    mm_dir.mkdir(parents=True)
    backbone = backbones.build_backbone("vgg16", width=0.0625)
    backbones.save_backbone_weights(backbone, str(mm_dir / "backbone.weights.h5"))
    (mm_dir / "summary.json").write_text(json.dumps({
        "steps": 10, "resumed_from_step": 0, "seconds": 0.5 * batch, "graph_nodes": 4 * batch,
        "backbone_weights": str(mm_dir / "backbone.weights.h5"),
        "config": {"tune": {"backbone": "vgg16", "width": 0.0625, "input_mode": "rgb",
                            "init": "random", "seed": seed, "triplet_mode": "graph"},
                   "mix": MIX, "dataset": "demo",
                   "input": {"crop_size": 64, "batch_size": batch, "min_scale": 0.75,
                             "max_scale": 1.25, "input_mode": "rgb", "seed": 0}}}))
    config = segmenter.SegConfig(backbone="vgg16", head="hypercolumn", width=0.0625)
    model_config = segmenter.model_config_dict(
        config, info, {"dataset": "demo", "data_dir": str(data_dir), "split": "val"})
    arms = {}
    for k, arm in enumerate(("random", "random+mm_graph")):
        seg_dir = root / "seg" / arm
        network = segmenter.build_network(config, info.num_classes)
        rng = np.random.default_rng(seed + k)
        for variable in network.non_trainable_variables:
            value = (rng.uniform(0.5, 2.0, variable.shape) if "variance" in variable.path
                     else rng.normal(0.0, 0.2, variable.shape))
            variable.assign(value.astype(np.float32))
        segmenter.save_network_weights(network, str(seg_dir / segmenter.MODEL_WEIGHTS))
        (seg_dir / segmenter.MODEL_CONFIG).write_text(json.dumps(model_config))
        arms[arm] = str(seg_dir)
    report = {"arms": {
        "random": {"miou": 0.2, "pixel_acc": 0.5, "per_class_iou": {}, "seconds": 1.0,
                   "stages": {"seg": {"workdir": arms["random"]}}},
        "random+mm": {"miou": 0.2 + 0.01 * batch, "pixel_acc": 0.5, "per_class_iou": {},
                      "seconds": 1.0,
                      "stages": {"mm": {"workdir": str(mm_dir)},
                                 "seg": {"workdir": arms["random+mm_graph"]}}}},
        "config": {"repo_root": "/nonexistent"}}
    (root / "report.json").write_text(json.dumps(report))
    (root / "report.md").write_text("# M&M pipeline report\n")
    return root


def test_make_figures_on_a_pipeline_folder(small_demo_dir, tmp_path):
    _, info = datasets.read_dataset("demo", small_demo_dir, "val")
    workdir = _pipeline(tmp_path / "b2", small_demo_dir, info, batch=2, seed=0)
    other = _pipeline(tmp_path / "b4", small_demo_dir, info, batch=4, seed=1)
    config = pipeline_figures.FigureConfig(rows=2, max_patches=24, perplexity=5,
                                           graph_workdirs=(str(other),))
    manifest = pipeline_figures.make_figures(str(workdir), config, log=lambda _: None)
    assert manifest["naive_arm"] == "random" and manifest["mm_arm"] == "random+mm"
    # 24 // 4 = 6 crops per split: 6 of the 16 train images, all 4 val images.
    assert manifest["patches"] == {"train": 24, "val": 16}
    for scores in manifest["knn_accuracy"].values():
        assert 0 <= scores["knn_val"] <= 1 and 0 <= scores["knn_train_loo"] <= 1
    np.testing.assert_allclose(sorted(manifest["graph_points"]), [(8, 0.22, 0.1),
                                                                  (16, 0.24, 0.2)])
    assert manifest["gradcam_layer"] == "conv5_3_relu"
    assert manifest["gradcam_class"] in info.class_names[1:]
    for name in ("tsne", "qualitative", "gradcam", "graph_size"):
        assert os.path.getsize(manifest[name]) > 1000
    assert manifest["embedded"] == ["tsne.png", "qualitative.png", "gradcam.png",
                                    "graph_size.png"]
    text = (workdir / "report.md").read_text()
    assert text.startswith("# M&M pipeline report\n") and "(figures/graph_size.png)" in text
    assert (workdir / "projector" / "projector_config.pbtxt").is_file()
    rows = (workdir / "projector" / "metadata.tsv").read_text().splitlines()
    assert len(rows) - 1 == 16
    assert json.loads((workdir / "figures" / "figures.json").read_text())["mm_arm"] == \
        "random+mm"
    # The "before" backbone of a random init is the seeded Glorot draw: repeatable.
    summary = pipeline_figures.mm_summary(json.loads((workdir / "report.json").read_text()),
                                          "random+mm")
    a = pipeline_figures.before_backbone(summary).get_weights()
    b = pipeline_figures.before_backbone(summary).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_pick_arms():
    report = {"arms": {"random": {"stages": {}},
                       "random+mm_random": {"stages": {"mm": {}}},
                       "random+mm": {"stages": {"mm": {}}},
                       "jigsaw+mm": {"stages": {"mm": {}}}}}
    assert pipeline_figures.pick_arms(report) == ("random", "random+mm")
    assert pipeline_figures.pick_arms(report, "random+mm_random") == ("random",
                                                                       "random+mm_random")
    with pytest.raises(ConfigError, match="not an M&M arm"):
        pipeline_figures.pick_arms(report, "random")
    with pytest.raises(ConfigError, match="naive twin"):
        pipeline_figures.pick_arms(report, "jigsaw+mm")
    assert report_lib.naive_twin("jigsaw+mm") == "jigsaw"
