"""Llama Guard 4 images without torchvision: tile planning, pixels and prompt tokens (reference §6).

An image is resized without distortion onto the best-fitting canvas of 336x336 tiles (at most 16),
padded with black, cut into tiles row by row, and followed by a global 336x336 tile when it has
more than one; pixels are scaled to [0, 1] and normalised with mean and std 0.5. In the prompt its
`<|image|>` placeholder becomes `<|image_start|>`, 144 `<|patch|>` per tile with `<|tile_x_separator|>`
between columns and `<|tile_y_separator|>` after each row, then `<|image|>` and the global tile's 144
`<|patch|>`, then `<|image_end|>`. Resampling is Pillow's bilinear: pixel values can differ slightly
from transformers' torchvision processor; tile layout and token counts are the same.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from proxy.guards.guard import GuardError, Image

TILE = 336
PATCHES_PER_TILE = 144
MAX_TILES = 16


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray[Any, Any]  # (tiles, 3, 336, 336) float32, the global tile last
    rows: int
    cols: int

    def tokens(self) -> list[str]:
        out = ["<|image_start|>"]
        if self.rows * self.cols > 1:
            for _ in range(self.rows):
                for col in range(self.cols):
                    out += ["<|patch|>"] * PATCHES_PER_TILE
                    if col < self.cols - 1:
                        out.append("<|tile_x_separator|>")
                out.append("<|tile_y_separator|>")
        return [*out, "<|image|>", *["<|patch|>"] * PATCHES_PER_TILE, "<|image_end|>"]


@cache
def canvases(max_tiles: int = MAX_TILES) -> tuple[tuple[int, int], ...]:
    """Every (height, width) canvas of up to `max_tiles` tiles, grouped by aspect ratio in the order
    the reference processor lists them (it breaks ties by that order)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, count + 1) if count % d == 0):
            by_ratio.setdefault(rows / (count // rows), []).append((rows, count // rows))
    return tuple((r * TILE, c * TILE) for group in by_ratio.values() for r, c in group)


def best_canvas(height: int, width: int, max_tiles: int = MAX_TILES) -> tuple[int, int]:
    """The smallest upscale that fits, else the mildest downscale; ties go to the smaller canvas."""
    options = canvases(max_tiles)
    scales = [min(h / height, w / width) for h, w in options]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(s for s in scales if s < 1)
    fits = [opt for opt, s in zip(options, scales, strict=True) if s == chosen]
    return min(fits, key=lambda hw: hw[0] * hw[1])


def fit_without_distortion(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return max(min(int(height * scale_w), target_h), 1), target_w
    return target_h, max(min(int(width * scale_h), target_w), 1)


def _normalise(rgb: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    scaled = rgb.astype(np.float32) / 255.0
    return ((scaled - 0.5) / 0.5).transpose(2, 0, 1)


def prepare(image: Image, max_tiles: int = MAX_TILES) -> PreparedImage:
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        pil = PILImage.open(io.BytesIO(image.data)).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise GuardError(f"an image could not be decoded ({image.media_type})") from exc
    width, height = pil.size
    canvas_h, canvas_w = best_canvas(height, width, max_tiles)
    # Never upscale by more than one tile's worth: small images stay small on their canvas.
    limit_h, limit_w = min(max(height, TILE), canvas_h), min(max(width, TILE), canvas_w)
    new_h, new_w = fit_without_distortion(height, width, limit_h, limit_w)
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = np.asarray(pil.resize((new_w, new_h), PILImage.Resampling.BILINEAR))
    rows, cols = canvas_h // TILE, canvas_w // TILE
    pixels = _normalise(canvas)
    tiles = [pixels[:, r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] for r in range(rows) for c in range(cols)]
    if rows * cols > 1:
        tiles.append(_normalise(np.asarray(pil.resize((TILE, TILE), PILImage.Resampling.BILINEAR))))
    return PreparedImage(np.stack(tiles).astype(np.float32), rows, cols)
