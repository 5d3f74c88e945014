"""Loss variants for ablations: each one a small, annotated difference from GRPO's loss in loss.py.

``grpo_loss`` (loss.py) computes GRPO; an option there calls one function here, which holds the line or two
that the variant changes, its equation and its paper. The options and their defaults are TRL 1.16's
(``GRPOConfig``), and tests/test_loss.py holds every one equal to TRL's own code (golden values). In GRPO's
notation (docs/METHOD.md, "GRPO"): rho_t = pi_theta(o_t) / pi_old(o_t), A the sequence's advantage,
sg() stops the gradient. B = completions, T = padded completion length; mask (B, T) marks completion tokens.

Why a file of its own: GRPO's path in loss.py stays as short as it was, and each variant below reads
on its own, top to bottom, in about 15 lines. Importance ratio: ``sequence_log_ratio`` (GSPO).
Per-token policy term, replacing -min(rho A, clip(rho) A): ``cispo_loss``, ``sapo_loss``, ``vespo_loss``;
``two_sided_ratio`` (INTELLECT-2) changes one factor of it. Which tokens count: ``off_policy_keep``
(DeepSeek-V3.2), ``high_entropy_mask`` (top-entropy tokens). Aggregation: ``luspo_aggregate``.
KL: ``bias_corrected_kl`` (DeepSeek-V3.2). Added term: ``entropy_bonus``. Advantages: ``normalize_then_sum`` (GDPO).
"""

import math

import torch

from grpo_min import dist


