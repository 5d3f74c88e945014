"""Write tests/golden/trl_grpo_loss.json: TRL's own GRPO loss values and gradients on fixed inputs.

Run with the TRL venv (see requirements-dev-trl.txt), never the project's:

    python3 -m venv .venv-trl && .venv-trl/bin/pip install torch==2.14.1 trl==1.16.0
    .venv-trl/bin/python scripts/make_trl_golden.py

Loss: the script calls TRL's unbound `GRPOTrainer._compute_loss(fake_self, model, inputs)`. `fake_self`
(`FakeTrainer` below) carries just the attributes that method reads, and its
`_get_per_token_logps_and_entropies` returns our fixed log-probs as a float64 leaf tensor, so after
`loss.backward()` its `.grad` is TRL's gradient with respect to the per-token log-probs. The TRL
settings, chosen so that TRL computes exactly the loss of docs/METHOD.md:

- importance_sampling_level="token" (per-token ratio; "sequence" is GSPO);
- use_bias_correction_kl=False. TRL 1.16.0 defaults it to True, which multiplies the k3 KL by the
  (differentiable) ratio: the KL *value* is unchanged on-policy but its gradient is not. docs/METHOD.md's
  KL is plain k3, so the goldens turn it off;
- delta=None (no extra upper clamp of the unclipped ratio; two-sided clipping only);
- use_vllm=False and vllm_importance_sampling_correction=False (no sampler/trainer IS correction);
- off_policy_mask_threshold=None (no off-policy sequence mask), top_entropy_quantile=1.0 (no entropy
  mask), entropy bonus off, no MoE aux loss;
- one process, current_gradient_accumulation_steps=1, steps_per_generation=1, training mode: TRL then
  divides grpo/bnpo/dr_grpo by 1, and divides dapo's token sum by exactly num_items_in_batch;
- epsilon_low = epsilon; epsilon_high as given per case (None in GRPOConfig means epsilon).
mask_truncated_completions does not enter `_compute_loss` (it edits the mask upstream), so the mask
here is the final one. TRL's logged metrics (`kl`, `clip_ratio/*`) are stored alongside.

Advantages: TRL 1.16.0 computes them inline in the long `_generate_and_score_completions`, so
`trl_advantages` below reproduces that formula (multi_objective_aggregation="sum_then_normalize", one
reward function with weight 1, no unscorable completions) using TRL's own `nanstd`; the script checks
that the lines it reproduces are still in TRL's source.
"""

import inspect
import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

TRL_VERSION = "1.16.0"
OUT = Path(__file__).resolve().parents[1] / "tests" / "golden" / "trl_grpo_loss.json"
B, GROUP_SIZE, T = 6, 3, 5
MAX_COMPLETION_LENGTH = 8  # > T, as when no completion in the batch reached the limit
NUM_ITEMS_IN_BATCH = 40.0  # as if the global batch held another micro-batch of 20 completion tokens
EPS = 1e-4  # TRL's std epsilon in the advantage


class FakeTrainer:
    """Just the attributes GRPOTrainer._compute_loss (TRL 1.16.0) reads, set as the docstring says."""

    def __init__(self, logps, loss_type, beta, epsilon, epsilon_high):
        self.logps = logps
        self.loss_type = loss_type
        self.beta = beta
        self.epsilon_low = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.max_completion_length = MAX_COMPLETION_LENGTH
        self.importance_sampling_level = "token"
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self._entropy_bonus_enabled = False
        self.aux_loss_enabled = False
        self.current_gradient_accumulation_steps = 1
        self.args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
        self.accelerator = SimpleNamespace(  # one process: gathers and sums are identities
            num_processes=1, sync_gradients=True,
            gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x)
        self.model = SimpleNamespace(training=True)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return self.logps, torch.zeros_like(self.logps), None  # log-probs, entropies, aux loss


def trl_advantages(rewards, num_generations, scale_rewards):
    """TRL 1.16.0's advantage formula, reproduced from GRPOTrainer._generate_and_score_completions."""
    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):
        if num_generations > 1:
            std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
        else:
            std = torch.zeros_like(rewards)
    else:  # "batch"
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def check_trl_source():
    """Fail loudly if TRL's code moved away from what this script assumes."""
    assert trl.__version__ == TRL_VERSION, f"goldens are for trl=={TRL_VERSION}, found {trl.__version__}"
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for line in ("advantages = rewards - mean_grouped_rewards",
                 "advantages = advantages / (std_rewards + 1e-4)",
                 "std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)",
                 "std_rewards = nanstd(rewards).expand_as(rewards)"):
        assert line in source, f"TRL's advantage code changed: {line!r} not found"


