"""Throughput of full GRPO steps, phase by phase: train.py's own ``grpo_step`` on a synthetic image.

Runs N calls of ``train.grpo_step`` (the very function the training loop calls, so a patched loss or
sampler is measured as it trains) on a synthetic S x S image, drops the first as warm-up, prints the
median seconds of each phase and, as its last line, one JSON object:

    python scripts/bench.py --model-config tiny --image-size 224 --steps 6
    python scripts/bench.py --model runs/grpo/final --image-size 448 --num-generations 8 \\
        --max-completion-length 32 --beta 0.04 --steps 6
    {"seconds_per_step": 0.197, "completion_tokens_per_s": 1118.3, "peak_rss_mb": 807.5, ...}

``completion_tokens_per_s`` counts the completion tokens actually generated (a completion stops after
its first EOS; a random model rarely emits one and runs to ``--max-completion-length``), divided by
the wall time of the measured steps. ``peak_rss_mb`` is the process's lifetime peak resident memory
(``getrusage``), so compare configurations in fresh processes (scripts/bench_vs_trl.py does).

Models: ``--model PATH`` loads any Qwen2.5-VL / Qwen2-VL folder (``load_policy``, the reference a second
copy via ``load_reference``, as in ``train.py``); ``--model-config NAME`` builds one with random
weights from a named config (``grpo_min.tiny.MODEL_CONFIGS``), with the tiny model's tokenizer and
processor, and prepares it as train.py does (``prepare_policy``). ``--lora-r R`` trains LoRA adapters
(alpha 2 R) on a frozen base stored in the compute precision, the policy with its adapters off serving
as the reference, all exactly as ``train.py --lora-r R``:

    python scripts/bench.py --model-config 3b --lora-r 64 --gradient-checkpointing --max-completion-length 256 The image processor's pixel limits are widened so that the S x S image reaches the vision
tower unresized (S must be a multiple of 28: 112, 224, 448 are).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import resource
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewards as R  # noqa: E402
import train  # noqa: E402
from grpo_min.metrics import PhaseTimer  # noqa: E402
from grpo_min.models import load_policy, load_reference, prepare_policy, resolve_dtype  # noqa: E402
from grpo_min.optim import make_optimizer  # noqa: E402
from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts  # noqa: E402
from grpo_min.rollout import completion_logps  # noqa: E402
from grpo_min.sample import Sample  # noqa: E402
from grpo_min.tiny import MODEL_CONFIGS, build_processor, random_model  # noqa: E402

PHASES = ("encode", "generate", "rewards", "old_policy", "reference", "policy", "optimizer")
PHRASES = ["small left apical pneumothorax", "right lower lobe consolidation", "enlarged cardiac silhouette"]


def train_config(args) -> train.Config:
    """train.py's Config for the measured step (train.py's defaults for whatever the benchmark does not set)."""
    return train.Config(num_generations=args.num_generations, batch_size=args.batch_size,
                        max_completion_length=args.max_completion_length, beta=args.beta, loss_type=args.loss_type,
                        num_iterations=args.num_iterations, temperature=args.temperature,
                        learning_rate=args.learning_rate, optim=args.optim, dtype=args.dtype, seed=args.seed,
                        gradient_checkpointing=args.gradient_checkpointing, lora_r=args.lora_r,
                        lora_alpha=2.0 * args.lora_r if args.lora_r else None,
                        compile_generation=args.compile_generation)


def load_models(args, device):
    """(policy, reference or None, processor) from ``--model PATH`` or ``--model-config NAME``, the policy
    prepared as train.py prepares it; no reference with LoRA (the policy with its adapters off) or beta 0."""
    cfg = train_config(args)
    full_reference = args.beta > 0 and not args.lora_r
    if args.model:
        policy, processor, _ = load_policy(args.model, cfg, device)
        reference = load_reference(args.model, dtype=torch.float32, device=device) if full_reference else None
    else:
        processor = build_processor()
        # as load_policy: float32 weights to fine-tune, or a frozen LoRA base in the compute precision
        dtype = resolve_dtype(args.dtype, device) if args.lora_r else torch.float32
        with torch.device(device):  # draw the weights where they will live (a 7B model is slow to build in RAM)
            policy = random_model(args.model_config, processor, args.seed).to(dtype)
        reference = copy.deepcopy(policy).eval().requires_grad_(False) if full_reference else None
        policy = prepare_policy(policy, cfg, device)
    # An S x S image must reach the vision tower unresized: widen the processor's pixel limits to S*S.
    size = dict(processor.image_processor.size)
    area = args.image_size ** 2
    size["shortest_edge"] = min(size.get("shortest_edge", area), area)
    size["longest_edge"] = max(size.get("longest_edge", area), area)
    processor.image_processor.size = size
    return policy, reference, processor


def synthetic_image(size: int, seed: int) -> Image.Image:
    """A deterministic S x S RGB image (smooth gradient plus noise; its content does not matter)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
    noise = rng.normal(0, 40, (size, size, 3))
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="a Qwen2.5-VL / Qwen2-VL folder (save_pretrained)")
    which.add_argument("--model-config", choices=tuple(MODEL_CONFIGS), default=None,
                       help="random weights from a named config (default: tiny when --model is not given)")
    p.add_argument("--image-size", type=int, default=224,
                   help="S: the synthetic image is S x S pixels (a multiple of 28)")
    p.add_argument("--num-generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--max-completion-length", type=int, default=32, help="longest completion, in tokens")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight; 0 loads no reference and skips its pass")
    p.add_argument("--loss-type", default="grpo", choices=("grpo", "bnpo", "dr_grpo", "dapo"), help="as train.py's")
    p.add_argument("--num-iterations", type=int, default=1, help="mu: optimizer updates per rollout, as train.py's")
    p.add_argument("--steps", type=int, default=6, help="GRPO steps to run; the first is warm-up and not counted")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per step (each its own image)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute precision, as train.py's --dtype: auto (bfloat16 on GPU, float32 on CPU); weights and "
                        "optimizer state stay float32")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--learning-rate", type=float, default=1e-6, help="AdamW learning rate")
    p.add_argument("--optim", default="adamw_torch_fused", choices=("adamw_torch_fused", "adamw_torch"),
                   help="AdamW implementation, as train.py's --optim")
    p.add_argument("--compile-generation", action="store_true",
                   help="sample with a static KV cache and a decode step compiled with CUDA graphs, as train.py's")
    p.add_argument("--seed", type=int, default=0, help="seed for the random model, the image and sampling")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank, as train.py's --lora-r (alpha 2 r; 0: full "
                   "fine-tuning)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="as train.py's --gradient-checkpointing")
    p.add_argument("--no-image-once", action="store_true",
                   help="score on the plain path: every completion row carries its prompt and image, so both go "
                        "through the model G times (measures the fast path of completion_logps)")
    args = p.parse_args(argv)
    if args.model is None and args.model_config is None:
        args.model_config = "tiny"
    if args.image_size % 28:
        p.error(f"--image-size {args.image_size}: must be a multiple of 28 (Qwen2.5-VL's patch x merge size)")
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first is warm-up)")
    if args.lora_r < 0:
        p.error(f"--lora-r {args.lora_r}: expected 0 (off) or more")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    policy, reference, processor = load_models(args, device)
    S, G, cfg = args.image_size, args.num_generations, train_config(args)
    optimizer, scheduler = make_optimizer(policy.parameters(), lr=args.learning_rate,
                                          fused=args.optim == "adamw_torch_fused", total_steps=args.steps)
    if args.no_image_once:  # the patch point any ablation uses: train.py's module-level names
        train.completion_logps = functools.partial(completion_logps, encode_image_once=False)
    box = (S // 4, S // 4, S // 2, S // 2)  # any box: the reward's cost does not depend on it
    samples = [Sample(id=f"bench-{i}", image=synthetic_image(S, args.seed + i), text=PHRASES[0],  # one text, as
                      box=box, width=S, height=S) for i in range(args.batch_size)]  # scripts/trl_driver.py

    def reward(texts, samples, images, resized_sizes):
        targets = [R.Target(box=s.box, orig_size=(S, S), resized_size=size) for s, size in zip(samples, resized_sizes)
                   for _ in range(G)]
        return R.score_completions(texts, targets, R.RewardConfig())

    check = encode_prompts(processor, [samples[0].load_image()], PHRASES[:1], CHAIN_OF_BOX)
    if check.resized_sizes[0] != (S, S):
        raise SystemExit(f"the processor resized the {S} px image to {check.resized_sizes[0]}")
    visual_tokens = int(check.inputs["image_grid_thw"].prod(-1).item()) // 4
    n_params = sum(p.numel() for p in policy.parameters())
    n_trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    source = args.model or f"random {args.model_config}"
    print(f"{source}: {n_params / 1e6:.2f} M parameters ({n_trained / 1e6:.2f} M trained"
          f"{f', LoRA r {args.lora_r}' if args.lora_r else ''}), {dtype}, {device}; {args.batch_size} prompt(s) x {G} "
          f"completions, image {S} px ({visual_tokens} visual tokens), prompt {check.inputs['input_ids'].shape[1]} "
          f"tokens, max completion {args.max_completion_length}, beta {args.beta}, "
          f"scoring: {'plain path' if args.no_image_once else 'prompt and image once per group'}", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    steps = []  # (phase seconds, completion tokens) of each step
    for step in range(args.steps):
        timer = PhaseTimer(device)
        records = train.grpo_step(cfg, policy, reference, processor, optimizer, scheduler, [samples], reward,
                                  CHAIN_OF_BOX, timer=timer)
        seconds, tokens = dict(timer.seconds), records[0]["completion_tokens"]
        steps.append((seconds, tokens))
        print(f"step {step + 1}/{args.steps}{' (warm-up)' if step == 0 else ''}: {sum(seconds.values()):.3f} s, "
              f"{tokens} completion tokens", flush=True)

    measured = steps[1:]
    totals = [sum(s.values()) for s, _ in measured]
    tokens = sum(t for _, t in measured)
    medians = {ph: statistics.median(s.get(ph, 0.0) for s, _ in measured) for ph in PHASES}
    print(f"median seconds per phase over {len(measured)} steps:")
    for ph in PHASES:
        print(f"  {ph:<10} {medians[ph]:8.4f}")
    result = {
        "seconds_per_step": round(statistics.median(totals), 4),
        "completion_tokens_per_s": round(tokens / sum(totals), 2),
        "completion_tokens_per_step": round(tokens / len(measured), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KB on Linux
        "step_over_generate": round(statistics.median(totals) / medians["generate"], 3),
        **{f"{ph}_s": round(v, 4) for ph, v in medians.items()},
        "model": source, "parameters_m": round(n_params / 1e6, 2), "trained_parameters_m": round(n_trained / 1e6, 3),
        "lora_r": args.lora_r, "gradient_checkpointing": args.gradient_checkpointing,
        "image_size": S, "visual_tokens": visual_tokens,
        "num_generations": G, "batch_size": args.batch_size, "max_completion_length": args.max_completion_length,
        "beta": args.beta, "loss_type": args.loss_type, "num_iterations": args.num_iterations,
        "dtype": str(dtype).replace("torch.", ""), "device": device.type,
        "image_once": not args.no_image_once, "fused_adamw": bool(optimizer.defaults.get("fused")),
        "compile_generation": args.compile_generation,
        "measured_steps": len(measured), "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
