"""grpo_min against TRL at Qwen2.5-VL-3B's dimensions, LoRA, with and without gradient checkpointing.

    .venv/bin/python scripts/bench_real_size.py        # the README's real-size table (CPU: about 23 GB, 1 hour)
    .venv/bin/python scripts/bench_real_size.py --model 34m --shapes 2x8 8x8 --steps 2   # a quick check

For each shape G x T (G completions of at most T tokens for one prompt) it runs four processes, one
after the other, each fresh (peak memory is a process-lifetime number): grpo_min (``scripts/bench.py``)
and TRL's GRPOTrainer (``scripts/trl_driver.py``, in its own venv: ``--trl-python``, set up with
requirements-dev-trl.txt), each without and with gradient checkpointing. The work is the same in all:
a random Qwen2.5-VL with the dimensions of ``--model`` (default ``3b``: Qwen2.5-VL-3B-Instruct's, 3.75 B
parameters; grpo_min.tiny.MODEL_CONFIGS) saved once as a folder that both load, LoRA r ``--lora-r``
(alpha 2 r) on the language model's projections over a frozen base stored in bfloat16 and computing in
bfloat16, the reference being the base, a ``--image-size`` px synthetic image and the Chain-of-Box
prompt text of scripts/bench.py, beta 0.04, loss "grpo", AdamW; the first step is warm-up.

It prints seconds per step and peak memory side by side (on CPU the peak resident memory, on a GPU the
peak allocated by torch), then grpo_min's scoring passes: the reference pass (no gradients: the same
with checkpointing) and the policy's forward and backward. An out-of-memory is a result: on CPU a
process whose resident memory passes ``--memory-limit-gb`` (default: 90% of the machine's) is stopped
and reported so, as is one the kernel kills; on a GPU, torch's OutOfMemoryError. Raw JSON lines and
logs go to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import PHRASES, synthetic_image  # noqa: E402  (scripts/bench.py)
from bench_vs_trl import model_folder  # noqa: E402
from grpo_min.prompts import CHAIN_OF_BOX, render_question  # noqa: E402
from grpo_min.tiny import MODEL_CONFIGS  # noqa: E402

BETA = 0.04
SIDES = {  # column -> (trainer, gradient checkpointing)
    "grpo_min": ("ours", False), "grpo_min --gradient-checkpointing": ("ours", True),
    "TRL": ("trl", False), "TRL, gradient checkpointing": ("trl", True)}


def rss_mb(pid: int) -> float:
    """A live process's resident memory (Linux), 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)


