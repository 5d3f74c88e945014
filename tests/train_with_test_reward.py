"""``train.py`` with one extra reward term, for the tests' short training runs.

The tests train a model warm-started for only 20 steps, with completions of 16-24 tokens: no
completion holds a readable box, so every real reward is 0, every advantage is 0, the gradient is
0 and the weights never move, and a test of "resume gives the same weights" could not fail. This
adds a term that depends on the text alone (the fraction of digits in it), so completions of a
group differ, the policy gets a gradient, and the weights, KL and ratios change from step to step.
Everything else is train.py as shipped. With ``GRPO_MIN_TEST_TRACE=FOLDER`` each rank also writes
what it scored and trained on (``FOLDER/rank<r>.jsonl``: its rewards; the advantages, completion tokens,
dapo normaliser and entropies its loss got, and the statistics it returned; one line each per micro-batch), so that a test can check the distributed bookkeeping.

    python tests/train_with_test_reward.py --model PATH ...   # the same options as train.py
    monkeypatch.setattr(train.R, "score_completions", score_with_digits)   # in-process runs
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import rewards  # noqa: E402
import train  # noqa: E402

_real_score_completions = rewards.score_completions


def _trace(**values):
    folder = os.environ.get("GRPO_MIN_TEST_TRACE")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"rank{os.environ.get('RANK', '0')}.jsonl", "a") as f:
            f.write(json.dumps(values) + "\n")


def score_with_digits(completions, targets, config, semantic_scorer=None):
    scores = _real_score_completions(completions, targets, config, semantic_scorer)
    digits = torch.tensor([sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions])
    scores.total = scores.total + digits
    _trace(rewards=scores.total.tolist())
    return scores


def traced_loss(logps, old_logps, advantages, completion_mask, *args, **kwargs):
    loss, stats = _real_grpo_loss(logps, old_logps, advantages, completion_mask, *args, **kwargs)
    entropies = kwargs.get("entropies")
    _trace(advantages=advantages.tolist(), tokens=completion_mask.sum().item(),
           num_items_in_batch=kwargs.get("num_items_in_batch"), stats=stats,
           **({} if entropies is None else {"entropies": entropies[completion_mask.bool()].tolist()}))
    return loss, stats


_real_grpo_loss = train.grpo_loss


if __name__ == "__main__":  # as train.py's own entry point
    rewards.score_completions = score_with_digits  # train.py calls it as R.score_completions
    train.grpo_loss = traced_loss
    sys.exit(train.main())
