"""What the rewards (the semantic one included) cost inside the default training run.

    python scripts/reward_cost.py                 # 40 steps (20 rollouts) of `python train.py`, then one line
    python scripts/reward_cost.py --steps 100 -- --semantic-model none

Runs train.py in this process with ``rewards.score_completions`` wrapped by a timer, and prints the
mean seconds per rollout spent scoring (format, spatial and, when on, the semantic scorer's forwards)
against the mean rollout time without it. The first rollout is left out (warm-up). Measuring inside one
run avoids comparing two runs whose trajectories (and so completion lengths) differ.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewards as R  # noqa: E402
import train  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--output-dir", default="runs/reward_cost")
    p.add_argument("train_args", nargs="*", help="more train.py options (after --)")
    args = p.parse_args()
    spent, plain = [], R.score_completions

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = plain(*a, **k)
        spent.append(time.perf_counter() - t0)
        return out

    train.R.score_completions = timed
    train.main(["--max-steps", str(args.steps), "--eval-steps", "0", "--output-dir", args.output_dir,
                "--overwrite", *args.train_args])  # a scratch folder: each measurement replaces the last
    mu = json.loads((Path(args.output_dir) / "config.json").read_text())["num_iterations"]
    lines = [json.loads(l) for l in open(Path(args.output_dir) / "metrics.jsonl")]
    # A rollout is scored once and serves mu steps (updates), each logging the rollout's time / mu.
    rollouts = [sum(l["step_time_s"] for l in lines[i:i + mu]) for i in range(mu, len(lines), mu)]
    scoring, rollout = statistics.mean(spent[1:]), statistics.mean(rollouts)
    print(f"rewards: {scoring:.4f} s per rollout of {rollout:.4f} s ({mu} update(s) each); without them a rollout "
          f"would take {rollout - scoring:.4f} s, so they add {100 * scoring / (rollout - scoring):.1f}%")


if __name__ == "__main__":
    main()
