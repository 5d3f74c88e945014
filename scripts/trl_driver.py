"""TRL's GRPOTrainer on the benchmark's workload; prints one JSON line (for scripts/bench_vs_trl.py).

Run with the TRL venv (requirements-dev-trl.txt), never the project's; the project never imports trl:

    .venv-trl/bin/python scripts/trl_driver.py --model FOLDER --image IMG.png --prompt "..." --steps 6

The work per step is the benchmark's (scripts/bench.py): ``--batch-size`` prompts (default 1; prompt
i uses the i-th ``--image``, the same text, every step) x G sampled completions of at most L tokens,
in ``--dtype`` (fp32 by default; bfloat16 computes in bf16 under autocast over float32 weights, as
scripts/bench.py and train.py do), beta
as given, loss "grpo", one update per generation, AdamW at 1e-6 with gradient clipping at 1.0. Settings that would make TRL do *more*
work than grpo_min are turned off unless asked for: gradient checkpointing (GRPOConfig defaults it on;
``--gradient-checkpointing``), bf16 (on by default), and the bias-corrected KL (plain k3, as in
docs/METHOD.md). The same tokens are suppressed when sampling as in grpo_min (image/video/vision
placeholders). ``--lora-r R``: peft LoRA adapters (alpha 2 R, no dropout) on the language model's
q/k/v/o and gate/up/down projections, the vision tower excluded, as ``train.py --lora-r R``; the frozen
base is stored in ``--dtype`` (bfloat16 in the real-size benchmark), the reference is the base (TRL
switches the adapters off), as in grpo_min.

A step is timed from the trainer's ``on_step_begin`` to its ``on_step_end`` callback: generation,
rewards, reference and policy passes, backward and the optimizer step; the data loader and logging
fall outside (in TRL's favour). Completion tokens are counted by the reward function from the
``completion_ids`` TRL passes (up to and including the first EOS, as grpo_min counts them).
"""
import argparse
import json
import re
import resource
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoProcessor, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Qwen2.5-VL folder (save_pretrained)")
    p.add_argument("--image", required=True, nargs="+", help="the S x S image(s) (PNG), one per prompt")
    p.add_argument("--prompt", required=True, help="the user turn's text (the image goes before it)")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--steps", type=int, default=6, help="steps to run; the first is warm-up and not counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="prompts per step")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--lora-r", type=int, default=0, help="peft LoRA rank (alpha 2 r; 0: full fine-tuning)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default, off unless given")
    args = p.parse_args()

    images = [Image.open(path).convert("RGB") for path in args.image]
    if len(images) < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} needs as many --image files (got {len(images)})")
    image, B = images[0], args.batch_size
    S = image.size[0]
    processor = AutoProcessor.from_pretrained(args.model)
    size = dict(processor.image_processor.size)  # as scripts/bench.py: the S x S image stays unresized
    size["shortest_edge"] = min(size.get("shortest_edge", S * S), S * S)
    size["longest_edge"] = max(size.get("longest_edge", S * S), S * S)
    processor.image_processor.size = size
    never = [i for i in processor.tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"])
        if i is not None and i != processor.tokenizer.unk_token_id]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.prompt}]}]
    check = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    grid = check["image_grid_thw"].tolist()[0]
    assert grid[1] * 14 == S and grid[2] * 14 == S, f"the processor resized the image: grid {grid}"

    # B prompts per step (generation batch = B x G rows), the same B prompts every step.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": args.prompt}], "image": images[i]}
                                 for _ in range(args.steps) for i in range(B)])

    tokens_per_step = []
    box = (S // 4, S // 4, S // 2, S // 2)

    def box_reward(completions, completion_ids, **kwargs):
        """IoU of the first four integers of each completion with a fixed box (0 if there are none)."""
        tokens_per_step.append(sum(len(ids) for ids in completion_ids))
        out = []
        for c in completions:
            text = c[0]["content"] if isinstance(c, list) else c
            nums = [int(n) for n in re.findall(r"\d+", text)[:4]]
            if len(nums) < 4 or nums[2] <= nums[0] or nums[3] <= nums[1]:
                out.append(0.0)
                continue
            ix = max(0, min(nums[2], box[2]) - max(nums[0], box[0]))
            iy = max(0, min(nums[3], box[3]) - max(nums[1], box[1]))
            inter = ix * iy
            union = (nums[2] - nums[0]) * (nums[3] - nums[1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
            out.append(inter / union)
        return out

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.seconds.append(time.perf_counter() - self.t0)

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"), report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=args.seed, max_steps=args.steps,
        per_device_train_batch_size=B * args.num_generations, num_generations=args.num_generations,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.max_completion_length, temperature=1.0, top_k=0, top_p=1.0,
        beta=args.beta, loss_type="grpo", use_bias_correction_kl=False, scale_rewards="group",
        learning_rate=1e-6, max_grad_norm=1.0, bf16=args.dtype == "bfloat16", fp16=False,
        gradient_checkpointing=args.gradient_checkpointing, use_vllm=False, log_completions=False,
        model_init_kwargs={"dtype": args.dtype if args.lora_r else "float32"},  # a LoRA base is frozen: stored as is
        generation_kwargs={"suppress_tokens": never}, dataloader_pin_memory=False,
    )
    timer = StepTimer()
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], exclude_modules=r".*\.visual\..*", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=args.model, reward_funcs=box_reward, args=config, train_dataset=dataset,
                          processing_class=processor, callbacks=[timer], peft_config=peft_config)

    # Time the generate calls too (TRL's generation phase), by wrapping the policy's generate.
    generate_seconds, plain_generate = [], trainer.model.generate

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        out = plain_generate(*a, **k)
        generate_seconds.append(time.perf_counter() - t0)
        return out

    trainer.model.generate = timed_generate
    trainer.train()

    seconds, tokens, gen = timer.seconds[1:], tokens_per_step[1:], generate_seconds[1:]
    result = {
        "seconds_per_step": round(statistics.median(seconds), 4),
        "completion_tokens_per_s": round(sum(tokens) / sum(seconds), 2),
        "completion_tokens_per_step": round(sum(tokens) / len(tokens), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KB on Linux
        "generate_s": round(statistics.median(gen), 4),
        "step_over_generate": round(statistics.median(seconds) / statistics.median(gen), 3),
        "prompt_tokens": len(check["input_ids"][0]), "image_size": S, "measured_steps": len(seconds),
        "num_generations": args.num_generations, "max_completion_length": args.max_completion_length,
        "beta": args.beta, "batch_size": B, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
        "lora_r": args.lora_r, "gradient_checkpointing": args.gradient_checkpointing,
        "trained_parameters_m": round(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) / 1e6, 3),
    }
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
