"""Tests of grpo_min/loss.py: hand-worked values and gradients, then TRL's own numbers (goldens).

Runs with torch only; the TRL goldens come from tests/golden/trl_grpo_loss.json, written by
scripts/make_trl_golden.py in a separate venv.
"""

import doctest
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import grpo_min.loss
from grpo_min.loss import group_advantages, grpo_loss, mean_stats

GOLDEN = Path(__file__).parent / "golden" / "trl_grpo_loss.json"
F64 = torch.float64


def close(actual, expected, atol=1e-12):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64),
                               rtol=0, atol=atol)


# The hand-worked example. Two completions (B=2), T=4, epsilon=0.2, logps all -1, old_logps chosen to
# give the ratios below. Per-token loss l = -min(rho*A, clip(rho, 0.8, 1.2)*A), and dl/dlogp = -A*rho on
# the unclipped branch, 0 on the clipped one.
#   row 0, A=+1, mask 1 1 1 0:  rho 1.0 -> l -1.0 (grad -1);   rho 1.5 -> clipped at 1.2: l -1.2 (grad 0);
#                               rho 0.5 -> min(0.5, 0.8) = 0.5 unclipped: l -0.5 (grad -0.5); padding.
#   row 1, A=-2, mask 1 1 1 1:  rho 1.1 -> l 2.2 (grad 2.2);   rho 0.5 -> min(-1, -1.6): clipped, l 1.6
#                               (grad 0);  rho 1.5 -> min(-3, -2.4) = -3 unclipped: l 3 (grad 3);
#                               rho 1.0 -> l 2 (grad 2).
# Sums: row 0 -2.7 over 3 tokens, row 1 8.8 over 4 tokens; 7 tokens, total 6.1.
#   grpo    = mean(-2.7/3, 8.8/4) = mean(-0.9, 2.2) = 0.65; grads: row 0 / (3*2), row 1 / (4*2)
#   bnpo    = 6.1 / 7;                                    grads / 7
#   dr_grpo = 6.1 / (2*4) = 0.7625 (max_completion_length=None means T=4); with 10: 6.1 / 20 = 0.305
#   dapo    = 6.1 / 7 (num_items_in_batch=None means mask.sum()); with 61 items: 0.1
# Stats: clip_low 1/7 (row 1, rho 0.5), clip_high 1/7 (row 0, rho 1.5), clip_fraction 2/7.
RATIOS = [[1.0, 1.5, 0.5, 1.0], [1.1, 0.5, 1.5, 1.0]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1]]
ADVANTAGES = [1.0, -2.0]
RAW_GRAD = torch.tensor([[-1.0, 0.0, -0.5, 0.0], [2.2, 0.0, 3.0, 2.0]], dtype=F64)  # dl/dlogp per token


def hand_inputs():
    logps = torch.full((2, 4), -1.0, dtype=F64, requires_grad=True)
    old_logps = -1.0 - torch.tensor(RATIOS, dtype=F64).log()
    return logps, old_logps, torch.tensor(ADVANTAGES, dtype=F64), torch.tensor(MASK, dtype=F64)


