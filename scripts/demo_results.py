"""The demo's results over seeds and reward variants: runs train.py, then prints the README's tables.

    python scripts/demo_results.py                                  # the default, seeds 0 1 2
    python scripts/demo_results.py --variants hard semantic iou --seeds 0 1 --parallel 2   # the reward-variant table

Each run is ``python train.py --seed S --output-dir runs/demo/<variant>-seed<S> <variant's options>``
(the embedded default otherwise: the tiny model, its warm start for that seed, the demo preset), and
its ``summary.json`` holds greedy test Acc@0.5 / mIoU before and after GRPO. A run whose summary
exists is not run again, and an interrupted one resumes from its checkpoint, so the script can be
interrupted and restarted. ``--parallel N`` runs N at
once with ``OMP_NUM_THREADS`` = cores / N each (use it for results, not for timings).

Variants ("semantic" is what ``python train.py`` runs):
  hard      format + hard spatial reward (IoU > 0.5)            --semantic-model none
  semantic  format + hard spatial + semantic consistency        (the default)
  iou       format + continuous IoU spatial reward              --semantic-model none --spatial-reward iou
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "hard": ["--semantic-model", "none"],
    "semantic": [],
    "iou": ["--semantic-model", "none", "--spatial-reward", "iou"],
}
LABELS = {"hard": "(a) format + hard spatial", "semantic": "(b) + semantic (the default)",
          "iou": "(c) format + continuous IoU"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["semantic"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=1, help="runs at once (each gets cores / N threads)")
    p.add_argument("--out", default=str(ROOT / "runs" / "demo"))
    args = p.parse_args()

    out = Path(args.out)
    runs = [(v, s, out / f"{v}-seed{s}") for v in args.variants for s in args.seeds]
    todo = [r for r in runs if not (r[2] / "summary.json").exists()]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.parallel)))
    running = []
    while todo or running:
        while todo and len(running) < args.parallel:
            variant, seed, folder = todo.pop(0)
            folder.mkdir(parents=True, exist_ok=True)
            # --resume auto: a run stopped by Ctrl-C left a checkpoint (train.py saves one on SIGINT): go on from
            # it; --overwrite: a run killed without one starts over
            cmd = [sys.executable, "train.py", "--seed", str(seed), "--output-dir", str(folder), "--resume", "auto",
                   "--overwrite", *VARIANTS[variant]]
            print(f"start {variant} seed {seed}: {' '.join(cmd)}", flush=True)
            log = open(folder / "train.log", "w")
            running.append((variant, seed, folder, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                                                    stderr=subprocess.STDOUT)))
        time.sleep(5)
        for job in [j for j in running if j[3].poll() is not None]:
            running.remove(job)
            variant, seed, folder, proc = job
            status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}), see {folder / 'train.log'}"
            print(f"{variant} seed {seed}: {status}", flush=True)

    print("\n| rewards | seed | test Acc@0.5 before -> after | mIoU before -> after | "
          "parse failures before -> after | wall |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants:
        gains = []
        for seed in args.seeds:
            path = out / f"{variant}-seed{seed}" / "summary.json"
            if not path.exists():
                print(f"| {LABELS[variant]} | {seed} | (no summary) | | | |")
                continue
            s = json.loads(path.read_text())
            b, a = s["before"], s["after"]
            gains.append((a["acc@0.5"] - b["acc@0.5"], a["miou"] - b["miou"]))
            print(f"| {LABELS[variant]} | {seed} | {b['acc@0.5']:.2f} -> {a['acc@0.5']:.2f} "
                  f"({a['acc@0.5'] - b['acc@0.5']:+.2f}) | {b['miou']:.2f} -> {a['miou']:.2f} "
                  f"({a['miou'] - b['miou']:+.2f}) | {b['parse_failures']} -> {a['parse_failures']} | "
                  f"{s['wall_s']:.0f} s |")
        if len(gains) > 1:
            acc, miou = zip(*gains)
            print(f"| {LABELS[variant]} | mean (min, max) | **{statistics.mean(acc):+.2f}** ({min(acc):+.2f}, "
                  f"{max(acc):+.2f}) | **{statistics.mean(miou):+.2f}** ({min(miou):+.2f}, {max(miou):+.2f}) | | |")


if __name__ == "__main__":
    main()
