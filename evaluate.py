"""The numbers: greedy decoding on a split, IoU / Acc@t / mIoU, predictions, tables and pictures.

Six ways to run it (docs/METHOD.md, "Evaluation" defines every number):

    python evaluate.py --model tiny --dataset synthetic --split test --output-dir runs/eval --save-vis 8
    python evaluate.py --predictions runs/eval/predictions.jsonl --output-dir runs/rescored
    python evaluate.py --predictions medground_r1_mscxr_log.json --output-dir runs/released
    python evaluate.py --compare runs/a/metrics.json runs/b/metrics.json [--paper ms-cxr]
    python evaluate.py --plot-run runs/grpo
    python scripts/ablate.py ...       (plot_variants: several runs' curves, mean and band per variant)
    python evaluate.py --model /ckpt/Qwen2.5-VL-3B-Instruct --image cxr.png --phrase "left pleural effusion"

A model evaluation writes ``predictions.jsonl`` (one row per sample: id, phrase, category,
ground_truth, output, box, iou; boxes in ORIGINAL image pixels) and ``metrics.json`` (n,
parse_failures, acc@0.3, acc@0.5, acc@0.7, miou in percent, per_category when categories are
known, and the dataset / split / model it came from), then prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from grpo_min.boxes import Box, from_model_frame, iou, parse_answer, summarize_ious
from grpo_min.files import InputError, atomic_path, brief, check_output, write_text
from grpo_min.prompts import encode_prompts, load_template
from grpo_min.rollout import generate_completions

# Qwen2.5-VL-7B, MedGround-R1 README (docs/METHOD.md, "Evaluation"): only Acc@0.5 ("Acc") and mIoU are published.
PAPER = {"ms-cxr": ("MS-CXR", {"acc@0.5": 83.12, "miou": 79.02}),
         "chestx-ray8": ("ChestX-ray8", {"acc@0.5": 62.18, "miou": 53.12}),
         "m3d-refseg": ("M3D-RefSeg", {"acc@0.5": 74.66, "miou": 60.10})}
PAPER_NOTES = {"ms-cxr": "The prediction log released next to the MS-CXR numbers scores 33.65 mIoU / "
                         "37.13 Acc@0.5 over its 167 test samples (docs/METHOD.md, last section)."}
PAPER_SETTINGS = {("medrpg", "test"): "ms-cxr"}  # (dataset, split) recorded in metrics.json -> paper row
TRUTH, PREDICTION = (0, 200, 0), (230, 30, 30)  # green and red, as in data.draw_grid


# ----------------------------------------------------------------------------------------------
# Predictions and metrics
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_boxes(model, processor, images, phrases, orig_sizes, template: str, frame: str = "absolute",
                 max_new_tokens: int = 256, device=None, synced_gpus: bool = False) -> list[tuple[str, Box | None]]:
    """Greedy answers for B (image, phrase) pairs: (text, box in original pixels or None) each.

    ``synced_gpus``: the model is sharded with FSDP; every rank decodes until all ranks are done.
    """
    prompts = encode_prompts(processor, images, phrases, template, device=device)
    out = generate_completions(model, processor, prompts, num_generations=1, max_new_tokens=max_new_tokens,
                               greedy=True, logits_processor=repetition_penalty(model, prompts),
                               synced_gpus=synced_gpus)
    results = []
    for text, orig, resized in zip(out.texts, orig_sizes, prompts.resized_sizes):
        box = parse_answer(text)  # in the model's frame
        if box is not None:
            box = tuple(round(v, 2) for v in from_model_frame(box, orig, resized, frame))
            if not all(math.isfinite(v) for v in box):  # e.g. [1e308, ...] scaled up: unreadable, as --predictions
                box = None  # would read the row back (as_box), so that rescoring counts it the same
        results.append((text, box))
    return results


def repetition_penalty(model, prompts):
    """Greedy evaluation's logits processor for ``generate_completions``: the checkpoint's repetition penalty.

    As HF's RepetitionPenaltyLogitsProcessor, which the released evaluation ran through ``generate``: the
    logit of every token already in the prompt or the answer moves toward -inf (divided by the penalty
    when positive, multiplied when negative). None when the checkpoint sets no penalty. Sampling for
    training never uses it: its samples must come from the distribution the loss scores.
    """
    penalty = _checkpoint_repetition_penalty(model)
    if penalty == 1.0:
        return None
    seen = None  # (B, V) bool: tokens of each row's prompt and answer so far

    def process(scores, last_token):
        nonlocal seen
        if seen is None:
            seen = _prompt_tokens(prompts, scores.shape[-1])
        if last_token is not None:
            seen[torch.arange(len(seen), device=seen.device), last_token] = True
        return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)

    return process


def _prompt_tokens(prompts, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: the tokens of each prompt (left padding excluded), as repetition penalties count them."""
    input_ids, attention_mask = prompts.inputs["input_ids"], prompts.inputs["attention_mask"]
    seen = torch.zeros(len(input_ids), vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    seen.scatter_(1, input_ids.masked_fill(attention_mask == 0, vocab_size), True)  # padding -> the extra column
    return seen[:, :vocab_size]


def _checkpoint_repetition_penalty(model) -> float:
    """The repetition penalty of the model's generation_config.json, which greedy evaluation applies.

    It is the one decoding default of Qwen's checkpoints that changes a greedy answer (their
    temperature, top_k and top_p shape sampling only). Others that would are refused, not ignored.
    """
    config = model.generation_config
    unsupported = {name: getattr(config, name) for name in _GREEDY_CHANGERS if getattr(config, name, None)}
    if unsupported:
        raise ValueError(f"the model's generation_config sets {unsupported}; greedy evaluation applies only "
                         "repetition_penalty: remove these from generation_config.json to evaluate")
    return float(config.repetition_penalty or 1.0)


_GREEDY_CHANGERS = ("no_repeat_ngram_size", "min_length", "min_new_tokens", "bad_words_ids", "sequence_bias",
                    "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
                    "exponential_decay_length_penalty")



def predict(model, processor, samples, template: str, frame: str = "absolute", batch_size: int = 32,
            max_new_tokens: int = 256, progress: bool = True, device=None, synced_gpus: bool = False) -> list[dict]:
    """Greedy predictions for ``samples``, with boxes mapped back to original pixels and scored.

    The IoU is that of the box as written to the row (rounded to 0.01 px), so that rescoring a
    ``predictions.jsonl`` with ``--predictions`` reproduces the numbers exactly.
    """
    rows = []
    for start in tqdm(range(0, len(samples), batch_size), desc="evaluating", disable=not progress, leave=False):
        batch = [samples[i] for i in range(start, min(start + batch_size, len(samples)))]
        answers = decode_boxes(model, processor, [s.load_image() for s in batch], [s.text for s in batch],
                               [(s.width, s.height) for s in batch], template, frame, max_new_tokens, device,
                               synced_gpus)
        for s, (text, box) in zip(batch, answers):
            rows.append({"id": s.id, "phrase": s.text, "category": s.category, "ground_truth": list(s.box),
                         "output": text, "box": None if box is None else list(box), "iou": iou(box, s.box)})
    return rows


def evaluate_samples(model, processor, samples, template: str, frame: str, *, limit: int | None = None,
                     batch_size: int = 32, max_new_tokens: int = 256, device=None,
                     dtype: torch.dtype = torch.float32, synced_gpus: bool = False) -> list[dict]:
    """``predict`` on the first ``limit`` samples (all when None), computing in ``dtype`` as training does
    (float32 weights under autocast): the evaluation train.py runs before, during and after GRPO.
    ``synced_gpus``: the model is sharded with FSDP (see ``decode_boxes``)."""
    from grpo_min.models import compute_precision

    n = len(samples) if limit is None else min(limit, len(samples))
    with compute_precision(torch.device(device or "cpu"), dtype):
        return predict(model, processor, [samples[i] for i in range(n)], template, frame, batch_size, max_new_tokens,
                       progress=False, device=device, synced_gpus=synced_gpus)


def metrics_of(rows: list[dict]) -> dict:
    """The summary metrics of prediction rows (percentages; a parse failure counts as IoU 0).

    ``per_category`` (the same keys, one entry per category) is added when any row has a category;
    rows without one are then grouped under "unknown".

    >>> metrics_of([{"iou": 0.8, "box": [0, 0, 1, 1], "category": "mass"},
    ...             {"iou": 0.0, "box": None, "category": "nodule"}])["per_category"]["nodule"]
    {'n': 1, 'parse_failures': 1, 'acc@0.3': 0.0, 'acc@0.5': 0.0, 'acc@0.7': 0.0, 'miou': 0.0}
    """
    summary = lambda rs: summarize_ious([r["iou"] for r in rs], sum(r["box"] is None for r in rs))
    metrics = summary(rows)
    if any(r.get("category") is not None for r in rows):
        category = lambda r: "unknown" if r.get("category") is None else str(r["category"])
        metrics["per_category"] = {c: summary([r for r in rows if category(r) == c])
                                   for c in sorted({category(r) for r in rows})}
    return metrics


# ----------------------------------------------------------------------------------------------
# Prediction files: ours, and the MedGround-R1 / VLM-R1 log
# ----------------------------------------------------------------------------------------------
def as_box(value) -> Box | None:
    """A ground-truth box from how files write it: [x1, y1, x2, y2], [[...]], {"bbox_2d": [...]}, or text.

    Corners are ordered (min x, min y, max x, max y) whichever way the box is written, as ``parse_answer``
    orders a box in text; a number that is not finite (or too large for a float) makes it no box.

    >>> as_box([[10, 20, 30, 40]]), as_box({"bbox_2d": [1, 2, 3, 4]}), as_box("[5, 6, 7, 8]"), as_box([30, 40, 10, 20])
    ((10.0, 20.0, 30.0, 40.0), (1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0), (10.0, 20.0, 30.0, 40.0))
    """
    if isinstance(value, str):
        return parse_answer(value)
    if isinstance(value, dict):
        return next((as_box(value[k]) for k in ("bbox_2d", "bbox", "box") if k in value), None)
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return as_box(value[0])
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(_finite(v) for v in value):
        x1, y1, x2, y2 = (float(v) for v in value)
        return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)
    return None


