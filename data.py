"""What goes in: grounding samples (image, phrase, box) from a synthetic generator or a real dataset.

Every source yields the same record, :class:`Sample`: an image, a referring phrase, and one box
``[x1, y1, x2, y2]`` in *original image pixels* (the model's own frame is applied later, in the
rewards and the metrics, never here).

The embedded default is ``synthetic``: procedurally drawn chest-X-ray-like images (thorax, lung
fields, heart, spine, ribs) with one finding (nodule, mass, consolidation, pleural effusion,
pneumothorax, cardiomegaly) at a random place, sometimes with a second, different finding as a
distractor. Phrases use radiological laterality: the patient's left is on the image's right.

    >>> ds = load_dataset("synthetic", split="val")
    >>> s = ds[0]; s.text, s.box            # doctest: +SKIP
    ('small nodule in the left lower zone', (151.0, 160.0, 163.0, 172.0))

Real datasets are read exactly as they sit on disk after the official download (layouts, formats and
commands: docs/DATASETS_USAGE.md): ``ms-cxr``, ``medrpg``,
``chestx-ray8``, ``m3d-refseg`` and the generic ``jsonl``. Their records hold an image *path*; a
malformed row is skipped and counted (``.skipped``), a missing root or file stops with a
DatasetError that says what was expected, where, and where to get it, and ``check_images`` finds
missing or unreadable images (and those the model's processor would refuse) before training starts.

    >>> ds = load_dataset("ms-cxr", "train", data_root="ms-cxr/1.1.0",
    ...                   image_root="mimic-cxr-jpg/2.1.0")  # doctest: +SKIP

Run ``python data.py --help`` to inspect, picture or export a dataset.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

Box = tuple[float, float, float, float]


# ----------------------------------------------------------------------------------------------
# The record
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Synthetic chest X-rays
# ----------------------------------------------------------------------------------------------
SYNTHETIC_VERSION = 3  # bump whenever drawing changes: cached models trained on old data are rebuilt
SYNTHETIC_SIZE = 224  # pixels, square; the tiny model's processor resizes it to 112 x 112
SYNTHETIC_SPLITS = {"train": (0, 2000), "val": (1, 200), "test": (2, 200)}  # split -> (stream, size)
FINDINGS = ("nodule", "mass", "consolidation", "pleural effusion", "pneumothorax", "cardiomegaly")
DISTRACTOR_PROB = 0.2


def _ellipse(xx, yy, cx, cy, ax, ay):
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


def _blob(xx, yy, cx, cy, r, rng, lobes=4):
    """An irregular blob: a union of a disc and a few smaller discs around it."""
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    for _ in range(lobes):
        a = rng.uniform(0, 2 * math.pi)
        d = rng.uniform(0.3, 0.8) * r
        rr = rng.uniform(0.4, 0.7) * r
        mask |= (xx - cx - d * math.cos(a)) ** 2 + (yy - cy - d * math.sin(a)) ** 2 <= rr * rr
    return mask


def _mask_box(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


class _Thorax:
    """Random thorax geometry: lungs, heart, and the zones phrases refer to."""

    def __init__(self, rng: np.random.Generator, size: int):
        # Patient size and placement vary a lot, so no box can be guessed from the phrase alone.
        s = size / 224.0 * rng.uniform(0.66, 1.04)
        self.size = size
        self.cx = size / 2 + rng.uniform(-26, 26) * size / 224
        cy = size / 2 + rng.uniform(-20, 20) * size / 224
        self.top = cy + (-78 + rng.normal(0, 4)) * s
        self.bottom = cy + (84 + rng.normal(0, 4)) * s
        self.body_ax = (92 + rng.normal(0, 5)) * s
        lung_ay = (self.bottom - self.top) / 2 * rng.uniform(0.82, 0.92)
        lung_cy = self.top + (self.bottom - self.top) * 0.47
        gap = (13 + rng.normal(0, 2)) * s
        # Image-left is the patient's RIGHT lung (radiological convention).
        self.lungs = {
            "right": (self.cx - gap - 31 * s, lung_cy, (30 + rng.normal(0, 2.5)) * s, lung_ay),
            "left": (self.cx + gap + 29 * s, lung_cy + 3 * s, (28 + rng.normal(0, 2.5)) * s, lung_ay * 0.97),
        }
        self.heart = (self.cx + (11 + rng.uniform(-7, 7)) * s, self.top + (self.bottom - self.top) * rng.uniform(0.64, 0.74),
                      (27 + rng.normal(0, 2.5)) * s, (22 + rng.normal(0, 2.5)) * s)

    def lung_mask(self, xx, yy, side):
        return _ellipse(xx, yy, *self.lungs[side])

    def zone_mask(self, xx, yy, side, zone):
        cx, cy, ax, ay = self.lungs[side]
        k = ("upper", "middle", "lower").index(zone)
        y0 = cy - ay + 2 * ay * k / 3
        return self.lung_mask(xx, yy, side) & (yy >= y0) & (yy < y0 + 2 * ay / 3)


def _draw_finding(kind, side, zone, rng, th, xx, yy, img, heart_mask):
    """Paint one finding onto ``img`` in place; return (phrase, mask, anatomy name, anatomy mask)."""
    s = th.size / 224.0
    lung = th.lung_mask(xx, yy, side)
    if kind in ("nodule", "mass", "consolidation"):
        zmask = th.zone_mask(xx, yy, side, zone) & ~heart_mask
        ys, xs = np.nonzero(zmask)
        i = rng.integers(len(xs))
        cx, cy = xs[i], ys[i]
        if kind == "nodule":
            r = rng.uniform(5, 10) * s
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            size = "small " if r < 7 * s else ""
            phrase = f"{size}nodule in the {side} {zone} zone"
            img += 0.38 * mask
        elif kind == "mass":
            r = rng.uniform(11, 17) * s
            mask = _blob(xx, yy, cx, cy, r, rng) & lung
            size = "large " if r > 14.5 * s else ""
            phrase = f"{size}mass in the {side} {zone} zone"
            img += 0.33 * mask
        else:
            r = rng.uniform(12, 20) * s
            mask = _blob(xx, yy, cx, cy, r, rng, lobes=7) & lung
            texture = 0.18 + 0.12 * rng.random(img.shape)
            img += texture * mask
            phrase = f"consolidation in the {side} {zone} zone"
        return phrase, mask, f"{side} {zone} zone", th.zone_mask(xx, yy, side, zone)
    if kind == "pleural effusion":
        cx, cy, ax, ay = th.lungs[side]
        frac = rng.uniform(0.15, 0.45)
        level = cy + ay - 2 * ay * frac
        # The meniscus rises towards the chest wall (laterally).
        lateral = -1 if side == "right" else 1
        meniscus = level - 8 * s * np.clip(lateral * (xx - cx) / ax, 0, 1)
        mask = lung & (yy >= meniscus) & ~heart_mask
        img += 0.42 * mask
        phrase = f"{'small' if frac < 0.28 else 'moderate'} {side} pleural effusion"
        return phrase, mask, f"{side} lower zone", th.zone_mask(xx, yy, side, "lower")
    if kind == "pneumothorax":
        cx, cy, ax, ay = th.lungs[side]
        depth = rng.uniform(0.2, 0.6)  # how far the collapsed lung edge has moved in
        apical = rng.random() < 0.5
        lateral = -1 if side == "right" else 1
        if apical:  # air above the lung apex
            edge_y = cy - ay + 2 * ay * depth
            mask = lung & (yy < edge_y - 3 * s * np.cos((xx - cx) / ax))
            phrase = f"{side} apical pneumothorax"
        else:  # air along the lateral chest wall
            edge_x = cx + lateral * ax * (1 - 1.6 * depth)
            mask = lung & ((xx - edge_x) * lateral > 0) & (yy < cy + ay * 0.5)
            phrase = f"{side} pneumothorax"
        img[mask] = 0.06 + 0.02 * rng.random(int(mask.sum()))  # no lung markings in the air
        edge = mask & ~np.roll(mask, lateral if not apical else 1, axis=1 if not apical else 0)
        img += 0.25 * edge
        return phrase, mask, f"{side} upper zone", th.zone_mask(xx, yy, side, "upper")
    raise ValueError(kind)


def synthetic_sample(index: int, split: str = "train", seed: int = 0, size: int = SYNTHETIC_SIZE) -> Sample:
    """Draw sample ``index`` of a synthetic split, deterministically from (seed, split, index).

    Each split uses its own random stream, so train, val and test never share an image.
    """
    stream, _ = SYNTHETIC_SPLITS[split]
    rng = np.random.default_rng([seed, stream, index])
    th = _Thorax(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = FINDINGS[rng.integers(len(FINDINGS))]
    side = ("right", "left")[rng.integers(2)]
    zone = ("upper", "middle", "lower")[rng.integers(3)]

    # Soft tissue, lungs (dark, with faint vessel texture), spine, heart, ribs.
    img = np.full((size, size), 0.04, np.float32)
    body = _ellipse(xx, yy, th.cx, (th.top + th.bottom) / 2 + 6, th.body_ax, (th.bottom - th.top) / 2 + 30)
    img[body] = 0.55
    lungs = th.lung_mask(xx, yy, "right") | th.lung_mask(xx, yy, "left")
    vessels = np.asarray(Image.fromarray((rng.random((size // 8, size // 8)) * 255).astype(np.uint8))
                         .resize((size, size), Image.BICUBIC), np.float32) / 255.0
    img[lungs] = 0.16 + 0.1 * vessels[lungs]
    img[(np.abs(xx - th.cx) < 8 * size / 224) & body] = 0.72  # spine
    heart_axes = th.heart
    if kind == "cardiomegaly":
        grow = rng.uniform(1.25, 1.75)
        heart_axes = (th.heart[0] + 4, th.heart[1] - 3, th.heart[2] * grow, th.heart[3] * grow * 0.9)
    heart = _ellipse(xx, yy, *heart_axes) & body
    img[heart] = 0.68
    for sgn in (-1, 1):  # clavicles: bright bars from the shoulders down to the top of the sternum
        t = np.clip(sgn * (xx - th.cx) / (th.body_ax * 0.9), 0, 1)
        img += 0.12 * ((np.abs(yy - (th.top + 4 * size / 224 - 14 * size / 224 * t)) < 4 * size / 224)
                       & (t > 0.08) & body)
    for k in range(9):  # posterior ribs: gently curved bright bands over the lungs
        y0 = th.top + 6 + k * (th.bottom - th.top) / 9.5
        curve = y0 + 0.004 * (xx - th.cx) ** 2 * 224 / size
        img += 0.07 * (np.abs(yy - curve) < 2.2 * size / 224) * lungs

    if kind == "cardiomegaly":
        phrase = ("cardiomegaly", "enlarged cardiac silhouette")[rng.integers(2)]
        mask, anatomy_name, anatomy_mask = heart, "heart", heart
    else:
        phrase, mask, anatomy_name, anatomy_mask = _draw_finding(kind, side, zone, rng, th, xx, yy, img, heart)
    if rng.random() < DISTRACTOR_PROB:  # a second, different finding elsewhere: the phrase must matter
        other = [k for k in FINDINGS if k not in (kind, "cardiomegaly", "pleural effusion" if kind == "cardiomegaly" else "")]
        dkind = other[rng.integers(len(other))]
        dside = "left" if side == "right" else "right"
        dzone = ("upper", "middle", "lower")[rng.integers(3)]
        _draw_finding(dkind, dside, dzone, rng, th, xx, yy, img, heart)

    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    return Sample(
        id=f"synthetic-{seed}-{split}-{index}",
        image=pil,  # 8-bit grayscale; load_image() gives RGB
        text=phrase,
        box=_mask_box(mask),
        width=size,
        height=size,
        category=kind,
        anatomy=[(anatomy_name, _mask_box(anatomy_mask))],
    )


def synthetic_phrases() -> list[str]:
    """Every phrase and anatomical region name the synthetic generator can write (for tokenizers)."""
    out = ["cardiomegaly", "enlarged cardiac silhouette", "heart"]
    for side in ("right", "left"):
        for zone in ("upper", "middle", "lower"):
            out += [f"{size}{kind} in the {side} {zone} zone" for kind, sizes in
                    (("nodule", ("", "small ")), ("mass", ("", "large ")), ("consolidation", ("",)))
                    for size in sizes]
            out.append(f"{side} {zone} zone")
        out += [f"small {side} pleural effusion", f"moderate {side} pleural effusion",
                f"{side} apical pneumothorax", f"{side} pneumothorax"]
    return out


class SyntheticDataset(Sequence):
    """A lazily drawn synthetic split: ``ds[i]`` draws sample i (the same one every time)."""

    def __init__(self, split: str = "train", seed: int = 0, size: int | None = None):
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SYNTHETIC_SPLITS)}")
        self.split, self.seed = split, seed
        full = SYNTHETIC_SPLITS[split][1]
        self.n = full if size is None else min(size, full)  # the first `size` samples; never more than the split
        self._cache: dict[int, Sample] = {}  # drawing costs ~7 ms; a drawn sample is ~50 kB

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        if i not in self._cache:
            self._cache[i] = synthetic_sample(i, self.split, self.seed)
        return self._cache[i]


def phrase_only_baseline(train: Sequence[Sample], test: Sequence[Sample]) -> list[float]:
    """IoUs of the best *image-blind* guess: for each test phrase, the mean training box of that phrase.

    This is what a model that ignores the image could at best learn; it must stay low, or the task
    could be solved from the words alone. Returns one IoU per test sample.
    """
    from grpo_min.boxes import iou

    sums: dict[str, np.ndarray] = {}
    counts: Counter = Counter()
    for s in train:
        sums[s.text] = sums.get(s.text, 0) + np.asarray(s.box)
        counts[s.text] += 1
    overall = sum(sums.values()) / max(1, sum(counts.values()))
    guesses = {t: sums[t] / counts[t] for t in sums}
    return [iou(tuple(guesses.get(s.text, overall)), s.box) for s in test]


# ----------------------------------------------------------------------------------------------
# Real datasets: what they share (errors, skipped rows, boxes, image paths, splits)
# ----------------------------------------------------------------------------------------------
SPLITS = ("train", "val", "test")
SEEDED_FRACTIONS = (0.7, 0.1, 0.2)  # train / val / test where a dataset has no official split
BOX_TOLERANCE = 1.0  # pixels a box may overshoot the image (rounding in the annotations); it is clipped
TINY_BOX = "box smaller than 1 pixel: boxes are expected in original pixels"  # e.g. a box normalised to [0, 1]
MULTI_BOX = ("union", "separate", "drop")  # what to do with a phrase that has several boxes

WHERE_TO_GET = {
    "ms-cxr": "PhysioNet, https://physionet.org/content/ms-cxr/ (credentialed access); its images are "
              "MIMIC-CXR-JPG, https://physionet.org/content/mimic-cxr-jpg/",
    "medrpg": "MedRPG, https://github.com/eraserNut/MedRPG (data/MS_CXR/MS_CXR_{train,val,test}.pth; its 640 x 640 "
              "JPGs go in ln_data/MS_CXR/), or MedGround-R1's JSON, https://github.com/bio-mlhui/MedGround-R1",
    "chestx-ray8": "NIH, https://nihcc.app.box.com/v/ChestXray-NIHCC, or Kaggle's 'NIH Chest X-rays', "
                   "https://www.kaggle.com/datasets/nih-chest-xrays/data",
    "m3d-refseg": "Hugging Face, https://huggingface.co/datasets/GoodBaiBai88/M3D-RefSeg (unzip M3D_RefSeg.zip "
                  "next to the CSVs)",
    "jsonl": "your own data, in the format of docs/DATASETS_USAGE.md (`python data.py --export` converts any dataset)",
}


class DatasetError(Exception):
    """A dataset cannot be read at all: a missing root, file or column. The message says what was
    expected, where it was looked for, and where the dataset is obtained."""


def _not_found(dataset: str, expected: str, looked_in: Sequence[Path], note: str = "") -> DatasetError:
    places = ", ".join(str(p) for p in looked_in)
    return DatasetError(f"{dataset}: expected {expected}; looked in {places}{note}. "
                        f"Obtain the dataset from {WHERE_TO_GET[dataset]}.")


def _root(dataset: str, data_root: str | Path | None, expected: str) -> Path:
    """``--data-root`` as a Path, or a DatasetError naming what it should hold."""
    if data_root is None:
        raise DatasetError(f"{dataset}: --data-root is required (the folder holding {expected}). "
                           f"Obtain the dataset from {WHERE_TO_GET[dataset]}.")
    root = Path(data_root).expanduser()
    if not root.exists():
        raise _not_found(dataset, expected, [root], note=" (it does not exist)")
    return root


def _read_json(file: Path, dataset: str):
    """A whole JSON annotation file; a DatasetError naming it when it cannot be decoded."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{dataset}: {file} is not valid JSON ({e}); was it cut off while downloading?") from None


