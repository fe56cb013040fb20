"""The report's figures as PNG files (matplotlib, Agg backend). Each function takes
plain arrays, writes one PNG and returns the number of axes it drew, so tests (and
callers) can check the layout without reading pixels.

* `tsne_figure`: t-SNE (sklearn.manifold.TSNE) of patch features, one panel per feature
  set (e.g. before / after M&M x train / val patches), points in the data set's class
  colours, class names in the legend; each panel's title gives a 5-NN class accuracy of
  its features (the probe's, `mm_tf.probe`: leave-one-out by default).
* `graph_size_figure`: the graph-size study: val mIoU and seconds per M&M step against
  nodes per graph (global batch x patches per image), from (nodes, miou, sec_per_step)
  points. A pipeline's arms differ in init and triplet mode, not in batch size, so the
  study is one pipeline per batch size, each given an M&M flagfile that includes the
  base one and overrides --batch_size (nodes = batch_size x patches_per_image):

      printf -- '--flagfile=flags/demo_mm.flags\\n--batch_size=4\\n' > /tmp/mm_b4.flags
      python bin/pipeline.py --flagfile=flags/demo.flags --arms=random+mm \\
          --mm_flagfile=/tmp/mm_b4.flags --workdir=work/graph/b4
      (likewise b8, b16), then
      python bin/figures.py --workdir=work/graph/b4 \\
          --graph_workdirs=work/graph/b4,work/graph/b8,work/graph/b16

  (`graph_study_points` also takes one report.json whose arms' M&M stages differ in
  graph size, should the arm grammar ever allow it.)
* `qualitative_figure`: rows of image | ground truth | naive | M&M in the palette, a
  legend of the classes shown; `most_different` picks the images where the two
  predictions differ most.
* Grad-CAM of a segmentation network for one class: `gradcam` (tf-keras-vis `Gradcam`
  with `CategoricalScore`) and `gradcam_tape` (the same computation with
  tf.GradientTape, the fallback, equal to it in tests); `gradcam_figure` draws them.
  tf-keras-vis needs a functional Keras model whose layers include the named
  penultimate layer. `SegmentationModel` is subclassed, so `gradcam_model` builds a
  functional wrapper from the backbone's own input and endpoint tensors (its layers are
  the backbone's layers, e.g. `conv5_3_relu`) and a `ClassScores` layer: the head's
  logits averaged over the image -> [B,K], or over a region given as a second input
  (Seg-Grad-CAM, Vinogradova et al. 2020: the pixels predicted as the class); the score
  of class c (`CategoricalScore(c)`) is that mean logit of c. The default layer is the
  last ReLU before pool5, the deepest layer M&M tunes. Grad-CAM is ReLU(sum_k w_k A_k):
  where every location's weighted sum is negative the map is empty, which the figure
  says. The head is wrapped in a layer because `HypercolumnHead.compute_output_shape`
  takes a non-shape argument (`upsample`), which Keras 3.15 rejects when the head is
  called on symbolic tensors ("all arguments should have a `_shape` suffix").
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from mm_tf import common
from mm_tf import probe
from mm_tf import summaries
from mm_tf.models.heads import DATA

# tf-keras-vis normalises CAMs as (x - min) / (max - min + K.epsilon()).
_CAM_EPSILON = 1e-7
_DPI = 100
# Image grids: inches per panel column, and for the column titles and the class legend.
_CELL = 2.2
_TITLE = 0.5
_LEGEND = 0.8


def _pyplot():
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    return plt


def _colour(palette, k: int) -> Tuple[float, float, float]:
    return tuple(float(v) / 255.0 for v in np.asarray(palette)[k])


def _class_legend(fig, class_ids, class_names, palette, ignore: bool = False,
                  title: str = "classes"):
    """A figure legend of coloured squares with the class names (and 'ignore')."""
    from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel
    handles = [Patch(facecolor=_colour(palette, k), edgecolor="black", linewidth=0.5,
                     label=class_names[k]) for k in class_ids]
    if ignore:
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=0.5,
                             label="ignore"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6),
               title=title, frameon=False, fontsize=8, title_fontsize=8)


def _save(fig, path: str) -> int:
    count = len(fig.axes)
    fig.savefig(path, dpi=_DPI)
    _pyplot().close(fig)
    return count


# ----------------------------------------------------------------------------------------
# t-SNE.
# ----------------------------------------------------------------------------------------

def tsne_embed(features, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """features [N,D] -> [N,2] with sklearn's TSNE (PCA init, fixed seed); perplexity is
    capped at (N - 1) / 3 so small sets work."""
    from sklearn.manifold import TSNE  # pylint: disable=import-outside-toplevel
    features = np.asarray(features, np.float32)
    perplexity = float(min(perplexity, max(1.0, (len(features) - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca",
                random_state=seed).fit_transform(features)


def tsne_figure(panels: Sequence[Tuple[str, np.ndarray, np.ndarray]], class_names, palette,
                path: str, *, accuracies: Optional[Sequence[float]] = None,
                columns: Optional[int] = None, seed: int = 0, perplexity: float = 30.0,
                title: Optional[str] = None) -> int:
    """t-SNE maps in a grid of `columns` (default: one row), e.g. [("before M&M, val",
    features [N,D], labels [N]), ...]; each title ends with its panel's 5-NN class
    accuracy (`accuracies`, default the leave-one-out `probe.knn_accuracy_loo`). Returns
    the number of axes (one per panel)."""
    plt = _pyplot()
    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.2 * rows + 0.6),
                             dpi=_DPI, squeeze=False)
    present = set()
    for i, (name, features, labels) in enumerate(panels):
        ax = axes[i // columns][i % columns]
        labels = np.asarray(labels, np.int64)
        if len(features) != len(labels):
            raise ValueError(f"panel {name!r}: {len(features)} features for {len(labels)} "
                             "labels")
        accuracy = (accuracies[i] if accuracies is not None
                    else probe.knn_accuracy_loo(features, labels))
        points = tsne_embed(features, seed, perplexity)
        for k in sorted(set(labels.tolist())):
            mask = labels == k
            ax.scatter(points[mask, 0], points[mask, 1], s=12, color=_colour(palette, k),
                       edgecolors="black", linewidths=0.3, label=class_names[k])
        present.update(labels.tolist())
        ax.set_title(f"{name}\n5-NN class accuracy {accuracy:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for i in range(len(panels), rows * columns):
        axes[i // columns][i % columns].remove()
    _class_legend(fig, sorted(present), class_names, palette)
    fig.suptitle(title or "t-SNE of pool5 patch features", fontsize=10)
    fig.tight_layout(rect=(0, 0.12 / rows, 1, 0.95))
    return _save(fig, path)


# ----------------------------------------------------------------------------------------
# Graph-size study.
# ----------------------------------------------------------------------------------------

def graph_size_figure(points: Sequence[Tuple[float, float, float]], path: str,
                      title: str = "M&M graph size") -> int:
    """points: (nodes per graph, val mIoU in [0,1], seconds per M&M step); two panels
    (mIoU vs nodes, seconds/step vs nodes); returns the axes count (2)."""
    if not points:
        raise ValueError("graph_size_figure: no point")
    plt = _pyplot()
    points = sorted((float(n), float(m), float(s)) for n, m, s in points)
    nodes = [p[0] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.4), dpi=_DPI)
    left.plot(nodes, [100 * p[1] for p in points], "o-", color="#1f77b4")
    left.set_ylabel("val mIoU (%)")
    right.plot(nodes, [p[2] for p in points], "s-", color="#d62728")
    right.set_ylabel("seconds per M&M step")
    for ax in (left, right):
        ax.set_xlabel("nodes per graph (batch x patches per image)")
        ax.set_xticks(sorted(set(nodes)))
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------
# Qualitative grid.
# ----------------------------------------------------------------------------------------

def most_different(first: Sequence[np.ndarray], second: Sequence[np.ndarray],
                   truths: Sequence[np.ndarray], count: int,
                   ignore_label: int = common.IGNORE_LABEL) -> list:
    """Indices of the `count` images whose two predictions [H,W] differ on the largest
    share of labelled pixels, largest first (ties: lower index first)."""
    shares = []
    for a, b, truth in zip(first, second, truths):
        labelled = np.asarray(truth) != ignore_label
        shares.append(float(np.mean((np.asarray(a) != np.asarray(b))[labelled]))
                      if labelled.any() else 0.0)
    order = sorted(range(len(shares)), key=lambda i: (-shares[i], i))
    return order[:count]


def qualitative_figure(rows: Sequence[dict], class_names, palette, path: str,
                       titles: Sequence[str] = ("image", "ground truth", "naive", "M&M"),
                       ignore_label: int = common.IGNORE_LABEL) -> int:
    """rows: dicts with `image` uint8 [H,W,3], `truth` and one label map [H,W] per title
    after the first two (`predictions`: list in title order), optional `name`; returns
    the axes count (rows x columns)."""
    if not rows:
        raise ValueError("qualitative_figure: no row")
    plt = _pyplot()
    columns = len(titles)
    height, width = np.asarray(rows[0]["image"]).shape[:2]
    fig_height = _CELL * height / width * len(rows) + _TITLE + _LEGEND
    fig, axes = plt.subplots(len(rows), columns, dpi=_DPI, squeeze=False,
                             figsize=(_CELL * columns, fig_height))
    shown = set()
    for r, row in enumerate(rows):
        maps = [row["truth"]] + list(row["predictions"])
        if len(maps) != columns - 1:
            raise ValueError(f"row {r}: {len(maps)} label maps for {columns - 1} columns")
        panels = [np.asarray(row["image"], np.uint8)] + [
            summaries.colorize(m, palette) for m in maps]
        for m in maps:
            values = np.unique(np.asarray(m))
            shown.update(int(v) for v in values if v != ignore_label and v < len(class_names))
        for c, (ax, panel) in enumerate(zip(axes[r], panels)):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        if row.get("name"):
            axes[r][0].set_ylabel(row["name"], fontsize=7)
    has_ignore = any((np.asarray(row["truth"]) == ignore_label).any() for row in rows)
    _class_legend(fig, sorted(shown), class_names, palette, ignore=has_ignore)
    fig.tight_layout(rect=(0, _LEGEND / fig_height, 1, 1))
    return _save(fig, path)


# ----------------------------------------------------------------------------------------
# Grad-CAM.
# ----------------------------------------------------------------------------------------

class ClassScores(keras.layers.Layer):
    """A segmentation head's logits averaged over the image, or over a region: the
    per-class scores Grad-CAM differentiates. Wraps the head (shares its weights; not
    serialisable).

    Args:
      head: a `HypercolumnHead` or `FCNHead` (features dict -> logits [B,H,W,K]).

    Example:
      scores = ClassScores(network.head)({**backbone.output, DATA: backbone.input})
    """

    def __init__(self, head, **kwargs):
        super().__init__(**kwargs)
        self.head = head
        self.num_classes = int(head.num_classes)

    def call(self, features, region=None):
        """features {name: [B,h,w,C], DATA: [B,H,W,C_in]}, optional region weights
        [B,H,W] -> float32 [B,K]: mean logits over the image, or sum(region * logits) /
        sum(region) (Seg-Grad-CAM's region score; an empty region scores 0)."""
        logits = tf.cast(self.head(features, training=False), tf.float32)
        if region is None:
            return tf.reduce_mean(logits, axis=[1, 2])
        region = tf.cast(region, tf.float32)[..., None]
        total = tf.reduce_sum(region, axis=[1, 2])
        return tf.reduce_sum(logits * region, axis=[1, 2]) / tf.maximum(total, 1e-6)

    def compute_output_shape(self, features_shape, region_shape=None):
        return (features_shape[DATA][0], self.num_classes)


def gradcam_layer(backbone) -> str:
    """Default Grad-CAM layer: the last ReLU before pool5 (conv5_3_relu for VGG-16,
    conv5_relu for AlexNet): the deepest features M&M tunes."""
    names = [layer.name for layer in backbone.layers]
    if "pool5" not in names:
        raise ValueError(f"backbone {backbone.name} has no pool5 layer")
    for name in reversed(names[:names.index("pool5")]):
        if isinstance(backbone.get_layer(name), keras.layers.ReLU):
            return name
    raise ValueError(f"backbone {backbone.name} has no ReLU before pool5")


def gradcam_model(network, with_region: bool = False) -> keras.Model:
    """Functional wrapper of a SegmentationModel: images [B,H,W,C] (and, `with_region`,
    region weights [B,H,W]) -> class scores [B,K] (mean logits over the image or the
    region). Built on the backbone's own input and endpoint tensors, so its layers are
    the backbone's layers (weights shared) and any of them can be named."""
    backbone = network.backbone
    features = dict(backbone.output)
    features[DATA] = backbone.input
    layer = ClassScores(network.head, name="class_scores")
    if not with_region:
        return keras.Model(backbone.input, layer(features),
                           name=f"{network.name}_class_scores")
    region = keras.Input((None, None), name="region")
    return keras.Model([backbone.input, region], layer(features, region),
                       name=f"{network.name}_region_scores")


def _normalise(cam: np.ndarray) -> np.ndarray:
    """Per image (x - min) / (max - min + eps), as tf-keras-vis."""
    low = cam.min(axis=(1, 2), keepdims=True)
    high = cam.max(axis=(1, 2), keepdims=True)
    return (cam - low) / (high - low + _CAM_EPSILON)


def _expand(cam: np.ndarray, size) -> np.ndarray:
    """[B,h,w] -> [B,H,W] by scipy's order-1 zoom, as tf-keras-vis expands CAMs."""
    from scipy import ndimage  # pylint: disable=import-outside-toplevel
    factors = (1.0, size[0] / cam.shape[1], size[1] / cam.shape[2])
    return ndimage.zoom(cam, factors, order=1)


def gradcam(network, images, class_index: int, layer: Optional[str] = None,
            expand: bool = True, region=None, model: Optional[keras.Model] = None
            ) -> np.ndarray:
    """Grad-CAM with tf-keras-vis: images float32 [B,H,W,C] (normalised) -> CAM [B,H,W]
    in [0,1] (or [B,h,w] at the layer's resolution if not `expand`) for `class_index`.

    The score is `CategoricalScore(class_index)` on the wrapper's class scores: the
    image-mean logit, or with `region` [B,H,W] (e.g. the pixels predicted as the class,
    Seg-Grad-CAM) the region-mean logit. `model`: a `gradcam_model` to reuse (with
    `with_region` matching `region`)."""
    from tf_keras_vis.gradcam import Gradcam  # pylint: disable=import-outside-toplevel
    from tf_keras_vis.utils.scores import CategoricalScore  # pylint: disable=import-outside-toplevel
    model = model or gradcam_model(network, with_region=region is not None)
    layer = layer or gradcam_layer(network.backbone)
    images = tf.convert_to_tensor(images, tf.float32)
    count = int(images.shape[0])
    seed = images if region is None else [images, tf.convert_to_tensor(region, tf.float32)]
    # clone=False: no model modifier is given, so nothing of `network` is changed.
    cam = Gradcam(model, clone=False)(
        CategoricalScore([int(class_index)] * count), seed, penultimate_layer=layer,
        seek_penultimate_conv_layer=False, expand_cam=expand)
    if isinstance(cam, list):  # Expanded once per model input: the images' comes first.
        cam = cam[0]
    return np.asarray(cam, np.float32).reshape((count,) + np.shape(cam)[-2:])


def gradcam_tape(network, images, class_index: int, layer: Optional[str] = None,
                 expand: bool = True, region=None, model: Optional[keras.Model] = None
                 ) -> np.ndarray:
    """Grad-CAM with tf.GradientTape (the fallback; same maths as `gradcam`): weights =
    spatial mean of d score_c / d A, CAM = ReLU(sum_k w_k A_k), normalised per image."""
    model = model or gradcam_model(network, with_region=region is not None)
    layer = layer or gradcam_layer(network.backbone)
    probe = keras.Model(model.inputs, [model.get_layer(layer).output, model.output])
    images = tf.convert_to_tensor(images, tf.float32)
    inputs = images if region is None else [images, tf.convert_to_tensor(region, tf.float32)]
    with tf.GradientTape() as tape:
        activations, scores = probe(inputs, training=False)
        score = tf.reduce_sum(scores[:, int(class_index)])
    grads = tape.gradient(score, activations)
    weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(activations * weights, axis=-1)).numpy()
    if expand:
        cam = _expand(cam, images.shape[1:3])
    return _normalise(cam).astype(np.float32)


