"""grpo_min against TRL's GRPOTrainer, same work, side by side (issue 7); prints a markdown table.

    .venv/bin/python scripts/bench_vs_trl.py                    # tiny and 50m models, 112/224/448 px, 3 runs
    .venv/bin/python scripts/bench_vs_trl.py --models tiny --sizes 224 --runs 1   # a quick look

Run with the project's venv. TRL runs in its own venv (``--trl-python``, default .venv-trl/bin/python,
set up with requirements-dev-trl.txt) through scripts/trl_driver.py; nothing here imports trl.

For each model, a folder is written once with ``save_pretrained`` (model and processor) and both
trainers load that same folder: ``tiny`` is grpo_min.tiny's model with random weights, ``50m`` the
~50 M-parameter random model of grpo_min.bench.MODEL_CONFIGS. Then for each image size, ours
(``python -m grpo_min.bench``) and TRL's (scripts/trl_driver.py) run alternately, A B A B A B, each in
a fresh process (peak RSS is a process-lifetime number), so that a change in the machine's load
hits both alike. Same settings in both: 1 prompt x 8 completions per step, at most 32 completion
tokens, beta 0.04, loss "grpo", fp32, the same image and prompt text; the first step of each run is
warm-up. The table reports medians over the runs and the ratios ours / TRL.
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

from grpo_min.bench import PHRASES, random_model, synthetic_image  # noqa: E402
from grpo_min.prompts import CHAIN_OF_BOX, render_question  # noqa: E402
from grpo_min.tiny import build_processor, cache_dir  # noqa: E402

G, L, BETA = 8, 32, 0.04


def model_folder(name: str, seed: int = 0) -> Path:
    """The random-weight model ``name`` saved as a Qwen2.5-VL folder (built once, then reused)."""
    path = cache_dir() / "bench" / f"{name}-seed{seed}"
    if (path / "config.json").exists():
        return path
    processor = build_processor()
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}  # 112 to 448 px unresized
    model = random_model(name, processor, seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def run_json(cmd: list[str], env: dict, log) -> dict:
    """Run one benchmark process; its last stdout line is a JSON object."""
    t0 = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    log.write(f"$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr[-3000:]}\n")
    log.flush()
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "50m"], choices=["tiny", "50m"])
    p.add_argument("--sizes", nargs="+", type=int, default=[112, 224, 448], help="image sizes in pixels")
    p.add_argument("--runs", type=int, default=3, help="runs of each trainer per configuration")
    p.add_argument("--steps", type=int, nargs=2, default=[8, 4], metavar=("TINY", "50M"),
                   help="GRPO steps per run (the first is warm-up) for the tiny and the 50m model")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: torch's own)")
    p.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_vs_trl"), help="raw results and logs go here")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    prompt = render_question(PHRASES[0], CHAIN_OF_BOX)  # the text grpo_min.bench renders for its one prompt
    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"{started}, {platform.node()}, {os.cpu_count()} cores, load average at start {os.getloadavg()}")
    log = open(out / "log.txt", "w")
    rows = []
    for name in args.models:
        folder = model_folder(name)
        steps = args.steps[0] if name == "tiny" else args.steps[1]
        for size in args.sizes:
            image = out / f"image{size}.png"
            synthetic_image(size, seed=0).save(image)  # the very image grpo_min.bench draws (PNG is lossless)
            common = ["--model", str(folder), "--num-generations", str(G), "--max-completion-length", str(L),
                      "--beta", str(BETA), "--steps", str(steps)]
            ours_cmd = [sys.executable, "-m", "grpo_min.bench", *common, "--image-size", str(size),
                        "--dtype", "float32"]
            trl_cmd = [args.trl_python, "scripts/trl_driver.py", *common, "--image", str(image), "--prompt", prompt]
            results = {"ours": [], "trl": []}
            for run in range(args.runs):  # A B A B A B
                for who, cmd in (("ours", ours_cmd), ("trl", trl_cmd)):
                    r = run_json(cmd, env, log)
                    results[who].append(r)
                    print(f"{name} {size} px run {run + 1} {who:>4}: {r['completion_tokens_per_s']:8.1f} tok/s, "
                          f"{r['seconds_per_step']:.3f} s/step, peak {r['peak_rss_mb']:.0f} MB, "
                          f"step/generate {r['step_over_generate']:.2f}, load {os.getloadavg()[0]:.2f}", flush=True)
            med = lambda who, key: statistics.median(r[key] for r in results[who])
            row = {"model": name, "image_size": size, "runs": args.runs,
                   **{f"{who}_{key}": med(who, key) for who in ("ours", "trl")
                      for key in ("completion_tokens_per_s", "peak_rss_mb", "seconds_per_step", "step_over_generate",
                                  "generate_s", "completion_tokens_per_step")},
                   "raw": results}
            row["speed_ratio"] = row["ours_completion_tokens_per_s"] / row["trl_completion_tokens_per_s"]
            row["memory_ratio"] = row["ours_peak_rss_mb"] / row["trl_peak_rss_mb"]
            rows.append(row)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    print(f"\nload average at the end {os.getloadavg()}; {started} to {time.strftime('%H:%M')}\n")
    print("| model | image | ours tok/s | TRL tok/s | ratio | ours peak MB | TRL peak MB | ratio | "
          "ours step / generate | TRL step / generate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['image_size']} px | {r['ours_completion_tokens_per_s']:.1f} | "
              f"{r['trl_completion_tokens_per_s']:.1f} | **{r['speed_ratio']:.2f}x** | {r['ours_peak_rss_mb']:.0f} | "
              f"{r['trl_peak_rss_mb']:.0f} | {r['memory_ratio']:.2f} | {r['ours_step_over_generate']:.2f} | "
              f"{r['trl_step_over_generate']:.2f} |")


if __name__ == "__main__":
    main()
