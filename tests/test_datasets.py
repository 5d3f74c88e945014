"""The real-dataset loaders of data.py, on fixture folders in the exact on-disk formats (made-up values)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
import sys

import numpy as np
import pytest
from PIL import Image

import data
from grpo_min import m3d
from data import DatasetError, check_images, load_dataset
from tests.fixtures import (M3D_TEXTS, MS_CXR_SIZE, MULTI_BOX_PHRASE, write_chestxray8_fixture, write_jsonl_fixture,
                            write_m3d_fixture, write_medrpg_fixture, write_ms_cxr_fixture)


def _images(ds) -> set[str]:
    return {s.image for s in ds}


def _boxes(ds) -> list:
    return sorted((s.id, s.box, s.category) for s in ds)


def _splits(name, **kw) -> dict:
    return {split: load_dataset(name, split, **kw) for split in data.SPLITS}


# ---------------------------------------------------------------------------------------------- MS-CXR
def test_ms_cxr_v110_official_split_boxes_in_original_pixels(tmp_path):
    data_root, image_root = write_ms_cxr_fixture(tmp_path)
    ds = _splits("ms-cxr", data_root=data_root, image_root=image_root)
    assert [len(ds[s]) for s in data.SPLITS] == [16, 4, 4]
    assert all(not d.skipped.total for d in ds.values())
    s = ds["train"][0]
    assert isinstance(s.image, str) and s.image.endswith(".jpg") and (s.width, s.height) == MS_CXR_SIZE
    # the fixture's first row: x, y, w, h -> x1, y1, x2, y2, in original pixels
    row = (data_root / "MS_CXR_Local_Alignment_v1.1.0.csv").read_text().splitlines()[1].split(",")
    x, y, w, h = map(float, row[4:8])
    assert s.text == row[2] and s.category == row[1] and s.box == (x, y, x + w, y + h)
    img = s.load_image()
    assert img.mode == "RGB" and img.size == MS_CXR_SIZE
    assert not (_images(ds["train"]) & _images(ds["val"])) and not (_images(ds["train"]) & _images(ds["test"]))


@pytest.mark.parametrize("files_prefix", [True, False])
def test_ms_cxr_image_root_with_or_without_files(tmp_path, files_prefix):
    data_root, image_root = write_ms_cxr_fixture(tmp_path, files_prefix=files_prefix)
    assert (image_root.name == "files") != files_prefix
    ds = load_dataset("ms-cxr", "train", data_root=data_root, image_root=image_root)
    good, report = check_images(ds)
    assert len(good) == 16 and report.total == 0


def test_ms_cxr_quirks_malformed_rows_multi_box_and_missing_image(tmp_path):
    data_root, image_root = write_ms_cxr_fixture(tmp_path, quirks=True)
    train = load_dataset("ms-cxr", "train", data_root=data_root, image_root=image_root)
    assert train.skipped.counts == {"unparseable number": 1, "box outside the image": 1}
    assert any("line 6" in e for e in train.skipped.examples)  # the first few reasons say where
    union = [s for s in train if s.text == MULTI_BOX_PHRASE]
    assert len(union) == 1 and union[0].box == (4.0, 60.0, 70.0, 90.0)  # union of (4,60,24,90), (50,60,70,90)
    separate = load_dataset("ms-cxr", "train", data_root=data_root, image_root=image_root, multi_box="separate")
    assert sorted(s.box for s in separate if s.text == MULTI_BOX_PHRASE) == [(4, 60, 24, 90), (50, 60, 70, 90)]
    dropped = load_dataset("ms-cxr", "train", data_root=data_root, image_root=image_root, multi_box="drop")
    assert not [s for s in dropped if s.text == MULTI_BOX_PHRASE] and len(dropped) == len(train) - 1
    # the missing image is found before training, never mid-run
    good, report = check_images(train)
    assert report.counts == {"image file not found": 2} and len(good) == len(train) - 2
    assert "p10000012" in report.examples[0]
    assert good.skipped is train.skipped


def test_ms_cxr_v100_without_split_gets_a_seeded_split_by_patient(tmp_path):
    data_root, image_root = write_ms_cxr_fixture(tmp_path, version="1.0.0")
    ds = _splits("ms-cxr", data_root=data_root, image_root=image_root, split_seed=3)
    assert sum(len(d) for d in ds.values()) == 24 and all(len(d) for d in ds.values())
    images = [_images(d) for d in ds.values()]
    assert not (images[0] & images[1]) and not (images[0] & images[2]) and not (images[1] & images[2])
    again = load_dataset("ms-cxr", "test", data_root=data_root, image_root=image_root, split_seed=3, seed=9)
    assert [s.id for s in again] == [s.id for s in ds["test"]]
    others = [_images(load_dataset("ms-cxr", "test", data_root=data_root, image_root=image_root, split_seed=k))
              for k in range(4, 8)]
    assert any(o != images[2] for o in others)  # the split seed moves the split; the data seed does not


def test_ms_cxr_coco_json_several_image_ids_for_one_file(tmp_path):
    data_root, image_root = write_ms_cxr_fixture(tmp_path / "j", fmt="json", quirks=True)
    coco = json.loads((data_root / "MS_CXR_Local_Alignment_v1.1.0.json").read_text())
    paths = [im["path"] for im in coco["images"]]
    assert len(set(paths)) < len(paths)  # the quirk: several image ids per file
    csv_root, csv_images = write_ms_cxr_fixture(tmp_path / "c", quirks=True)
    for split in data.SPLITS:
        from_json = load_dataset("ms-cxr", split, data_root=data_root, image_root=image_root)
        from_csv = load_dataset("ms-cxr", split, data_root=csv_root, image_root=csv_images)
        assert _boxes(from_json) == _boxes(from_csv)
    assert from_json.skipped.counts == from_csv.skipped.counts


def test_ms_cxr_coco_json_malformed_entries_are_skipped_and_counted(tmp_path):
    data_root, image_root = write_ms_cxr_fixture(tmp_path, fmt="json")
    file = data_root / "MS_CXR_Local_Alignment_v1.1.0.json"
    coco = json.loads(file.read_text())
    good = load_dataset("ms-cxr", "train", data_root=data_root, image_root=image_root)
    coco["annotations"] += [None, {**coco["annotations"][0], "label_text": 7}, {**coco["annotations"][0], "image_id": [1]}]
    file.write_text(json.dumps(coco))
    ds = load_dataset("ms-cxr", "train", data_root=data_root, image_root=image_root)
    assert [s.id for s in ds] == [s.id for s in good]
    n = len(coco["annotations"])
    assert ds.skipped.counts == {"malformed entry": 2, "image_id not among the images": 1}
    assert f"annotations[{n - 3}]" in str(ds.skipped.examples)
    file.write_text(file.read_text()[:50])
    with pytest.raises(DatasetError, match="MS_CXR_Local_Alignment_v1.1.0.json is not valid JSON"):
        load_dataset("ms-cxr", "train", data_root=data_root, image_root=image_root)


def test_missing_root_or_file_names_the_file_where_and_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="MS_CXR_Local_Alignment_v1.1.0.csv.*does not exist.*physionet.org"):
        load_dataset("ms-cxr", "train", data_root=tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=f"MS_CXR_Local_Alignment_v1.1.0.csv.*looked in {tmp_path}.*physionet"):
        load_dataset("ms-cxr", "train", data_root=tmp_path)
    with pytest.raises(DatasetError, match="--data-root is required"):
        load_dataset("ms-cxr", "train")
    with pytest.raises(DatasetError, match="MS_CXR_val.pth.*data/MS_CXR.*github.com/eraserNut/MedRPG"):
        load_dataset("medrpg", "val", data_root=tmp_path)
    with pytest.raises(DatasetError, match="BBox_List_2017.csv.*nihcc"):
        load_dataset("chestx-ray8", "test", data_root=tmp_path)
    with pytest.raises(DatasetError, match="M3D_RefSeg_train.csv.*huggingface.co/datasets/GoodBaiBai88/M3D-RefSeg"):
        load_dataset("m3d-refseg", "train", data_root=tmp_path)
    with pytest.raises(DatasetError, match="val.jsonl"):
        load_dataset("jsonl", "val", data_root=tmp_path)
    (tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv").write_text("dicom_id,label_text\n")
    with pytest.raises(DatasetError, match="lacks the column.*category_name"):
        load_dataset("ms-cxr", "train", data_root=tmp_path)
    assert data.main(["--dataset", "ms-cxr", "--data-root", str(tmp_path / "nowhere")]) == 2


# ---------------------------------------------------------------------------------------------- MedRPG
def test_medrpg_pth_in_640_space(tmp_path):
    root = write_medrpg_fixture(tmp_path)
    ds = _splits("medrpg", data_root=root)
    assert [len(ds[s]) for s in data.SPLITS] == [4, 1, 1]
    assert ds["train"].skipped.counts == {"box outside the image": 1}
    s = ds["train"][1]  # entry k=1: (x, y, w, h) = (60, 110, 200, 150) in the 640 x 640 JPG
    assert s.box == (60.0, 110.0, 260.0, 260.0) and (s.width, s.height) == (640, 640)
    assert "ln_data/MS_CXR/files/p11/" in s.image and s.category == "Lung Opacity" and s.id == "medrpg-1001"
    assert s.load_image().size == (640, 640)


def test_medrpg_pth_is_never_fully_unpickled(tmp_path):
    root = write_medrpg_fixture(tmp_path)
    # a pickle that would run code when fully unpickled: weights_only refuses it
    (root / "data" / "MS_CXR" / "MS_CXR_test.pth").write_bytes(pickle.dumps([_Evil()], protocol=2))
    with pytest.raises(DatasetError, match="weights_only=True"):
        load_dataset("medrpg", "test", data_root=root)


class _Evil:
    def __reduce__(self):
        return (sys.exit, ("unpickled!",))


def test_medrpg_json_recovers_the_phrase(tmp_path):
    root = write_medrpg_fixture(tmp_path / "j", fmt="json")
    from_pth = load_dataset("medrpg", "train", data_root=write_medrpg_fixture(tmp_path / "p"))
    from_json = load_dataset("medrpg", "train", data_root=root)
    assert [(s.text, s.box) for s in from_json] == [(s.text, s.box) for s in from_pth]
    assert "describes" not in from_json[0].text and not from_json[0].text.endswith(".")
    q = data.phrase_from_question
    assert q("<image>\nPlease provide the bounding box coordinate of the region this sentence describes: "
             "Left pneumothorax is small.") == "Left pneumothorax is small"
    assert q("Where is it? Find: a right lower lobe opacity. ") == "a right lower lobe opacity"
    assert q("just a phrase") == "just a phrase"


# ---------------------------------------------------------------------------------------------- ChestX-ray8
def test_chestxray8_header_quirk_nested_images_and_modes(tmp_path):
    root = write_chestxray8_fixture(tmp_path)
    assert (root / "BBox_List_2017.csv").read_text().splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    ds = _splits("chestx-ray8", data_root=root, split_seed=1)
    every = [s for d in ds.values() for s in d]
    assert len(every) == 11  # 10 images (Effusion twice on image 2: one union box), 1 missing image
    assert ds["train"].skipped.counts == {"unparseable number": 1}
    images = [_images(d) for d in ds.values()]
    assert all(images) and not (images[0] & images[1]) and not (images[0] & images[2]) and not (images[1] & images[2])
    by_id = {s.id: s for s in every}
    effusion = by_id["00090002_000-effusion"]
    assert effusion.text == "pleural effusion" and effusion.box == (180.5, 260.25, 700.0, 580.0)
    assert by_id["00090003_000-infiltrate"].text == "infiltration"
    assert by_id["00090000_000-atelectasis"].box == (100.5, 200.25, 250.5, 320.25)
    for k in (1, 2, 7):  # RGBA, 16-bit, 8-bit gray; found in images_001/ and images_002/
        s = next(s for s in every if s.id.startswith(f"{90000 + k:08d}"))
        img = s.load_image()
        assert img.mode == "RGB" and img.size == (1024, 1024) and np.asarray(img).max() > 100
    good, report = check_images(every)
    assert report.counts == {"image file not found": 1} and len(good) == 10


# ---------------------------------------------------------------------------------------------- M3D-RefSeg
def test_m3d_nifti_slices_boxes_splits_and_cache(tmp_path, monkeypatch):
    root = write_m3d_fixture(tmp_path / "m3d")
    cache = tmp_path / "cache"
    ds = _splits("m3d-refseg", data_root=root, cache_dir=cache)
    cases = {split: {s.id.split("-")[0] for s in d} for split, d in ds.items()}
    assert cases["test"] == {"s0006"} and len(cases["val"]) == 1 and len(cases["train"]) == 4
    assert not (cases["train"] & cases["val"])
    assert all(len(d) == 2 * len(cases[split]) for split, d in ds.items())  # one sample per (case, region)
    s1 = next(s for s in ds["test"] if s.id == "s0006-1")
    # region 1 is largest on slice 3 at voxels x 2..5, y 3..6 of a 16 x 16 slice; radiological view
    # (patient's right, +x, on the image's left; anterior, +y, at the top): cols 15-x, rows 15-y
    assert s1.box == (10.0, 9.0, 14.0, 13.0) and (s1.width, s1.height) == (16, 16)
    assert s1.text == M3D_TEXTS["1"] and s1.image.endswith(".png") and str(cache) in s1.image
    assert next(s for s in ds["test"] if s.id == "s0006-2").box == (4.0, 4.0, 7.0, 6.0)
    img = Image.open(s1.image)
    assert img.mode == "L" and img.size == (16, 16)
    # a second load reads the cache and decodes no volume
    monkeypatch.setattr(m3d, "_read_volumes", lambda *paths: pytest.fail(f"decoded {paths} again"))
    again = load_dataset("m3d-refseg", "test", data_root=root, cache_dir=cache)
    assert [(s.id, s.box, s.image) for s in again] == [(s.id, s.box, s.image) for s in ds["test"]]


def test_m3d_bad_cases_are_skipped_and_counted(tmp_path):
    """A case with a broken text.json, a truncated volume or a 4-D volume loses its regions (counted, with
    the file named); the other cases load. A trailing size-1 axis is harmless."""
    import nibabel

    root = write_m3d_fixture(tmp_path / "m3d")
    case = lambda k: root / "M3D_RefSeg" / f"s{k:04d}"
    (case(1) / "text.json").write_text('{"1": "cut off')
    (case(2) / "text.json").write_text('["a list"]')
    blob = (case(3) / "ct.nii.gz").read_bytes()
    (case(3) / "ct.nii.gz").write_bytes(blob[:40])
    mask = np.asanyarray(nibabel.load(str(case(4) / "mask.nii.gz")).dataobj)
    nibabel.save(nibabel.Nifti1Image(np.stack([mask, mask], -1), np.eye(4)), case(4) / "mask.nii.gz")
    ct = np.asanyarray(nibabel.load(str(case(5) / "ct.nii.gz")).dataobj)
    nibabel.save(nibabel.Nifti1Image(ct[..., None], np.eye(4)), case(5) / "ct.nii.gz")
    train = load_dataset("m3d-refseg", "train", data_root=root, cache_dir=tmp_path / "cache", split_seed=0)
    val = load_dataset("m3d-refseg", "val", data_root=root, cache_dir=tmp_path / "cache", split_seed=0)
    loaded = {s.id.split("-")[0] for s in [*train, *val]}
    assert loaded == {"s0005"}  # s0001-s0004 broken; s0005's trailing axis is dropped
    counts = train.skipped.counts + val.skipped.counts
    assert counts == {"text.json unreadable": 4, "volume unreadable": 2, "volume is not 3-D": 2}
    examples = str(train.skipped.examples) + str(val.skipped.examples)
    assert "s0003/ct.nii.gz" in examples and "s0004/mask.nii.gz" in examples


def test_m3d_mask_follows_the_cts_orientation(tmp_path):
    """The mask is reoriented by the CT's affine: a mask saved with another (or no) affine still lines up."""
    import nibabel

    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # voxel axes pointing to the patient's left, posterior, superior
    boxes = []
    for name, mask_affine in (("both-lps", lps), ("mask-identity", np.eye(4))):
        root = write_m3d_fixture(tmp_path / name)
        folder = root / "M3D_RefSeg" / "s0006"
        for file, affine in (("ct.nii.gz", lps), ("mask.nii.gz", mask_affine)):
            volume = np.asanyarray(nibabel.load(str(folder / file)).dataobj)
            nibabel.save(nibabel.Nifti1Image(volume, affine), folder / file)
        test = load_dataset("m3d-refseg", "test", data_root=root, cache_dir=tmp_path / name / "cache")
        boxes.append({s.id: s.box for s in test})
    assert boxes[0] == boxes[1]
    # LPS voxel axes flip both in-plane directions of the RAS fixture: region 1 (x 2..5, y 3..6) lands at cols 2..6, rows 3..7
    assert boxes[0]["s0006-1"] == (2.0, 3.0, 6.0, 7.0)


