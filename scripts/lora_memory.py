"""GPU memory of the training state, LoRA vs full fine-tuning, for Qwen2.5-VL-3B and 7B: counted, not measured.

The models are built on the meta device (shapes only: nothing is allocated or downloaded) with the published
dimensions (``grpo_min.tiny.MODEL_CONFIGS``), wrapped as ``train.py --lora-r R`` wraps them, and their
parameters counted. Bytes per parameter, as train.py keeps them on a GPU:

    LoRA (--lora-r R):  the frozen base in bfloat16 (2); the adapters in float32 (4), their gradients (4) and
                        AdamW's two moments (8); no reference copy (the base with its adapters off serves).
    full fine-tuning:   float32 weights (4), gradients (4), AdamW's moments (8), a float32 reference (4).

Weights and optimizer state only: activations, the KV cache of generation and the log-softmax over the
vocabulary come on top, and depend on batch, G, lengths and image sizes (scripts/gpu_check.sh measures them).

    python scripts/lora_memory.py            # r 64
    python scripts/lora_memory.py --lora-r 16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_min import lora  # noqa: E402
from grpo_min.tiny import build_processor, random_model  # noqa: E402

GIB = 2 ** 30
MODELS = {"Qwen2.5-VL-3B": "3b", "Qwen2.5-VL-7B": "7b"}


def count(config_name: str, processor, r: int) -> dict:
    """Parameter counts of one model: all, vision tower, LoRA adapters (default targets, alpha irrelevant)."""
    with torch.device("meta"):
        model = random_model(config_name, processor, seed=0)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings (3B) counted once
    vision = sum(p.numel() for p in model.model.visual.parameters())
    layers = lora.add_lora(model, r=r, lora_alpha=2 * r)
    adapters = sum(p.numel() for p in lora.lora_parameters(model))
    return {"total": total, "vision": vision, "adapters": adapters, "layers": len(layers)}


def memory_rows(n: dict) -> list[tuple[str, float, float]]:
    """(what, LoRA GiB, full fine-tuning GiB) per kind of training state, then the total."""
    N, A = n["total"], n["adapters"]
    rows = [("weights (LoRA: bf16 base + fp32 adapters; full: fp32)", 2 * N + 4 * A, 4 * N),
            ("gradients (fp32, trained tensors only)", 4 * A, 4 * N),
            ("AdamW moments (fp32, 2 per trained number)", 8 * A, 8 * N),
            ("reference policy (LoRA: adapters off, no copy)", 0, 4 * N)]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    return [(what, lora_bytes / GIB, full_bytes / GIB) for what, lora_bytes, full_bytes in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora-r", type=int, default=64, help="LoRA rank (default: 64)")
    args = p.parse_args(argv)
    processor = build_processor()  # the tiny tokenizer: only its special-token ids are read
    for name, config_name in MODELS.items():
        n = count(config_name, processor, args.lora_r)
        print(f"{name}: {n['total'] / 1e9:.2f} B parameters ({n['vision'] / 1e9:.2f} B in the vision tower); LoRA r "
              f"{args.lora_r} on {n['layers']} language-model layers: {n['adapters'] / 1e6:.1f} M trained parameters "
              f"({100 * n['adapters'] / n['total']:.2f}%)")
        print(f"  {'GiB':<52} {'LoRA':>8} {'full':>8}")
        for what, lora_gib, full_gib in memory_rows(n):
            print(f"  {what:<52} {lora_gib:8.2f} {full_gib:8.2f}")
        print()


if __name__ == "__main__":
    main()
