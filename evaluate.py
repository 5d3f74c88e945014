"""The numbers: greedy decoding on a split, IoU / Acc@t / mIoU, predictions written as JSONL.

    python evaluate.py --model tiny --dataset synthetic --split test --output-dir runs/eval
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from grpo_min.boxes import from_model_frame, iou, parse_answer, summarize_ious
from grpo_min.prompts import load_template
from grpo_min.rollout import encode_prompts, generate_completions


@torch.no_grad()
def predict(model, processor, samples, template: str, frame: str = "absolute", batch_size: int = 32,
            max_new_tokens: int = 256, progress: bool = True, device=None) -> list[dict]:
    """Greedy predictions for ``samples``, with boxes mapped back to original pixels and scored."""
    rows = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="evaluating", disable=not progress, leave=False):
        batch = [samples[i] for i in range(start, min(start + batch_size, len(samples)))]
        prompts = encode_prompts(processor, [s.load_image() for s in batch], [s.text for s in batch], template,
                                 device=device)
        out = generate_completions(model, processor, prompts, num_generations=1, max_new_tokens=max_new_tokens,
                                   greedy=True)
        for s, text, resized in zip(batch, out.texts, prompts.resized_sizes):
            box = parse_answer(text)
            pred = None if box is None else from_model_frame(box, (s.width, s.height), resized, frame)
            rows.append({"id": s.id, "phrase": s.text, "category": s.category, "ground_truth": list(s.box),
                         "output": text, "box": None if pred is None else [round(v, 2) for v in pred],
                         "iou": iou(pred, s.box)})
    return rows


def metrics_of(rows: list[dict]) -> dict:
    """The summary metrics of prediction rows (percentages; a parse failure counts as IoU 0)."""
    return summarize_ious([r["iou"] for r in rows], sum(r["box"] is None for r in rows))


def main(argv=None):
    from data import DATASETS, load_dataset
    from grpo_min.models import load_model, resolve_dtype, resolve_model_path

    p = argparse.ArgumentParser(description="Evaluate a grounding model: Acc@0.3/0.5/0.7 and mIoU (percent).")
    p.add_argument("--model", default="tiny", help="model folder, or 'tiny' (the cached warm-started demo model)")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS, help="dataset name")
    p.add_argument("--data-root", default=None, help="dataset folder (real datasets)")
    p.add_argument("--image-root", default=None, help="image folder (default: --data-root)")
    p.add_argument("--split", default="test", help="train, val or test")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--template", default="chain-of-box", help="chain-of-box, plain, or a text file with {question}")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer decoded")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data / the tiny model")
    p.add_argument("--output-dir", default="runs/eval", help="where predictions.jsonl and metrics.json go")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor, frame = load_model(resolve_model_path(args.model, args.seed),
                                         dtype=resolve_dtype(args.dtype, device), device=device)
    samples = load_dataset(args.dataset, args.split, data_root=args.data_root, image_root=args.image_root,
                           seed=args.seed, limit=args.limit)
    rows = predict(model, processor, samples, load_template(args.template), frame, args.batch_size,
                   args.max_new_tokens, device=device)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    metrics = metrics_of(rows)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics))


if __name__ == "__main__":
    sys.exit(main())
