"""The GRPO objective: group-relative advantages and the clipped, KL-regularised token loss.

GRPO (DeepSeekMath, Shao et al. 2024, arXiv 2402.03300) is PPO without a value network: each prompt gets
G sampled completions, and a completion's advantage is its reward relative to its own group. Every
completion token then gets PPO's clipped surrogate, optionally plus a k3 estimate of the KL to a frozen
reference policy, and the token losses are averaged in one of four ways (`loss_type`): `grpo` (the
paper), `bnpo`, `dr_grpo` (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783) and `dapo` (DAPO, Yu et al.
2025, arXiv 2503.14476). `epsilon_high` is DAPO's "clip-higher"; `scale="none"` is Dr. GRPO's unscaled
advantage.

Equation numbers below are the bullets of docs/METHOD.md, section "GRPO", in order:
(1) advantage, (2) ratio, (3) per-token loss, (4) k3 KL, (5) aggregation.
B = completions in the micro-batch (groups of G adjacent rows), T = padded completion length.
"""

import torch

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """Advantages (1) from rewards (B,) whose groups of `group_size` completions are adjacent rows.

    scale: "group" divides by each group's std, "batch" by the std of the whole batch (still centring on
    the group mean), "none" does not divide (Dr. GRPO). Stds are unbiased (Bessel). A group whose rewards
    are all equal (also any group of one) gets exactly 0.

    >>> group_advantages(torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0]), group_size=3)
    tensor([-0.9999,  0.0000,  0.9999,  0.0000,  0.0000,  0.0000])
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    if group_size == 1:  # a group of one has nothing to be relative to (and its std would be NaN)
        return torch.zeros_like(rewards)  # (B,)
    grouped = rewards.view(-1, group_size)  # (B/G, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)  # (B/G, G)  (1): r_i - mean(r)
    if scale == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)  # (B/G, G)  (1): / (std(r) + eps)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + eps)  # (B/G, G)  (1) with the batch std
    # Float rounding can leave a constant group's mean a hair off its value (mean of three 0.1s is not
    # 0.1), which the division would blow up: zero such groups explicitly.
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # (B/G, 1)
    return torch.where(constant, torch.zeros_like(advantages), advantages).view(-1)  # (B,)


def grpo_loss(logps, old_logps, advantages, mask, *, ref_logps=None, beta=0.0, epsilon=0.2,
              epsilon_high=None, loss_type="grpo", max_completion_length=None, num_items_in_batch=None):
    """The GRPO loss (3)-(5) of a micro-batch, and a few statistics of it.

    logps, old_logps, ref_logps: (B, T) log-probs of the sampled tokens under the current, the sampling
    and the reference policy; advantages: (B,); mask: (B, T), 1 on completion tokens (bool/int/float).
    Padded positions (mask 0) are set to log-prob 0 in all three before anything else, so their values
    do not matter, not even -inf or a gap whose exp() overflows.
    epsilon_high=None means epsilon; max_completion_length=None means T (only `dr_grpo` uses it);
    num_items_in_batch (only `dapo`) is the number of completion tokens in the whole global batch,
    None means mask.sum(); under DDP, which averages gradients over ranks, pass it divided by the world
    size (as TRL does). Scaling for gradient accumulation is the caller's job. ref_logps is only read
    when beta > 0.

    Returns (loss, stats): loss a scalar tensor to backpropagate; stats plain floats, token means over
    the mask: `kl` (k3, 0.0 when beta == 0), `clip_low` (ratio < 1 - epsilon with A < 0), `clip_high`
    (ratio > 1 + epsilon_high with A > 0) and `clip_fraction` (either: the tokens where the clipped
    branch of the min is taken, so they get no policy gradient; TRL logs it as `clip_ratio/region_mean`).

    >>> logps = torch.tensor([[-1.0, -2.0]])  # one completion of two tokens, on-policy: ratio 1
    >>> loss, stats = grpo_loss(logps, logps, torch.tensor([0.5]), torch.ones(1, 2))
    >>> loss, stats["clip_fraction"]  # -ratio * A
    (tensor(-0.5000), 0.0)
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta < 0 or (beta > 0 and ref_logps is None):
        raise ValueError(f"beta must be >= 0, and beta > 0 needs ref_logps; got beta={beta}, "
                         f"ref_logps {'missing' if ref_logps is None else 'given'}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)  # (B, T)
    adv = advantages.to(logps.dtype).unsqueeze(1)  # (B, 1)
    # Positions after EOS hold real log-probs of the pad token. Multiplying their loss by 0 afterwards is
    # not enough: exp(ref - logp) or the ratio can overflow there, and inf x 0 = NaN voids the whole update.
    # As in TRL (log-prob 0 where the label is padding), zero them first: ratio 1 and KL 0 there.
    padding = mask == 0  # (B, T)
    logps = logps.masked_fill(padding, 0.0)  # (B, T)  no gradient reaches padded positions
    old_logps = old_logps.masked_fill(padding, 0.0)  # (B, T)
    if ref_logps is not None:
        ref_logps = ref_logps.masked_fill(padding, 0.0)  # (B, T)

    ratio = torch.exp(logps - old_logps)  # (B, T)  (2): rho = pi_theta / pi_old
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)  # (B, T)  (3): clip(rho, ...)
    per_token_loss = -torch.min(ratio * adv, clipped_ratio * adv)  # (B, T)  (3): -min(rho A, clip(rho) A)
    kl = None
    if beta > 0:
        log_ref_over_policy = ref_logps - logps  # (B, T)
        kl = torch.exp(log_ref_over_policy) - log_ref_over_policy - 1  # (B, T)  (4): k3
        per_token_loss = per_token_loss + beta * kl  # (B, T)  (3): + beta KL

    masked_loss = per_token_loss * mask  # (B, T)
    if loss_type == "grpo":  # (5): mean over sequences of each sequence's token mean
        loss = (masked_loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif loss_type == "bnpo":  # (5): token mean over the micro-batch
        loss = masked_loss.sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":  # (5): token sum / (B x max completion length)
        max_len = mask.shape[1] if max_completion_length is None else max_completion_length
        loss = masked_loss.sum() / (mask.shape[0] * max_len)
    else:  # dapo  (5): token sum / completion tokens in the global batch
        num_items = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = masked_loss.sum() / torch.as_tensor(num_items, dtype=logps.dtype).clamp(min=1)

    with torch.no_grad():
        num_tokens = mask.sum().clamp(min=1)  # ()
        clip_low = (ratio < 1 - epsilon) & (adv < 0)  # (B, T)  negative A, ratio under the floor
        clip_high = (ratio > 1 + epsilon_high) & (adv > 0)  # (B, T)  positive A, ratio over the ceiling
        stats = {
            "kl": 0.0 if kl is None else ((kl * mask).sum() / num_tokens).item(),
            "clip_low": ((clip_low * mask).sum() / num_tokens).item(),
            "clip_high": ((clip_high * mask).sum() / num_tokens).item(),
            "clip_fraction": (((clip_low | clip_high) * mask).sum() / num_tokens).item(),
        }
    return loss, stats
