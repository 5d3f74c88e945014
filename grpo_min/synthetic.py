"""The embedded demo's data: procedurally drawn chest-X-ray-like images with one finding each.

A thorax, two lung fields with vessel texture, a heart, spine, clavicles and ribs, with one finding
(nodule, mass, consolidation, pleural effusion, pneumothorax or cardiomegaly) at a random place, and
in some images a second, different finding on the other side as a distractor. Patient size and
placement vary, so the phrase alone cannot pin the box. Phrases use radiological laterality (the
patient's left is on the image's right) and zones.

    >>> s = synthetic_sample(0, "val"); s.text, s.box      # doctest: +SKIP
    ('small nodule in the left lower zone', (151.0, 160.0, 163.0, 172.0))
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from grpo_min.boxes import Box
from grpo_min.sample import Sample, mask_box

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
    return synthetic_findings(index, split, seed, size)[0]


def synthetic_findings(index: int, split: str = "train", seed: int = 0,
                       size: int = SYNTHETIC_SIZE) -> tuple[Sample, list[tuple[str, str, Box]]]:
    """``synthetic_sample`` plus every finding painted on it: [(kind, phrase, box)], the described one
    first, then the distractor when there is one (the tiny semantic scorer learns from both)."""
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
    distractors = []
    if rng.random() < DISTRACTOR_PROB:  # a second, different finding elsewhere: the phrase must matter
        other = [k for k in FINDINGS if k not in (kind, "cardiomegaly", "pleural effusion" if kind == "cardiomegaly" else "")]
        dkind = other[rng.integers(len(other))]
        dside = "left" if side == "right" else "right"
        dzone = ("upper", "middle", "lower")[rng.integers(3)]
        dphrase, dmask, *_ = _draw_finding(dkind, dside, dzone, rng, th, xx, yy, img, heart)
        if dmask.any():
            distractors.append((dkind, dphrase, mask_box(dmask)))

    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    sample = Sample(
        id=f"synthetic-{seed}-{split}-{index}",
        image=pil,  # 8-bit grayscale; load_image() gives RGB
        text=phrase,
        box=mask_box(mask),
        width=size,
        height=size,
        category=kind,
        anatomy=[(anatomy_name, mask_box(anatomy_mask))],
    )
    return sample, [(kind, phrase, sample.box)] + distractors


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