def test_m3d_npy_variant_and_missing_nibabel(tmp_path, monkeypatch):
    nifti_root = write_m3d_fixture(tmp_path / "nifti")
    npy_root = write_m3d_fixture(tmp_path / "npy", fmt="npy")
    monkeypatch.setitem(sys.modules, "nibabel", None)  # as if not installed: the .npy variant does not need it
    test = load_dataset("m3d-refseg", "test", data_root=npy_root, cache_dir=tmp_path / "cache")
    # (1, D, H, W) arrays are used as stored: region 1 at rows (y) 3..6, cols (x) 2..5 of slice 3
    assert {s.id: s.box for s in test} == {"s0006-1": (2.0, 3.0, 6.0, 7.0), "s0006-2": (9.0, 10.0, 12.0, 12.0)}
    with pytest.raises(DatasetError, match="pip install nibabel.*npy"):
        load_dataset("m3d-refseg", "test", data_root=nifti_root, cache_dir=tmp_path / "cache")


def test_m3d_cache_follows_grpo_min_cache(tmp_path, monkeypatch):
    """Slices go where the models go ($GRPO_MIN_CACHE/m3d); without it, to $XDG_CACHE_HOME/grpo_min/m3d."""
    root = write_m3d_fixture(tmp_path / "m3d", fmt="npy")
    monkeypatch.setenv("GRPO_MIN_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    test = load_dataset("m3d-refseg", "test", data_root=root)
    assert len(test) == 2 and all(Path(s.image).is_relative_to(tmp_path / "models" / "m3d") for s in test)
    monkeypatch.delenv("GRPO_MIN_CACHE")
    test = load_dataset("m3d-refseg", "test", data_root=root)
    assert len(test) == 2 and all(Path(s.image).is_relative_to(tmp_path / "xdg" / "grpo_min" / "m3d") for s in test)


# ---------------------------------------------------------------------------------------------- JSONL
def test_jsonl_both_layouts_and_image_modes(tmp_path):
    root = write_jsonl_fixture(tmp_path)
    per_file = _splits("jsonl", data_root=root)
    one_file = _splits("jsonl", data_root=root / "all.jsonl")
    assert [len(per_file[s]) for s in data.SPLITS] == [5, 1, 2]
    for split in data.SPLITS:
        assert [(s.id, s.box) for s in per_file[split]] == [(s.id, s.box) for s in one_file[split]]
    assert per_file["train"].skipped.counts == {"missing columns": 1}
    train = per_file["train"]
    assert train[3].image.endswith("3.jpg") and (train[3].width, train[3].height) == (64, 48)  # from the header
    for s in train:  # 16-bit, RGBA, palette, gray -> 8-bit RGB
        img = s.load_image()
        assert img.mode == "RGB" and img.size == (64, 48) and np.asarray(img).max() > 100


def test_jsonl_normalised_boxes_are_skipped_with_a_warning(tmp_path, capsys):
    root = write_jsonl_fixture(tmp_path)
    lines = [json.loads(x) for x in (root / "all.jsonl").read_text().splitlines()]
    for r in lines:
        if "width" in r and len(r.get("box", [])) == 4:
            r["box"] = [r["box"][0] / r["width"], r["box"][1] / r["height"], r["box"][2] / r["width"], r["box"][3] / r["height"]]
    (root / "norm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines if "width" in r))
    train = load_dataset("jsonl", "train", data_root=root / "norm.jsonl")
    assert len(train) == 0 and train.skipped.counts == {data.TINY_BOX: 4}  # e.g. [0.08, 0.13, 0.47, 0.83] in 64 x 48
    assert "norm.jsonl line 1" in train.skipped.examples[0]
    assert "not normalised to [0, 1]: multiply them by the image's width and height" in capsys.readouterr().err
    load_dataset("jsonl", "train", data_root=root / "all.jsonl")
    assert "WARNING" not in capsys.readouterr().err


def test_jsonl_and_medrpg_json_malformed_phrases_and_boxes_are_skipped(tmp_path):
    """null or a list as the phrase, true / false as a number, a box under 1 pixel: skipped and counted."""
    write_jsonl_fixture(tmp_path)
    good = {"image": str(tmp_path / "img" / "0.png"), "text": "made-up phrase", "box": [5, 6, 30, 40],
            "width": 64, "height": 48}
    bad = [good | {"text": None}, good | {"text": ["list", "text"]}, good | {"text": " "}, good | {"image": None},
           good | {"box": [True, 6, 30, 40]}, good | {"width": True}, good | {"box": [0.1, 0.1, 0.5, 0.6]}]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [good] + bad))
    train = load_dataset("jsonl", "train", data_root=tmp_path / "bad")
    assert [(s.text, s.box) for s in train] == [("made-up phrase", (5.0, 6.0, 30.0, 40.0))]
    assert train.skipped.counts == {"malformed entry": 3, "empty phrase": 1, "unparseable number": 2, data.TINY_BOX: 1}
    assert "train.jsonl line 2: malformed entry (text=None, expected a string)" in train.skipped.examples

    root = write_medrpg_fixture(tmp_path / "medrpg", fmt="json")
    file = root / "data" / "MS_CXR" / "train.json"
    entries = json.loads(file.read_text())
    n = len(entries)
    entries += [entries[0] | {"problem": None}, entries[0] | {"problem": ["a", "list"]},
                entries[0] | {"solution": [True, 100, 300, 300]}]
    file.write_text(json.dumps(entries))
    train = load_dataset("medrpg", "train", data_root=root)
    assert len(train) == 4 and "None" not in {s.text for s in train}
    assert train.skipped.counts == {"box outside the image": 1, "malformed entry": 2, "unparseable number": 1}
    assert f"train.json[{n}]: malformed entry (problem=None, expected a string)" in train.skipped.examples