def loss_and_grad(logps, *args, **kwargs):
    """Loss, d loss / d logps and the statistics as means (grpo_loss returns them as (sum, count))."""
    loss, stats = grpo_loss(logps, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss, grad, mean_stats(stats)


@pytest.mark.parametrize("loss_type, kwargs, expected_loss, grad_scale", [
    ("grpo", {}, 0.65, torch.tensor([[1 / 6], [1 / 8]], dtype=F64)),
    ("bnpo", {}, 6.1 / 7, 1 / 7),
    ("dr_grpo", {}, 0.7625, 1 / 8),
    ("dr_grpo", {"max_completion_length": 10}, 0.305, 1 / 20),
    ("dapo", {}, 6.1 / 7, 1 / 7),
    ("dapo", {"num_items_in_batch": 61}, 0.1, 1 / 61),
    ("dapo", {"num_items_in_batch": torch.tensor(61.0)}, 0.1, 1 / 61),
])
def test_hand_example(loss_type, kwargs, expected_loss, grad_scale):
    loss, grad, stats = loss_and_grad(*hand_inputs(), loss_type=loss_type, **kwargs)
    close(loss, expected_loss)
    close(grad, RAW_GRAD * grad_scale)
    assert stats == pytest.approx({"kl": 0.0, "clip_low": 1 / 7, "clip_high": 1 / 7, "clip_fraction": 2 / 7})
    assert all(type(value) is float for value in stats.values())


def one_token(ratio, advantage, **kwargs):
    """Loss, d loss / d logp and stats of a single token (B=T=1, bnpo: normaliser 1)."""
    logps = torch.zeros(1, 1, dtype=F64, requires_grad=True)
    old_logps = -torch.tensor([[math.log(ratio)]], dtype=F64)
    return loss_and_grad(logps, old_logps, torch.tensor([advantage], dtype=F64), torch.ones(1, 1),
                         loss_type="bnpo", **kwargs)


@pytest.mark.parametrize("ratio, advantage, clipped", [
    (1.5, 2.0, True),     # positive A above 1 + eps: clipped, no gradient
    (0.5, -2.0, True),    # negative A below 1 - eps: clipped, no gradient
    (0.5, 2.0, False),    # positive A below 1 - eps: the unclipped branch is the min
    (1.5, -2.0, False),   # negative A above 1 + eps: the unclipped branch is the min
    (1.1, 2.0, False),    # inside the range
    (0.9, -2.0, False),
])
def test_clipping_gradient(ratio, advantage, clipped):
    loss, grad, stats = one_token(ratio, advantage)
    clipped_ratio = min(max(ratio, 0.8), 1.2)
    close(loss, -min(ratio * advantage, clipped_ratio * advantage))
    close(grad, [[0.0 if clipped else -advantage * ratio]])
    assert stats["clip_fraction"] == (1.0 if clipped else 0.0)
    assert stats["clip_high" if advantage > 0 else "clip_low"] == stats["clip_fraction"]


def test_epsilon_high_is_asymmetric():
    # ratio 1.25 with A > 0: clipped with epsilon_high = epsilon = 0.2, free with epsilon_high = 0.28
    assert one_token(1.25, 1.0)[1].item() == 0.0
    close(one_token(1.25, 1.0, epsilon_high=0.28)[1], [[-1.25]])
    close(one_token(1.25, 1.0, epsilon_high=0.28)[0], -1.25)
    # the low side still uses epsilon: 0.75 < 0.8 with A < 0 is clipped, at 1 - 0.2
    loss, grad, _ = one_token(0.75, -1.0, epsilon_high=0.28)
    close(loss, 0.8)
    assert grad.item() == 0.0


def test_kl_term():
    # A = 0, ratio 1: only beta * KL is left. ref - logp = ln 2: KL = 2 - ln 2 - 1 = 1 - ln 2, and
    # dKL/dlogp = 1 - exp(ref - logp) = -1.
    logps = torch.full((1, 1), -1.0, dtype=F64, requires_grad=True)
    ref = logps.detach() + math.log(2.0)
    loss, grad, stats = loss_and_grad(logps, logps.detach(), torch.zeros(1, dtype=F64), torch.ones(1, 1),
                                      ref_logps=ref, beta=0.1, loss_type="bnpo")
    close(loss, 0.1 * (1 - math.log(2.0)))
    close(grad, [[-0.1]])
    close(stats["kl"], 1 - math.log(2.0))
    # ref == logp: KL 0 and no KL gradient
    loss, grad, stats = loss_and_grad(logps, logps.detach(), torch.zeros(1, dtype=F64), torch.ones(1, 1),
                                      ref_logps=logps.detach(), beta=0.1, loss_type="bnpo")
    assert loss.item() == 0.0 and grad.item() == 0.0 and stats["kl"] == 0.0


def test_kl_adds_to_the_hand_example():
    logps, old_logps, advantages, mask = hand_inputs()
    ref = logps.detach() + math.log(2.0)  # every token: KL 1 - ln 2, dKL/dlogp -1
    loss, grad, stats = loss_and_grad(logps, old_logps, advantages, mask, ref_logps=ref, beta=0.04,
                                      loss_type="bnpo")
    close(loss, 6.1 / 7 + 0.04 * (1 - math.log(2.0)))
    close(grad, (RAW_GRAD - 0.04 * mask) / 7)
    close(stats["kl"], 1 - math.log(2.0))


def test_beta_zero_ignores_ref():
    logps, old_logps, advantages, mask = hand_inputs()
    without = grpo_loss(logps, old_logps, advantages, mask)
    with_ref = grpo_loss(logps, old_logps, advantages, mask, ref_logps=logps.detach() + 5.0, beta=0.0)
    assert torch.equal(without[0], with_ref[0]) and with_ref[1]["kl"] == (0.0, 7.0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_masked_tokens_have_no_effect(loss_type):
    logps, old_logps, advantages, mask = hand_inputs()
    ref = logps.detach() - 0.3
    base = loss_and_grad(logps, old_logps, advantages, mask, ref_logps=ref, beta=0.04, loss_type=loss_type)
    wild_logps = logps.detach().clone()
    wild_old, wild_ref = old_logps.clone(), ref.clone()
    wild_logps[0, 3], wild_old[0, 3], wild_ref[0, 3] = 30.0, -30.0, -25.0  # row 0, token 3 is padding
    wild_logps.requires_grad_(True)
    wild = loss_and_grad(wild_logps, wild_old, advantages, mask, ref_logps=wild_ref, beta=0.04,
                         loss_type=loss_type)
    assert torch.equal(base[0], wild[0]) and torch.equal(base[1], wild[1]) and base[2] == wild[2]
    assert wild[1][0, 3].item() == 0.0


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_padding_whose_exp_overflows_leaves_the_loss_finite_and_unchanged(loss_type, dtype):
    """Positions after EOS hold real log-probs of the pad token, and their gaps can be huge: exp(ref - logp)
    or the ratio overflows there, and inf x 0 (the mask) would make the loss and every gradient NaN, so
    the whole update would be skipped. The loss must equal, bitwise, the loss with those positions all 0."""
    logps, old_logps, _, mask = hand_inputs()
    pad = torch.zeros(2, 1, dtype=F64)  # a fifth token, padding in both rows
    logps, old_logps, mask = (torch.cat([t.detach(), pad], 1).to(dtype) for t in (logps, old_logps, mask))
    ref = logps - 0.3
    padding = mask == 0  # (0, 3), (0, 4) and (1, 4)
    zeroed = [t.masked_fill(padding, 0.0) for t in (logps, old_logps, ref)]
    wild = [t.clone() for t in (logps, old_logps, ref)]
    for t, value in zip(wild, (-1e4, 0.0, 0.0)):  # KL: exp(ref - logp) = exp(1e4) = inf
        t[0, 3] = value
    for t, value in zip(wild, (0.0, -1e4, 0.0)):  # ratio exp(logp - old) = inf, with A < 0: loss +inf
        t[1, 4] = value
    for t in wild:
        t[0, 4] = -math.inf
    advantages = torch.tensor(ADVANTAGES, dtype=dtype)
    (loss, grad, stats), (wild_loss, wild_grad, wild_stats) = (
        loss_and_grad(lp.requires_grad_(True), old, advantages, mask, ref_logps=rf, beta=0.04, loss_type=loss_type)
        for lp, old, rf in (zeroed, wild))
    assert torch.isfinite(wild_loss) and torch.isfinite(wild_grad).all(), (wild_loss, wild_grad)
    assert torch.equal(wild_loss, loss) and torch.equal(wild_grad, grad) and wild_stats == stats
    assert (wild_grad[padding] == 0).all() and (wild_grad[~padding] != 0).any()


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32])
def test_mask_dtypes(dtype):
    logps, old_logps, advantages, mask = hand_inputs()
    loss, _ = grpo_loss(logps, old_logps, advantages, mask.to(dtype))
    close(loss, 0.65)


