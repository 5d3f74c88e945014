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

Variants (tests/golden/trl_grpo_variants.json, a second file so that the first stays as it was): every
loss_type x importance_sampling_level x beta x a set of options (none; delta; use_bias_correction_kl
(beta > 0); top_entropy_quantile; off_policy_mask_threshold; entropy_coef; all of them), with old
log-probs equal to and different from the current ones, computed by the same unbound `_compute_loss`
(its helpers `get_high_entropy_mask`, `get_off_policy_mask`, `get_gamma_weights` are TRL's own,
attached to `FakeTrainer`). The per-token entropies are a second float64 leaf, so the entropy bonus's
gradient is a golden value too. Per-term advantages: `trl_multi_objective` reproduces both
`multi_objective_aggregation` branches (several reward functions with weights), on rewards with ties
and constant groups.
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
VARIANTS_OUT = OUT.with_name("trl_grpo_variants.json")
B, GROUP_SIZE, T = 6, 3, 5
MAX_COMPLETION_LENGTH = 8  # > T, as when no completion in the batch reached the limit
NUM_ITEMS_IN_BATCH = 40.0  # as if the global batch held another micro-batch of 20 completion tokens
EPS = 1e-4  # TRL's std epsilon in the advantage


class FakeTrainer:
    """Just the attributes GRPOTrainer._compute_loss (TRL 1.16.0) reads, set as the docstring says.

    `options` are the variant settings (GRPOConfig names); left out, each is off.
    """

    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask  # TRL's own helpers
    get_off_policy_mask = staticmethod(GRPOTrainer.get_off_policy_mask)
    get_gamma_weights = staticmethod(GRPOTrainer.get_gamma_weights)

    def __init__(self, logps, loss_type, beta, epsilon, epsilon_high, entropies=None, **options):
        self.logps = logps
        self.entropies = torch.zeros_like(logps) if entropies is None else entropies
        self.loss_type = loss_type
        self.beta = beta
        self.epsilon_low = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.max_completion_length = MAX_COMPLETION_LENGTH
        self.importance_sampling_level = options.get("importance_sampling_level", "token")
        self.top_entropy_quantile = options.get("top_entropy_quantile", 1.0)
        self.off_policy_mask_threshold = options.get("off_policy_mask_threshold")
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.entropy_coef = options.get("entropy_coef", 0.0)
        self.use_adaptive_entropy = False
        self._entropy_bonus_enabled = self.entropy_coef != 0.0
        self.aux_loss_enabled = False
        self.current_gradient_accumulation_steps = 1
        self.args = SimpleNamespace(
            delta=options.get("delta"), use_bias_correction_kl=options.get("use_bias_correction_kl", False),
            steps_per_generation=1, **{k: options[k] for k in VARIANT_PARAMETERS})
        self.accelerator = SimpleNamespace(  # one process: gathers and sums are identities
            num_processes=1, sync_gradients=True, pad_across_processes=lambda x, dim, pad_index: x,
            gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x)
        self.model = SimpleNamespace(training=True)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return self.logps, self.entropies, None  # log-probs, entropies, aux loss


# SAPO's and VESPO's parameters: TRL 1.16.0's defaults, read by FakeTrainer's args whatever the loss type
VARIANT_PARAMETERS = dict(sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_k_neg=3.0,
                          vespo_lambda_pos=3.0, vespo_lambda_neg=2.0)


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
    fake = FakeTrainer(logps, loss_type, beta, epsilon, epsilon_high, **VARIANT_PARAMETERS)
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


def trl_multi_objective(rewards_per_func, weights, num_generations, aggregation, scale_rewards="group"):
    """TRL 1.16.0's advantages from several weighted reward functions, both `multi_objective_aggregation`s,
    reproduced from GRPOTrainer._generate_and_score_completions (no unscorable completions)."""
    weights = torch.tensor(weights, dtype=rewards_per_func.dtype)
    if aggregation == "sum_then_normalize":
        return trl_advantages((rewards_per_func * weights.unsqueeze(0)).nansum(dim=1), num_generations, scale_rewards)
    grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
    reward_k = ((grouped - mean_k) / (std_k + EPS)).view(-1, rewards_per_func.shape[1])
    rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
    std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return torch.nan_to_num((rewards - torch.nanmean(rewards)) / (std_rewards + EPS), nan=0.0)


def check_trl_variant_source():
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for line in ("reward_k = (grouped - mean_k) / (std_k + 1e-4)",
                 "rewards = (reward_k * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)",
                 "advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)",
                 "rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)"):
        assert line in source, f"TRL's multi-objective advantage code changed: {line!r} not found"


VB, VG, VT = 9, 3, 6  # the variants' inputs: 3 groups (one with equal rewards: A = 0), 6 tokens
# epsilon_high per loss type: DAPO's 0.28 for the clipped ones; CISPO's cap itself (1.3, so that it binds here)
VARIANT_EPSILON_HIGH = dict(grpo=0.28, bnpo=0.28, dr_grpo=0.28, dapo=0.28, luspo=0.28, cispo=1.3, sapo=None,
                            vespo=None)


