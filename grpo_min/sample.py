"""The record every dataset yields: one image, one referring phrase, one box in original pixels."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from grpo_min.boxes import Box


@dataclass
class Sample:
    """One grounding sample. ``box`` is (x1, y1, x2, y2) in original image pixels."""

    id: str
    image: str | Path | Image.Image | Callable[[], Image.Image]  # a path, a PIL image, or a loader
    text: str  # the referring phrase (not the full question: the template wraps it)
    box: Box
    width: int
    height: int
    category: str | None = None
    anatomy: list[tuple[str, Box]] = field(default_factory=list)  # named regions (synthetic only)

    def load_image(self) -> Image.Image:
        """The image as 8-bit RGB, whatever its mode on disk (16-bit, RGBA, palette, grayscale)."""
        img = self.image
        if callable(img) and not isinstance(img, Image.Image):
            img = img()
        if not isinstance(img, Image.Image):
            with Image.open(img) as f:
                img = f.copy()
        return to_rgb8(img)


def to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16-bit and float images are min-max scaled, not clipped."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.astype(np.uint8))
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def mask_box(mask: np.ndarray) -> Box:
    """The tightest box (x1, y1, x2, y2) around the True pixels of a 2-D mask, in pixel edges.

    >>> mask_box(np.array([[0, 0, 0], [0, 1, 1]], bool))
    (1.0, 1.0, 3.0, 2.0)
    """
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
