"""A PNG contact sheet of input batches: one row per example, image | label colours."""

import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

_GAP = 2  # Pixels of grey between cells, so neighbouring crops do not blend visually.
_GAP_COLOUR = 128


def colorize(labels, palette, ignore_colour: Sequence[int] = (255, 255, 255)) -> np.ndarray:
    """Colour train ids [..., H, W] as RGB uint8 [..., H, W, 3]; ids past the palette: ignore."""
    labels = np.asarray(labels)
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    table = np.tile(np.asarray(ignore_colour, np.uint8), (256, 1))
    table[: len(palette)] = palette
    return table[np.clip(labels, 0, 255).astype(np.intp)]


def write_preview(
    raw_images, labels, palette, path, ignore_colour: Sequence[int] = (255, 255, 255)
) -> pathlib.Path:
    """Write a PNG grid, rows of raw_images uint8 [B,H,W,3] | labels [B,H,W]; return path."""
    images = np.asarray(raw_images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or labels.shape != images.shape[:3]:
        raise ValueError(
            f"expected images [B,H,W,3] and labels [B,H,W], got {images.shape} and {labels.shape}"
        )
    images = np.clip(images, 0, 255).astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    colours = colorize(labels, palette, ignore_colour)
    batch, height, width = labels.shape
    grid = np.full((batch * (height + _GAP) - _GAP, 2 * width + _GAP, 3), _GAP_COLOUR, np.uint8)
    for b in range(batch):
        top = b * (height + _GAP)
        grid[top : top + height, :width] = images[b]
        grid[top : top + height, width + _GAP :] = colours[b]
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