class _BadRow(ValueError):
    """A malformed annotation row: skipped and counted under ``reason``; ``detail`` goes in the examples."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class SkipReport:
    """What loading left out: a count per reason, and the first few cases with where they are."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    rescaled: int = 0  # check_images: boxes rescaled to the size of the image on disk

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line, e.g. '3 skipped: 2 box outside the image, 1 unparseable number'."""
        if not self.total:
            return "nothing skipped"
        return f"{self.total} skipped: " + ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())

    def __str__(self) -> str:
        lines = [self.summary()] + [f"  e.g. {e}" for e in self.examples]
        if self.rescaled:
            lines.append(f"  {self.rescaled} boxes rescaled to the size of their image on disk")
        return "\n".join(lines)


class SampleList(list):
    """One split of a real dataset: a plain list of Sample, plus ``skipped`` (a SkipReport: the rows
    left out and why) and ``source`` (the annotation file read)."""

    def __init__(self, samples: Sequence[Sample] = (), skipped: SkipReport | None = None, source: str = ""):
        super().__init__(samples)
        self.skipped = skipped if skipped is not None else SkipReport()
        self.source = source


@dataclass
class _Row:
    """One parsed and checked box of a real dataset, before splitting and grouping into samples."""

    image: Path
    text: str
    box: Box  # (x1, y1, x2, y2), original pixels, inside the image
    width: int
    height: int
    category: str | None
    id: str  # stable id of the sample this row belongs to
    split: str | None  # the file's own split, when it has one
    group: str  # what a seeded split keeps together: a patient, an image
    where: str  # file and line, for messages

    def sample(self, box: Box | None = None, id: str | None = None) -> Sample:
        return Sample(id=id or self.id, image=str(self.image), text=self.text, box=box or self.box,
                      width=self.width, height=self.height, category=self.category)


@dataclass
class _Skipped:
    """A row skipped while reading a file, kept until the loader knows which split reports it."""

    split: str | None  # the split the row names, None when it names none (or not readably)
    reason: str
    where: str
    detail: str = ""


def _own_split(record) -> str | None:
    """The split a skipped row names in its 'split' field, when that can be read; else None."""
    try:
        return _split_value(record.get("split")) if isinstance(record, dict) else None
    except _BadRow:
        return None


def _phrase(value, name: str) -> str:
    """A referring phrase: a non-empty string, stripped; else a _BadRow naming the field.

    >>> _phrase(None, "text")
    Traceback (most recent call last):
    data._BadRow: malformed entry
    """
    if not isinstance(value, str):  # JSON null or a list would otherwise become the phrase 'None' / "['a']"
        raise _BadRow("malformed entry", f"{name}={value!r}, expected a string")
    if not value.strip():
        raise _BadRow("empty phrase", name)
    return value.strip()


def _number(value, name: str) -> float:
    """A finite float from a CSV / JSON field, or a _BadRow."""
    if isinstance(value, bool):  # JSON true / false: a bool is an int in Python, but never a coordinate
        raise _BadRow("unparseable number", f"{name}={value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise _BadRow("unparseable number", f"{name}={value!r}") from None
    if not math.isfinite(v):
        raise _BadRow("unparseable number", f"{name}={value!r}")
    return v


def _checked_box(x: float, y: float, w: float, h: float, width: float, height: float) -> Box:
    """(x1, y1, x2, y2) from a top-left corner and a size, checked against the image, then clipped to it.

    A box under 1 pixel wide or high once clipped is a _BadRow (TINY_BOX): almost always a box
    normalised to [0, 1] where original pixels were expected.

    >>> _checked_box(10, 20, 30, 40, width=100, height=100)
    (10.0, 20.0, 40.0, 60.0)
    >>> _checked_box(90, 20, 30, 40, width=100, height=100)
    Traceback (most recent call last):
    data._BadRow: box outside the image
    """
    if width <= 0 or height <= 0:
        raise _BadRow("image size zero or negative", f"{width:g} x {height:g}")
    if w <= 0 or h <= 0:
        raise _BadRow("box of zero or negative size", f"w={w:g}, h={h:g}")
    x1, y1, x2, y2 = x, y, x + w, y + h
    if x1 < -BOX_TOLERANCE or y1 < -BOX_TOLERANCE or x2 > width + BOX_TOLERANCE or y2 > height + BOX_TOLERANCE \
            or x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise _BadRow("box outside the image", f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}] in {width:g} x {height:g}")
    box = (max(0.0, float(x1)), max(0.0, float(y1)), min(float(width), float(x2)), min(float(height), float(y2)))
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        raise _BadRow(TINY_BOX, f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}] in {width:g} x {height:g}")
    return box


def _split_value(value) -> str | None:
    """A row's own split ('train' / 'val' / 'test'), None when the row has none."""
    if value is None or str(value).strip() == "":
        return None
    split = str(value).strip().lower()
    if split not in SPLITS:
        raise _BadRow("unknown split value", repr(value))
    return split


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def _resolve_image(rel: str, roots: Sequence[Path]) -> Path:
    """Where the image listed as ``rel`` is: the first existing ``root/rel``, trying ``rel`` with and
    without a leading ``files/`` (MIMIC-CXR-JPG roots are kept both ways). When none exists, the first
    candidate: check_images() then reports it as missing, with the path it expected."""
    if Path(rel).is_absolute():
        return Path(rel)
    rel = PurePosixPath(rel.replace("\\", "/")).as_posix()
    variants = [rel, rel[len("files/"):]] if rel.startswith("files/") else [rel, "files/" + rel]
    candidates = [root / v for root in roots for v in (variants[::-1] if root.name == "files" else variants)]
    return next((c for c in candidates if c.is_file()), candidates[0])