def _finite(v) -> bool:
    """A JSON number that is a finite float (a 400-digit integer is not: it overflows)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def row_from_record(record: dict, index: int) -> dict:
    """One scored row from a record of either format (see ``load_predictions``)."""
    if not isinstance(record, dict):
        raise ValueError(f"record {index}: expected a JSON object, got {type(record).__name__}")
    gt_key = next((k for k in ("ground_truth", "solution") if k in record), None)
    truth = as_box(record[gt_key]) if gt_key else None
    if truth is None:
        raise ValueError(f"record {index}: no ground-truth box (expected 'ground_truth': [x1, y1, x2, y2] of finite "
                         f"numbers), got {gt_key and json.dumps(record[gt_key])[:80] or f'keys {sorted(record)[:8]}'}")
    if truth[2] <= truth[0] or truth[3] <= truth[1]:
        raise ValueError(f"record {index}: the ground-truth box {list(truth)} has zero area")
    output = record.get("model_output", record.get("output"))
    if "box" in record:  # ours: the box was already parsed and mapped to original pixels
        box = as_box(record["box"]) if record["box"] is not None else None
    else:  # a log: parse the raw answer; it shares the ground truth's frame
        box = parse_answer(output)  # None (a parse failure) for no box or a non-text output
    return {"id": record.get("id", record.get("image", index)),
            "phrase": record.get("phrase", record.get("question", record.get("problem", ""))),
            "category": record.get("category"), "ground_truth": list(truth), "output": output,
            "box": None if box is None else list(box), "iou": iou(box, truth)}


def load_predictions(path: str | Path) -> tuple[list[dict], str]:
    """Scored rows from a prediction file, and the name of the format that was detected.

    - ``{"results": [{"question", "ground_truth", "model_output", ...}, ...]}``: the MedGround-R1 /
      VLM-R1 evaluation log. The output is parsed here; its box and the ground truth share one frame.
    - JSONL (or a JSON list) of our rows (``predictions.jsonl``): ``box`` and ``ground_truth`` in
      original pixels; the IoU is recomputed from them. Rows with an ``output`` / ``model_output``
      but no ``box`` are parsed like the log.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        records, kind = data["results"], "MedGround-R1 / VLM-R1 log (JSON 'results'; output and truth share a frame)"
    else:
        if isinstance(data, list):
            records, kind = data, "JSON list"
        elif isinstance(data, dict):  # a JSONL file of a single line
            records, kind = [data], "JSONL"
        else:
            records, kind = [], "JSONL"
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except (json.JSONDecodeError, RecursionError) as e:
                        raise ValueError(f"{path}, line {number}: not JSON ({brief(e)})") from None
        mine = bool(records) and isinstance(records[0], dict) and "box" in records[0]
        kind += " of grpo_min predictions (boxes in original pixels)" if mine else " of raw outputs (parsed here)"
    if not records:  # nothing to score: a table of zeros would read as a result
        raise ValueError(f"{path}: no prediction records")
    try:
        return [row_from_record(r, i) for i, r in enumerate(records)], kind
    except ValueError as e:
        raise ValueError(f"{path}, {e}") from None


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
COLUMNS = (("n", "n"), ("parse_failures", "parse fail"), ("acc@0.3", "Acc@0.3"), ("acc@0.5", "Acc@0.5"),
           ("acc@0.7", "Acc@0.7"), ("miou", "mIoU"))


