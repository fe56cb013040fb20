"""mm_tf/viz/figures.py: every figure writes a non-empty PNG with the expected panels on
tiny inputs; Grad-CAM by tf-keras-vis equals the GradientTape fallback; the helpers
(most-different images, Grad-CAM layer) by hand; report.md embedding."""

import keras
import numpy as np
import pytest
from PIL import Image

from mm_tf import report
from mm_tf.models import heads
from mm_tf.viz import figures

CLASS_NAMES = ("background", "disc", "square", "triangle", "ring")
PALETTE = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]],
                   np.uint8)


def _png_size(path):
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        return image.size


def test_tsne_figure_grid_of_panels(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    before = rng.normal(size=(30, 8))
    after = before + 4.0 * np.eye(8)[labels]  # Class-separated.
    # A train row of two panels and a val panel of another size and classes below.
    val_labels = np.array([0, 1, 3, 3, 1, 0, 3, 1])
    path = tmp_path / "tsne.png"
    assert figures.tsne_figure([("before, train", before, labels), ("after, train", after, labels),
                                ("after, val", rng.normal(size=(8, 8)), val_labels)],
                               CLASS_NAMES, PALETTE, str(path), accuracies=[0.1, 0.2, 0.3],
                               columns=2, perplexity=2) == 3  # the empty cell is removed
    width, height = _png_size(path)
    assert height > 0.8 * width  # two rows of two columns
    with pytest.raises(ValueError, match="labels"):
        figures.tsne_figure([("x", before, labels[:5])], CLASS_NAMES, PALETTE, str(path))


def test_graph_size_figure(tmp_path):
    path = tmp_path / "graph.png"
    assert figures.graph_size_figure([(48, 0.30, 0.9), (16, 0.25, 0.3), (96, 0.33, 1.8)],
                                     str(path)) == 2
    width, height = _png_size(path)
    assert width > 2 * height * 0.9
    with pytest.raises(ValueError):
        figures.graph_size_figure([], str(path))


def test_qualitative_figure_rows_by_columns(tmp_path):
    rng = np.random.default_rng(1)
    rows = [{"image": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8),
             "truth": rng.integers(0, 5, (24, 32)),
             "predictions": [rng.integers(0, 5, (24, 32)), rng.integers(0, 5, (24, 32))],
             "name": f"img{i}"} for i in range(3)]
    rows[0]["truth"][0, 0] = 255
    path = tmp_path / "qualitative.png"
    assert figures.qualitative_figure(rows, CLASS_NAMES, PALETTE, str(path)) == 12
    width, height = _png_size(path)
    assert height > width * 0.5  # Three rows of four 4:3 panels and a legend.
    with pytest.raises(ValueError, match="label maps"):
        figures.qualitative_figure([dict(rows[0], predictions=[])], CLASS_NAMES, PALETTE,
                                   str(path))


def test_most_different():
    truth = np.zeros((2, 2), np.int64)
    truth[0, 0] = 255
    a = [np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2))]
    b = [np.ones((2, 2)), np.zeros((2, 2)), np.array([[1, 1], [0, 0]])]
    # Image 0: 3/3 labelled pixels differ; image 2: 1/3 (its (0,0) is ignored); image 1: 0.
    assert figures.most_different(a, b, [truth] * 3, 2) == [0, 2]


@pytest.fixture(scope="module")
def network():
    keras.utils.set_random_seed(0)
    return heads.build_segmentation_model("vgg16", "hypercolumn", 5, width=0.0625)


def test_gradcam_tf_keras_vis_equals_the_tape(network):
    assert figures.gradcam_layer(network.backbone) == "conv5_3_relu"
    model = figures.gradcam_model(network)
    assert model.get_layer("conv5_3_relu") is network.backbone.get_layer("conv5_3_relu")
    images = np.random.default_rng(2).normal(0, 60, (2, 64, 80, 3)).astype(np.float32)
    np.testing.assert_allclose(model(images).numpy(),
                               network(images).numpy().mean(axis=(1, 2)), atol=1e-5)
    for expand, shape in ((False, (2, 4, 5)), (True, (2, 64, 80))):
        vis = figures.gradcam(network, images, 2, expand=expand, model=model)
        tape = figures.gradcam_tape(network, images, 2, expand=expand, model=model)
        assert vis.shape == tape.shape == shape
        np.testing.assert_allclose(vis, tape, atol=1e-4)
        assert vis.min() >= 0 and vis.max() <= 1 + 1e-6
    # Seg-Grad-CAM: the score is the class's mean logit over a region.
    region = np.zeros((2, 64, 80), np.float32)
    region[:, 10:40, 20:60] = 1.0
    region_model = figures.gradcam_model(network, with_region=True)
    logits = network(images).numpy()
    np.testing.assert_allclose(region_model([images, region]).numpy(),
                               logits[:, 10:40, 20:60].mean(axis=(1, 2)), atol=1e-5)
    vis = figures.gradcam(network, images, 3, layer="conv4_3_relu", region=region,
                          model=region_model)
    tape = figures.gradcam_tape(network, images, 3, layer="conv4_3_relu", region=region,
                                model=region_model)
    assert vis.shape == (2, 64, 80)
    np.testing.assert_allclose(vis, tape, atol=1e-4)


def test_gradcam_figure(network, tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    truths = np.random.default_rng(4).integers(0, 5, (2, 48, 64))
    cams = [("naive", np.random.default_rng(5).random((2, 48, 64))),
            ("M&M", np.random.default_rng(6).random((2, 48, 64)))]
    path = tmp_path / "gradcam.png"
    cams[0][1][1] = 0.0  # An empty CAM gets a note instead of a blank panel.
    assert figures.gradcam_figure(images, truths, cams, 1, CLASS_NAMES, PALETTE,
                                  str(path), layer="conv5_3_relu") == 8
    _png_size(path)


def test_report_embeds_figures(tmp_path):
    (tmp_path / "report.md").write_text("# M&M pipeline report\n\ntable\n")
    assert report.embed_figures(str(tmp_path)) == []
    (tmp_path / "figures").mkdir()
    for name in ("qualitative.png", "tsne.png", "extra.png"):
        (tmp_path / "figures" / name).write_bytes(b"png")
    embedded = report.embed_figures(str(tmp_path))
    assert embedded == ["tsne.png", "qualitative.png", "extra.png"]
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# M&M pipeline report\n\ntable\n")
    assert "![" in text and "(figures/tsne.png)" in text
    # Idempotent: a second call replaces the section.
    report.embed_figures(str(tmp_path))
    assert (tmp_path / "report.md").read_text() == text
