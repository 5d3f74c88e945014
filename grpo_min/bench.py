"""Throughput of full GRPO steps, phase by phase (issue 7).

Runs N steps of exactly the GRPO step that ``train.py`` runs (same functions: ``encode_prompts``,
``generate_completions``, ``score_completions``, ``group_advantages``, ``completion_logps``,
``grpo_loss``, and train.py's ``make_optimizer``) on a synthetic S x S image, drops the first step
as warm-up, prints the median seconds of each phase and, as its last line, one JSON object:

    python -m grpo_min.bench --model-config tiny --image-size 224 --steps 6
    python -m grpo_min.bench --model runs/grpo/final --image-size 448 --num-generations 8 \\
        --max-completion-length 32 --beta 0.04 --steps 6
    {"seconds_per_step": 0.197, "completion_tokens_per_s": 1118.3, "peak_rss_mb": 807.5, ...}

``completion_tokens_per_s`` counts the completion tokens actually generated (a completion stops after
its first EOS; a random model rarely emits one and runs to ``--max-completion-length``), divided by
the wall time of the measured steps. ``peak_rss_mb`` is the process's lifetime peak resident memory
(``getrusage``), so compare configurations in fresh processes (scripts/bench_vs_trl.py does).

Models: ``--model PATH`` loads any Qwen2.5-VL / Qwen2-VL folder (``load_model``, the reference a second
copy via ``load_reference``, as in ``train.py``); ``--model-config NAME`` builds one with random
weights from a named config (``MODEL_CONFIGS``), with the tiny model's tokenizer and processor.
The image processor's pixel limits are widened so that the S x S image reaches the vision tower
unresized (S must be a multiple of 28: 112, 224, 448 are).
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

import rewards as R
from grpo_min.loss import group_advantages, grpo_loss
from grpo_min.models import compute_precision, load_model, load_reference, resolve_dtype
from grpo_min.prompts import CHAIN_OF_BOX
from grpo_min.rollout import completion_logps, encode_prompts, generate_completions, special_token_ids
from train import Config, make_optimizer  # the optimizer and schedule train.py builds, unchanged

PHASES = ("encode", "generate", "rewards", "reference", "policy", "optimizer")
PHRASES = ["small left apical pneumothorax", "right lower lobe consolidation", "enlarged cardiac silhouette"]

# Random-weight models with Qwen2.5-VL's layout. The tokenizer is always the tiny model's (a few
# hundred tokens, fitted in memory: nothing to download). "50m" keeps that small vocabulary, so its
# ~50 M parameters are decoder and vision blocks (where CPU arithmetic goes); "3b" and "7b" copy
# Qwen2.5-VL-3B/7B-Instruct's published dimensions, including the 151,936-row vocabulary, so that the
# LM head and log-softmax cost what they cost on the real model (ids past the tokenizer decode to "").
MODEL_CONFIGS = {
    "50m": dict(
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12], rope_theta=10000.0, vocab_size=None,
                  tie_word_embeddings=False),
        vision=dict(depth=8, hidden_size=384, intermediate_size=1536, num_heads=6, out_hidden_size=512,
                    fullatt_block_indexes=[3, 7])),
    "3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, mrope_section=[16, 24, 24], rope_theta=1000000.0, vocab_size=151936,
                  tie_word_embeddings=True),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    fullatt_block_indexes=[7, 15, 23, 31])),
    "7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, mrope_section=[16, 24, 24], rope_theta=1000000.0, vocab_size=152064,
                  tie_word_embeddings=False),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    fullatt_block_indexes=[7, 15, 23, 31])),
}


def random_model(name: str, processor, seed: int):
    """A Qwen2.5-VL with random weights and the dimensions of ``MODEL_CONFIGS[name]`` ("tiny": tiny.py's)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from grpo_min import tiny

    if name == "tiny":
        return tiny.build_model(processor, seed)
    dims = MODEL_CONFIGS[name]
    text, vision = dict(dims["text"]), dims["vision"]
    tok = processor.tokenizer
    tid = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=text.pop("vocab_size") or len(tok), max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                                          "mrope_section": text.pop("mrope_section")},
                         bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"),
                         pad_token_id=tok.pad_token_id, **text),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, **vision),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # Both end-of-turn tokens, as the tiny model (and Qwen's checkpoints) list them: TRL stops where the
    # model's generation_config says, grpo_min where special_token_ids says; they must agree.
    model.generation_config.eos_token_id = [tid("<|im_end|>"), tid("<|endoftext|>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def load_models(args, device, dtype):
    """(policy, reference or None, processor) from ``--model PATH`` or ``--model-config NAME``."""
    if args.model:
        policy, processor, _ = load_model(args.model, dtype=dtype, device=device)
        reference = load_reference(args.model, dtype=dtype, device=device) if args.beta > 0 else None
    else:
        from grpo_min import tiny

        processor = tiny.build_processor()
        with torch.device(device):  # draw the weights where they will live (a 7B model is slow to build in RAM)
            policy = random_model(args.model_config, processor, args.seed).to(dtype)
        reference = copy.deepcopy(policy).eval().requires_grad_(False) if args.beta > 0 else None
    # An S x S image must reach the vision tower unresized: widen the processor's pixel limits to S*S.
    size = dict(processor.image_processor.size)
    area = args.image_size ** 2
    size["shortest_edge"] = min(size.get("shortest_edge", area), area)
    size["longest_edge"] = max(size.get("longest_edge", area), area)
    processor.image_processor.size = size
    return policy.train(), reference, processor


def synthetic_image(size: int, seed: int) -> Image.Image:
    """A deterministic S x S RGB image (smooth gradient plus noise; its content does not matter)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
    noise = rng.normal(0, 40, (size, size, 3))
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))


class PhaseTimer:
    """Wall time per phase; on a GPU it waits for queued kernels before reading the clock."""

    def __init__(self, device):
        self.device, self.seconds = device, {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, phase: str):
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def grpo_step(args, policy, reference, processor, optimizer, scheduler, images, targets, device):
    """One GRPO step as train.py runs it (one micro-batch, mu = 1). Returns (phase seconds, tokens)."""
    timer = PhaseTimer(device)
    amp = lambda: compute_precision(device, args.compute_dtype)  # noqa: E731  float32 weights, as in train.py
    G = args.num_generations
    never_ids = special_token_ids(processor)["never"]
    with timer("encode"):
        prompts = encode_prompts(processor, images, [PHRASES[0]] * len(images),  # one text, as scripts/trl_driver.py
                                 CHAIN_OF_BOX, device=device)
    with timer("generate"), amp():
        rollout = generate_completions(policy, processor, prompts, num_generations=G,
                                       max_new_tokens=args.max_completion_length, temperature=args.temperature)
    with timer("rewards"):
        scores = R.score_completions(rollout.texts, targets, R.RewardConfig())
        advantages = group_advantages(scores.total, G).to(device)  # (B*G,)
    args_logps = (prompts, rollout.completion_ids, rollout.completion_mask)
    kw = dict(group_size=G, temperature=args.temperature, never_ids=never_ids, encode_image_once=not args.no_image_once)
    ref_logps = None
    if reference is not None:  # beta = 0 loads no reference and skips this pass
        with timer("reference"), torch.no_grad(), amp():
            ref_logps = completion_logps(reference, *args_logps, **kw)  # (B*G, T)
    with timer("policy"):
        with amp():
            logps = completion_logps(policy, *args_logps, **kw)  # (B*G, T)
        # mu = 1: the sampling policy is the current one, so old log-probs are logps.detach() (no pass).
        loss, _ = grpo_loss(logps, logps.detach(), advantages, rollout.completion_mask, ref_logps=ref_logps,
                            beta=args.beta, loss_type="grpo", max_completion_length=args.max_completion_length)
        loss.backward()
    with timer("optimizer"):
        torch.nn.utils.clip_grad_norm_(policy.parameters(), Config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return timer.seconds, int(rollout.completion_mask.sum().item())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="a Qwen2.5-VL / Qwen2-VL folder (save_pretrained)")
    which.add_argument("--model-config", choices=("tiny", *MODEL_CONFIGS), default=None,
                       help="random weights from a named config (default: tiny when --model is not given)")
    p.add_argument("--image-size", type=int, default=224,
                   help="S: the synthetic image is S x S pixels (a multiple of 28)")
    p.add_argument("--num-generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--max-completion-length", type=int, default=32, help="longest completion, in tokens")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight; 0 loads no reference and skips its pass")
    p.add_argument("--steps", type=int, default=6, help="GRPO steps to run; the first is warm-up and not counted")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per step (each its own image)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute precision, as train.py's --dtype: auto (bfloat16 on GPU, float32 on CPU); weights and "
                        "optimizer state stay float32")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--learning-rate", type=float, default=1e-6, help="AdamW learning rate")
    p.add_argument("--optim", default="adamw_torch_fused", choices=("adamw_torch_fused", "adamw_torch"),
                   help="AdamW implementation, as train.py's --optim")
    p.add_argument("--seed", type=int, default=0, help="seed for the random model, the image and sampling")
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
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.compute_dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    policy, reference, processor = load_models(args, device, torch.float32)
    optimizer, scheduler = make_optimizer(policy, Config(learning_rate=args.learning_rate, optim=args.optim), args.steps)
    S, G = args.image_size, args.num_generations
    images = [synthetic_image(S, args.seed + i) for i in range(args.batch_size)]
    box = (S // 4, S // 4, S // 2, S // 2)  # any box: the reward's cost does not depend on it
    targets = [R.Target(box=box, orig_size=(S, S), resized_size=(S, S)) for _ in images for _ in range(G)]
    check = encode_prompts(processor, images[:1], PHRASES[:1], CHAIN_OF_BOX)
    if check.resized_sizes[0] != (S, S):
        raise SystemExit(f"the processor resized the {S} px image to {check.resized_sizes[0]}")
    visual_tokens = int(check.inputs["image_grid_thw"].prod(-1).item()) // 4
    n_params = sum(p.numel() for p in policy.parameters())
    source = args.model or f"random {args.model_config}"
    print(f"{source}: {n_params / 1e6:.2f} M parameters, {dtype}, {device}; {args.batch_size} prompt(s) x {G} "
          f"completions, image {S} px ({visual_tokens} visual tokens), prompt {check.inputs['input_ids'].shape[1]} "
          f"tokens, max completion {args.max_completion_length}, beta {args.beta}, "
          f"scoring: {'plain path' if args.no_image_once else 'prompt and image once per group'}", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    steps = []  # (phase seconds, completion tokens) of each step
    for step in range(args.steps):
        seconds, tokens = grpo_step(args, policy, reference, processor, optimizer, scheduler, images, targets, device)
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
        "model": source, "parameters_m": round(n_params / 1e6, 2), "image_size": S, "visual_tokens": visual_tokens,
        "num_generations": G, "batch_size": args.batch_size, "max_completion_length": args.max_completion_length,
        "beta": args.beta, "dtype": str(dtype).replace("torch.", ""), "device": device.type,
        "image_once": not args.no_image_once, "fused_adamw": bool(optimizer.defaults.get("fused")),
        "measured_steps": len(measured),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
