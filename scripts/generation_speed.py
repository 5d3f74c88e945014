"""Sampling speed: grpo_min's decoding loop against plain HF ``generate``, per generated token.

    .venv/bin/python scripts/generation_speed.py                       # 34 M model at 224 px, tiny at 112/224/448
    .venv/bin/python scripts/generation_speed.py --models tiny --sizes 224 --runs 3 --threads 1

Both sample G completions of one prompt (one S x S synthetic image, unresized) from the same
random-weight model, in the same process, alternately (ours, HF, ours, HF, ...), after one warm-up
call each, and the table gives the median over the runs:

* ours: ``grpo_min.rollout.generate_completions``: the prompt and its image once, the KV cache
  repeated G times, then one token per step for the G rows;
* HF: ``model.generate(num_return_sequences=G, do_sample=True, top_k=0, top_p=1.0)`` with the same
  EOS, padding and suppressed tokens (the call grpo_min made before): it copies the prompt G times
  before its first forward.

A random model rarely emits EOS, and both stop only when all G rows have: the table gives the
steps each took. "Per token" is the call's wall time divided by the G x steps tokens it produced.
Each run also times the prefill alone (a call for 1 token, which takes no decoding step), so that
"ms / decoding step" is (median call - median prefill) / (steps - 1).
Models (``grpo_min.tiny.random_model``): "34m", random weights with Qwen2.5-VL's layout (text hidden
512, 8 layers, 8 heads, 2 KV heads, MLP 1024; vision hidden 384, depth 8, 6 heads, MLP 768); "50m",
the same with MLPs of 2048 and 1536; "tiny", grpo_min.tiny's (random, not warm-started); all with the
tiny model's tokenizer (a few hundred tokens). See ``grpo_min.tiny.MODEL_CONFIGS``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from grpo_min import tiny  # noqa: E402
from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts, special_token_ids  # noqa: E402
from grpo_min.rollout import generate_completions  # noqa: E402

PHRASE = "small left apical pneumothorax"


def synthetic_image(size: int, seed: int = 0) -> Image.Image:
    """An S x S RGB picture (a gradient plus noise; its content does not matter here)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
    return Image.fromarray(np.clip(ramp + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8))


def timed(fn) -> tuple[float, int]:
    """(seconds, decoding steps) of one sampling call."""
    t0 = time.perf_counter()
    steps = fn()
    return time.perf_counter() - t0, steps


def measure(model, processor, size: int, G: int, T: int, runs: int) -> dict:
    prompts = encode_prompts(processor, [synthetic_image(size)], [PHRASE], CHAIN_OF_BOX)
    if prompts.resized_sizes[0] != (size, size):
        raise SystemExit(f"the processor resized the {size} px image to {prompts.resized_sizes[0]}")
    ids = special_token_ids(processor)
    P = prompts.inputs["input_ids"].shape[1]

    def ours(tokens):
        out = generate_completions(model, processor, prompts, num_generations=G, max_new_tokens=tokens)
        return out.completion_ids.shape[1]

    def hf(tokens):
        config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=tokens,
                                  num_return_sequences=G, eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                                  suppress_tokens=ids["never"])
        with torch.no_grad():
            return model.generate(**prompts.inputs, generation_config=config).shape[1] - P

    # The whole call (T tokens), and the prefill alone (1 token: no decoding step), alternately.
    calls = [(who, tokens) for tokens in (T, 1) for who in ("ours", "hf")]
    run_one = {"ours": ours, "hf": hf}
    samples = {call: [] for call in calls}
    torch.manual_seed(0)
    ours(T), hf(T)  # warm-up
    for run in range(runs):
        for who, tokens in calls if run % 2 == 0 else calls[::-1]:
            samples[who, tokens].append(timed(lambda: run_one[who](tokens)))
    row = {"image_size": size, "prompt_tokens": P, "visual_tokens": int(prompts.inputs["image_grid_thw"].prod()) // 4,
           "num_generations": G, "max_new_tokens": T, "runs": runs}
    for who in run_one:
        got, prefill = samples[who, T], statistics.median(s for s, _ in samples[who, 1])
        row[f"{who}_s"] = statistics.median(s for s, _ in got)
        row[f"{who}_ms_per_token"] = statistics.median(1000 * s / (G * steps) for s, steps in got)
        row[f"{who}_steps"] = sorted({steps for _, steps in got})
        row[f"{who}_prefill_s"] = prefill
        steps = statistics.median(steps for _, steps in got)
        row[f"{who}_ms_per_step"] = 1000 * (row[f"{who}_s"] - prefill) / (steps - 1) if steps > 1 else float("nan")
    row["ratio"] = row["ours_ms_per_token"] / row["hf_ms_per_token"]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["34m", "tiny"], choices=list(tiny.MODEL_CONFIGS))
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help="image sizes in pixels, multiples of 28 (default: 112 224 448 for tiny, 224 for the others)")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=5, help="timed calls of each, alternating; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1]
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.node()}, CPU {cpu.strip() or platform.processor()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}",
          flush=True)
    processor = tiny.build_processor()
    widest = max(args.sizes or [448]) ** 2
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": widest}  # S x S stays unresized
    rows = []
    for name in args.models:
        model = tiny.random_model(name, processor, seed=0).eval()
        n_params = sum(q.numel() for q in model.parameters()) / 1e6
        for size in args.sizes or ([112, 224, 448] if name == "tiny" else [224]):
            row = {"model": name, "parameters_m": round(n_params, 2),
                   **measure(model, processor, size, args.num_generations, args.max_new_tokens, args.runs)}
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print("\n| model | image | prompt tokens | ours s | HF s | ours ms / token | HF ms / token | ours / HF | steps "
          "| prefill s, ours / HF | ms / decoding step, ours / HF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']}, {r['parameters_m']:.2f} M | {r['image_size']} px | {r['prompt_tokens']} | "
              f"{r['ours_s']:.3f} | {r['hf_s']:.3f} | {r['ours_ms_per_token']:.2f} | {r['hf_ms_per_token']:.2f} | "
              f"**{r['ratio']:.2f}x** | {r['ours_steps']} / {r['hf_steps']} | "
              f"{r['ours_prefill_s']:.3f} / {r['hf_prefill_s']:.3f} | "
              f"{r['ours_ms_per_step']:.2f} / {r['hf_ms_per_step']:.2f} |")


if __name__ == "__main__":
    main()