def test_empty_sequence_is_guarded():
    # a third completion with no tokens: it counts as a sequence with loss 0, and nothing is NaN
    logps = torch.full((3, 4), -1.0, dtype=F64, requires_grad=True)
    old_logps = torch.cat([hand_inputs()[1], torch.full((1, 4), -1.0, dtype=F64)])
    mask = torch.tensor(MASK + [[0, 0, 0, 0]], dtype=F64)
    advantages = torch.tensor(ADVANTAGES + [0.5], dtype=F64)
    loss, grad, _ = loss_and_grad(logps, old_logps, advantages, mask, loss_type="grpo")
    close(loss, (-0.9 + 2.2 + 0.0) / 3)
    assert torch.isfinite(grad).all() and (grad[2] == 0).all()
    for loss_type in ("bnpo", "dapo"):  # nothing but padding: loss 0, not NaN
        loss, _ = grpo_loss(logps, old_logps, advantages, torch.zeros(3, 4), loss_type=loss_type)
        assert loss.item() == 0.0


def test_loss_bad_arguments():
    logps, old_logps, advantages, mask = hand_inputs()
    with pytest.raises(ValueError, match="grpo.*bnpo.*dr_grpo.*dapo"):
        grpo_loss(logps, old_logps, advantages, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old_logps, advantages, mask, beta=0.04)
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(logps, old_logps, advantages, mask, ref_logps=logps.detach(), beta=-0.1)