def test_jsonl_without_split_field_gets_a_seeded_split(tmp_path):
    root = write_jsonl_fixture(tmp_path)
    lines = [json.loads(x) for x in (root / "all.jsonl").read_text().splitlines()]
    (root / "nosplit.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n"
                                                for r in lines))
    ds = _splits("jsonl", data_root=root / "nosplit.jsonl")
    assert sum(len(d) for d in ds.values()) == 8 and all(len(d) for d in ds.values())


# ---------------------------------------------------------------------------------------------- splits
def _skip_counts(name, **kw) -> dict:
    return {split: dict(d.skipped.counts) for split, d in _splits(name, **kw).items()}


def test_skipped_rows_are_reported_by_their_own_split_only(tmp_path):
    """A file holding every split: each bad row is counted by one split (its own; 'train' when its split
    cannot be known), so the splits' reports add up to the bad rows, never three times them."""
    for fmt in ("csv", "json"):  # the MS-CXR quirks' two malformed rows are train rows
        data_root, image_root = write_ms_cxr_fixture(tmp_path / fmt, fmt=fmt, quirks=True)
        assert _skip_counts("ms-cxr", data_root=data_root, image_root=image_root) == {
            "train": {"unparseable number": 1, "box outside the image": 1}, "val": {}, "test": {}}

    data_root, image_root = write_ms_cxr_fixture(tmp_path / "split-values")
    file = data_root / "MS_CXR_Local_Alignment_v1.1.0.csv"
    rows = file.read_text().splitlines()
    val_row = next(r for r in rows if r.endswith(",val"))
    rows += [val_row.replace(",val", ","), val_row.replace(",val", ",test")]  # no split; the image is in val
    file.write_text("\n".join(rows) + "\n")
    assert _skip_counts("ms-cxr", data_root=data_root, image_root=image_root) == {
        "train": {"no split value": 1}, "val": {}, "test": {"image already in another split": 1}}

    # ChestX-ray8's seeded split assigns usable rows only: its malformed row is train's
    assert _skip_counts("chestx-ray8", data_root=write_chestxray8_fixture(tmp_path / "cx8"), split_seed=1) == {
        "train": {"unparseable number": 1}, "val": {}, "test": {}}

    root = write_jsonl_fixture(tmp_path / "jsonl")
    with open(root / "all.jsonl", "a") as f:
        f.write(json.dumps({"image": "img/5.png", "text": None, "box": [1, 2, 3, 4], "split": "val"}) + "\n")
        f.write("{not json\n")
    assert _skip_counts("jsonl", data_root=root / "all.jsonl") == {
        "train": {"missing columns": 1, "not valid JSON": 1}, "val": {"malformed entry": 1}, "test": {}}

    root = write_m3d_fixture(tmp_path / "m3d", fmt="npy")
    with open(root / "M3D_RefSeg_test.csv", "a") as f:
        f.write("s0006/ct.nii.gz,s0006/mask.nii.gz,x,0,made-up question?,[SEG].\n")
    with open(root / "M3D_RefSeg_train.csv", "a") as f:
        f.write("s0001/ct.nii.gz,s0001/mask.nii.gz,0,0,made-up question?,[SEG].\n")
        f.write("s0006/ct.nii.gz,s0006/mask.nii.gz,1,0,made-up question?,[SEG].\n")  # a test case
    assert _skip_counts("m3d-refseg", data_root=root, cache_dir=tmp_path / "cache") == {
        "train": {"unparseable number": 1, "case also in the test CSV": 1}, "val": {}, "test": {"unparseable number": 1}}