def format_table(named_metrics: list[tuple[str, dict]]) -> str:
    """A fixed-width table, one row per (name, metrics); a missing number prints as "-"."""
    width = max([len(name) for name, _ in named_metrics] + [4])
    counts = ("n", "parse_failures")
    cell = lambda key, v: "-" if v is None else f"{v:.0f}" if key in counts else f"{v:.2f}"
    lines = [f"{'':<{width}}" + "".join(f"{title:>11}" for _, title in COLUMNS)]
    lines += [f"{name:<{width}}" + "".join(f"{cell(key, m.get(key)):>11}" for key, _ in COLUMNS)
              for name, m in named_metrics]
    return "\n".join(lines)


def metrics_table(metrics: dict) -> str:
    """The table printed after an evaluation: all samples, then each category (indented)."""
    per_category = metrics.get("per_category", {})
    return format_table([("all", metrics)] + [(f"  {c}", m) for c, m in per_category.items()])


def compare_table(paths: list[str | Path], paper: str | None = None) -> str:
    """Runs side by side (the ablation table), named by their folders; plus the paper's row in its setting.

    ``paper`` is a key of PAPER; without it the paper's row appears when every file records the
    same (dataset, split) and that is the paper's setting (``medrpg``, ``test``).
    """
    named = []
    for path in map(Path, paths):
        metrics = _read_metrics(path)
        named.append((path.parent.name if path.name in ("metrics.json", "summary.json") else path.stem, metrics))
    settings = {(m.get("dataset"), m.get("split")) for _, m in named}
    if paper is None and len(settings) == 1:
        paper = PAPER_SETTINGS.get(settings.pop())
    if paper is None:
        return format_table(named)
    name, numbers = PAPER[paper]
    table = format_table(named + [(f"MedGround-R1 7B, paper ({name})", numbers)])
    return table + "".join(f"\n* {note}" for note in [PAPER_NOTES.get(paper)] if note)


