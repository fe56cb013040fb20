"""The embedded demo data set: small synthetic scenes in the PASCAL VOC layout.

Every image holds 1-4 objects on a noisy background. The four object classes differ by
SHAPE and TEXTURE (disc with stripes, square with checks, triangle with dots, ring with
speckle noise) while their two colours are drawn from one shared set, as is the
background's, so colour alone does not tell the classes apart: a patch embedding has to
learn shape and texture, which is what M&M tuning is meant to teach. Like VOC, object
borders carry a thin ring of ignore (255) pixels and label PNGs are palette images.

Layout written by `generate_demo_dataset`:
  JPEGImages/<id>.png              lossless RGB images (the VOC folder name, PNG content;
                                   `image_format="jpg"` writes VOC-like JPEGs instead)
  SegmentationClass/<id>.png       palette PNGs, index = class id, 255 = ignore
  ImageSets/Segmentation/{train,val}.txt
  dataset.json                     name, num_classes, class_names, palette, ignore_label,
                                   background_class
  generator.json                   the generation parameters (for idempotent re-runs)

Sizes default to 96x128 (H x W), 200 train / 50 val: a full demo (M&M tuning plus
segmentation of a small network) runs in minutes on 2 CPU cores. The same parameters give
byte-identical files.
"""

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
from typing import List, Tuple

import numpy as np
from PIL import Image

from mm_tf.data.datasets import bit_colormap

NAME = "demo"
CLASS_NAMES = ("background", "disc", "square", "triangle", "ring")
NUM_CLASSES = len(CLASS_NAMES)
BACKGROUND_CLASS = 0
IGNORE_LABEL = 255
# One colour set shared by every class and the background.
COLOURS = np.array(
    [
        (220, 50, 40),
        (50, 170, 70),
        (40, 80, 220),
        (235, 205, 45),
        (200, 70, 200),
        (40, 200, 205),
        (240, 140, 40),
        (235, 235, 235),
        (35, 35, 35),
    ],
    np.float32,
)
_SPLIT_CODES = {"train": 0, "val": 1}
# Bump when the rendering changes, so that an old data set on disk is regenerated.
_GENERATOR_VERSION = 1


PALETTE = bit_colormap(NUM_CLASSES)  # VOC's colours for ids 0..4.


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Render a smooth two-colour gradient with fine noise, float32 [H, W, 3]."""
    h, w = yy.shape
    a, b = rng.choice(len(COLOURS), size=2, replace=False)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * yy / h + np.sin(angle) * xx / w
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    # Muted colours: the background shares the palette but stays less saturated.
    base = 0.55 * (COLOURS[a] * t[..., None] + COLOURS[b] * (1 - t[..., None])) + 50.0
    return base + rng.normal(0.0, 10.0, size=(h, w, 1)).astype(np.float32)


def _shape_mask(class_id: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Return the bool [H, W] mask of class_id's shape of radius r in object coordinates u, v."""
    if class_id == 1:  # disc
        return u * u + v * v <= r * r
    if class_id == 2:  # square
        return (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r)
    if class_id == 3:  # equilateral triangle of circumradius r, pointing along -u
        inside = np.ones_like(u, bool)
        for k in range(3):
            phi = np.pi + 2 * np.pi * k / 3
            inside &= u * np.cos(phi) + v * np.sin(phi) <= 0.5 * r
        return inside
    if class_id == 4:  # ring
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    raise ValueError(f"no shape for class {class_id}")


