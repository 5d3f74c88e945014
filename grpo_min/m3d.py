"""M3D-RefSeg (3D CT) as 2D grounding: one axial slice per described region, cached as PNGs."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from grpo_min.datasets import (ROW_ERRORS, WHERE_TO_GET, DatasetError, SampleList, SkipReport, _bad_row, _BadRow,
                               _not_found, _number, _path, _root, _short_hash, _text_lines, _utf8, seeded_split)
from grpo_min.files import atomic_path, brief, write_text
from grpo_min.sample import Sample, mask_box

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

    base = _path(image_root, "--image-root") if image_root else root
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
        except ROW_ERRORS as e:
            e = _bad_row(e)
            for i in ids:
                skipped.add(e.reason, regions[(case, i)].where, e.detail)
            continue
        for i in ids:
            where, found = regions[(case, i)].where, slices[i]
            if isinstance(found, str):
                skipped.add(found, where, f"{case} id {i}")
            elif str(i) not in texts:
                skipped.add("region id not in text.json", where, f"{case} id {i}")
            elif texts[str(i)] is None:
                skipped.add("empty phrase", where, f"{case} id {i}: text.json's description is empty or not text")
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
    with _text_lines(file) as f:
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
                _utf8(*(raw[c] for c in M3D_COLUMNS))
                mask_id = _number(raw["Mask_ID"], "Mask_ID")
                if mask_id != int(mask_id) or mask_id <= 0:
                    raise _BadRow("unparseable number", f"Mask_ID={raw['Mask_ID']!r}")
                image = raw["Image"].strip().replace("\\", "/")
                regions.setdefault((PurePosixPath(image).parent.name, int(mask_id)),
                                   _Region(image, raw["Mask"].strip().replace("\\", "/"), where))
            except ROW_ERRORS as e:
                e = _bad_row(e)
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


def _m3d_texts(file: Path) -> dict[str, str | None]:
    """text.json: region id (a string) -> English description (None where it is empty or not text: "" or null
    must not become the phrases "" and "None")."""
    if not file.is_file():
        raise _BadRow("text.json not found", str(file))
    try:
        texts = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _BadRow("text.json unreadable", f"{file}: {brief(e)}") from None
    if not isinstance(texts, dict):
        raise _BadRow("text.json unreadable", f"{file}: a {type(texts).__name__}, expected {{region id: text}}")
    first = {str(k): v[0] if isinstance(v, list) and v else v for k, v in texts.items()}
    return {k: v.strip() if isinstance(v, str) and v.strip() else None for k, v in first.items()}


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
                raise _BadRow("volume unreadable", f"{path}: {brief(e)}") from None
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
            raise _BadRow("volume unreadable", f"{path}: {brief(e)}") from None
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


def _m3d_case_slices(ct: Path, mask: Path, ids: list[int], out: Path) -> dict[int, dict | str]:
    """For each region id: its slice PNG, box and size (or why there is none), from the cache when fresh."""
    source = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in (ct, mask)}
    source["reader"] = 2  # bump when _read_volumes changes what it returns (2: the mask follows the CT's orientation)
    index_file, regions = out / "regions.json", {}
    try:  # a cache damaged since it was written counts as stale: the slices are made again
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
        if isinstance(index, dict) and index.get("source") == source and isinstance(index.get("regions"), dict):
            regions = index["regions"]  # the volumes have not changed since
    except (ValueError, RecursionError):
        pass

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
        with atomic_path(png) as tmp:  # a reader (another rank) never sees half a file
            Image.fromarray(_window(volume[z])).save(tmp, format="PNG")
        rows, cols = region[z].shape
        regions[str(i)] = {"image": str(png), "box": list(mask_box(region[z])), "width": cols, "height": rows,
                           "slice": z}
    write_text(index_file, json.dumps({"source": source, "regions": regions}))
    return {i: regions[str(i)] for i in ids}