# Advantages by hand: rewards [1, 2, 3 | 0, 0, 4], G = 3. Group means 2 and 4/3.
#   none:  [-1, 0, 1, -4/3, -4/3, 8/3]
#   group: unbiased stds 1 (squares 1+0+1 over 2) and 4/sqrt(3) (squares 16/9+16/9+64/9 = 32/3, over 2)
#   batch: the batch mean is 5/3, squares 4/9+1/9+16/9+25/9+25/9+49/9 = 40/3, over 5: std sqrt(8/3)
HAND_REWARDS = [1.0, 2.0, 3.0, 0.0, 0.0, 4.0]
HAND_CENTRED = torch.tensor([-1.0, 0.0, 1.0, -4 / 3, -4 / 3, 8 / 3], dtype=F64)


@pytest.mark.parametrize("scale, divisor", [
    ("none", torch.ones(6, dtype=F64)),
    ("group", torch.tensor([1.0] * 3 + [4 / math.sqrt(3)] * 3, dtype=F64) + 1e-4),
    ("batch", torch.full((6,), math.sqrt(8 / 3), dtype=F64) + 1e-4),
])
def test_advantages_by_hand(scale, divisor):
    close(group_advantages(torch.tensor(HAND_REWARDS, dtype=F64), 3, scale=scale), HAND_CENTRED / divisor)


def test_advantages_use_bessel():
    # [0, 2]: unbiased std sqrt(2) (population std would be 1)
    close(group_advantages(torch.tensor([0.0, 2.0], dtype=F64), 2), [-1 / (math.sqrt(2) + 1e-4),
                                                                    1 / (math.sqrt(2) + 1e-4)])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_groups_are_exactly_zero(scale):
    # mean of three 0.1s is not exactly 0.1 in floating point; the group must still give exact zeros
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 0.5], dtype=F64)
    advantages = group_advantages(rewards, 3, scale=scale)
    assert torch.equal(advantages[:3], torch.zeros(3, dtype=F64)) and torch.isfinite(advantages).all()
    assert torch.equal(group_advantages(torch.full((6,), 0.7), 3, scale=scale), torch.zeros(6))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_groups_of_one(scale):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "degrees of freedom" warning from a std of one value
        assert torch.equal(group_advantages(torch.tensor([0.3, 1.0, 2.0]), 1, scale=scale), torch.zeros(3))
        assert torch.equal(group_advantages(torch.tensor([0.3]), 1, scale=scale), torch.zeros(1))


def test_advantages_bad_arguments():
    with pytest.raises(ValueError, match="group.*batch.*none"):
        group_advantages(torch.zeros(6), 3, scale="std")
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(5), 3)
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(6), 0)
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, K\)"):
        group_advantages(torch.zeros(3, 2, 1), 3)
    with pytest.raises(ValueError, match="per-term"):
        group_advantages(torch.zeros(6), 3, aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match="aggregation"):
        group_advantages(torch.zeros(6, 2), 3, aggregation="sum")


def test_docstring_examples():
    result = doctest.testmod(grpo_min.loss)
    assert result.attempted > 0 and result.failed == 0


# TRL's numbers: see scripts/make_trl_golden.py for the settings under which TRL computes docs/METHOD.md's loss.
with GOLDEN.open() as f:
    TRL = json.load(f)


def test_golden_settings():
    assert TRL["trl_version"] == "1.16.0" and TRL["dtype"] == "float64"
    settings = TRL["trl_settings"]
    assert settings["importance_sampling_level"] == "token" and settings["use_bias_correction_kl"] is False


