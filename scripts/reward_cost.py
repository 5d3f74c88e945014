"""What the rewards (the semantic one included) cost inside the default training run.

    python scripts/reward_cost.py                 # 40 steps (20 rollouts) of `python train.py`, then two lines
    python scripts/reward_cost.py --steps 100 -- --semantic-model none

Runs train.py in this process with ``rewards.score_completions`` wrapped by a timer, and prints the
mean seconds per rollout spent scoring (format, spatial and, when on, the semantic scorer's forwards)
against the mean rollout time without it. The first rollout is left out (warm-up). Measuring inside one
run avoids comparing two runs whose trajectories (and so completion lengths) differ.

It also prices the semantic scorer's batch invariance (each crop embedded alone, so that a completion's reward
depends on it alone): every call of ``SemanticScorer.embed_images`` is followed by one batched forward of the
same crops, timed apart and subtracted from the run's times, and the line says what batching would save.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import rewards as R  # noqa: E402
import train  # noqa: E402
from grpo_min.semantic import SemanticScorer, one_thread  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--output-dir", default="runs/reward_cost")
    p.add_argument("train_args", nargs="*", help="more train.py options (after --)")
    args = p.parse_args()
    spent, plain = [], R.score_completions
    alone, batched, embed_alone = [], [], SemanticScorer.embed_images

    def timed(*a, **k):
        t0, extra = time.perf_counter(), sum(batched)
        out = plain(*a, **k)
        spent.append(time.perf_counter() - t0 - (sum(batched) - extra))  # less the comparison forward below
        return out

    def embed_images(self, images):  # the real one, then (for comparison only) one batched forward of the crops
        t0 = time.perf_counter()
        out = embed_alone(self, images)
        t1 = time.perf_counter()
        with torch.inference_mode(), one_thread():
            pixels = self.processor(images=images, return_tensors="pt", disable_grouping=True)["pixel_values"]
            self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        alone.append(t1 - t0), batched.append(time.perf_counter() - t1)
        return out

    train.R.score_completions = timed
    SemanticScorer.embed_images = embed_images
    train.main(["--max-steps", str(args.steps), "--eval-steps", "0", "--output-dir", args.output_dir,
                "--overwrite", *args.train_args])  # a scratch folder: each measurement replaces the last
    mu = json.loads((Path(args.output_dir) / "config.json").read_text())["num_iterations"]
    lines = [json.loads(l) for l in open(Path(args.output_dir) / "metrics.jsonl")]
    # A rollout is scored once and serves mu steps (updates), each logging the rollout's time / mu.
    rollouts = [sum(l["step_time_s"] for l in lines[i:i + mu]) for i in range(mu, len(lines), mu)]
    comparison = statistics.mean(batched[1:]) if len(batched) > 1 else 0.0  # time the real run did not spend
    scoring, rollout = statistics.mean(spent[1:]), statistics.mean(rollouts) - comparison
    print(f"rewards: {scoring:.4f} s per rollout of {rollout:.4f} s ({mu} update(s) each); without them a rollout "
          f"would take {rollout - scoring:.4f} s, so they add {100 * scoring / (rollout - scoring):.1f}%")
    if len(alone) > 1:
        one, many = statistics.mean(alone[1:]), statistics.mean(batched[1:])
        print(f"semantic scorer: its crops embedded one at a time {one:.4f} s per rollout, in one batched forward "
              f"{many:.4f} s: batch invariance costs {one - many:.4f} s, {100 * (one - many) / rollout:.1f}% of a "
              f"rollout")


if __name__ == "__main__":
    main()