def _texture(class_id: int, rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Return the weight float32 [H, W] of the first of an object's two colours (its texture)."""
    if class_id == 1:  # stripes
        period, phi = rng.uniform(4.0, 8.0), rng.uniform(0, np.pi)
        return (np.mod((u * np.cos(phi) + v * np.sin(phi)) / period, 1.0) < 0.5).astype(np.float32)
    if class_id == 2:  # checks
        cell = rng.uniform(3.0, 6.0)
        return (np.mod(np.floor(u / cell) + np.floor(v / cell), 2) == 0).astype(np.float32)
    if class_id == 3:  # dots on a grid
        gap = rng.uniform(5.0, 8.0)
        du = np.mod(u, gap) - gap / 2
        dv = np.mod(v, gap) - gap / 2
        return (du * du + dv * dv <= (0.32 * gap) ** 2).astype(np.float32)
    if class_id == 4:  # per-pixel speckle
        return rng.uniform(0.0, 1.0, size=u.shape).astype(np.float32)
    raise ValueError(f"no texture for class {class_id}")


def _ignore_ring(label: np.ndarray) -> np.ndarray:
    """Return the bool [H, W] mask of object pixels with a 4-neighbour of another class."""
    padded = np.pad(label, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    border = np.zeros(label.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        border |= padded[dy : dy + label.shape[0], dx : dx + label.shape[1]] != centre
    return border & (label != BACKGROUND_CLASS)


def render_example(
    rng: np.random.Generator, height: int, width: int
) -> Tuple[np.ndarray, np.ndarray, List[dict]]:
    """Render one scene: image uint8 [H, W, 3], label uint8 [H, W], objects' metadata."""
    yy, xx = np.meshgrid(
        np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij"
    )
    image = _background(rng, yy, xx)
    label = np.zeros((height, width), np.uint8)
    objects = []
    side = min(height, width)
    for _ in range(int(rng.integers(1, 5))):
        class_id = int(rng.integers(1, NUM_CLASSES))
        r = rng.uniform(0.12, 0.35) * side
        cy, cx = rng.uniform(0.5 * r, height - 0.5 * r), rng.uniform(0.5 * r, width - 0.5 * r)
        theta = rng.uniform(0, 2 * np.pi)
        u = np.cos(theta) * (yy - cy) + np.sin(theta) * (xx - cx)
        v = -np.sin(theta) * (yy - cy) + np.cos(theta) * (xx - cx)
        mask = _shape_mask(class_id, u, v, r)
        colours = rng.choice(len(COLOURS), size=2, replace=False)
        weight = _texture(class_id, rng, u, v)[..., None]
        fill = weight * COLOURS[colours[0]] + (1 - weight) * COLOURS[colours[1]]
        fill = fill + rng.normal(0.0, 6.0, size=(height, width, 1)).astype(np.float32)
        image = np.where(mask[..., None], fill, image)
        label[mask] = class_id  # Later objects occlude earlier ones, in image and label.
        objects.append(
            {
                "class_id": class_id,
                "colours": [int(c) for c in colours],
                "radius": float(r),
                "centre": (float(cy), float(cx)),
            }
        )
    label[_ignore_ring(label)] = IGNORE_LABEL
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image, label, objects


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Return the generator of one example, fixed by (seed, split, index) alone."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def dataset_description() -> dict:
    """Return the contents of the demo's dataset.json."""
    return {
        "name": NAME,
        "num_classes": NUM_CLASSES,
        "class_names": list(CLASS_NAMES),
        "palette": PALETTE.astype(int).tolist(),
        "ignore_label": IGNORE_LABEL,
        "background_class": BACKGROUND_CLASS,
    }


def _params(num_train, num_val, height, width, seed, image_format) -> dict:
    """Return the generation parameters recorded in generator.json."""
    return {
        "num_train": int(num_train),
        "num_val": int(num_val),
        "height": int(height),
        "width": int(width),
        "seed": int(seed),
        "image_format": image_format,
        "version": _GENERATOR_VERSION,
    }


@contextlib.contextmanager
def _locked(directory: pathlib.Path):
    """Hold an exclusive flock on `directory` itself (no lock file is left behind)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # Closing the descriptor releases the lock.


def _is_complete(path: pathlib.Path, params: dict) -> bool:
    """Tell whether `path` holds a finished demo data set generated with `params`."""
    try:
        return json.loads((path / "generator.json").read_text()) == params
    except (OSError, ValueError):
        return False


def _write(root: pathlib.Path, params: dict) -> None:
    """Write every file of the data set under `root` (generator.json last)."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    palette = bit_colormap(256)
    palette[IGNORE_LABEL] = (224, 224, 192)  # VOC's colour for the ignore border.
    for split, count in (("train", params["num_train"]), ("val", params["num_val"])):
        ids = [f"{split}_{i:04d}" for i in range(count)]
        for i, example_id in enumerate(ids):
            image, label, _ = render_example(
                example_rng(params["seed"], split, i), params["height"], params["width"]
            )
            image_path = root / "JPEGImages" / f"{example_id}.{params['image_format']}"
            # quality=90: VOC-like JPEG size and decode cost (the bench); PNG is lossless.
            options = {"quality": 90} if params["image_format"] == "jpg" else {}
            Image.fromarray(image, mode="RGB").save(image_path, **options)
            label_png = Image.fromarray(label, mode="P")
            label_png.putpalette(palette.reshape(-1).tolist())
            label_png.save(root / "SegmentationClass" / f"{example_id}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "".join(f"{i}\n" for i in ids)
        )
    (root / "dataset.json").write_text(json.dumps(dataset_description(), indent=1) + "\n")
    (root / "generator.json").write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")


def generate_demo_dataset(
    output_dir,
    num_train: int = 200,
    num_val: int = 50,
    height: int = 96,
    width: int = 128,
    seed: int = 0,
    image_format: str = "png",
) -> pathlib.Path:
    """Generate the demo data set in `output_dir` unless already there; return its path.

    Files are written to a temporary sibling directory that is renamed into place when
    complete, so an interrupted run never leaves a half-written data set behind; processes
    that generate the same data set at once write it once (a lock on the parent folder).
    An existing directory is replaced only if it is empty or an earlier demo data set.
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if min(num_train, num_val) < 0 or num_train + num_val < 1 or min(height, width) < 16:
        raise ValueError(
            f"need num_train, num_val >= 0 (not both 0) and a size >= 16x16, got "
            f"{num_train}, {num_val}, {height}x{width}"
        )
    out = pathlib.Path(output_dir).resolve()
    params = _params(num_train, num_val, height, width, seed, image_format)
    if _is_complete(out, params):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Binaries that all default to work/demo_data may start together (parallel tests, a
    # pipeline's stages): under the lock the first writes and the others find its data
    # set complete, instead of renaming it away while a third is reading it.
    with _locked(out.parent):
        if _is_complete(out, params):
            return out
        if out.exists() and any(out.iterdir()) and not (out / "generator.json").exists():
            raise ValueError(f"{out} exists and is not a demo data set; refusing to replace it")
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write(tmp, params)
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.rename(out, old)
                shutil.rmtree(old)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
