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

The other loss variants of TRL 1.16 (GSPO, CISPO, SAPO, LUSPO, VESPO, two-sided clipping, the masks, the
entropy bonus, GDPO's advantages) are options below, each a call into grpo_min/variants.py marked
`# variant:`; there each one is a few annotated lines with its equation and paper. All off by default.
"""

import torch

from grpo_min import variants as V

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # the clipped surrogate (3)
LOSS_TYPES = (*CLIPPED_LOSS_TYPES, "cispo", "sapo", "vespo")
TOKEN_SUM_LOSS_TYPES = ("dapo", "cispo", "vespo")  # normalised by the global batch's completion tokens
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def group_advantages(rewards, group_size, scale="group", eps=1e-4, *, weights=None,
                     aggregation="sum_then_normalize"):
    """Advantages (1) from rewards (B,) whose groups of `group_size` completions are adjacent rows.

    scale: "group" divides by each group's std, "batch" by the std of the whole batch (still centring on
    the group mean), "none" does not divide (Dr. GRPO). Stds are unbiased (Bessel). A group whose rewards
    are all equal (also any group of one) gets exactly 0.
    rewards may also be per-term, (B, K), with `weights` (K,) (default: all 1): "sum_then_normalize" sums
    the weighted terms, then proceeds as above; "normalize_then_sum" is GDPO (variants.normalize_then_sum).

    >>> group_advantages(torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0]), group_size=3)
    tensor([-0.9999,  0.0000,  0.9999,  0.0000,  0.0000,  0.0000])
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if rewards.dim() not in (1, 2) or group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"rewards must be (B,) or (B, K) with B divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    if rewards.dim() == 2:  # per-term rewards (B, K)
        weights = torch.ones(rewards.shape[1]) if weights is None else torch.as_tensor(weights)
        weights = weights.to(rewards.dtype).to(rewards.device)  # (K,)
        if group_size == 1:
            return torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)  # (B,)
        if aggregation == "normalize_then_sum":  # variant: GDPO, each term normalised within its group first
            return V.normalize_then_sum(rewards, group_size, weights, eps)  # (B,)
        rewards = (rewards * weights).sum(dim=1)  # (B,)  the weighted sum, then GRPO's (1)
    elif aggregation != "sum_then_normalize":
        raise ValueError("aggregation 'normalize_then_sum' needs per-term rewards of shape (B, K)")
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
              epsilon_high=None, loss_type="grpo", max_completion_length=None, num_items_in_batch=None,
              importance_sampling_level="token", delta=None, use_bias_correction_kl=False,
              top_entropy_quantile=1.0, off_policy_mask_threshold=None, entropy_coef=0.0, entropies=None,
              sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_k_neg=3.0,
              vespo_lambda_pos=3.0, vespo_lambda_neg=2.0):
    """The GRPO loss (3)-(5) of a micro-batch, and a few statistics of it.

    logps, old_logps, ref_logps: (B, T) log-probs of the sampled tokens under the current, the sampling
    and the reference policy; advantages: (B,); mask: (B, T), 1 on completion tokens (bool/int/float).
    Padded positions (mask 0) are set to log-prob 0 in all three before anything else, so their values
    do not matter, not even -inf or a gap whose exp() overflows.
    epsilon_high=None means epsilon; max_completion_length=None means T (only `dr_grpo` uses it);
    num_items_in_batch (only `dapo`, `cispo`, `vespo`) is the number of completion tokens in the whole
    global batch, None means mask.sum(); under DDP, which averages gradients over ranks, pass it divided
    by the world size (as TRL does). Scaling for gradient accumulation is the caller's job. ref_logps is
    only read when beta > 0; entropies (B, T), the policy's per-token entropies, only when
    top_entropy_quantile < 1 or entropy_coef != 0 (the bonus back-propagates through them).
    The other keywords are TRL 1.16's GRPOConfig options of the same names (grpo_min/variants.py); their
    defaults compute GRPO as above (use_bias_correction_kl is off: TRL 1.16 defaults it to True).

    Returns (loss, stats): loss a scalar tensor to backpropagate; stats maps each statistic to (sum, count)
    floats, its mean being sum / count: a caller adds sums and counts over micro-batches and ranks before
    dividing, so every statistic is weighted by its tokens (or sequences), as TRL logs them (`mean_stats`
    divides for a single call). Token means over the mask: `kl` (k3 as applied, 0.0 when beta == 0),
    `clip_low` (ratio < 1 - epsilon with A < 0), `clip_high` (ratio > 1 + epsilon_high with A > 0) and
    `clip_fraction` (either: the tokens where the clipped branch of the min is taken, so they get no policy
    gradient; TRL logs it as `clip_ratio/region_mean`); with the sequence-level ratio these three are
    fractions of sequences, and for cispo `clip_fraction` is its capped tokens. Where they apply:
    `entropy` (mean entropy), `entropy_kept` (fraction of tokens the entropy mask kept),
    `off_policy_dropped` (fraction of sequences the off-policy mask dropped), `vespo_phi` (mean weight).

    >>> logps = torch.tensor([[-1.0, -2.0]])  # one completion of two tokens, on-policy: ratio 1
    >>> loss, stats = grpo_loss(logps, logps, torch.tensor([0.5]), torch.ones(1, 2))
    >>> loss, stats["clip_fraction"]  # -ratio * A; no token clipped out of 2
    (tensor(-0.5000), (0.0, 2.0))
    """
    check_options(loss_type, beta, ref_logps, importance_sampling_level, top_entropy_quantile, entropy_coef,
                  entropies)
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

    log_ratio = logps - old_logps  # (B, T)
    if importance_sampling_level == "sequence":  # variant: GSPO, one ratio per sequence
        ratio = torch.exp(V.sequence_log_ratio(log_ratio, mask))  # (B, 1)
    else:
        ratio = torch.exp(log_ratio)  # (B, T)  (2): rho = pi_theta / pi_old
    if loss_type in CLIPPED_LOSS_TYPES:
        clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)  # (B, T)  (3): clip(rho, ...)
        unclipped_ratio = ratio if delta is None else V.two_sided_ratio(ratio, delta)  # variant: INTELLECT-2
        per_token_loss = -torch.min(unclipped_ratio * adv, clipped_ratio * adv)  # (B, T)  (3): -min(rho A, clip A)
    elif loss_type == "cispo":  # variant: CISPO
        per_token_loss = V.cispo_loss(ratio, logps, adv, epsilon_high)  # (B, T)
    elif loss_type == "sapo":  # variant: SAPO
        per_token_loss = V.sapo_loss(ratio, adv, sapo_temperature_pos, sapo_temperature_neg)  # (B, T)
    else:  # variant: VESPO
        per_token_loss, phi = V.vespo_loss(log_ratio, logps, adv, mask, vespo_k_pos, vespo_k_neg,
                                           vespo_lambda_pos, vespo_lambda_neg)  # (B, T), (B, 1)
    keep = entropy_mask = None
    if off_policy_mask_threshold is not None:  # variant: DeepSeek-V3.2's off-policy sequence mask
        keep = V.off_policy_keep(adv, logps, old_logps, mask, off_policy_mask_threshold)  # (B, 1)
        per_token_loss = per_token_loss * keep
    if top_entropy_quantile < 1:  # variant: the policy term on the high-entropy tokens only
        entropy_mask = V.high_entropy_mask(entropies, mask, top_entropy_quantile)  # (B, T)
        per_token_loss = per_token_loss * entropy_mask
    kl = None
    if beta > 0:
        log_ref_over_policy = ref_logps - logps  # (B, T)
        kl = torch.exp(log_ref_over_policy) - log_ref_over_policy - 1  # (B, T)  (4): k3
        if use_bias_correction_kl:  # variant: DeepSeek-V3.2's unbiased KL
            kl = V.bias_corrected_kl(kl, ratio)
        per_token_loss = per_token_loss + beta * kl  # (B, T)  (3): + beta KL

    masked_loss = per_token_loss * mask  # (B, T)
    if loss_type in ("grpo", "sapo"):  # (5): mean over sequences of each sequence's token mean
        loss = (masked_loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif loss_type == "bnpo":  # (5): token mean over the micro-batch
        loss = masked_loss.sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":  # (5): token sum / (B x max completion length)
        max_len = mask.shape[1] if max_completion_length is None else max_completion_length
        loss = masked_loss.sum() / (mask.shape[0] * max_len)
    elif loss_type == "luspo":  # variant: LUSPO, each sequence's loss times its length
        loss = V.luspo_aggregate(masked_loss)
    else:  # dapo, cispo, vespo  (5): token sum / completion tokens in the global batch
        num_items = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = masked_loss.sum() / torch.as_tensor(num_items, dtype=logps.dtype).clamp(min=1)
    if entropy_coef != 0:  # variant: entropy bonus, on the tokens the policy term acts on
        loss = loss + V.entropy_bonus(entropies, mask if entropy_mask is None else mask * entropy_mask, entropy_coef)

    with torch.no_grad():
        tokens, sequences = mask.sum().item(), float(mask.shape[0])
        over_tokens = lambda x: ((x * mask).sum().item(), tokens)  # noqa: E731  a token mean, as (sum, count)
        over_sequences = lambda x: (x.sum().item(), sequences)  # noqa: E731  x (B, 1): a mean over sequences
        over_ratios = over_sequences if importance_sampling_level == "sequence" else over_tokens  # as TRL logs them
        stats = {"kl": (0.0, tokens) if kl is None else over_tokens(kl)}
        if loss_type in CLIPPED_LOSS_TYPES:
            # (after delta's cap, if any, as TRL does; the same unless delta < 1 + epsilon_high)
            clip_low = (unclipped_ratio < 1 - epsilon) & (adv < 0)  # (B, T)  negative A, ratio under the floor
            clip_high = (unclipped_ratio > 1 + epsilon_high) & (adv > 0)  # (B, T)  positive A, over the ceiling
            stats.update(clip_low=over_ratios(clip_low.to(mask.dtype)),
                         clip_high=over_ratios(clip_high.to(mask.dtype)),
                         clip_fraction=over_ratios((clip_low | clip_high).to(mask.dtype)))
        elif loss_type == "cispo":  # the tokens whose weight min(rho, eps_max) was capped
            stats["clip_fraction"] = over_ratios(((ratio > epsilon_high) & (adv > 0)).to(mask.dtype))
        elif loss_type == "vespo":
            stats["vespo_phi"] = over_sequences(phi)
        if entropies is not None:
            stats["entropy"] = over_tokens(entropies)
        if entropy_mask is not None:
            stats["entropy_kept"] = over_tokens(entropy_mask)
        if keep is not None:
            stats["off_policy_dropped"] = over_sequences(1 - keep)
    return loss, stats


def check_options(loss_type, beta, ref_logps, importance_sampling_level, top_entropy_quantile, entropy_coef,
                  entropies):
    """Refuse option values grpo_loss cannot honour, with a message naming the option."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta < 0 or (beta > 0 and ref_logps is None):
        raise ValueError(f"beta must be >= 0, and beta > 0 needs ref_logps; got beta={beta}, "
                         f"ref_logps {'missing' if ref_logps is None else 'given'}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if not 0 < top_entropy_quantile <= 1:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}")
    if (top_entropy_quantile < 1 or entropy_coef != 0) and entropies is None:
        raise ValueError("top_entropy_quantile < 1 or entropy_coef != 0 needs entropies= (B, T), the per-token "
                         "entropies")


def mean_stats(stats):
    """grpo_loss's statistics as plain means: {name: sum / count} (0 where the count is 0)."""
    return {name: total / count if count else 0.0 for name, (total, count) in stats.items()}


def needs_entropies(top_entropy_quantile=1.0, entropy_coef=0.0):
    """Whether grpo_loss needs the per-token entropies (the scoring pass computes them only then)."""
    return top_entropy_quantile < 1 or entropy_coef != 0