@pytest.mark.parametrize("case", TRL["loss_cases"],
                         ids=lambda c: f"{c['loss_type']}-beta{c['beta']}-eps_high{c['epsilon_high']}")
def test_loss_matches_trl(case):
    inputs, settings = TRL["inputs"], TRL["trl_settings"]
    logps = torch.tensor(inputs["logps"], dtype=F64, requires_grad=True)
    loss, grad, stats = loss_and_grad(
        logps, torch.tensor(inputs["old_logps"], dtype=F64), torch.tensor(inputs["advantages"], dtype=F64),
        torch.tensor(inputs["mask"], dtype=F64), ref_logps=torch.tensor(inputs["ref_logps"], dtype=F64),
        beta=case["beta"], epsilon=case["epsilon"], epsilon_high=case["epsilon_high"],
        loss_type=case["loss_type"], max_completion_length=settings["max_completion_length"],
        num_items_in_batch=settings["num_items_in_batch"])
    close(loss, case["loss"], atol=1e-6)
    close(grad, case["grad"], atol=1e-6)
    metrics = case["trl_metrics"]
    assert stats["clip_low"] == pytest.approx(metrics["clip_ratio/low_mean"], abs=1e-6)
    assert stats["clip_high"] == pytest.approx(metrics["clip_ratio/high_mean"], abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(metrics["clip_ratio/region_mean"], abs=1e-6)
    assert stats["kl"] == pytest.approx(metrics.get("kl", 0.0), abs=1e-6)


def test_golden_inputs_exercise_clipping():
    metrics = [case["trl_metrics"] for case in TRL["loss_cases"]]
    assert all(m["clip_ratio/low_mean"] > 0 and m["clip_ratio/high_mean"] > 0 for m in metrics)


@pytest.mark.parametrize("case", TRL["advantage_cases"],
                         ids=lambda c: f"{c['scale']}-G{c['group_size']}-{c['rewards'][0]:.2f}")
def test_advantages_match_trl(case):
    # atol: TRL's nanstd computes Bessel's n/(n-1) in float32, a ~3e-8 relative difference for "batch"
    advantages = group_advantages(torch.tensor(case["rewards"], dtype=F64), case["group_size"], case["scale"])
    close(advantages, case["advantages"], atol=1e-6)


# The variants of TRL 1.16 (grpo_min/variants.py), against TRL's own _compute_loss: tests/golden/trl_grpo_variants.json
# (scripts/make_trl_golden.py lists the cases: every loss type x ratio level x beta x option set x old log-probs).
with (GOLDEN.parent / "trl_grpo_variants.json").open() as f:
    TRL_VARIANTS = json.load(f)
# TRL's metric name for each of our statistics (TRL logs no fraction for the two masks)
TRL_METRIC = {"kl": "kl", "entropy": "entropy", "clip_low": "clip_ratio/low_mean",
              "clip_high": "clip_ratio/high_mean", "clip_fraction": "clip_ratio/region_mean",
              "vespo_phi": "vespo/phi_seq_mean"}


def variant_id(case):
    options = "+".join(f"{k}={v}" for k, v in case["options"].items()) or "plain"
    return (f"{case['loss_type']}-{case['importance_sampling_level']}-beta{case['beta']}-"
            f"{'on' if case['on_policy'] else 'off'}_policy-{options}")


def close_rel(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64),
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("case", TRL_VARIANTS["loss_cases"], ids=variant_id)
def test_variant_matches_trl(case):
    inputs, settings = TRL_VARIANTS["inputs"], TRL_VARIANTS["trl_settings"]
    logps = torch.tensor(inputs["logps"], dtype=F64, requires_grad=True)
    entropies = torch.tensor(inputs["entropies"], dtype=F64, requires_grad=True)
    old = logps.detach() if case["on_policy"] else torch.tensor(inputs["old_logps"], dtype=F64)
    parameters = {k: settings[k] for k in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
                                           "vespo_k_neg", "vespo_lambda_pos", "vespo_lambda_neg")}
    loss, stats = grpo_loss(
        logps, old, torch.tensor(inputs["advantages"], dtype=F64), torch.tensor(inputs["mask"], dtype=F64),
        ref_logps=torch.tensor(inputs["ref_logps"], dtype=F64), entropies=entropies, beta=case["beta"],
        epsilon=case["epsilon"], epsilon_high=case["epsilon_high"], loss_type=case["loss_type"],
        importance_sampling_level=case["importance_sampling_level"],
        max_completion_length=settings["max_completion_length"], num_items_in_batch=settings["num_items_in_batch"],
        **parameters, **case["options"])
    grad, entropy_grad = torch.autograd.grad(loss, [logps, entropies], allow_unused=True)
    close_rel(loss, case["loss"])
    close_rel(grad, case["grad"])
    if "entropy_grad" in case:
        close_rel(entropy_grad, case["entropy_grad"])
    else:  # no bonus: the entropies only select tokens, they get no gradient
        assert entropy_grad is None or not entropy_grad.any()
    means = mean_stats(stats)
    for ours, theirs in TRL_METRIC.items():
        if theirs in case["trl_metrics"]:
            assert means[ours] == pytest.approx(case["trl_metrics"][theirs], rel=1e-5, abs=1e-8), ours
    if case["loss_type"] == "cispo":
        assert means["clip_fraction"] == pytest.approx(case["trl_metrics"]["cispo_clip_ratio"], rel=1e-5, abs=1e-8)


