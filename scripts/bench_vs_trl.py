"""grpo_min against TRL's GRPOTrainer, same work, side by side; prints a markdown table.

    .venv/bin/python scripts/bench_vs_trl.py                    # tiny and 34m models, 112/224/448 px, 3 runs
    .venv/bin/python scripts/bench_vs_trl.py --models tiny --sizes 224 --runs 1   # a quick look
    # on a GPU (one python with both stacks; see scripts/gpu_check.sh):
    python3 scripts/bench_vs_trl.py --models 3b --dtype bfloat16 --max-completion-length 256 \
        --batch-sizes 1 4 --sizes 448 --runs 1 --steps 3 --trl-python python3

Run with the project's venv. TRL runs in its own venv (``--trl-python``, default .venv-trl/bin/python,
set up with requirements-dev-trl.txt) through scripts/trl_driver.py; nothing here imports trl.

For each model, a folder is written once with ``save_pretrained`` (model and processor) and both
trainers load that same folder: ``tiny`` is grpo_min.tiny's model with random weights, ``34m`` and
``50m`` the random models of those sizes in grpo_min.tiny.MODEL_CONFIGS. Then for each image size, ours
(``python scripts/bench.py``) and TRL's (scripts/trl_driver.py) run alternately, A B A B A B, each in
a fresh process (peak RSS is a process-lifetime number), so that a change in the machine's load
hits both alike. Same settings in both: 1 prompt x 8 completions per step, at most 32 completion
tokens, beta 0.04, loss "grpo", fp32, the same image and prompt text; the first step of each run is
warm-up. The table reports medians over the runs and the ratios ours / TRL. On a GPU the memory
compared is the peak allocated by torch on the device (``peak_gpu_mb``), not the process's RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import PHRASES, synthetic_image  # noqa: E402  (scripts/bench.py)
from grpo_min.prompts import CHAIN_OF_BOX, render_question  # noqa: E402
from grpo_min.tiny import MODEL_CONFIGS, RECIPE_VERSION, build_processor, cached_build, random_model  # noqa: E402

G, L, BETA = 8, 32, 0.04


def model_folder(name: str, seed: int = 0, dtype: str = "float32") -> Path:
    """The random-weight model ``name`` saved as a Qwen2.5-VL folder (built once, then reused; the folder
    name hashes what it is built from, and it is written atomically, like the demo model)."""
    recipe = dict(kind="bench", name=name, dims=MODEL_CONFIGS.get(name), seed=seed, dtype=dtype,
                  tiny_version=RECIPE_VERSION, version=2)

    def build():
        processor = build_processor()
        processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}  # 112-448 px unresized
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 3B model is slow to draw on a CPU
            model = random_model(name, processor, seed).to(getattr(torch, dtype))
        return model, processor

    return cached_build(f"bench-{name}-seed{seed}-{dtype}", recipe, build)


def run_json(cmd: list[str], env: dict, log, timeout: int = 3600) -> dict:
    """Run one benchmark process; its last stdout line is a JSON object (None if it failed: the other runs go on)."""
    t0 = time.time()
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout} s: {' '.join(cmd)}", flush=True)
        return None
    log.write(f"$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr[-3000:]}\n")
    log.flush()
    if result.returncode != 0:
        print(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}", flush=True)
        return None
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "34m"], choices=["tiny", "34m", "50m", "3b", "7b"])
    p.add_argument("--sizes", nargs="+", type=int, default=[112, 224, 448], help="image sizes in pixels")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1], help="prompts per step (each its own image)")
    p.add_argument("--runs", type=int, default=3, help="runs of each trainer per configuration")
    p.add_argument("--steps", type=int, default=None,
                   help="GRPO steps per run, the first is warm-up (default: 8 for tiny, 4 for larger models)")
    p.add_argument("--max-completion-length", type=int, default=L, help="completion tokens (random models never stop)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed to one benchmark process")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: torch's own)")
    p.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_vs_trl"), help="raw results and logs go here")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    prompt = render_question(PHRASES[0], CHAIN_OF_BOX)  # the text scripts/bench.py renders for its one prompt
    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"{started}, {platform.node()}, {os.cpu_count()} cores, load average at start {os.getloadavg()}")
    log = open(out / "log.txt", "w")
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    memory = "peak_gpu_mb" if on_gpu else "peak_rss_mb"
    rows = []
    for name in args.models:
        folder = model_folder(name, dtype=args.dtype)
        steps = args.steps or (8 if name == "tiny" else 4)
        for size in args.sizes:
            for B in args.batch_sizes:
                images = [out / f"image{size}-{i}.png" for i in range(B)]
                for i, image in enumerate(images):  # the very images scripts/bench.py draws (PNG is lossless)
                    synthetic_image(size, seed=i).save(image)
                common = ["--model", str(folder), "--num-generations", str(G), "--max-completion-length",
                          str(args.max_completion_length), "--beta", str(BETA), "--steps", str(steps),
                          "--batch-size", str(B), "--dtype", args.dtype]
                ours_cmd = [sys.executable, "scripts/bench.py", *common, "--image-size", str(size)]
                trl_cmd = [args.trl_python, "scripts/trl_driver.py", *common, "--image", *map(str, images),
                           "--prompt", prompt]
                results = {"ours": [], "trl": []}
                for run in range(args.runs):  # A B A B A B
                    for who, cmd in (("ours", ours_cmd), ("trl", trl_cmd)):
                        r = run_json(cmd, env, log, args.timeout)
                        if r is None:
                            continue
                        results[who].append(r)
                        print(f"{name} {size} px x{B} run {run + 1} {who:>4}: {r['completion_tokens_per_s']:8.1f} "
                              f"tok/s, {r['seconds_per_step']:.3f} s/step, peak {r[memory]:.0f} MB, step/generate "
                              f"{r['step_over_generate']:.2f}, load {os.getloadavg()[0]:.2f}", flush=True)
                if not (results["ours"] and results["trl"]):
                    continue  # a side failed every run (printed above): no ratio for this row
                med = lambda who, key: statistics.median(r[key] for r in results[who])
                row = {"model": name, "image_size": size, "batch_size": B, "runs": args.runs, "memory": memory,
                       **{f"{who}_{key}": med(who, key) for who in ("ours", "trl")
                          for key in ("completion_tokens_per_s", memory, "seconds_per_step", "step_over_generate",
                                      "generate_s", "completion_tokens_per_step")},
                       "raw": results}
                row["speed_ratio"] = row["ours_completion_tokens_per_s"] / row["trl_completion_tokens_per_s"]
                row["memory_ratio"] = row[f"ours_{memory}"] / row[f"trl_{memory}"]
                rows.append(row)
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")

    print(f"\nload average at the end {os.getloadavg()}; {started} to {time.strftime('%H:%M')}\n")
    mem = "peak GPU MB" if on_gpu else "peak MB"
    print(f"| model | image | prompts | ours tok/s | TRL tok/s | ratio | ours {mem} | TRL {mem} | ratio | "
          "ours step / generate | TRL step / generate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['image_size']} px | {r['batch_size']} | {r['ours_completion_tokens_per_s']:.1f} | "
              f"{r['trl_completion_tokens_per_s']:.1f} | **{r['speed_ratio']:.2f}x** | {r[f'ours_{memory}']:.0f} | "
              f"{r[f'trl_{memory}']:.0f} | {r['memory_ratio']:.2f} | {r['ours_step_over_generate']:.2f} | "
              f"{r['trl_step_over_generate']:.2f} |")


if __name__ == "__main__":
    main()
