"""Fixture folders in the exact on-disk formats of the real datasets, with made-up values.

MS-CXR and MIMIC-CXR are credentialed data: nothing here comes from them. Ids, phrases, boxes and
images are invented; only the *formats* (file names, columns, header quirks, folder layouts) follow
the official releases (docs/DATASETS_USAGE.md). Every writer returns the folders to pass as ``--data-root`` /
``--image-root``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

# Made-up phrases, each with a made-up MS-CXR category.
PHRASES = [("opacity in the left lower zone", "Lung Opacity"), ("small right pleural effusion", "Pleural Effusion"),
           ("enlarged cardiac silhouette", "Cardiomegaly"), ("right upper zone consolidation", "Consolidation"),
           ("left apical pneumothorax", "Pneumothorax"), ("patchy basal atelectasis", "Atelectasis")]
MS_CXR_SIZE = (80, 96)  # (width, height) of the fixture JPGs; real MIMIC images are about 2500 x 3000
MULTI_BOX_PHRASE = "bilateral pleural effusions"  # the quirks' phrase with two boxes


def _xray(size: tuple[int, int], boxes, seed: int) -> Image.Image:
    """A gray noisy 8-bit image with a bright rectangle at each box (so a model can learn something)."""
    w, h = size
    rng = np.random.default_rng(seed)
    a = rng.normal(60, 12, (h, w))
    for x1, y1, x2, y2 in boxes:
        a[int(y1):int(y2), int(x1):int(x2)] += 120
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _fake_dicom(k: int) -> str:
    return f"{k:08x}-fa4e0000-00000000-00000000-00000000"


def write_ms_cxr_fixture(root, *, version: str = "1.1.0", fmt: str = "csv", files_prefix: bool = True,
                         quirks: bool = False) -> tuple[Path, Path]:
    """An MS-CXR fixture: annotations in ``<root>/ms-cxr/``, JPGs in a MIMIC-CXR-JPG-style tree.

    12 images, one patient each, 2 phrases per image: 16 train / 4 val / 4 test pairs (v1.1.0's
    ``split`` column; v1.0.0 has no such column). ``fmt``: 'csv' or 'json' (COCO-style, one image id
    per annotation, so several ids name one file). ``files_prefix``: the image root holds ``files/``
    (else the returned image root *is* the ``files`` folder, as some users keep it). ``quirks`` adds a
    phrase with two boxes (train image 0), a row with an unparseable number, a row with a box outside
    the image, and a row whose image file is missing (train).

    Returns (data_root, image_root).
    """
    root = Path(root)
    data_root, mimic = root / "ms-cxr", root / "mimic-cxr-jpg"
    data_root.mkdir(parents=True, exist_ok=True)
    w, h = MS_CXR_SIZE
    rng = np.random.default_rng(0)
    rows = []  # (dicom_id, category, text, path, x, y, w, h, width, height, split)
    for k in range(12 + quirks):
        split = "train" if k < 8 or k == 12 else "val" if k < 10 else "test"
        patient, study, dicom = f"p{10000000 + k}", f"s{50000000 + k}", _fake_dicom(k)
        path = f"files/p10/{patient}/{study}/{dicom}.jpg"
        boxes = []
        for j in range(2):
            text, category = PHRASES[(k + j) % len(PHRASES)]
            bx, by = int(rng.integers(2, w // 2)), int(rng.integers(2, h // 2))
            bw, bh = int(rng.integers(8, w // 2 - 2)), int(rng.integers(8, h // 2 - 2))
            rows.append([dicom, category, text, path, bx, by, bw, bh, w, h, split])
            boxes.append((bx, by, bx + bw, by + bh))
        if quirks and k == 0:
            for bx in (4, 50):  # two boxes of one phrase
                rows.append([dicom, "Pleural Effusion", MULTI_BOX_PHRASE, path, bx, 60, 20, 30, w, h, split])
                boxes.append((bx, 60, bx + 20, 90))
            rows.append([dicom, "Edema", "made-up malformed row", path, "12,5", 10, 10, 10, w, h, split])
            rows.append([dicom, "Edema", "made-up box outside", path, 70, 10, 30, 10, w, h, split])
        if k < 12:  # with quirks, image 12 is listed but missing
            file = mimic / path if files_prefix else mimic / "files" / path[len("files/"):]
            file.parent.mkdir(parents=True, exist_ok=True)
            _xray((w, h), boxes, seed=k).save(file, quality=90)

    name = f"MS_CXR_Local_Alignment_v{version}.{fmt}"
    with_split = version == "1.1.0"
    if fmt == "csv":
        with open(data_root / name, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                          "image_width", "image_height"] + ["split"] * with_split)
            out.writerows(r if with_split else r[:-1] for r in rows)
    else:
        categories = sorted({r[1] for r in rows})
        coco = {"images": [], "annotations": [],
                "categories": [{"id": i + 1, "name": c} for i, c in enumerate(categories)]}
        for i, (dicom, category, text, path, x, y, bw, bh, iw, ih, split) in enumerate(rows):
            coco["images"].append({"id": 100 + i, "file_name": f"{dicom}.jpg", "path": path, "width": iw, "height": ih})
            ann = {"id": i, "image_id": 100 + i, "category_id": categories.index(category) + 1,
                   "bbox": [x, y, bw, bh], "label_text": text}
            coco["annotations"].append(ann | ({"split": split} if with_split else {}))
        (data_root / name).write_text(json.dumps(coco))
    return data_root, (mimic if files_prefix else mimic / "files")


def write_medrpg_fixture(root, *, fmt: str = "pth") -> Path:
    """MedRPG's layout: ``data/MS_CXR/MS_CXR_{split}.pth`` (or MedGround-R1's ``{split}.json`` with
    ``fmt='json'``) and 640 x 640 JPGs in ``ln_data/MS_CXR/files/...``. 4 / 1 / 1 entries, plus a
    malformed entry in train. Returns the data root (MedRPG's repository root)."""
    import torch

    root = Path(root)
    ann_dir, img_dir = root / "data" / "MS_CXR", root / "ln_data" / "MS_CXR"
    ann_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": [0, 1, 2, 3], "val": [4], "test": [5]}
    for split, ks in splits.items():
        entries = []
        for k in ks:
            img_file = f"files/p11/p{11000000 + k}/s{51000000 + k}/{_fake_dicom(100 + k)}.jpg"
            x, y, bw, bh = 40 + 20 * k, 100 + 10 * k, 200, 150
            path = img_dir / img_file
            path.parent.mkdir(parents=True, exist_ok=True)
            _xray((640, 640), [(x, y, x + bw, y + bh)], seed=k).save(path, quality=85)
            text, _ = PHRASES[k % len(PHRASES)]
            entries.append((1000 + k, 2000 + k, 1 + k % 8, img_file, (x, y, bw, bh), 2500 + k, 3000 + k, text))
        if split == "train":
            entries.append((1999, 2999, 1, entries[0][3], (600, 10, 100, 100), 2500, 3000, "made-up box outside"))
        if fmt == "pth":
            torch.save(entries, ann_dir / f"MS_CXR_{split}.pth")
        else:
            wrapper = "Please provide the bounding box coordinate of the region this sentence describes: {}."
            items = []
            for e in entries:
                x, y, bw, bh = e[4]
                box = [x, y, x + bw, y + bh]
                items.append({"image": e[3], "problem": "<image>" + wrapper.format(e[7]), "solution": box,
                              "normalized_solution": [round(v / 640 * 1000) for v in box]})
            (ann_dir / f"{split}.json").write_text(json.dumps(items))
    return root


CHESTXRAY8_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
CHESTXRAY8_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia",
                     "Pneumothorax"]