def test_variant_goldens_exercise_each_option():
    """The golden inputs make every option change something: clipping at both levels, capped CISPO weights, a
    dropped sequence, tokens the entropy mask leaves out, a VESPO weight far from 1."""
    cases = {variant_id(c): c for c in TRL_VARIANTS["loss_cases"]}
    off, on = "beta0.0-off_policy", "beta0.0-on_policy"
    for level in ("token", "sequence"):
        assert cases[f"grpo-{level}-{off}-plain"]["trl_metrics"]["clip_ratio/region_mean"] > 0
        assert cases[f"cispo-{level}-{off}-plain"]["trl_metrics"]["cispo_clip_ratio"] > 0
        for option in ("delta=1.25", "top_entropy_quantile=0.4", "off_policy_mask_threshold=0.05",
                       "entropy_coef=0.01"):
            assert cases[f"grpo-{level}-{off}-{option}"]["loss"] != cases[f"grpo-{level}-{off}-plain"]["loss"], option
        assert (cases[f"dapo-{level}-beta0.04-on_policy-use_bias_correction_kl=True"]["grad"]
                != cases[f"dapo-{level}-beta0.04-on_policy-plain"]["grad"])  # on-policy: same value, other gradient
        assert cases[f"vespo-{level}-{off}-plain"]["trl_metrics"]["vespo/phi_seq_mean"] < 0.99
    assert cases[f"sapo-token-{on}-plain"]["loss"] != cases[f"sapo-token-{off}-plain"]["loss"]


@pytest.mark.parametrize("case", TRL_VARIANTS["advantage_cases"],
                         ids=lambda c: f"{c['aggregation']}-weights{c['weights']}")
def test_multi_objective_advantages_match_trl(case):
    advantages = group_advantages(torch.tensor(case["rewards"], dtype=F64), case["group_size"],
                                  weights=case["weights"], aggregation=case["aggregation"])
    close(advantages, case["advantages"], atol=1e-6)  # TRL's nanstd: Bessel's factor in float32


def test_mask_fractions_by_hand():
    """off_policy_dropped and entropy_kept, which TRL does not log. Three sequences of 2 tokens, each drifted by
    mean(old - new) = 0.5 > threshold 0.1: A < 0 is dropped, A = 0 and A > 0 are kept (A >= 0 always is)."""
    logps = torch.zeros(3, 2, dtype=F64)
    entropies = torch.tensor([[0.1, 0.9], [0.5, 0.3], [0.7, 0.2]], dtype=F64)  # quantile 0.5 of 6 values: 0.4
    _, stats = grpo_loss(logps, logps + 0.5, torch.tensor([-1.0, 0.0, 1.0], dtype=F64), torch.ones(3, 2),
                         off_policy_mask_threshold=0.1, top_entropy_quantile=0.5, entropies=entropies)
    assert stats["off_policy_dropped"] == (1.0, 3.0) and stats["entropy_kept"] == (3.0, 6.0)
    assert mean_stats(stats)["entropy"] == pytest.approx(2.7 / 6)