def make_inputs():
    """Seeded inputs: padding, ratios beyond both clip bounds, advantages of both signs."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 3, 4, 5, 2, 1])  # completion lengths; the rest of each row is padding
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).double()  # (B, T)
    logps = -3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)  # (B, T)
    # ratios exp(logps - old_logps) in 0.6..1.6: beyond both clip bounds
    old_logps = logps + torch.empty(B, T, dtype=torch.float64).uniform_(-0.5, 0.5, generator=g)
    ref_logps = logps + torch.empty(B, T, dtype=torch.float64).uniform_(-0.7, 0.7, generator=g)
    rewards = torch.rand(B, generator=g, dtype=torch.float64) * 2.0  # (B,)
    return dict(logps=logps, old_logps=old_logps, ref_logps=ref_logps, mask=mask, rewards=rewards)


def trl_loss_case(inputs, advantages, loss_type, beta, epsilon, epsilon_high):
    logps = inputs["logps"].clone().requires_grad_(True)  # (B, T) leaf: its .grad is the golden gradient
    fake = FakeTrainer(logps, loss_type, beta, epsilon, epsilon_high)
    batch = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": inputs["mask"],
        "advantages": advantages, "old_per_token_logps": inputs["old_logps"],
        "ref_per_token_logps": inputs["ref_logps"],
        "num_items_in_batch": torch.tensor(NUM_ITEMS_IN_BATCH, dtype=torch.float64),
    }
    loss = GRPOTrainer._compute_loss(fake, model=None, inputs=batch)
    loss.backward()
    metrics = {name: values[-1] for name, values in fake._metrics["train"].items()}
    return dict(loss_type=loss_type, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high,
                loss=loss.item(), grad=logps.grad.tolist(), trl_metrics=metrics)


def main():
    check_trl_source()
    inputs = make_inputs()
    advantages = trl_advantages(inputs["rewards"], GROUP_SIZE, "group")  # (B,)
    ratio = torch.exp(inputs["logps"] - inputs["old_logps"])
    on = inputs["mask"].bool()
    assert (on & (ratio > 1.28) & (advantages > 0).unsqueeze(1)).any(), "no high-clipped token"
    assert (on & (ratio < 0.8) & (advantages < 0).unsqueeze(1)).any(), "no low-clipped token"

    loss_cases = [trl_loss_case(inputs, advantages, loss_type, beta, 0.2, epsilon_high)
                  for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")
                  for beta in (0.0, 0.04)
                  for epsilon_high in (None, 0.28)]
    advantage_rewards = [inputs["rewards"], torch.tensor([0.3, 1.7, 0.9, 1.0, 1.0, 1.0], dtype=torch.float64)]
    advantage_cases = [dict(rewards=rewards.tolist(), group_size=group_size, scale=scale,
                            advantages=trl_advantages(rewards, group_size, scale).tolist())
                       for rewards in advantage_rewards
                       for group_size in (GROUP_SIZE, 1)
                       for scale in ("group", "batch", "none")]
    golden = {
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "dtype": "float64",
        "trl_settings": dict(importance_sampling_level="token", use_bias_correction_kl=False, delta=None,
                             use_vllm=False, vllm_importance_sampling_correction=False,
                             off_policy_mask_threshold=None, top_entropy_quantile=1.0, entropy_coef=0.0,
                             num_processes=1, gradient_accumulation_steps=1, steps_per_generation=1,
                             training=True, max_completion_length=MAX_COMPLETION_LENGTH,
                             num_items_in_batch=NUM_ITEMS_IN_BATCH, advantage_eps=EPS),
        "inputs": dict(group_size=GROUP_SIZE, advantages=advantages.tolist(),
                       **{name: tensor.tolist() for name, tensor in inputs.items()}),
        "loss_cases": loss_cases,
        "advantage_cases": advantage_cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {len(loss_cases)} loss cases and {len(advantage_cases)} advantage cases to {OUT}")


if __name__ == "__main__":
    main()
