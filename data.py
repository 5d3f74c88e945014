"""What goes in: grounding samples (image, phrase, box), from the synthetic demo or a real dataset.

Every source yields the same record, :class:`Sample`: an image, a referring phrase, and one box
``[x1, y1, x2, y2]`` in *original image pixels* (the model's own frame is applied later, in the
rewards and the metrics, never here).

    >>> ds = load_dataset("synthetic", split="val")
    >>> s = ds[0]; s.text, s.box            # doctest: +SKIP
    ('small nodule in the left lower zone', (151.0, 160.0, 163.0, 172.0))
    >>> ds = load_dataset("ms-cxr", "train", data_root="ms-cxr/1.1.0",
    ...                   image_root="mimic-cxr-jpg/2.1.0")  # doctest: +SKIP

This file is the face of the data; the work is done below it: the synthetic chest X-rays in
grpo_min/synthetic.py, the parsers of ``ms-cxr``, ``medrpg``, ``chestx-ray8`` and the generic ``jsonl``
in grpo_min/datasets.py, ``m3d-refseg`` in grpo_min/m3d.py (layouts, formats and commands:
docs/DATASETS_USAGE.md). Here: ``load_dataset`` by name, ``check_images`` (missing or unreadable images,
and those the model's processor would refuse, found before training starts), ``load_splits`` (both, for
the three splits of a run), and a command line: ``python data.py --help`` inspects, pictures or exports
a dataset.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from grpo_min import dist
from grpo_min.files import InputError, atomic_path, brief, check_output, write_text
from grpo_min.boxes import Box
from grpo_min.datasets import (MULTI_BOX, SPLITS, TINY_BOX, DatasetError, SampleList, SkipReport, _BadRow,  # noqa: F401
                               load_chestxray8, load_jsonl, load_medrpg, load_ms_cxr, phrase_from_question,
                               seeded_split)
from grpo_min.m3d import load_m3d_refseg
from grpo_min.sample import Sample, to_rgb8  # noqa: F401
from grpo_min.synthetic import (FINDINGS, SYNTHETIC_SIZE, SYNTHETIC_VERSION, SyntheticDataset,  # noqa: F401
                                phrase_only_baseline, synthetic_findings, synthetic_phrases, synthetic_sample)


# ----------------------------------------------------------------------------------------------
# Before training: every image file opens
# ----------------------------------------------------------------------------------------------
# The Qwen2-VL / Qwen2.5-VL processor's smart_resize raises "absolute aspect ratio must be smaller
# than 200" for a longer side over 200 times the shorter one. (transformers 4.x before 4.51 also
# refused sides under 28 pixels; transformers 5, which this project needs, upscales them instead.)
MAX_ASPECT_RATIO = 200


def _probe_image(path: Path, decode: bool) -> tuple[int, int]:
    """The (width, height) of an image file, or a _BadRow saying why it cannot be used."""
    try:
        if not path.is_file():
            raise _BadRow("image file not found", str(path))
        with Image.open(path) as im:
            size = im.size
            if decode:  # JPEG: decode at 1/8 scale; the whole stream is still read, so truncation shows
                im.draft("L", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except _BadRow:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...; a NUL in the path
        raise _BadRow("image unreadable", f"{path}: {brief(e)}") from None
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
    if ds.skipped.total and dist.is_main():
        print(f"{name}/{split}: {ds.skipped.summary()} (python data.py --dataset {name} ... lists examples)",
              file=sys.stderr)
    tiny = ds.skipped.counts[TINY_BOX]  # normalised boxes end up here (see _checked_box)
    if tiny > len(ds) and dist.is_main():
        print(f"WARNING: {name}/{split}: most boxes ({tiny} skipped, {len(ds)} kept) are smaller than 1 pixel; "
              "boxes must be in pixels of the original image (x1, y1, x2, y2), not normalised to [0, 1]: "
              "multiply them by the image's width and height", file=sys.stderr)
    return SampleList(ds[:limit], ds.skipped, ds.source) if limit is not None else ds


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The seeded order of the n training samples in one epoch (computed once per epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def stream_indices(position: int, count: int, n: int, seed: int) -> list[int]:
    """Training-sample indices at positions ``position`` .. ``position + count - 1`` of the seeded stream.

    The stream is one permutation of the n samples per epoch (``epoch_order``), epoch after epoch: the
    data order of a run is a function of the seed alone, so a resumed run continues it exactly.
    """
    return [int(epoch_order(seed, epoch, n)[i]) for epoch, i in (divmod(k, n) for k in range(position, position + count))]


def load_splits(name: str, *, data_root=None, image_root=None, seed: int = 0, need_val: bool = True):
    """train, val and test of a dataset for a training run, every image opened once before training starts.

    Bad rows and images are dropped and reported (rank 0 prints). Rank 0 loads first: it may build a cache
    (M3D-RefSeg's slices) that the other ranks then read. Stops with a one-line error (SystemExit) when a
    split the run needs has no usable sample; val is needed only when the run evaluates (``need_val``).
    """
    args = dict(data_root=data_root, image_root=image_root, seed=seed)
    try:
        splits = dist.on_main_first(lambda: [load_dataset(name, s, **args) for s in SPLITS])
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    checked = []
    for split, ds in zip(SPLITS, splits):
        source = getattr(ds, "source", "")
        ds, report = check_images(ds)
        dist.print0(f"{name}/{split} images: {report}")
        if len(ds) == 0 and (split != "val" or need_val):
            dropped = report.total + getattr(getattr(ds, "skipped", None), "total", 0)  # images + rows at load
            why = "every sample was skipped: see the reports above" if dropped else "the split is empty"
            raise SystemExit(f"error: {name}/{split} has no usable sample ({why}{'; ' + source if source else ''})")
        checked.append(ds)
    return checked


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
    with atomic_path(path) as tmp:
        grid.save(tmp)
    return Path(path)


def export_jsonl(samples: Sequence[Sample], out: str | Path, split: str, copy_images: bool = False) -> Path:
    """Write samples in the generic JSONL format (``load_jsonl`` reads it back).

    Image files are referred to by absolute path. Images that are not files (synthetic) are written as
    PNGs into a folder next to ``out`` named after it (``runs/x.jsonl`` -> ``runs/x/<id>.png``), and so
    are image files with ``copy_images`` (M3D-RefSeg's cached slices: the export then does not depend
    on the cache); those paths are relative to the JSONL's folder. Each line also has ``split``, so the
    exports of three splits can be concatenated into one file. Every file is written whole, the JSONL last:
    an export cut off midway leaves no JSONL that refers to missing images.
    """
    out = Path(out)
    img_dir = out.with_suffix("")
    lines = []
    for s in samples:
        if isinstance(s.image, (str, Path)) and not copy_images:
            image = str(Path(s.image).resolve())
        else:
            img_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(img_dir / f"{s.id}.png") as tmp:
                shutil.copyfile(s.image, tmp) if isinstance(s.image, (str, Path)) else s.load_image().save(tmp)
            image = f"{img_dir.name}/{s.id}.png"
        lines.append(json.dumps({"image": image, "text": s.text, "box": [round(v, 2) for v in s.box],
                                 "width": s.width, "height": s.height, "category": s.category, "id": s.id,
                                 "split": split}) + "\n")
    return write_text(out, "".join(lines))


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
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: expected at least 1")
    if args.show < 0:
        p.error(f"--show {args.show}: expected 0 or more")
    for option, value in (("--seed", args.seed), ("--split-seed", args.split_seed)):
        if not 0 <= value < 2**32:
            p.error(f"{option} {value}: expected 0 or more and below 2**32")
    # Outputs never go into a folder the data is read from, nor over the annotation file itself; checked
    # before the data loads.
    reads = {"--data-root": args.data_root, "--image-root": args.image_root}
    try:
        for option, path in (("--export", args.export), ("--show-path", args.show and args.show_path)):
            if path:
                if any(Path(path).resolve() == Path(r).resolve() for r in reads.values() if r):
                    raise InputError(f"{option} {path} is an input of this command: it would be written over")
                check_output(Path(path).parent, reads, option=option)  # (--export's images folder lies in it too)
    except InputError as e:
        p.error(str(e))

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