def seeded_split(keys, seed: int, fractions: tuple[float, float, float] = SEEDED_FRACTIONS) -> dict[str, str]:
    """Assign each key (an image, a patient, a case) to 'train', 'val' or 'test', reproducibly.

    The keys are sorted, then shuffled with ``seed``: the assignment depends on the set of keys and
    the seed only, never on file order. With 3 keys or more, a split with a nonzero fraction gets at
    least one key.

    >>> sorted(seeded_split([f"img{i}" for i in range(10)], seed=0).values())
    ['test', 'test', 'train', 'train', 'train', 'train', 'train', 'train', 'train', 'val']
    """
    keys = sorted(set(keys))
    n = len(keys)
    n_val, n_test = (max(1, round(n * f)) if f > 0 and n >= 3 else round(n * f) for f in fractions[1:])
    names = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_val - n_test)
    order = np.random.default_rng(seed).permutation(n)
    return {keys[i]: names[k] for k, i in enumerate(order)}


def _rows_in_split(rows: list[_Row], split: str, seed: int, skipped: SkipReport,
                   bad: Sequence[_Skipped] = ()) -> list[_Row]:
    """The rows of one split: the file's own split when it has one, else a seeded split of the rows'
    groups (``seeded_split``). No image lands in two splits: a row whose split differs from the one its
    image already has is skipped.

    ``skipped`` gets only what *this* split lost, so that over the three splits each bad row of the
    file is counted once: the rows skipped while reading (``bad``) that name this split, and the rows
    whose split cannot be known (no readable split field; a seeded split assigns usable rows only)
    under 'train' alone.
    """
    for b in bad:
        if (b.split or "train") == split:
            skipped.add(b.reason, b.where, b.detail)
    if not any(r.split for r in rows):
        split_of = seeded_split([r.group for r in rows], seed)
        return [r for r in rows if split_of[r.group] == split]
    split_of_image: dict[Path, str] = {}
    out = []
    for r in rows:
        if r.split is None:
            if split == "train":  # its split cannot be known: reported once, under train
                skipped.add("no split value", r.where)
            continue
        first = split_of_image.setdefault(r.image, r.split)
        if r.split != first:
            if r.split == split:  # reported by the split the row names
                skipped.add("image already in another split", r.where, f"{r.image.name} is in {first}")
        elif r.split == split:
            out.append(r)
    return out


