"""The real datasets, read exactly as they sit on disk after the official download.

MS-CXR, MedRPG's split of it, ChestX-ray8 and the generic JSONL here; M3D-RefSeg in grpo_min/m3d.py.
Layouts, formats and commands: docs/DATASETS_USAGE.md. Every loader returns a ``SampleList``: records
holding an image *path* (nothing is decoded until ``Sample.load_image()``), with ``.skipped`` saying
which rows were left out and why. A missing root or file stops with a ``DatasetError`` that says what
was expected, where it was looked for, and where the dataset is obtained.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
from PIL import Image

from grpo_min.boxes import Box
from grpo_min.files import brief
from grpo_min.sample import Sample

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
    root = _path(data_root, "--data-root")
    if not root.exists():
        raise _not_found(dataset, expected, [root], note=" (it does not exist)")
    return root


def _path(path: str | Path, option: str) -> Path:
    """A folder option as a Path, ``~`` expanded; a DatasetError for one that cannot name a file."""
    try:
        path = Path(path).expanduser()
        path.exists()  # a NUL byte raises here, not later
        return path
    except (RuntimeError, ValueError, OSError) as e:  # ~nobody (no such user), a NUL byte, a name too long
        raise DatasetError(f"{option} {str(path)!r}: not a usable path ({brief(e)})") from None


def _read_json(file: Path, dataset: str):
    """A whole JSON annotation file; a DatasetError naming it when it cannot be decoded."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DatasetError(f"{dataset}: {file} is not valid JSON ({brief(e)}); was it cut off while "
                           "downloading?") from None


# What one row's garbage can raise besides _BadRow (a 400-digit number overflows a float, a NUL in a path is a
# ValueError, '~nobody' a RuntimeError, a path too long an OSError): the row is skipped and counted, never the load.
ROW_ERRORS = (ValueError, TypeError, OverflowError, KeyError, IndexError, AttributeError, RecursionError,
              RuntimeError, OSError)


def _bad_row(e: Exception) -> "_BadRow":
    """``e`` as a _BadRow: itself, or "malformed entry" with its type and message."""
    return e if isinstance(e, _BadRow) else _BadRow("malformed entry", brief(e))


def _utf8(*values) -> None:
    """A _BadRow when a text field holds a lone surrogate: a byte that is not UTF-8 (read with
    errors="surrogateescape"), or a JSON escape such as "\\udcff"; such a string cannot even be printed."""
    for v in values:
        if isinstance(v, str) and any("\ud800" <= ch <= "\udfff" for ch in v):
            raise _BadRow("not UTF-8 text", repr(v.encode("utf-8", "surrogateescape")[:60]))


def _text_lines(file: Path):
    """A CSV / JSONL file opened so that a byte that is not UTF-8 spoils its row only (see ``_utf8``), and a
    field of any length reads (the csv module's default limit of 128 KiB would stop the whole file)."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    return open(file, newline="", encoding="utf-8-sig", errors="surrogateescape")


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
    grpo_min.datasets._BadRow: malformed entry
    """
    if not isinstance(value, str):  # JSON null or a list would otherwise become the phrase 'None' / "['a']"
        raise _BadRow("malformed entry", f"{name}={repr(value)[:60]}, expected a string")
    _utf8(value)
    if not value.strip():
        raise _BadRow("empty phrase", name)
    return value.strip()