def sequence_log_ratio(log_ratio, mask):
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): one importance ratio per sequence, not per token.

    GRPO:  rho_t = exp(log pi_theta(o_t) - log pi_old(o_t))             one ratio per token  (B, T)
    GSPO:  s     = exp(mean_t [log pi_theta(o_t) - log pi_old(o_t)])    one ratio per sequence (B, 1)
    The ratio is then clipped exactly as GRPO clips rho_t; every token of a sequence shares it, so a
    sequence is clipped or not as a whole (``importance_sampling_level="sequence"``).
    """
    return ((log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1))  # (B, 1)


def two_sided_ratio(ratio, delta):
    """Two-sided clipping (INTELLECT-2, arXiv 2505.07291): the unclipped branch is capped at delta too.

    GRPO:  -min(rho A,              clip(rho, 1 - eps, 1 + eps_high) A)
    here:  -min(min(rho, delta) A,  clip(rho, 1 - eps, 1 + eps_high) A)
    For A < 0, GRPO's min picks rho A however large rho grows, an unbounded loss on a token the policy
    now overweights; delta (> 1 + eps_high) bounds it. For A > 0 nothing changes.
    """
    return torch.clamp(ratio, max=delta)


def cispo_loss(ratio, logps, adv, epsilon_high):
    """CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance weight, never the gradient.

    GRPO:   l_t = -min(rho_t A, clip(rho_t) A)       a clipped token gets no gradient at all
    CISPO:  l_t = -sg(min(rho_t, eps_max)) A log pi_theta(o_t)
    Every token keeps its REINFORCE gradient A grad log pi, weighted by its ratio capped at eps_max
    (``epsilon_high`` taken as the cap itself, e.g. 5.0, not as 1 + epsilon_high). Normalised like dapo.
    """
    return -torch.clamp(ratio, max=epsilon_high).detach() * adv * logps  # (B, T)


def sapo_loss(ratio, adv, temperature_pos, temperature_neg):
    """SAPO (Gao et al. 2025, arXiv 2511.20347): a soft, smooth gate in place of the hard clip.

    GRPO:  l_t = -min(rho_t A, clip(rho_t) A)
    SAPO:  l_t = -(4 / tau) sigmoid(tau (rho_t - 1)) A,   tau = tau_pos if A > 0 else tau_neg
    Its gradient, A rho_t 4 sigmoid' (...) grad log pi, equals GRPO's at rho = 1 and fades smoothly as
    rho moves away instead of dropping to 0 at the clip bound. Normalised like grpo.
    """
    tau = torch.where(adv > 0, temperature_pos, temperature_neg)  # (B, 1)
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv  # (B, T)


def vespo_loss(log_ratio, logps, adv, mask, k_pos, k_neg, lambda_pos, lambda_neg):
    """VESPO (arXiv 2602.10693): a smooth gamma weight of the whole sequence's ratio, no clipping.

    W      = exp(sum_t log rho_t)                         the sequence's ratio (a product, not GSPO's mean)
    phi(W) = exp(lambda) W^k exp(-lambda W)               phi(1) = 1, peak at W = k / lambda; (k, lambda) by sign(A)
    l_t    = -sg(phi(W)) A log pi_theta(o_t)              normalised like dapo
    phi shrinks the REINFORCE gradient of a sequence whose ratio drifted far from 1, either way. Computed
    in log space; log rho_t clamped to [-20, 20] and log W to [log 1e-8, 20], as the paper's code does.
    """
    with torch.no_grad():
        log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(dim=1, keepdim=True).clamp(math.log(1e-8), 20.0)  # (B, 1)
        k = torch.where(adv >= 0, k_pos, k_neg)  # (B, 1)
        lam = torch.where(adv >= 0, lambda_pos, lambda_neg).clamp(min=1e-4)  # (B, 1)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * adv * logps, phi  # (B, T), (B, 1)


def off_policy_keep(adv, logps, old_logps, mask, threshold):
    """Off-policy sequence mask (DeepSeek-V3.2, arXiv 2512.02556, eq. 9): drop the stale negatives.

    A sequence is left out of the policy term when A < 0 and mean_t (log pi_old - log pi_theta) > threshold:
    a bad sample the policy has already moved away from teaches little and destabilises. Returns (B, 1),
    1 = keep. The KL term still applies to its tokens.
    """
    stale = ((old_logps - logps.detach()) * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return ((adv >= 0) | (stale <= threshold)).to(mask.dtype)  # (B, 1)


def high_entropy_mask(entropies, mask, top_entropy_quantile):
    """Learn on the high-entropy "forking" tokens only (Wang et al. 2025, arXiv 2506.01939).

    The policy term keeps a token when its entropy is at or above the (1 - rho) quantile of the
    entropies of all completion tokens on all ranks (rho = ``top_entropy_quantile``, e.g. 0.2: the top
    20%). The quantile is taken over every rank's tokens (a collective: every rank must call the loss
    together), in float32 as TRL does. Returns a (B, T) float mask.
    """
    local = entropies[mask.bool()].detach().float()  # (n,) this rank's completion tokens
    counts = dist.all_gather_cat(torch.tensor([local.numel()], device=local.device))  # (ranks,)
    padded = torch.full((int(counts.max()),), float("nan"), device=local.device)  # ranks differ in n: NaN pads
    padded[:local.numel()] = local
    gathered = dist.all_gather_cat(padded)
    gathered = gathered[~gathered.isnan()]  # (all ranks' tokens,)
    if gathered.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(gathered, 1 - top_entropy_quantile)
    return ((entropies.detach() * mask >= threshold) & mask.bool()).to(mask.dtype)  # (B, T)


def luspo_aggregate(masked_loss):
    """LUSPO (arXiv 2602.05261): GSPO's loss, each sequence's loss times its length, then the mean.

    grpo:   mean_i (1/|o_i|) sum_t l_it        every sequence weighs the same
    luspo:  mean_i           sum_t l_it        = mean_i |o_i| l_i with GSPO's per-sequence loss l_i
    Each sequence then weighs by its length in the gradient, not equally as in grpo's mean over sequences.
    """
    return masked_loss.sum(dim=1).mean()


def bias_corrected_kl(kl, ratio):
    """Unbiased KL estimate (DeepSeek-V3.2, arXiv 2512.02556): k3 times the importance ratio.

    The tokens were sampled from pi_old, not pi_theta, so k3's gradient is biased once the two differ;
    weighting by rho (differentiable) makes it the reverse-KL gradient. The value is unchanged at rho = 1,
    the gradient is not. Off by default, as in DeepSeekMath and the paper's era (TRL 1.16 turns it on).
    """
    return kl * ratio  # (B, T)


def entropy_bonus(entropies, mask, entropy_coef):
    """Entropy regularisation (TRL's static ``entropy_coef``): loss - coef x H.

    H is the mean entropy of the completion tokens the policy term acts on (those the entropy mask kept,
    if any), whatever the loss type's own normalisation; its gradient raises the entropy, i.e. explores.
    """
    return -entropy_coef * (entropies * mask).sum() / mask.sum().clamp(min=1)


def normalize_then_sum(terms, group_size, weights, eps):
    """GDPO (arXiv 2601.05242): z-score each reward term within its group before summing the terms.

    GRPO:  r_i = sum_k w_k r_ik;  A_i = (r_i - mean_group r) / (std_group r + eps)
    GDPO:  z_ik = (r_ik - mean_group r_k) / (std_group r_k + eps);  s_i = sum_k w_k z_ik;
           A_i = (s_i - mean_batch s) / (std_batch s + eps)
    Summing first lets a term with a wide spread drown the others (and distinct reward combinations
    collapse to one sum); normalising each term first gives every term its say. ``scale_rewards`` does
    not apply: the final scaling is always over the batch. terms (N, K), weights (K,); returns (N,).
    """
    grouped = terms.view(-1, group_size, terms.shape[1])  # (N/G, G, K)
    z = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + eps)  # (N/G, G, K)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # (N/G, 1, K) as in GRPO
    z = torch.where(constant, torch.zeros_like(z), z).view(terms.shape)  # (N, K)
    summed = (z * weights).sum(dim=1)  # (N,)
    if summed.amax() == summed.amin():  # every completion alike: no signal (and no rounding noise blown up)
        return torch.zeros_like(summed)
    return (summed - summed.mean()) / (summed.std() + eps)  # (N,)