def _union(boxes: Sequence[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _pair_samples(rows: list[_Row], multi_box: str, skipped: SkipReport) -> list[Sample]:
    """One sample per (image, phrase); a phrase with several boxes is handled as ``multi_box`` says:
    'union' (one sample, the union box), 'separate' (one sample per box) or 'drop' (skipped)."""
    pairs: dict[tuple[Path, str], list[_Row]] = {}
    for r in rows:
        pairs.setdefault((r.image, r.text), []).append(r)
    samples = []
    for group in pairs.values():
        first, boxes = group[0], list(dict.fromkeys(r.box for r in group))  # a repeated box counts once
        if len(boxes) == 1 or multi_box == "union":
            samples.append(first.sample(box=_union(boxes)))
        elif multi_box == "separate":
            samples += [first.sample(box=b, id=f"{first.id}-b{j}") for j, b in enumerate(boxes)]
        else:
            skipped.add("phrase with several boxes dropped (multi_box='drop')", first.where, f"{len(boxes)} boxes")
    return samples


# ----------------------------------------------------------------------------------------------
# MS-CXR (PhysioNet): CSV v1.1.0 / v1.0.0 or COCO-style JSON, images from MIMIC-CXR-JPG
# ----------------------------------------------------------------------------------------------
MS_CXR_FILES = ("MS_CXR_Local_Alignment_v1.1.0.csv", "MS_CXR_Local_Alignment_v1.1.0.json",
                "MS_CXR_Local_Alignment_v1.0.0.csv", "MS_CXR_Local_Alignment_v1.0.0.json")
MS_CXR_COLUMNS = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")


def load_ms_cxr(split: str, data_root, image_root=None, *, split_seed: int = 0,
                multi_box: str = "union") -> SampleList:
    """MS-CXR image-phrase pairs, boxes in original MIMIC-CXR-JPG pixels.

    ``data_root`` holds one of MS_CXR_FILES (the first found wins, v1.1.0 first) or is that file.
    ``image_root`` (default: ``data_root``) is the MIMIC-CXR-JPG root, with or without its leading
    ``files/``: an image is ``<image_root>/files/p10/p10000032/s50414267/<dicom_id>.jpg``.

    Splits: v1.1.0's ``split`` column (official, patient-level). v1.0.0 has none: a seeded 70/10/20
    split by *patient* (the ``pXXXXXXXX`` folder of the path), so no image and no patient is in two splits.

    Several boxes for one phrase (about 1,448 boxes for 1,162 pairs, e.g. "bilateral effusions"): the
    task and its metrics are one box per phrase, so by default (``multi_box='union'``) the boxes of a
    pair merge into their union box: every pair is kept and the target covers all that the phrase
    describes. 'separate' gives one sample per box (the same prompt then has several targets, so even a
    perfect model loses reward); 'drop' skips such pairs, as MedRPG's split did.
    """
    root = _root("ms-cxr", data_root, " or ".join(MS_CXR_FILES[::2]))
    file = root if root.is_file() else next((root / n for n in MS_CXR_FILES if (root / n).is_file()), None)
    if file is None:
        raise _not_found("ms-cxr", " or ".join(MS_CXR_FILES), [root])
    roots = [Path(image_root).expanduser() if image_root else file.parent]
    skipped, bad = SkipReport(), []
    rows = (_ms_cxr_json_rows if file.suffix == ".json" else _ms_cxr_csv_rows)(file, roots, bad)
    rows = _rows_in_split(rows, split, split_seed, skipped, bad)
    return SampleList(_pair_samples(rows, multi_box, skipped), skipped, str(file))


def _ms_cxr_row(where: str, path: str, text: str, category: str | None, xywh, size, split, roots,
                resolved: dict[str, Path]) -> _Row:
    text = _phrase(text, "label_text")
    width, height = (_number(v, n) for v, n in zip(size, ("image_width", "image_height")))
    x, y, w, h = (_number(v, n) for v, n in zip(xywh, "xywh"))
    box = _checked_box(x, y, w, h, width, height)
    if path not in resolved:
        resolved[path] = _resolve_image(path, roots)
    dicom_id = PurePosixPath(path).stem
    patient = re.search(r"(?:^|/)(p\d+)/s\d+/", path)
    return _Row(image=resolved[path], text=text, box=box, width=round(width), height=round(height),
                category=category or None, id=f"{dicom_id}-{_short_hash(text)}", split=_split_value(split),
                group=patient.group(1) if patient else dicom_id, where=where)


def _ms_cxr_csv_rows(file: Path, roots: list[Path], bad: list[_Skipped]) -> list[_Row]:
    rows, resolved = [], {}
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MS_CXR_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"ms-cxr: {file} lacks the column(s) {', '.join(missing)}; expected the header "
                               f"{','.join(MS_CXR_COLUMNS)}[,split]. Obtain the dataset from {WHERE_TO_GET['ms-cxr']}.")
        for raw in reader:
            where = f"{file.name} line {reader.line_num}"
            try:
                if any(raw.get(c) is None for c in MS_CXR_COLUMNS):
                    raise _BadRow("missing columns", f"{sum(v is not None for v in raw.values())} fields")
                rows.append(_ms_cxr_row(where, raw["path"], raw["label_text"], raw["category_name"],
                                        [raw[c] for c in "xywh"], (raw["image_width"], raw["image_height"]),
                                        raw.get("split"), roots, resolved))
            except _BadRow as e:
                bad.append(_Skipped(_own_split(raw), e.reason, where, e.detail))
    return rows


def _ms_cxr_json_rows(file: Path, roots: list[Path], bad: list[_Skipped]) -> list[_Row]:
    """COCO-style: several image ids may name one file, so rows are keyed on the image's ``path``."""
    data = _read_json(file, "ms-cxr")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DatasetError(f"ms-cxr: {file} is not COCO-style: expected an object with 'images' and 'annotations' lists")
    hashable = lambda v: isinstance(v, (int, str))  # ids are numbers (or strings); anything else matches nothing
    images = {im.get("id"): im for im in data.get("images", []) if isinstance(im, dict) and hashable(im.get("id"))}
    categories = {c.get("id"): c.get("name") for c in data.get("categories", [])
                  if isinstance(c, dict) and hashable(c.get("id"))}
    rows, resolved = [], {}
    for k, ann in enumerate(data["annotations"]):
        where = f"{file.name} annotations[{k}]"
        image = None
        try:
            if not isinstance(ann, dict):
                raise _BadRow("malformed entry", f"a {type(ann).__name__}, expected an object")
            image = images.get(ann.get("image_id")) if hashable(ann.get("image_id")) else None
            if image is None:
                raise _BadRow("image_id not among the images", repr(ann.get("image_id")))
            path, bbox = image.get("path") or image.get("file_name"), ann.get("bbox")
            if not path or not isinstance(bbox, list) or len(bbox) != 4:
                raise _BadRow("missing columns", "path" if not path else "bbox")
            label = ann.get("label_text") or ""
            if not isinstance(label, str) or not isinstance(path, str):
                raise _BadRow("malformed entry", "label_text and path must be strings")
            category = categories.get(ann.get("category_id")) if hashable(ann.get("category_id")) else None
            rows.append(_ms_cxr_row(where, path, label, category,
                                    bbox, (image.get("width"), image.get("height")),
                                    ann.get("split", image.get("split")), roots, resolved))
        except _BadRow as e:
            bad.append(_Skipped(_own_split(ann) or _own_split(image), e.reason, where, e.detail))
    return rows


# ----------------------------------------------------------------------------------------------
# MedRPG's split of MS-CXR (what MedGround-R1 reports on): .pth lists, or VLM-R1-style JSON
# ----------------------------------------------------------------------------------------------
MEDRPG_SIZE = 640  # MedRPG's JPGs are stretched to 640 x 640, and its boxes are in that space
MEDRPG_CATEGORIES = {1: "Cardiomegaly", 2: "Lung Opacity", 3: "Edema", 4: "Consolidation", 5: "Pneumonia",
                     6: "Atelectasis", 7: "Pneumothorax", 8: "Pleural Effusion"}  # MedRPG's category ids
_QUESTION_WRAPPER = re.compile(r"^.*?\bdescribes\s*:\s*", re.IGNORECASE | re.DOTALL)


def phrase_from_question(problem: str) -> str:
    """The referring phrase inside a VLM-R1-style question, so that our template wraps it only once.

    Removes ``<image>`` tokens and MedGround-R1's wrapper ("... this sentence describes: <phrase>.");
    for another wording, keeps what follows the last ': '. A trailing period is dropped.

    >>> phrase_from_question("<image>Please provide the bounding box coordinate of the region this "
    ...                      "sentence describes: small left apical pneumothorax.")
    'small left apical pneumothorax'
    >>> phrase_from_question("Locate this finding: right basal opacity")
    'right basal opacity'
    """
    text = problem.replace("<image>", " ").strip()
    wrapper = _QUESTION_WRAPPER.match(text)
    if wrapper:
        text = text[wrapper.end():]
    elif ": " in text:
        text = text.rsplit(": ", 1)[1]
    return text.strip().rstrip(".").strip()


def load_medrpg(split: str, data_root, image_root=None) -> SampleList:
    """MedRPG's MS-CXR split (638 / 85 / 167), from ``MS_CXR_{split}.pth`` or MedGround-R1's ``{split}.json``.

    ``data_root`` is MedRPG's repository (the file is looked for in it, in ``data/MS_CXR/`` and in
    ``MS_CXR/``; a .pth file wins over a .json). The .pth lists are read with
    ``torch.load(weights_only=True)``: plain lists, tuples, numbers and strings, never arbitrary pickles.

    Boxes are in the space of MedRPG's 640 x 640 *stretched* JPGs, so a record's image is that JPG,
    ``<image_root>/ln_data/MS_CXR/files/...`` (also tried: ``<image_root>/MS_CXR/...``, ``<image_root>/...``),
    and its width and height are 640. If the image found is the original MIMIC-CXR-JPG file instead,
    check_images() rescales the box to its size (IoU does not change under such a per-axis scaling).
    """
    root = _root("medrpg", data_root, f"MS_CXR_{split}.pth")
    root = root.parent if root.is_file() else root
    folders = [root, root / "data" / "MS_CXR", root / "MS_CXR"]
    names = (f"MS_CXR_{split}.pth", f"{split}.json")
    file = next((d / n for n in names for d in folders if (d / n).is_file()), None)
    if file is None:
        raise _not_found("medrpg", f"{names[0]} (MedRPG) or {names[1]} (MedGround-R1)", folders)
    base = Path(image_root).expanduser() if image_root else root
    roots = [base / "ln_data" / "MS_CXR", base / "MS_CXR", base]
    skipped = SkipReport()
    rows = (_medrpg_pth_rows if file.suffix == ".pth" else _medrpg_json_rows)(file, roots, skipped)
    return SampleList([r.sample() for r in rows], skipped, str(file))


def _medrpg_row(where: str, id: str, img_file, x1y1x2y2, text, category, roots, resolved) -> _Row:
    if not isinstance(img_file, str) or not img_file:
        raise _BadRow("missing columns", "image path")
    text = _phrase(text, "phrase")
    x1, y1, x2, y2 = (_number(v, "box") for v in x1y1x2y2)
    box = _checked_box(x1, y1, x2 - x1, y2 - y1, MEDRPG_SIZE, MEDRPG_SIZE)
    if img_file not in resolved:
        resolved[img_file] = _resolve_image(img_file, roots)
    return _Row(image=resolved[img_file], text=text, box=box, width=MEDRPG_SIZE, height=MEDRPG_SIZE,
                category=category, id=id, split=None, group=img_file, where=where)


def _medrpg_pth_rows(file: Path, roots: list[Path], skipped: SkipReport) -> list[_Row]:
    """Entries ``(anno_id, image_id, category_id, img_file, (x, y, w, h), orig_w, orig_h, phrase)``."""
    import torch

    try:
        entries = torch.load(file, weights_only=True)
    except Exception as e:  # an UnpicklingError names what was refused
        raise DatasetError(f"medrpg: {file} cannot be read with torch.load(weights_only=True) (only plain lists, "
                           f"tuples, numbers and strings are accepted; nothing else is unpickled): {e}") from None
    if not isinstance(entries, (list, tuple)):
        raise DatasetError(f"medrpg: {file} holds a {type(entries).__name__}, expected a list of entries "
                           f"(anno_id, image_id, category_id, img_file, (x, y, w, h), width, height, phrase)")
    rows, resolved = [], {}
    for k, entry in enumerate(entries):
        where = f"{file.name}[{k}]"
        try:
            if not isinstance(entry, (list, tuple)) or len(entry) < 8:
                raise _BadRow("missing columns", f"{len(entry) if isinstance(entry, (list, tuple)) else 0} fields of 8")
            anno_id, _, category_id, img_file, xywh, _, _, phrase = entry[:8]
            if not isinstance(xywh, (list, tuple)) or len(xywh) != 4:
                raise _BadRow("missing columns", "box is not (x, y, w, h)")
            x, y, w, h = (_number(v, "box") for v in xywh)
            rows.append(_medrpg_row(where, f"medrpg-{anno_id}", img_file, (x, y, x + w, y + h), phrase,
                                    MEDRPG_CATEGORIES.get(int(category_id)) if isinstance(category_id, int) else None,
                                    roots, resolved))
        except _BadRow as e:
            skipped.add(e.reason, where, e.detail)
    return rows


def _medrpg_json_rows(file: Path, roots: list[Path], skipped: SkipReport) -> list[_Row]:
    """VLM-R1 style: ``[{"image", "problem" (a full question), "solution": [x1, y1, x2, y2]}, ...]``."""
    entries = _read_json(file, "medrpg")
    if not isinstance(entries, list):
        raise DatasetError(f"medrpg: {file} holds a {type(entries).__name__}, expected a list of "
                           '{"image": ..., "problem": ..., "solution": [x1, y1, x2, y2]}')
    rows, resolved = [], {}
    for k, entry in enumerate(entries):
        where = f"{file.name}[{k}]"
        try:
            if not isinstance(entry, dict) or not all(key in entry for key in ("image", "problem", "solution")):
                raise _BadRow("missing columns", "needs image, problem, solution")
            box = entry["solution"]
            if not isinstance(box, list) or len(box) != 4:
                raise _BadRow("missing columns", "solution is not [x1, y1, x2, y2]")
            rows.append(_medrpg_row(where, f"{file.stem}-{k}", entry["image"], box,
                                    phrase_from_question(_phrase(entry["problem"], "problem")), None, roots, resolved))
        except _BadRow as e:
            skipped.add(e.reason, where, e.detail)
    return rows


# ----------------------------------------------------------------------------------------------
# ChestX-ray8 (NIH ChestX-ray14's boxes)
# ----------------------------------------------------------------------------------------------
CHESTXRAY8_FILE = "BBox_List_2017.csv"
CHESTXRAY8_SIZE = 1024  # every PNG is 1024 x 1024; check_images() rescales a box if one is not
# label in BBox_List_2017.csv -> the phrase the model is asked to ground
CHESTXRAY8_PHRASES = {"Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Effusion": "pleural effusion",
                      "Infiltrate": "infiltration", "Mass": "mass", "Nodule": "nodule", "Pneumonia": "pneumonia",
                      "Pneumothorax": "pneumothorax"}


def load_chestxray8(split: str, data_root, image_root=None, *, split_seed: int = 0,
                    multi_box: str = "union") -> SampleList:
    """ChestX-ray8's 984 boxes on 880 images: phrase = the finding (CHESTXRAY8_PHRASES), boxes in PNG pixels.

    ``data_root`` holds ``BBox_List_2017.csv`` (or is that file). Its header, ``Image Index,Finding
    Label,Bbox [x,y,w,h],,,``, splits the box header into four fields followed by empty ones: each row
    is read by position (file name, label, x, y, w, h). Images are found by file name anywhere below
    ``image_root`` (default: ``data_root``): NIH's ``images_001/images/...`` or one flat ``images/``.
    A label that appears twice on one image is handled as ``multi_box`` says (see load_ms_cxr).
    There is no official split: a seeded 70/10/20 split by image.
    """
    root = _root("chestx-ray8", data_root, CHESTXRAY8_FILE)
    file = root if root.is_file() else root / CHESTXRAY8_FILE
    if not file.is_file():
        raise _not_found("chestx-ray8", CHESTXRAY8_FILE, [root])
    image_root = Path(image_root).expanduser() if image_root else file.parent
    skipped, parsed, bad = SkipReport(), [], []
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        for fields in reader:
            where = f"{file.name} line {reader.line_num}"
            if not any(v.strip() for v in fields) or (reader.line_num == 1 and fields[0].strip() == "Image Index"):
                continue  # a blank line, or the header
            try:
                if len(fields) < 6 or not fields[0].strip() or not fields[1].strip():
                    raise _BadRow("missing columns", f"{len(fields)} fields")
                name, label = fields[0].strip(), fields[1].strip()
                x, y, w, h = (_number(v, n) for v, n in zip(fields[2:6], "xywh"))
                box = _checked_box(x, y, w, h, CHESTXRAY8_SIZE, CHESTXRAY8_SIZE)
                parsed.append((where, name, label, box))
            except _BadRow as e:
                bad.append(_Skipped(None, e.reason, where, e.detail))  # no split of its own: see _rows_in_split
    found = _find_files(image_root, {name for _, name, _, _ in parsed})
    rows = [_Row(image=found.get(name, image_root / "images" / name), text=CHESTXRAY8_PHRASES.get(label, label.lower()),
                 box=box, width=CHESTXRAY8_SIZE, height=CHESTXRAY8_SIZE, category=label,
                 id=f"{Path(name).stem}-{label.lower()}", split=None, group=name, where=where)
            for where, name, label, box in parsed]
    rows = _rows_in_split(rows, split, split_seed, skipped, bad)
    return SampleList(_pair_samples(rows, multi_box, skipped), skipped, str(file))


def _find_files(root: Path, names: set[str]) -> dict[str, Path]:
    """Where each wanted file name is below ``root``: one walk, so any folder layout works."""
    found: dict[str, Path] = {}
    for folder, _, files in os.walk(root, followlinks=True):
        for name in names.intersection(files):
            found.setdefault(name, Path(folder) / name)
    return found


# ----------------------------------------------------------------------------------------------
# M3D-RefSeg (3D CT): one 2D slice per described region
# ----------------------------------------------------------------------------------------------
M3D_CSVS = {"train": "M3D_RefSeg_train.csv", "test": "M3D_RefSeg_test.csv", "all": "M3D_RefSeg_all.csv"}
M3D_COLUMNS = ("Image", "Mask", "Mask_ID")  # Question_Type, Question, Answer: paraphrases, not needed
M3D_VAL_FRACTION = 0.1  # of the official training cases, by case, seeded
M3D_WINDOW = (0.5, 99.5)  # percentiles of the slice mapped to 0 and 255


def load_m3d_refseg(split: str, data_root, image_root=None, *, split_seed: int = 0, cache_dir=None) -> SampleList:
    """M3D-RefSeg as 2D grounding: one sample per (case, region), the axial slice where the region is largest.

    ``data_root`` holds the CSVs; the cases (``sXXXX/ct.nii.gz, mask.nii.gz, text.json``) are below
    ``image_root`` (default: ``data_root``) or its ``M3D_RefSeg/`` folder. The ``.npy`` variant
    (``ct.npy``, ``mask.npy``, shape (1, 32, 256, 256)) is used when a case folder has it instead.

    - Target: ``mask == Mask_ID``; the CSV's ~5 question paraphrases per region collapse into one
      sample; the phrase is the region's English description in ``text.json``.
    - Slice: the axial slice where the region's area is largest (the first if tied), shown in the
      radiological view (patient's right on the image's left, anterior at the top; NIfTI volumes are
      reoriented to RAS first; .npy arrays are used as stored). Image and mask get the same transform.
    - Intensity: the slice windowed to 8 bits with its own 0.5-99.5 percentile range.
    - Splits by case: test = ``M3D_RefSeg_test.csv``; val = a seeded 10% of the cases of
      ``M3D_RefSeg_train.csv``; train = the rest. Without those two files, ``M3D_RefSeg_all.csv`` is
      split 70/10/20 by case. A case never lands in two splits, so neither do the paraphrases.
    - Cache: slices are written once as PNGs (the records point to them) with a ``regions.json`` per
      case, under ``cache_dir`` (default ``$GRPO_MIN_CACHE/m3d``, the model cache's folder, when that is
      set, else ``$XDG_CACHE_HOME/grpo_min/m3d`` or ``~/.cache/grpo_min/m3d``)
      in a folder named after a hash of ``data_root``. A later run reads the cache and decodes no volume,
      unless a volume's size or modification time changed.
    """
    root = _root("m3d-refseg", data_root, f"{M3D_CSVS['train']} and {M3D_CSVS['test']}")
    skipped = SkipReport()
    # Each bad CSV row is reported by one split only, not by all three: a row of the test CSV by 'test',
    # any other by 'train' (a row that cannot be read has no case to split by). The other splits' go to
    # ``elsewhere``, which is not reported.
    elsewhere = SkipReport()
    train_csv, test_csv, all_csv = (root / M3D_CSVS[k] for k in ("train", "test", "all"))
    if train_csv.is_file() and test_csv.is_file():
        test = _m3d_regions(test_csv, skipped if split == "test" else elsewhere)
        train = _m3d_regions(train_csv, skipped if split == "train" else elsewhere)
        test_cases = {case for case, _ in test}
        for key in [k for k in train if k[0] in test_cases]:
            region = train.pop(key)
            if split == "train":
                skipped.add("case also in the test CSV", region.where, key[0])
        if split == "test":
            regions, source = test, test_csv
        else:
            val_fractions = (1 - M3D_VAL_FRACTION, M3D_VAL_FRACTION, 0.0)
            val_of = seeded_split({case for case, _ in train}, split_seed, val_fractions)
            regions, source = {k: v for k, v in train.items() if val_of[k[0]] == split}, train_csv
    elif all_csv.is_file():
        every = _m3d_regions(all_csv, skipped if split == "train" else elsewhere)
        split_of = seeded_split({case for case, _ in every}, split_seed)
        regions, source = {k: v for k, v in every.items() if split_of[k[0]] == split}, all_csv
    else:
        raise _not_found("m3d-refseg", f"{M3D_CSVS['train']} and {M3D_CSVS['test']} (or {M3D_CSVS['all']})", [root])

    base = Path(image_root).expanduser() if image_root else root
    if os.environ.get("GRPO_MIN_CACHE"):  # the same variable as the model cache (grpo_min/tiny.py)
        cache_base = Path(os.environ["GRPO_MIN_CACHE"]) / "m3d"
    else:
        cache_base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grpo_min" / "m3d"
    cache = Path(cache_dir or cache_base) / _short_hash(str(root.resolve()))  # one folder per data root
    samples = []
    for case in sorted({case for case, _ in regions}):
        ids = sorted(i for c, i in regions if c == case)
        first = regions[(case, ids[0])]
        try:
            ct, mask = _m3d_volume_files(base, first)
            texts = _m3d_texts(ct.parent / "text.json")
            slices = _m3d_case_slices(ct, mask, ids, cache / case)
        except _BadRow as e:
            for i in ids:
                skipped.add(e.reason, regions[(case, i)].where, e.detail)
            continue
        for i in ids:
            where, found = regions[(case, i)].where, slices[i]
            if isinstance(found, str):
                skipped.add(found, where, f"{case} id {i}")
            elif str(i) not in texts:
                skipped.add("region id not in text.json", where, f"{case} id {i}")
            else:
                samples.append(Sample(id=f"{case}-{i}", image=found["image"], text=texts[str(i)],
                                      box=tuple(found["box"]), width=found["width"], height=found["height"]))
    return SampleList(samples, skipped, str(source))


@dataclass
class _Region:
    image: str  # the CSV's paths, e.g. 's0736/ct.nii.gz'
    mask: str
    where: str


def _m3d_regions(file: Path, skipped: SkipReport) -> dict[tuple[str, int], _Region]:
    """(case, Mask_ID) -> where its volumes are; the question paraphrases of a region count once."""
    regions: dict[tuple[str, int], _Region] = {}
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in M3D_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"m3d-refseg: {file} lacks the column(s) {', '.join(missing)}; expected the header "
                               f"Image,Mask,Mask_ID,Question_Type,Question,Answer. "
                               f"Obtain the dataset from {WHERE_TO_GET['m3d-refseg']}.")
        for raw in reader:
            where = f"{file.name} line {reader.line_num}"
            try:
                if any(not (raw.get(c) or "").strip() for c in M3D_COLUMNS):
                    raise _BadRow("missing columns")
                mask_id = _number(raw["Mask_ID"], "Mask_ID")
                if mask_id != int(mask_id) or mask_id <= 0:
                    raise _BadRow("unparseable number", f"Mask_ID={raw['Mask_ID']!r}")
                image = raw["Image"].strip().replace("\\", "/")
                regions.setdefault((PurePosixPath(image).parent.name, int(mask_id)),
                                   _Region(image, raw["Mask"].strip().replace("\\", "/"), where))
            except _BadRow as e:
                skipped.add(e.reason, where, e.detail)
    return regions