# ---------------------------------------------------------------------------------------------- CLI, images
def test_cli_summary_export_and_show(tmp_path, capsys):
    data_root, image_root = write_ms_cxr_fixture(tmp_path, quirks=True)
    out, png = tmp_path / "out" / "train.jsonl", tmp_path / "grid.png"
    data.main(["--dataset", "ms-cxr", "--data-root", str(data_root), "--image-root", str(image_root),
               "--split", "train", "--export", str(out), "--show", "4", "--show-path", str(png)])
    printed = capsys.readouterr().out
    assert "ms-cxr/train: 17 samples on 8 images" in printed
    assert "1 unparseable number" in printed and "line 6" in printed and "2 image file not found" in printed
    assert Image.open(png).size[0] > 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 17 and {"image", "text", "box", "width", "height", "category", "id", "split"} <= set(rows[0])
    back = load_dataset("jsonl", "train", data_root=out.parent)  # the export reads back as the generic format
    assert [(s.id, s.box, s.text) for s in back] == [(r["id"], tuple(r["box"]), r["text"]) for r in rows]


def test_cli_m3d_export_writes_its_slices(tmp_path, capsys, monkeypatch):
    root = write_m3d_fixture(tmp_path / "m3d", fmt="npy")
    monkeypatch.setenv("GRPO_MIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "export" / "test.jsonl"
    data.main(["--dataset", "m3d-refseg", "--data-root", str(root), "--split", "test", "--export", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and all((out.parent / r["image"]).is_file() for r in rows)
    assert "m3d-refseg/test: 2 samples on 2 images" in capsys.readouterr().out


def test_check_images_unreadable_and_resized(tmp_path):
    bad = tmp_path / "bad.jpg"
    Image.new("L", (64, 64), 128).save(bad)
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    small = tmp_path / "small.png"
    Image.new("L", (50, 100)).save(small)
    samples = [data.Sample("a", str(bad), "x", (1, 1, 5, 5), 64, 64),
               data.Sample("b", str(small), "y", (10, 10, 50, 60), 100, 200)]  # record says 100 x 200
    good, report = check_images(samples)
    assert report.counts == {"image unreadable": 1} and report.rescaled == 1
    assert good[0].box == (5.0, 5.0, 25.0, 30.0) and (good[0].width, good[0].height) == (50, 100)
    synthetic = load_dataset("synthetic", "val", limit=3)
    assert check_images(synthetic)[0] is synthetic


def test_check_images_drops_aspect_ratios_the_processor_refuses(tmp_path):
    """A 2000 x 8 image loads, but Qwen2-VL's smart_resize would raise on it mid-training: dropped before."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        smart_resize(8, 2000)
    smart_resize(8, 1600)  # exactly 200 passes
    Image.new("L", (2000, 8), 100).save(tmp_path / "strip.png")
    Image.new("L", (1600, 8), 100).save(tmp_path / "edge.png")
    lines = [{"image": "strip.png", "text": "made-up strip", "box": [10, 1, 100, 7]},
             {"image": "edge.png", "text": "made-up edge", "box": [10, 1, 100, 7]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    train = load_dataset("jsonl", "train", data_root=tmp_path)
    good, report = check_images(train)
    assert len(train) == 2 and [s.text for s in good] == ["made-up edge"]
    assert report.counts == {"image aspect ratio over 200 (the Qwen2-VL processor's limit)": 1}
    assert "sample train-1" in report.examples[0] and "strip.png: 2000 x 8" in report.examples[0]


def test_synthetic_unchanged():
    ds = load_dataset("synthetic", "val", limit=4)
    assert isinstance(ds, data.SyntheticDataset) and len(ds) == 4 and ds[0].load_image().mode == "RGB"
    assert len(load_dataset("synthetic", "test", limit=260)) == 200  # a limit cuts a split, never extends it
    assert "jsonl" in data.DATASETS and "ms-cxr" in data.DATASETS


def test_torchrun_trains_two_steps_on_an_ms_cxr_fixture(tiny_model_dir, tmp_path):
    """The user's first line, `torchrun train.py --dataset ms-cxr ...`, on a fixture with quirks."""
    import json
    import os
    import subprocess
    import sys

    from tests.fixtures import write_ms_cxr_fixture

    data_root, image_root = write_ms_cxr_fixture(tmp_path / "data", quirks=True)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--dataset", "ms-cxr", "--data-root", str(data_root), "--image-root", str(image_root),
           "--model", str(tiny_model_dir), "--max-pixels", "12544", "--max-steps", "2", "--batch-size", "2",
           "--num-generations", "4", "--max-completion-length", "16", "--eval-steps", "2", "--beta", "0.04",
           "--output-dir", str(out)]
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "image file not found" in result.stdout  # the missing image is reported before training
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2] and "eval/acc@0.5" in lines[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["n"] == 4  # the fixture's 4 test pairs


@pytest.mark.parametrize("module", ["grpo_min.datasets", "grpo_min.sample", "grpo_min.optim"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