# ----------------------------------------------------------------------------------------------
# Pictures (Pillow only)
# ----------------------------------------------------------------------------------------------
def _read_metrics(path: Path) -> dict:
    """A metrics.json (evaluate.py) or summary.json (train.py: its "after"), or a ValueError naming the file."""
    try:
        metrics = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON, cut off
        raise ValueError(f"{path}: not a readable JSON file ({brief(e)})") from None
    if isinstance(metrics, dict) and "n" not in metrics:
        metrics = metrics.get("after", metrics)  # train.py's summary.json
    numbers = [metrics.get(k) for k, _ in COLUMNS] if isinstance(metrics, dict) else [None]
    if not all(v is None or _finite(v) for v in numbers) or not isinstance(metrics, dict):
        raise ValueError(f"{path}: expected an object of numbers {', '.join(k for k, _ in COLUMNS)} (evaluate.py's "
                         "metrics.json or train.py's summary.json)")
    return metrics


def hits_and_misses(rows: list[dict], n: int) -> list[int]:
    """Indices of up to n rows for a picture: the best and the worst IoUs, alternating.

    >>> hits_and_misses([{"iou": v} for v in (0.1, 0.9, 0.5, 0.0, 0.7)], 4)
    [1, 3, 4, 0]
    """
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["iou"])  # best first, stable
    n = min(n, len(rows))
    best, worst = order[: (n + 1) // 2], order[::-1][: n // 2]
    mixed = [i for pair in zip(best, worst) for i in pair] + best[len(worst):]
    return mixed


def save_examples(samples, rows: list[dict], n: int, path: str | Path, cell: int = 256, cols: int = 4) -> Path:
    """A PNG grid of n samples, a mix of hits and misses: truth (green), prediction (red), phrase, IoU."""
    from data import draw_grid

    picked = hits_and_misses(rows, n)
    path = draw_grid([samples[i] for i in picked], path, pred_boxes=[rows[i]["box"] for i in picked],
                     cell=cell, cols=cols)
    with Image.open(path) as grid:
        grid = grid.convert("RGB")
        grid.load()
    draw = ImageDraw.Draw(grid)
    row_height = grid.height // max(1, math.ceil(len(picked) / cols))  # the cell plus draw_grid's caption
    for k, i in enumerate(picked):
        x, y = (k % cols) * cell, (k // cols) * row_height
        label = f"IoU {rows[i]['iou']:.2f}" if rows[i]["box"] is not None else "no box"
        draw.rectangle([x, y, x + 62, y + 13], fill="black")
        draw.text((x + 3, y + 1), label, fill="white")
    with atomic_path(path) as tmp:
        grid.save(tmp)
    return Path(path)


def draw_prediction(image: Image.Image, box: Box | None, phrase: str, path: str | Path) -> Path:
    """The image with the predicted box (red) and, below it, the phrase and the box."""
    size = max(12, image.width // 45)
    font, strip = ImageFont.load_default(size=size), round(size * 3.2)  # two lines of text
    canvas = Image.new("RGB", (image.width, image.height + strip), "white")
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    if box is not None:
        draw.rectangle(box, outline=PREDICTION, width=max(2, image.width // 250))
    answer = f"box [{', '.join(f'{v:.0f}' for v in box)}]" if box is not None else "no box in the answer"
    draw.multiline_text((4, image.height + size // 4), f"{phrase}\n{answer}", fill="black", font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp)
    return Path(path)


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _draw_panel(draw, area, title: str, series: dict[str, list[tuple[float, float]]], font,
                bands: dict[str, list[tuple[float, float, float]]] | None = None):
    """One line plot inside ``area`` (left, top, right, bottom): axes, 5 ticks each way, a legend.

    ``bands``: per series, (x, low, high) points of a shaded band behind its curve (``draw`` must then be an
    ``ImageDraw.Draw(image, "RGBA")``, so that bands show through each other).
    """
    left, top, right, bottom = area[0] + 56, area[1] + 24, area[2] - 14, area[3] - 34  # the axes' box
    draw.text((left, area[1] + 5), title, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    bands = bands or {}
    points = [p for pts in series.values() for p in pts]
    points += [(x, y) for pts in bands.values() for x, low, high in pts for y in (low, high)]
    if not points:
        draw.text((left + 10, (top + bottom) // 2), "no data in metrics.jsonl", fill="gray", font=font)
        return
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + max(1.0, abs(y0)) * 0.1)
    y1 += 0.3 * (y1 - y0)  # headroom above the data for the legend
    sx = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
    sy = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)
    for k in range(5):
        xv, yv = x0 + k * (x1 - x0) / 4, y0 + k * (y1 - y0) / 4
        draw.line([sx(xv), bottom, sx(xv), bottom + 4], fill="black")
        draw.text((sx(xv) - 8, bottom + 6), f"{xv:.0f}", fill="black", font=font)
        draw.line([left - 4, sy(yv), left, sy(yv)], fill="black")
        draw.text((area[0] + 2, sy(yv) - 7), f"{yv:.3g}", fill="black", font=font)
    draw.text(((left + right) // 2 - 12, bottom + 20), "step", fill="black", font=font)
    for k, name in enumerate(series):  # the bands first, so that no band covers a curve
        band = bands.get(name, [])
        if len(band) > 1:
            draw.polygon([(sx(x), sy(high)) for x, _, high in band] + [(sx(x), sy(low)) for x, low, _ in band[::-1]],
                         fill=PALETTE[k % len(PALETTE)] + (50,))
    for k, (name, pts) in enumerate(series.items()):
        colour, xy = PALETTE[k % len(PALETTE)], [(sx(x), sy(y)) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        if len(xy) <= 30:  # sparse series (held-out evaluations): mark each point
            for px, py in xy:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    draw.rectangle([right - 156, top + 2, right - 2, top + 6 + 15 * len(series)], fill="white", outline="gray")
    for k, name in enumerate(series):  # the legend, over the curves
        y = top + 10 + 15 * k
        draw.line([right - 150, y, right - 130, y], fill=PALETTE[k % len(PALETTE)], width=3)
        draw.text((right - 125, y - 7), name, fill="black", font=font)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl``. Lines that are not a JSON object with a finite step (the line a
    crash cuts off, a damaged byte) are skipped and counted; a file without any readable line is refused."""
    path, records, bad = Path(run_dir) / "metrics.jsonl", [], []
    for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except (ValueError, RecursionError):
            record = {}
        if record is None:
            continue
        if isinstance(record, dict) and _finite(record.get("step")):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        print(f"{path}: skipped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad[:5]))}"
              f"{', ...' if len(bad) > 5 else ''}; a run cut off mid-write leaves its last line unfinished)")
    if not records:
        raise ValueError(f"{path}: no readable metrics line")
    return records


def metric_series(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key``, sorted by step; a resumed run's repeated steps keep the last value."""
    by_step = {r["step"]: r[key] for r in records if _finite(r.get(key))}
    return sorted(by_step.items())


def plot_run(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Training curves from ``RUN_DIR/metrics.jsonl`` in one PNG (3 x 2 panels, 1440 x 640).

    Lines that are not a JSON object with a step (the line a crash cuts off, a damaged byte) are skipped and
    counted; a file without any readable line is refused."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    series = lambda key: metric_series(records, key)  # noqa: E731

    reward_keys = ["reward"] + sorted({k for r in records for k in r if k.startswith("reward/")})
    panels = [("reward by component (mean per completion)", {k: series(k) for k in reward_keys}),
              ("KL to the reference (k3, token mean)", {"kl": series("kl")}),
              ("clipped tokens (fraction; with --num-iterations > 1)",
               {k: series(k) for k in ("clip_fraction", "clip_low", "clip_high")}),
              ("held-out evaluation (%; test: before GRPO at 0, after at the end)",
               {"val Acc@0.5": series("eval/acc@0.5"), "val mIoU": series("eval/miou")}),
              ("completion length (tokens)", {"completion_length": series("completion_length")}),
              ("gradient norm (before clipping)", {"grad_norm": series("grad_norm")})]
    summary = run_dir / "summary.json"
    if summary.exists():  # the test split before and after GRPO, at step 0 and the last step
        s, last = _read_metrics(summary), max(r["step"] for r in records)
        numbers = [(k, m) for k in ("before", "after") for m in ("acc@0.5", "miou")]
        if all(isinstance(s.get(k), dict) and _finite(s[k].get(m)) for k, m in numbers):
            panels[3][1].update({f"test {name}": [(0, s["before"][key]), (last, s["after"][key])]
                                 for name, key in (("Acc@0.5", "acc@0.5"), ("mIoU", "miou"))})
    canvas = Image.new("RGB", (1440, 640), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=12)
    for k, (title, data) in enumerate(panels):
        x, y = (k % 3) * 480, (k // 3) * 320
        _draw_panel(draw, (x, y, x + 480, y + 320), title, {n: s for n, s in data.items() if s}, font)
    path = Path(path) if path is not None else run_dir / "curves.png"
    with atomic_path(path) as tmp:
        canvas.save(tmp)
    return path


def plot_variants(runs: dict[str, list[str | Path]], path: str | Path, bins: int = 40) -> Path:
    """An ablation's curves in one PNG (2 panels, 1440 x 560): the training reward and the val Acc@0.5 against
    the step, per variant the mean over its runs (seeds) and a band from their lowest to their highest value.

    ``runs``: variant name -> its run folders (each with a metrics.jsonl). The reward, one noisy number per step,
    is first averaged per run over windows of last_step / ``bins`` steps.
    """
    def spread(per_run: list[list[tuple[float, float]]]):  # -> (mean curve, band): over the runs that have a step
        at = {}
        for pts in per_run:
            for x, y in pts:
                at.setdefault(x, []).append(y)
        xs = sorted(at)
        return [(x, sum(at[x]) / len(at[x])) for x in xs], [(x, min(at[x]), max(at[x])) for x in xs]

    def windowed(pts, width):  # the mean of each window of `width` steps, at the window's last step
        out = {}
        for x, y in pts:
            out.setdefault(math.ceil(x / width), []).append((x, y))
        return [(max(x for x, _ in w), sum(y for _, y in w) / len(w)) for _, w in sorted(out.items())]

    records = {name: [read_metrics(d) for d in dirs] for name, dirs in runs.items()}
    last = max([r["step"] for recs in records.values() for rs in recs for r in rs if "step" in r] + [1])
    width = max(1, last // bins)
    panels = [(f"training reward (mean per {width} steps; line: mean over seeds, band: lowest to highest)",
               {name: [windowed(metric_series(rs, "reward"), width) for rs in recs] for name, recs in records.items()}),
              ("val Acc@0.5 (%; line: mean over seeds, band: lowest to highest)",
               {name: [metric_series(rs, "eval/acc@0.5") for rs in recs] for name, recs in records.items()})]
    canvas = Image.new("RGB", (1440, 560), "white")
    draw, font = ImageDraw.Draw(canvas, "RGBA"), ImageFont.load_default(size=12)
    for k, (title, per_variant) in enumerate(panels):
        curves = {name: spread(per_run) for name, per_run in per_variant.items()}
        # every variant keeps its colour in both panels, even one without curves (no GRPO: no steps)
        _draw_panel(draw, (k * 720, 0, k * 720 + 720, 560), title, {n: c[0] for n, c in curves.items()}, font,
                    bands={n: c[1] for n, c in curves.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def write_results(out: Path, rows: list[dict] | None, metrics: dict):
    """predictions.jsonl (unless None) and metrics.json, each written whole or not at all."""
    if rows is not None:
        write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    print(metrics_table(metrics))
    print(f"wrote {out / 'metrics.json'}" + (f" and {out / 'predictions.jsonl'}" if rows is not None else ""))


def read_image(path: str) -> Image.Image:
    """--image's picture as 8-bit RGB, or a ValueError naming the file."""
    from data import to_rgb8

    try:
        with Image.open(path) as f:
            return to_rgb8(f.copy())
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ValueError(f"--image {path}: not a readable image ({brief(e)})") from None


def usable_samples(args):
    """The split's samples whose image can be read; stops with a one-line error when none is left."""
    from data import DatasetError, check_images, load_dataset

    try:
        samples = load_dataset(args.dataset, args.split, data_root=args.data_root, image_root=args.image_root,
                               seed=args.seed, limit=args.limit)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    samples, report = check_images(samples)  # missing / unreadable images are dropped and reported
    print(f"{args.dataset}/{args.split} images: {report}")
    if len(samples) == 0:  # nothing to score: a table of zeros would read as a result
        hint = ""
        if set(report.counts) == {"image file not found"}:
            hint = (f"; the image files of all its {report.total} samples are missing: point --image-root at the "
                    "image folder (default: --data-root)")
        raise SystemExit(f"error: {args.dataset}/{args.split} has no usable sample "
                         f"(annotations: {samples.source}){hint}")
    return samples


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a grounding model: Acc@0.3/0.5/0.7 and mIoU (percent).",
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--predictions", metavar="FILE", help="score a prediction file (ours or a MedGround-R1 / "
                      "VLM-R1 log) without a model")
    mode.add_argument("--compare", nargs="+", metavar="METRICS", help="print metrics.json files side by side")
    mode.add_argument("--plot-run", metavar="RUN_DIR", help="draw RUN_DIR/metrics.jsonl's training curves")
    mode.add_argument("--image", metavar="FILE", help="predict one image (with --phrase); writes prediction.png")
    p.add_argument("--phrase", help="the referring phrase for --image")
    p.add_argument("--paper", choices=sorted(PAPER), help="--compare: add the paper's row for this dataset")
    p.add_argument("--model", default="tiny", help="model folder, a LoRA adapter folder (train.py --lora-r's final/ or "
                   "a peft adapter: its base_model_name_or_path, then the adapter), or 'tiny' (the cached warm-started "
                   "demo model; the default)")
    p.add_argument("--dataset", default="synthetic", help="synthetic (the default), ms-cxr, medrpg, chestx-ray8, "
                   "m3d-refseg or jsonl")
    p.add_argument("--data-root", default=None, help="dataset folder (real datasets)")
    p.add_argument("--image-root", default=None, help="image folder (default: --data-root)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split (default: test)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples (default: all)")
    p.add_argument("--template", default="chain-of-box", help="chain-of-box, plain, or a text file with {question}")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer decoded (default: 256)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--min-pixels", type=int, default=None, help="processor's minimum image area in pixels")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="processor's maximum image area (default: its own, capped at 1003520 = 1280 visual tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data / the tiny model")
    p.add_argument("--save-vis", type=int, default=0, metavar="N", help="write examples.png: N samples, hits "
                   "and misses, truth green, prediction red")
    p.add_argument("--output-dir", default=None, help="where results go (default: runs/eval; RUN_DIR for --plot-run)")
    args = p.parse_args(argv)
    if args.image and not args.phrase:
        p.error("--image needs --phrase")
    for option, value, ok, expected in (
            ("--limit", args.limit, lambda v: v >= 1, "at least 1"),
            ("--batch-size", args.batch_size, lambda v: v >= 1, "at least 1"),
            ("--max-new-tokens", args.max_new_tokens, lambda v: v >= 1, "at least 1"),
            ("--save-vis", args.save_vis, lambda v: v >= 0, "0 or more"),
            ("--seed", args.seed, lambda v: 0 <= v < 2**32, "0 or more and below 2**32"),
            ("--min-pixels", args.min_pixels, lambda v: v >= 1, "at least 1"),
            ("--max-pixels", args.max_pixels, lambda v: v >= 56 * 56,
             "at least 3136 (56 x 56 pixels: one visual token)")):
        if value is not None and not ok(value):
            p.error(f"{option} {value}: expected {expected}")
    for option, files in (("--predictions", [args.predictions]), ("--compare", args.compare or []),
                          ("--image", [args.image]),
                          ("--plot-run", [args.plot_run and str(Path(args.plot_run) / "metrics.jsonl")])):
        for f in files:
            if f and not Path(f).is_file():
                p.error(f"{option}: no such file: {f}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except InputError as e:  # an output folder refused, a model folder that does not load: the message says why
        raise SystemExit(f"error: {e}")


def run(args) -> int:
    out = Path(args.output_dir or (args.plot_run if args.plot_run else "runs/eval"))
    # Checked before any file is read or model loaded: a folder the outputs cannot go to, or one the run reads
    # (--output-dir MODEL would write over the model's files). --plot-run writes curves.png next to metrics.jsonl.
    if not args.compare:
        model = None if args.predictions or args.plot_run or args.model == "tiny" else args.model
        check_output(out, {"--model": model, "--data-root": args.data_root, "--image-root": args.image_root})

    # ------------------------------------------------------------------ no model needed
    try:  # a malformed prediction, metrics or metrics.jsonl file: one line naming it
        if args.plot_run:
            print("wrote", plot_run(args.plot_run, out / "curves.png"))
        elif args.compare:
            print(compare_table(args.compare, args.paper))
        elif args.predictions:
            rows, kind = load_predictions(args.predictions)
            print(f"{args.predictions}: detected format: {kind}; {len(rows)} records")
            same_file = (out / "predictions.jsonl").resolve() == Path(args.predictions).resolve()
            write_results(out, None if same_file else rows, {"source": str(args.predictions), **metrics_of(rows)})
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.plot_run or args.compare or args.predictions:
        return 0

    # ------------------------------------------------------------------ the model
    from data import DATASETS
    from grpo_min.models import load_model, resolve_dtype, resolve_model_path

    if not args.image and args.dataset not in DATASETS:  # fail before loading a large model
        raise SystemExit(f"--dataset {args.dataset!r}: expected one of {', '.join(DATASETS)}")
    try:  # everything that can be checked before a large model loads: the template, the data, the model folder
        template = load_template(args.template)
        image = read_image(args.image) if args.image else None
        samples = None if args.image else usable_samples(args)
        model_path = resolve_model_path(args.model, args.seed)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    max_pixels = args.max_pixels  # None: the processor's own, capped (grpo_min.models.DEFAULT_MAX_PIXELS)
    model, processor, frame = load_model(model_path, dtype=resolve_dtype(args.dtype, device), device=device,
                                         min_pixels=args.min_pixels, max_pixels=max_pixels)

    if args.image:
        [(text, box)] = decode_boxes(model, processor, [image], [args.phrase], [image.size], template, frame,
                                     args.max_new_tokens, device)
        print(f"answer:\n{text}\n")
        print(f"box (original pixels, x1 y1 x2 y2): {list(box) if box is not None else 'none: no box in the answer'}")
        print("wrote", draw_prediction(image, box, args.phrase, out / "prediction.png"))
        return 0

    samples = [samples[i] for i in range(len(samples) if args.limit is None else min(args.limit, len(samples)))]
    rows = predict(model, processor, samples, template, frame, args.batch_size, args.max_new_tokens, device=device)
    metrics = {"model": args.model, "dataset": args.dataset, "split": args.split, "template": args.template,
               **metrics_of(rows)}
    if args.save_vis:
        print("wrote", save_examples(samples, rows, args.save_vis, out / "examples.png"))
    write_results(out, rows, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