def write_chestxray8_fixture(root) -> Path:
    """``BBox_List_2017.csv`` with its exact header, and 1024 x 1024 PNGs spread over
    ``images_001/images/`` and ``images_002/images/`` (one RGBA, one 16-bit, the rest 8-bit gray).
    10 images with one box each (image 2 has a second Effusion box), plus a row with an unparseable
    number and a row whose image is missing. Returns the data root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = [CHESTXRAY8_HEADER]
    for k in range(10):
        name = f"{90000 + k:08d}_000.png"
        label = CHESTXRAY8_LABELS[k % 8]
        x, y = 100.5 + 40 * k, 200.25 + 30 * k
        lines.append(f"{name},{label},{x},{y},{150.0 + k},{120.0}" + (",,," if k % 2 else ""))
        boxes = [(x, y, x + 150 + k, y + 120)]
        if k == 2:  # a second Effusion box on the same image
            lines.append(f"{name},Effusion,600.0,500.0,100.0,80.0")
            boxes.append((600, 500, 700, 580))
        folder = root / f"images_00{1 + k // 5}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        img = _xray((1024, 1024), boxes, seed=k)
        if k == 1:
            img = img.convert("RGBA")
        elif k == 2:
            img = Image.fromarray((np.asarray(img, np.uint16) * 257).astype(np.uint16))  # 16-bit
        img.save(folder / name)
    lines.append("00090000_000.png,Mass,abc,10,10,10")
    lines.append("00099999_000.png,Nodule,10,10,40,40")  # no such image
    (root / "BBox_List_2017.csv").write_text("\n".join(lines) + "\n")
    return root


M3D_SHAPE = (16, 16, 6)  # NIfTI voxel axes (x, y, z)
M3D_TEXTS = {"1": "made-up lesion in the left kidney", "2": "made-up cyst in the liver"}


def m3d_masks() -> np.ndarray:
    """The mask volume of every fixture case, (x, y, z): region 1 largest on slice 3, region 2 on slice 1."""
    mask = np.zeros(M3D_SHAPE, np.uint8)
    mask[2:5, 3:7, 2] = 1  # 12 voxels
    mask[2:6, 3:7, 3] = 1  # 16 voxels: region 1's largest slice
    mask[9:12, 10:12, 1] = 2
    return mask


def write_m3d_fixture(root, *, fmt: str = "nifti") -> Path:
    """M3D-RefSeg: ``M3D_RefSeg_{all,train,test}.csv`` next to ``M3D_RefSeg/sXXXX/{ct.nii.gz, mask.nii.gz,
    text.json, text_zh.txt}`` (identity affine, so voxel axes are RAS), or with ``fmt='npy'`` the
    preprocessed ``ct.npy`` / ``mask.npy`` of shape (1, D, H, W). Cases s0001-s0005 train, s0006 test;
    2 regions per case, 3 question paraphrases per region. Returns the data root."""
    root = Path(root)
    cases = [f"s{k:04d}" for k in range(1, 7)]
    header = ["Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer"]
    table = {"train": [], "test": []}
    for k, case in enumerate(cases):
        folder = root / "M3D_RefSeg" / case
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(k)
        ct = rng.integers(-1000, 1000, M3D_SHAPE).astype(np.int16)
        mask = m3d_masks()
        if fmt == "nifti":
            import nibabel

            nibabel.save(nibabel.Nifti1Image(ct, np.eye(4)), folder / "ct.nii.gz")
            nibabel.save(nibabel.Nifti1Image(mask, np.eye(4)), folder / "mask.nii.gz")
        else:  # (1, D, H, W): depth first, as M3D's preprocessing stores it
            np.save(folder / "ct.npy", ct.transpose(2, 1, 0)[None].astype(np.float32))
            np.save(folder / "mask.npy", mask.transpose(2, 1, 0)[None])
        (folder / "text.json").write_text(json.dumps(M3D_TEXTS))
        (folder / "text_zh.txt").write_text("made-up\n")
        for mask_id in (1, 2):
            for q in range(3):  # question paraphrases of one region
                row = [f"{case}/ct.nii.gz", f"{case}/mask.nii.gz", mask_id, q % 2, f"made-up question {q}?", "[SEG]."]
                table["test" if case == "s0006" else "train"].append(row)
    for name, rows in (("train", table["train"]), ("test", table["test"]), ("all", table["train"] + table["test"])):
        with open(root / f"M3D_RefSeg_{name}.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(header)
            out.writerows(rows)
    return root


def write_jsonl_fixture(root) -> Path:
    """Generic JSONL, both layouts: ``train/val/test.jsonl`` in ``root`` and ``all.jsonl`` with a ``split``
    field. Images in every mode: 16-bit PNG, RGBA PNG, palette PNG, 8-bit gray JPG (no width/height given
    for the JPG: read from its header). Returns ``root``."""
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for k, mode in enumerate(["I;16", "RGBA", "P", "L", "I;16", "RGBA", "P", "L"]):
        box = (5 + k, 6, 30 + k, 40)
        img = _xray((64, 48), [box], seed=k)
        if mode == "I;16":
            img = Image.fromarray(np.asarray(img, np.uint16) * 200)
        elif mode != "L":
            img = img.convert(mode)
        name = f"img/{k}.{'jpg' if mode == 'L' else 'png'}"
        img.save(root / name)
        rec = {"image": name, "text": PHRASES[k % 6][0], "box": list(box), "width": 64, "height": 48,
               "category": PHRASES[k % 6][1], "id": f"made-up-{k}"}
        if mode == "L":
            del rec["width"], rec["height"]
        records.append((["train", "train", "train", "train", "train", "val", "test", "test"][k], rec))
    records.append(("train", {"image": "img/0.png", "text": "broken", "box": [1, 2, 3]}))  # malformed
    for split in ("train", "val", "test"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for s, r in records if s == split))
    (root / "all.jsonl").write_text("".join(json.dumps(r | {"split": s}) + "\n" for s, r in records))
    return root


def qwen2_vl_folder(path: Path, shipped_pixel_limits: bool = False) -> Path:
    """A random Qwen2-VL (not 2.5) saved as a checkpoint, with the tiny model's tokenizer; with
    ``shipped_pixel_limits`` its processor keeps the pixel limits Qwen ships (3,136 to 12,845,056)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    from grpo_min import tiny

    base = tiny.build_processor()
    tok, tid = base.tokenizer, base.tokenizer.convert_tokens_to_ids
    processor = Qwen2VLProcessor(image_processor=base.image_processor, tokenizer=tok,
                                 video_processor=base.video_processor, chat_template=base.chat_template)
    if shipped_pixel_limits:
        processor.image_processor.size = {"shortest_edge": 3136, "longest_edge": 12845056}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"),
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def plain_logps(model, prompts, completion_ids, completion_mask=None, *, group_size, temperature=1.0, never_ids=None):
    """The scoring oracle: grpo_min/core.py's plain forward (each row carries its whole prompt and image), in
    rollout.completion_logps's signature. Positions after a completion's EOS differ (core attends to them);
    compare log-probs under the completion mask."""
    from grpo_min import core

    return core.completion_logps(model, prompts, completion_ids, group_size, temperature, never_ids or ())