def _m3d_volume_files(base: Path, region: _Region) -> tuple[Path, Path]:
    """(ct, mask) of a case: the CSV's files below ``base``, ``base/M3D_RefSeg`` or ``base/M3D_RefSeg_npy``,
    or the .npy variant (``ct.npy``, ``mask.npy``) in the same case folder."""
    for folder in (base / "M3D_RefSeg", base, base / "M3D_RefSeg_npy"):
        ct, mask = folder / region.image, folder / region.mask
        for pair in ((ct, mask), (ct.parent / "ct.npy", mask.parent / "mask.npy")):
            if pair[0].is_file() and pair[1].is_file():
                return pair
    raise _BadRow("volume not found", f"{region.image} below {base} or {base / 'M3D_RefSeg'}")


def _m3d_texts(file: Path) -> dict[str, str]:
    """text.json: region id (a string) -> English description."""
    if not file.is_file():
        raise _BadRow("text.json not found", str(file))
    try:
        texts = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _BadRow("text.json unreadable", f"{file}: {e}") from None
    if not isinstance(texts, dict):
        raise _BadRow("text.json unreadable", f"{file}: a {type(texts).__name__}, expected {{region id: text}}")
    return {str(k): (v[0] if isinstance(v, list) and v else str(v)).strip() for k, v in texts.items()}