def run_watched(cmd: list[str], env: dict, log, timeout: int, memory_limit_mb: float | None):
    """Run one benchmark process: (its last stdout line's JSON, None), or (None, what stopped it)."""
    t0, stopped = time.time(), None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            if memory_limit_mb and rss_mb(proc.pid) > memory_limit_mb:
                stopped = f"out of memory (stopped above {memory_limit_mb / 1024:.1f} GB)"
            elif time.time() - t0 > timeout:
                stopped = f"timed out after {timeout} s"
            if stopped:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.5)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    log.write(f"$ {' '.join(cmd)}\n{stdout}\n{stderr[-3000:]}\n")
    log.flush()
    if stopped is None and proc.returncode != 0:
        stopped = ("out of memory" if "OutOfMemoryError" in stderr or "out of memory" in stderr.lower()
                   else "killed by the system (out of memory?)" if proc.returncode == -9
                   else f"failed ({proc.returncode}): {stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
    if stopped:
        print(f"  {stopped}: {' '.join(cmd)}", flush=True)
        return None, stopped
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.time() - t0, 1)
    return result, None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="3b", choices=tuple(MODEL_CONFIGS), help="random model of these dimensions")
    p.add_argument("--shapes", nargs="+", default=["2x16", "8x16", "8x64"],
                   help="G x T: completions per prompt x completion tokens (random models never stop early)")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES), metavar="SIDE",
                   help=f"columns to run (default all: {', '.join(SIDES)})")
    p.add_argument("--lora-r", type=int, default=64, help="LoRA rank (alpha 2 r) on a frozen bfloat16 base")
    p.add_argument("--image-size", type=int, default=224, help="S: the synthetic image is S x S pixels")
    p.add_argument("--steps", type=int, default=3, help="GRPO steps per run, the first is warm-up")
    p.add_argument("--runs", type=int, default=1, help="runs of each column per shape (the table shows medians)")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="CPU: stop a run whose resident memory passes this (default: 90%% of the machine's)")
    p.add_argument("--timeout", type=int, default=7200, help="seconds allowed to one run")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: torch's own)")
    p.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_real_size"), help="raw results and logs go here")
    args = p.parse_args()

    on_gpu = torch.cuda.is_available()
    memory = "peak_gpu_mb" if on_gpu else "peak_rss_mb"
    limit_gb = None if on_gpu else args.memory_limit_gb or 0.9 * os.sysconf("SC_PHYS_PAGES") * os.sysconf(
        "SC_PAGE_SIZE") / 2 ** 30
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"{started}, {platform.node()}, {os.cpu_count()} cores, load average {os.getloadavg()}"
          + (f", GPU {torch.cuda.get_device_name()}" if on_gpu else f", memory limit per run {limit_gb:.1f} GB"))
    folder = model_folder(args.model, dtype="bfloat16")  # both load the same folder; LoRA keeps the base in bf16
    image = out / f"image{args.image_size}.png"
    synthetic_image(args.image_size, seed=0).save(image)  # the very image scripts/bench.py draws (PNG: lossless)
    prompt = render_question(PHRASES[0], CHAIN_OF_BOX)  # the text scripts/bench.py renders for its prompt
    log = open(out / "log.txt", "w")
    cells = {}  # (shape, column) -> list of results, or the reason none came
    for shape in args.shapes:
        G, T = (int(n) for n in shape.lower().split("x"))
        common = ["--model", str(folder), "--num-generations", str(G), "--max-completion-length", str(T),
                  "--beta", str(BETA), "--steps", str(args.steps), "--dtype", "bfloat16", "--lora-r", str(args.lora_r)]
        for run in range(args.runs):
            for column in args.sides:
                who, checkpointing = SIDES[column]
                cmd = ([sys.executable, "scripts/bench.py", *common, "--image-size", str(args.image_size)]
                       if who == "ours" else
                       [args.trl_python, "scripts/trl_driver.py", *common, "--image", str(image), "--prompt", prompt])
                cmd += ["--gradient-checkpointing"] if checkpointing else []
                result, stopped = run_watched(cmd, env, log, args.timeout, limit_gb and limit_gb * 1024)
                cells.setdefault((shape, column), [])
                if result is None:
                    cells[(shape, column)] = stopped
                    continue
                if isinstance(cells[(shape, column)], list):
                    cells[(shape, column)].append(result)
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps({"shape": shape, "column": column, **result}) + "\n")
                print(f"{shape} {column}: {result['seconds_per_step']:.1f} s/step, peak {result[memory] / 1024:.1f} GB"
                      + (f", reference {result['reference_s']:.1f} s, policy {result['policy_s']:.1f} s"
                         if who == "ours" else ""), flush=True)

    def med(shape, column, key):
        cell = cells.get((shape, column))
        return statistics.median(r[key] for r in cell) if isinstance(cell, list) and cell else None

    def show(shape, column):
        cell = cells.get((shape, column))
        if not isinstance(cell, list):
            return cell or ""
        return f"{med(shape, column, 'seconds_per_step'):.1f} s, {med(shape, column, memory) / 1024:.1f} GB"

    print(f"\n{args.model} dimensions, LoRA r {args.lora_r} on a bfloat16 base, {args.image_size} px, beta {BETA}, "
          f"{'peak GPU memory' if on_gpu else 'peak RSS'}; {started} to {time.strftime('%H:%M')}, load average "
          f"at the end {os.getloadavg()}\n")
    print("| G x completion tokens | " + " | ".join(args.sides) + " |")
    print("|---" * (len(args.sides) + 1) + "|")
    for shape in args.shapes:
        print(f"| {shape.replace('x', ' x ')} | " + " | ".join(show(shape, c) for c in args.sides) + " |")
    ours = [c for c in args.sides if SIDES[c][0] == "ours"]
    if ours:
        print("\ngrpo_min's phases, median seconds per step:\n")
        print("| G x completion tokens | " + " | ".join(f"{c}: generate / reference / policy fwd + bwd" for c in ours)
              + " |")
        print("|---" * (len(ours) + 1) + "|")
        for shape in args.shapes:
            parts = [" / ".join(f"{med(shape, c, k):.2f}" for k in ("generate_s", "reference_s", "policy_s"))
                     if med(shape, c, "policy_s") is not None else show(shape, c) for c in ours]
            print(f"| {shape.replace('x', ' x ')} | " + " | ".join(parts) + " |")


if __name__ == "__main__":
    main()
