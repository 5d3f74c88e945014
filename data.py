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

Run ``python data.py --help`` to inspect or export a dataset.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
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
SYNTHETIC_VERSION = 2  # bump whenever drawing changes: cached models trained on old data are rebuilt
SYNTHETIC_SIZE = 224  # pixels, square; the tiny model's processor resizes it to 112 x 112
SYNTHETIC_SPLITS = {"train": (0, 2000), "val": (1, 200), "test": (2, 200)}  # split -> (stream, size)
FINDINGS = ("nodule", "mass", "consolidation", "pleural effusion", "pneumothorax", "cardiomegaly")
DISTRACTOR_PROB = 0.3


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
        s = size / 224.0 * rng.uniform(0.72, 1.04)
        self.size = size
        self.cx = size / 2 + rng.uniform(-22, 22) * size / 224
        cy = size / 2 + rng.uniform(-16, 16) * size / 224
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
        self.heart = (self.cx + 11 * s + rng.normal(0, 2) * s, self.top + (self.bottom - self.top) * 0.7,
                      (27 + rng.normal(0, 2)) * s, (22 + rng.normal(0, 2)) * s)

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
            r = rng.uniform(3, 8) * s
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            size = "small " if r < 5 * s else ""
            phrase = f"{size}nodule in the {side} {zone} zone"
            img += 0.38 * mask
        elif kind == "mass":
            r = rng.uniform(9, 15) * s
            mask = _blob(xx, yy, cx, cy, r, rng) & lung
            size = "large " if r > 12.5 * s else ""
            phrase = f"{size}mass in the {side} {zone} zone"
            img += 0.33 * mask
        else:
            r = rng.uniform(10, 18) * s
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
    img[np.abs(xx - th.cx) < 8 * size / 224] = 0.72
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
        self.n = size if size is not None else SYNTHETIC_SPLITS[split][1]
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
# Dataset registry
# ----------------------------------------------------------------------------------------------
def load_dataset(name: str, split: str = "train", *, data_root: str | None = None,
                 image_root: str | None = None, seed: int = 0, limit: int | None = None) -> Sequence[Sample]:
    """Load one split of a dataset by name. ``image_root`` defaults to ``data_root``."""
    if name == "synthetic":
        return SyntheticDataset(split, seed=seed, size=limit)
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


DATASETS = ("synthetic",)


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


def main(argv=None):
    p = argparse.ArgumentParser(description="Inspect, picture or export a grounding dataset.")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS, help="dataset name")
    p.add_argument("--data-root", default=None, help="folder holding the dataset's annotation files")
    p.add_argument("--image-root", default=None, help="folder holding the images (default: --data-root)")
    p.add_argument("--split", default="train", help="train, val or test")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of seeded splits")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    p.add_argument("--show", type=int, default=0, metavar="N", help="write a PNG grid of N samples")
    p.add_argument("--show-path", default="samples.png", help="where --show writes its PNG")
    p.add_argument("--export", default=None, metavar="OUT.jsonl", help="write the generic JSONL format")
    args = p.parse_args(argv)

    ds = load_dataset(args.dataset, args.split, data_root=args.data_root, image_root=args.image_root,
                      seed=args.seed, limit=args.limit)
    cats = Counter(s.category for s in ds)
    print(f"{args.dataset}/{args.split}: {len(ds)} samples; categories: {dict(cats)}")
    if args.show:
        print("wrote", draw_grid([ds[i] for i in range(min(args.show, len(ds)))], args.show_path))
    if args.export:
        out = Path(args.export)
        img_dir = out.with_suffix("")
        with open(out, "w") as f:
            for s in ds:
                image = s.image
                if not isinstance(image, (str, Path)):
                    img_dir.mkdir(parents=True, exist_ok=True)
                    image = img_dir / f"{s.id}.png"
                    s.load_image().save(image)
                f.write(json.dumps({"image": str(image), "text": s.text, "box": list(s.box), "width": s.width,
                                    "height": s.height, "category": s.category, "id": s.id}) + "\n")
        print("wrote", out)


if __name__ == "__main__":
    sys.exit(main())