def _three_d(volume: np.ndarray, path: Path) -> np.ndarray:
    """``volume`` with trailing size-1 axes dropped; a _BadRow naming ``path`` unless that leaves 3 axes."""
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise _BadRow("volume is not 3-D", f"{path}: shape {tuple(volume.shape)}")
    return volume


def _read_volumes(ct: Path, mask: Path) -> tuple[np.ndarray, np.ndarray]:
    """A case's CT and mask volumes, each as (slices, rows, cols): axial slices in the radiological view.

    NIfTI (needs nibabel): both volumes are reoriented by the CT's affine to RAS (+x towards the
    patient's right, +y anterior): the same reorientation for both, so that a mask saved
    with a missing or different affine still lines up voxel for voxel with its CT. Then each axial
    slice is flipped so the patient's right is on the image's left and anterior at the top. The .npy
    variant is M3D's preprocessed (1, D, H, W) array, used as stored. An unreadable file is a _BadRow.
    """
    if ct.suffix == ".npy":
        volumes = []
        for path in (ct, mask):
            try:
                volume = np.load(path)  # allow_pickle stays False: only plain arrays
            except (OSError, ValueError) as e:
                raise _BadRow("volume unreadable", f"{path}: {type(e).__name__}: {e}") from None
            if volume.ndim < 3 or volume.size != int(np.prod(volume.shape[-3:])):
                raise _BadRow("volume is not 3-D", f"{path}: shape {volume.shape}, expected (1, D, H, W)")
            volumes.append(volume.reshape(volume.shape[-3:]))
        return volumes[0], volumes[1]
    try:
        import nibabel
        from nibabel import orientations
    except ImportError:
        raise DatasetError("m3d-refseg: reading the NIfTI volumes (ct.nii.gz, mask.nii.gz) needs nibabel: "
                           "pip install nibabel (the .npy variant, ct.npy / mask.npy, does not)") from None
    arrays, to_ras = [], None
    for path in (ct, mask):
        try:
            image = nibabel.load(str(path))
            volume = _three_d(np.asanyarray(image.dataobj), path)  # (X, Y, Z) in the file's voxel order
        except _BadRow:
            raise
        except Exception as e:  # nibabel raises several types for truncated or foreign files
            raise _BadRow("volume unreadable", f"{path}: {type(e).__name__}: {e}") from None
        if to_ras is None:  # the CT's affine decides, for both
            to_ras = orientations.ornt_transform(orientations.io_orientation(image.affine),
                                                 orientations.axcodes2ornt("RAS"))
        ras = orientations.apply_orientation(volume, to_ras)  # (X, Y, Z) in RAS
        arrays.append(ras.transpose(2, 1, 0)[:, ::-1, ::-1])  # (Z, Y, X), rows anterior first, cols patient-right first
    return arrays[0], arrays[1]