def gradcam_figure(images, truths, cams: Sequence[Tuple[str, np.ndarray]], class_index: int,
                   class_names, palette, path: str, layer: str = "",
                   ignore_label: int = common.IGNORE_LABEL) -> int:
    """Rows of image | ground truth | one Grad-CAM overlay per (title, cams [N,H,W]) for
    class `class_index` (at `layer`, named in the titles); returns the axes count
    (rows x (2 + len(cams))). An all-zero CAM is labelled "no positive evidence"."""
    plt = _pyplot()
    images = np.asarray(images, np.uint8)
    count = len(images)
    columns = 2 + len(cams)
    height, width = images.shape[1:3]
    fig_height = _CELL * height / width * count + _TITLE + _LEGEND
    fig, axes = plt.subplots(count, columns, dpi=_DPI, squeeze=False,
                             figsize=(_CELL * columns, fig_height))
    name = class_names[class_index]
    shown = set()
    for r in range(count):
        truth = np.asarray(truths[r])
        shown.update(int(v) for v in np.unique(truth)
                     if v != ignore_label and v < len(class_names))
        axes[r][0].imshow(images[r])
        axes[r][1].imshow(summaries.colorize(truth, palette), interpolation="nearest")
        for c, (title, maps) in enumerate(cams, start=2):
            axes[r][c].imshow(images[r])
            cam = np.asarray(maps[r])
            axes[r][c].imshow(cam, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if not cam.any():  # ReLU(sum w A) <= 0 everywhere: nothing to localise.
                axes[r][c].text(0.5, 0.5, "no positive evidence", color="white",
                                ha="center", va="center", fontsize=7,
                                transform=axes[r][c].transAxes)
            if r == 0:
                axes[r][c].set_title(f"Grad-CAM {title}\nclass '{name}'"
                                     + (f" at {layer}" if layer else ""), fontsize=8)
        if r == 0:
            axes[r][0].set_title("image", fontsize=9)
            axes[r][1].set_title("ground truth", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    has_ignore = any((np.asarray(t) == ignore_label).any() for t in truths)
    _class_legend(fig, sorted(shown), class_names, palette, ignore=has_ignore)
    fig.tight_layout(rect=(0, _LEGEND / fig_height, 1, 1))
    return _save(fig, path)