def make_variant_inputs():
    """Seeded inputs for the variants: per-row drift too, so that sequence-level ratios clip as well."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([6, 4, 5, 6, 2, 3, 6, 1, 5])
    mask = (torch.arange(VT).unsqueeze(0) < lengths.unsqueeze(1)).double()  # (B, T)
    logps = -3.0 * torch.rand(VB, VT, generator=g, dtype=torch.float64)
    drift = torch.empty(VB, 1, dtype=torch.float64).uniform_(-0.35, 0.35, generator=g)  # per sequence
    old_logps = logps + drift + torch.empty(VB, VT, dtype=torch.float64).uniform_(-0.4, 0.4, generator=g)
    ref_logps = logps + torch.empty(VB, VT, dtype=torch.float64).uniform_(-0.7, 0.7, generator=g)
    entropies = 2.0 * torch.rand(VB, VT, generator=g, dtype=torch.float64)
    rewards = torch.rand(VB, generator=g, dtype=torch.float64) * 2.0
    rewards[3:6] = 0.5  # a group of equal rewards
    return dict(logps=logps, old_logps=old_logps, ref_logps=ref_logps, mask=mask, entropies=entropies,
                rewards=rewards)


def variant_option_sets(loss_type, beta):
    """The option sets each (loss_type, level, beta, old log-probs) is computed under."""
    clipped = loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
    single = [{}, *([dict(delta=1.25)] if clipped else []),
              *([dict(use_bias_correction_kl=True)] if beta > 0 else []),
              dict(top_entropy_quantile=0.4), dict(off_policy_mask_threshold=0.05), dict(entropy_coef=0.01)]
    return single + [{k: v for options in single for k, v in options.items()}]  # and all of them together


def trl_variant_case(inputs, advantages, loss_type, level, beta, on_policy, options):
    logps = inputs["logps"].clone().requires_grad_(True)
    entropies = inputs["entropies"].clone().requires_grad_(True)
    epsilon_high = VARIANT_EPSILON_HIGH[loss_type]
    fake = FakeTrainer(logps, loss_type, beta, 0.2, epsilon_high, entropies=entropies,
                       importance_sampling_level=level, **options, **VARIANT_PARAMETERS)
    old = inputs["logps"].clone() if on_policy else inputs["old_logps"]
    batch = {
        "prompt_ids": torch.zeros(VB, 1, dtype=torch.long), "prompt_mask": torch.ones(VB, 1, dtype=torch.long),
        "completion_ids": torch.zeros(VB, VT, dtype=torch.long), "completion_mask": inputs["mask"],
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": inputs["ref_logps"],
        "num_items_in_batch": torch.tensor(NUM_ITEMS_IN_BATCH, dtype=torch.float64),
    }
    loss = GRPOTrainer._compute_loss(fake, model=None, inputs=batch)
    loss.backward()
    metrics = {name: values[-1] for name, values in fake._metrics["train"].items()}
    case = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon=0.2,
                epsilon_high=epsilon_high, on_policy=on_policy, options=options, loss=loss.item(),
                grad=logps.grad.tolist(), trl_metrics=metrics)
    if options.get("entropy_coef"):
        case["entropy_grad"] = entropies.grad.tolist()
    return case


def rounded(value):
    """Floats to 9 significant digits (a smaller file; the tests compare to 1e-5 relative)."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def make_variant_golden():
    check_trl_variant_source()
    inputs = make_variant_inputs()
    advantages = trl_advantages(inputs["rewards"], VG, "group")
    loss_cases = [trl_variant_case(inputs, advantages, loss_type, level, beta, on_policy, options)
                  for loss_type in VARIANT_EPSILON_HIGH
                  for level in ("token", "sequence")
                  for beta in (0.0, 0.04)
                  for on_policy in (True, False)
                  for options in variant_option_sets(loss_type, beta)]
    # per-term rewards (N, K): ties within a term, a term constant in a group, a group constant in every term
    terms = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.0, 0.7], [1.0, 0.0, 0.7],
                          [1.0, 1.0, 0.2], [1.0, 0.0, 0.9], [0.0, 1.0, 0.4],
                          [0.5, 1.0, 0.1], [0.5, 1.0, 0.1], [0.5, 1.0, 0.1],
                          [0.0, 0.0, 0.0], [1.0, 1.0, 0.6], [1.0, 0.0, 0.6]], dtype=torch.float64)
    advantage_cases = [dict(rewards=terms.tolist(), weights=weights, group_size=3, aggregation=aggregation,
                            advantages=trl_multi_objective(terms, weights, 3, aggregation).tolist())
                       for weights in ([1.0, 1.0, 1.0], [1.0, 0.5, 2.0])
                       for aggregation in ("sum_then_normalize", "normalize_then_sum")]
    golden = {
        "trl_version": trl.__version__, "torch_version": torch.__version__, "dtype": "float64",
        "trl_settings": dict(epsilon=0.2, max_completion_length=MAX_COMPLETION_LENGTH,
                             num_items_in_batch=NUM_ITEMS_IN_BATCH, num_processes=1,
                             gradient_accumulation_steps=1, use_vllm=False, **VARIANT_PARAMETERS),
        "inputs": dict(group_size=VG, advantages=advantages.tolist(),
                       **{name: tensor.tolist() for name, tensor in inputs.items()}),
        "loss_cases": loss_cases,
        "advantage_cases": advantage_cases,
    }
    VARIANTS_OUT.write_text(json.dumps(rounded(golden)) + "\n")
    print(f"wrote {len(loss_cases)} loss cases and {len(advantage_cases)} advantage cases to {VARIANTS_OUT}")


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
    make_variant_golden()


if __name__ == "__main__":
    main()