def _window(ct_slice: np.ndarray) -> np.ndarray:
    """A CT slice as 8 bits, its 0.5-99.5 percentile range stretched to 0-255 (robust to air and metal)."""
    lo, hi = np.percentile(ct_slice, M3D_WINDOW)
    if hi <= lo:
        return np.zeros(ct_slice.shape, np.uint8)
    return (np.clip((ct_slice - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file, so a reader (another rank) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _m3d_case_slices(ct: Path, mask: Path, ids: list[int], out: Path) -> dict[int, dict | str]:
    """For each region id: its slice PNG, box and size (or why there is none), from the cache when fresh."""
    source = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in (ct, mask)}
    source["reader"] = 2  # bump when _read_volumes changes what it returns (2: the mask follows the CT's orientation)
    index_file, regions = out / "regions.json", {}
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        if index.get("source") == source:  # the volumes have not changed since
            regions = index["regions"]

    def cached(i: int) -> bool:
        found = regions.get(str(i))
        return isinstance(found, str) or (isinstance(found, dict) and Path(found["image"]).is_file())

    if all(cached(i) for i in ids):
        return {i: regions[str(i)] for i in ids}

    volume, labels = _read_volumes(ct, mask)  # (Z, rows, cols) each
    out.mkdir(parents=True, exist_ok=True)
    for i in ids:
        if volume.shape != labels.shape:
            regions[str(i)] = "mask shape differs from the CT"
            continue
        region = labels == i  # (Z, rows, cols)
        areas = region.reshape(len(region), -1).sum(1)  # (Z,)
        if areas.max() == 0:
            regions[str(i)] = "region id absent from the mask"
            continue
        z = int(areas.argmax())  # the first of the largest
        png = out / f"{i}.png"
        _write_atomic(png, lambda p: Image.fromarray(_window(volume[z])).save(p, format="PNG"))
        rows, cols = region[z].shape
        regions[str(i)] = {"image": str(png), "box": list(_mask_box(region[z])), "width": cols, "height": rows,
                           "slice": z}
    _write_atomic(index_file, lambda p: p.write_text(json.dumps({"source": source, "regions": regions})))
    return {i: regions[str(i)] for i in ids}


# ----------------------------------------------------------------------------------------------
# Generic JSONL (users' own data; what --export writes)
# ----------------------------------------------------------------------------------------------
def load_jsonl(split: str, data_root, image_root=None, *, split_seed: int = 0) -> SampleList:
    """``{"image", "text", "box": [x1, y1, x2, y2], "width", "height", "category", "id"}``, one per line.

    ``data_root`` is a folder with ``train.jsonl``, ``val.jsonl``, ``test.jsonl``, or one .jsonl file
    whose lines have a ``split`` field (without any ``split`` field: a seeded 70/10/20 split by image).
    ``image`` is absolute or relative to ``image_root`` when given, else to the file's folder.
    ``width`` / ``height``, when absent, are read from the image's header (no decoding).
    """
    root = _root("jsonl", data_root, f"{split}.jsonl")
    file = root if root.is_file() else root / f"{split}.jsonl"
    if not file.is_file():
        raise _not_found("jsonl", f"{split}.jsonl (one file per split), or pass one .jsonl file whose lines have "
                                  f"a 'split' field as --data-root", [root])
    base = Path(image_root).expanduser() if image_root else file.parent
    skipped, rows, bad = SkipReport(), [], []
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{file.name} line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(_Skipped(None, "not valid JSON", where, str(e)))
                continue
            try:
                rows.append(_jsonl_row(rec, where, base, f"{file.stem}-{n}"))
            except _BadRow as e:
                bad.append(_Skipped(_own_split(rec), e.reason, where, e.detail))
    if root.is_file():  # one file for every split: each bad row is reported by one split (see _rows_in_split)
        rows = _rows_in_split(rows, split, split_seed, skipped, bad)
    else:  # the file is the split: all its bad rows are this split's
        for b in bad:
            skipped.add(b.reason, b.where, b.detail)
    return SampleList([r.sample() for r in rows], skipped, str(file))


def _jsonl_row(rec, where: str, base: Path, default_id: str) -> _Row:
    if not isinstance(rec, dict) or any(k not in rec for k in ("image", "text", "box")):
        raise _BadRow("missing columns", "needs image, text, box")
    text = _phrase(rec["text"], "text")
    if not isinstance(rec["image"], str) or not rec["image"].strip():
        raise _BadRow("malformed entry", f"image={rec['image']!r}, expected a path")
    if not isinstance(rec["box"], list) or len(rec["box"]) != 4:
        raise _BadRow("missing columns", "box is not [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (_number(v, "box") for v in rec["box"])
    image = Path(rec["image"]).expanduser()
    image = image if image.is_absolute() else base / image
    if rec.get("width") is None or rec.get("height") is None:
        try:
            with Image.open(image) as im:  # reads the header only
                width, height = im.size
        except OSError:
            raise _BadRow("image not found (and no width/height given)", str(image)) from None
    else:
        width, height = _number(rec["width"], "width"), _number(rec["height"], "height")
    box = _checked_box(x1, y1, x2 - x1, y2 - y1, width, height)
    category = rec.get("category")
    return _Row(image=image, text=text, box=box, width=round(width), height=round(height),
                category=str(category) if category is not None else None, id=str(rec.get("id") or default_id),
                split=_split_value(rec.get("split")), group=str(image), where=where)


# ----------------------------------------------------------------------------------------------
# Before training: every image file opens
# ----------------------------------------------------------------------------------------------
# The Qwen2-VL / Qwen2.5-VL processor's smart_resize raises "absolute aspect ratio must be smaller
# than 200" for a longer side over 200 times the shorter one. (transformers 4.x before 4.51 also
# refused sides under 28 pixels; transformers 5, which this project needs, upscales them instead.)
MAX_ASPECT_RATIO = 200


def _probe_image(path: Path, decode: bool) -> tuple[int, int]:
    """The (width, height) of an image file, or a _BadRow saying why it cannot be used."""
    if not path.is_file():
        raise _BadRow("image file not found", str(path))
    try:
        with Image.open(path) as im:
            size = im.size
            if decode:  # JPEG: decode at 1/8 scale; the whole stream is still read, so truncation shows
                im.draft("L", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise _BadRow("image unreadable", f"{path}: {e}") from None
    return size


def check_images(samples: Sequence[Sample], decode: bool = True) -> tuple[Sequence[Sample], SkipReport]:
    """Find missing or unreadable images before training, so that a run never dies on one midway.

    Each distinct file is opened once (and, with ``decode``, decoded: JPEGs at 1/8 scale, which still
    reads the whole file). Samples whose image is missing or unreadable, or whose aspect ratio the
    processor refuses (over MAX_ASPECT_RATIO), are dropped, counted by reason.
    A file whose size differs from the record's (a downsized MIMIC copy; MedRPG's 640 x 640 boxes with
    the original JPG) gets its box rescaled per axis to the size on disk, and counted in ``rescaled``.
    Synthetic data (drawn in memory) is returned as it is.

    Returns (the usable samples, as a SampleList that keeps the input's ``skipped``; the report).

        train_set, report = check_images(train_set)   # e.g. in train.py, right after load_dataset
    """
    report = SkipReport()
    if isinstance(samples, SyntheticDataset):
        return samples, report
    probed: dict[str, tuple[int, int] | _BadRow] = {}
    good = []
    for s in samples:
        width, height = s.width, s.height
        if isinstance(s.image, (str, Path)):
            key = str(s.image)
            if key not in probed:
                try:
                    probed[key] = _probe_image(Path(key), decode)
                except _BadRow as e:
                    probed[key] = e
            found = probed[key]
            if isinstance(found, _BadRow):
                report.add(found.reason, f"sample {s.id}", found.detail)
                continue
            width, height = found
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):  # would stop training midway
            report.add(f"image aspect ratio over {MAX_ASPECT_RATIO} (the Qwen2-VL processor's limit)",
                       f"sample {s.id}", f"{s.image}: {width} x {height}")
            continue
        if (width, height) != (s.width, s.height):
            sx, sy = width / s.width, height / s.height
            x1, y1, x2, y2 = s.box
            s = replace(s, box=(x1 * sx, y1 * sy, x2 * sx, y2 * sy), width=width, height=height)
            report.rescaled += 1
        good.append(s)
    return SampleList(good, getattr(samples, "skipped", None), getattr(samples, "source", "")), report


# ----------------------------------------------------------------------------------------------
# Dataset registry
# ----------------------------------------------------------------------------------------------
DATASETS = ("synthetic", "ms-cxr", "medrpg", "chestx-ray8", "m3d-refseg", "jsonl")


def load_dataset(name: str, split: str = "train", *, data_root: str | None = None, image_root: str | None = None,
                 seed: int = 0, limit: int | None = None, multi_box: str = "union", cache_dir: str | None = None,
                 split_seed: int = 0) -> Sequence[Sample]:
    """Load one split of a dataset by name. ``image_root`` defaults to ``data_root``.

    Real datasets return a SampleList (records with an image *path*: nothing is decoded until
    ``Sample.load_image()``), with ``.skipped`` saying which rows were left out and why; a one-line
    summary of those goes to stderr (rank 0 only). ``seed`` draws the synthetic data; ``split_seed``
    the seeded splits of real datasets that have no official one. They are kept apart on purpose: a
    training run with another ``seed`` must still be evaluated on the same test images, never on
    images it trained on. ``multi_box``: see load_ms_cxr. ``cache_dir``: see load_m3d_refseg.
    """
    if name == "synthetic":
        return SyntheticDataset(split, seed=seed, size=limit)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if multi_box not in MULTI_BOX:
        raise ValueError(f"unknown multi_box {multi_box!r}; expected one of {MULTI_BOX}")
    if name == "ms-cxr":
        ds = load_ms_cxr(split, data_root, image_root, split_seed=split_seed, multi_box=multi_box)
    elif name == "medrpg":
        ds = load_medrpg(split, data_root, image_root)
    elif name == "chestx-ray8":
        ds = load_chestxray8(split, data_root, image_root, split_seed=split_seed, multi_box=multi_box)
    elif name == "m3d-refseg":
        ds = load_m3d_refseg(split, data_root, image_root, split_seed=split_seed, cache_dir=cache_dir)
    elif name == "jsonl":
        ds = load_jsonl(split, data_root, image_root, split_seed=split_seed)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if ds.skipped.total and os.environ.get("RANK", "0") == "0":
        print(f"{name}/{split}: {ds.skipped.summary()} (python data.py --dataset {name} ... lists examples)",
              file=sys.stderr)
    tiny = ds.skipped.counts[TINY_BOX]  # normalised boxes end up here (see _checked_box)
    if tiny > len(ds) and os.environ.get("RANK", "0") == "0":
        print(f"WARNING: {name}/{split}: most boxes ({tiny} skipped, {len(ds)} kept) are smaller than 1 pixel; "
              "boxes must be in pixels of the original image (x1, y1, x2, y2), not normalised to [0, 1]: "
              "multiply them by the image's width and height", file=sys.stderr)
    return SampleList(ds[:limit], ds.skipped, ds.source) if limit is not None else ds


# ----------------------------------------------------------------------------------------------
# Command line: inspect, show, export
# ----------------------------------------------------------------------------------------------
def draw_grid(samples: Sequence[Sample], path: str | Path, pred_boxes: Sequence[Box | None] | None = None,
              cell: int = 256, cols: int = 4) -> Path:
    """A PNG grid of samples with the ground-truth box (green), an optional prediction (red) and the phrase."""
    from PIL import ImageDraw

    rows = max(1, math.ceil(len(samples) / cols))
    text_h = 28
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for k, s in enumerate(samples):
        img = s.load_image()
        scale = cell / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        x0, y0 = (k % cols) * cell, (k // cols) * (cell + text_h)
        grid.paste(img, (x0, y0))
        boxes = [(s.box, (0, 200, 0))]
        if pred_boxes is not None and pred_boxes[k] is not None:
            boxes.append((pred_boxes[k], (230, 30, 30)))
        for b, colour in boxes:
            draw.rectangle([x0 + b[0] * scale, y0 + b[1] * scale, x0 + b[2] * scale, y0 + b[3] * scale],
                           outline=colour, width=2)
        draw.text((x0 + 3, y0 + cell + 2), s.text[:42], fill="black")
        if len(s.text) > 42:
            draw.text((x0 + 3, y0 + cell + 14), s.text[42:84], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def export_jsonl(samples: Sequence[Sample], out: str | Path, split: str, copy_images: bool = False) -> Path:
    """Write samples in the generic JSONL format (``load_jsonl`` reads it back).

    Image files are referred to by absolute path. Images that are not files (synthetic) are written as
    PNGs into a folder next to ``out`` named after it (``runs/x.jsonl`` -> ``runs/x/<id>.png``), and so
    are image files with ``copy_images`` (M3D-RefSeg's cached slices: the export then does not depend
    on the cache); those paths are relative to the JSONL's folder. Each line also has ``split``, so the
    exports of three splits can be concatenated into one file.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img_dir = out.with_suffix("")
    with open(out, "w") as f:
        for s in samples:
            if isinstance(s.image, (str, Path)) and not copy_images:
                image = str(Path(s.image).resolve())
            else:
                img_dir.mkdir(parents=True, exist_ok=True)
                if isinstance(s.image, (str, Path)):
                    shutil.copyfile(s.image, img_dir / f"{s.id}.png")
                else:
                    s.load_image().save(img_dir / f"{s.id}.png")
                image = f"{img_dir.name}/{s.id}.png"
            f.write(json.dumps({"image": image, "text": s.text, "box": [round(v, 2) for v in s.box],
                                "width": s.width, "height": s.height, "category": s.category, "id": s.id,
                                "split": split}) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Inspect, picture or export a grounding dataset "
                                            "(formats and layouts: docs/DATASETS_USAGE.md).")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS, help="dataset name")
    p.add_argument("--data-root", default=None, help="folder (or file) holding the dataset's annotations")
    p.add_argument("--image-root", default=None, help="folder holding the images (default: --data-root)")
    p.add_argument("--split", default="train", choices=SPLITS, help="which split")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the seeded splits (real datasets without an official split)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    p.add_argument("--multi-box", default="union", choices=MULTI_BOX,
                   help="a phrase with several boxes (MS-CXR, ChestX-ray8): their union box (default), "
                        "one sample per box, or drop it")
    p.add_argument("--show", type=int, default=0, metavar="N", help="write a PNG grid of N samples")
    p.add_argument("--show-path", default="samples.png", help="where --show writes its PNG")
    p.add_argument("--export", default=None, metavar="OUT.jsonl", help="write the generic JSONL format")
    args = p.parse_args(argv)

    try:
        ds = load_dataset(args.dataset, args.split, data_root=args.data_root, image_root=args.image_root,
                          seed=args.seed, limit=args.limit, multi_box=args.multi_box, split_seed=args.split_seed)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ds, image_report = check_images(ds)
    cats = Counter(s.category for s in ds)
    images = len({str(s.image) for s in ds}) if isinstance(ds, SampleList) else len(ds)
    print(f"{args.dataset}/{args.split}: {len(ds)} samples on {images} images"
          + (f", from {ds.source}" if getattr(ds, "source", "") else ""))
    print(f"categories: {dict(cats.most_common())}")
    print(f"rows: {getattr(ds, 'skipped', SkipReport())}")
    print(f"images: {image_report}")
    if args.show:
        print("wrote", draw_grid([ds[i] for i in range(min(args.show, len(ds)))], args.show_path))
    if args.export:
        print("wrote", export_jsonl(ds, args.export, args.split, copy_images=args.dataset == "m3d-refseg"))


if __name__ == "__main__":
    sys.exit(main())