def _number(value, name: str) -> float:
    """A finite float from a CSV / JSON field, or a _BadRow."""
    if isinstance(value, bool):  # JSON true / false: a bool is an int in Python, but never a coordinate
        raise _BadRow("unparseable number", f"{name}={value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer of hundreds of digits
        raise _BadRow("unparseable number", f"{name}={repr(value)[:40]}") from None
    if not math.isfinite(v):
        raise _BadRow("unparseable number", f"{name}={repr(value)[:40]}")
    return v


def _checked_box(x: float, y: float, w: float, h: float, width: float, height: float) -> Box:
    """(x1, y1, x2, y2) from a top-left corner and a size, checked against the image, then clipped to it.

    A box under 1 pixel wide or high once clipped is a _BadRow (TINY_BOX): almost always a box
    normalised to [0, 1] where original pixels were expected.

    >>> _checked_box(10, 20, 30, 40, width=100, height=100)
    (10.0, 20.0, 40.0, 60.0)
    >>> _checked_box(90, 20, 30, 40, width=100, height=100)
    Traceback (most recent call last):
    grpo_min.datasets._BadRow: box outside the image
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
    _utf8(rel)
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
    roots = [_path(image_root, "--image-root") if image_root else file.parent]
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
    with _text_lines(file) as f:
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
                _utf8(*raw.values())
                rows.append(_ms_cxr_row(where, raw["path"], raw["label_text"], raw["category_name"],
                                        [raw[c] for c in "xywh"], (raw["image_width"], raw["image_height"]),
                                        raw.get("split"), roots, resolved))
            except ROW_ERRORS as e:
                e = _bad_row(e)
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
        except ROW_ERRORS as e:
            e = _bad_row(e)
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
    base = _path(image_root, "--image-root") if image_root else root
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
                           f"tuples, numbers and strings are accepted; nothing else is unpickled): {brief(e)}"
                           ) from None
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
        except ROW_ERRORS as e:
            e = _bad_row(e)
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
        except ROW_ERRORS as e:
            e = _bad_row(e)
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
    image_root = _path(image_root, "--image-root") if image_root else file.parent
    skipped, parsed, bad = SkipReport(), [], []
    with _text_lines(file) as f:
        reader = csv.reader(f)
        for fields in reader:
            where = f"{file.name} line {reader.line_num}"
            if not any(v.strip() for v in fields) or (reader.line_num == 1 and fields[0].strip() == "Image Index"):
                continue  # a blank line, or the header
            try:
                if len(fields) < 6 or not fields[0].strip() or not fields[1].strip():
                    raise _BadRow("missing columns", f"{len(fields)} fields")
                _utf8(*fields[:6])
                name, label = fields[0].strip(), fields[1].strip()
                x, y, w, h = (_number(v, n) for v, n in zip(fields[2:6], "xywh"))
                box = _checked_box(x, y, w, h, CHESTXRAY8_SIZE, CHESTXRAY8_SIZE)
                parsed.append((where, name, label, box))
            except ROW_ERRORS as e:
                e = _bad_row(e)
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
    base = _path(image_root, "--image-root") if image_root else file.parent
    skipped, rows, bad = SkipReport(), [], []
    with open(file, "rb") as f:  # line by line as bytes: a byte that is not UTF-8 spoils its line only
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{file.name} line {n}"
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad.append(_Skipped(None, "not UTF-8 text", where, str(e)))
                continue
            except (json.JSONDecodeError, RecursionError) as e:  # (RecursionError: nested too deeply)
                bad.append(_Skipped(None, "not valid JSON", where, brief(e)))
                continue
            try:
                rows.append(_jsonl_row(rec, where, base, f"{file.stem}-{n}"))
            except ROW_ERRORS as e:
                e = _bad_row(e)
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
        raise _BadRow("malformed entry", f"image={repr(rec['image'])[:60]}, expected a path")
    _utf8(rec["image"], rec.get("category"), rec.get("id"))
    if not isinstance(rec["box"], list) or len(rec["box"]) != 4:
        raise _BadRow("missing columns", "box is not [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (_number(v, "box") for v in rec["box"])
    image = Path(rec["image"]).expanduser()
    image = image if image.is_absolute() else base / image
    if rec.get("width") is None or rec.get("height") is None:
        try:
            with Image.open(image) as im:  # reads the header only
                width, height = im.size
        except Exception as e:  # OSError, DecompressionBombError, ValueError (a NUL in the path)...
            reason = "image not found" if isinstance(e, FileNotFoundError) else "image unreadable"
            raise _BadRow(f"{reason} (and no width/height given)", f"{image}: {type(e).__name__}") from None
    else:
        width, height = _number(rec["width"], "width"), _number(rec["height"], "height")
    box = _checked_box(x1, y1, x2 - x1, y2 - y1, width, height)
    category = rec.get("category")
    return _Row(image=image, text=text, box=box, width=round(width), height=round(height),
                category=str(category) if category is not None else None, id=str(rec.get("id") or default_id),
                split=_split_value(rec.get("split")), group=str(image), where=where)
