"""The numbers a step logs: this rank's sums reduced over all ranks into means, and phase timings.

Infrastructure, off the reading path: ``grpo_step`` hands over what it computed; the keys and their meaning
are README's "Reading a metrics line".
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from grpo_min import dist


def rollout_record(scores, rollouts, rewards: torch.Tensor, all_rewards: torch.Tensor, group_size: int,
                   device, truncated: torch.Tensor) -> dict:
    """Reward, parse and length statistics of one rollout, over every rank's completions.

    scores: this rank's rewards.Scores (one per micro-batch); rollouts: its rollout.Rollout records; rewards:
    (N,) its total rewards; all_rewards: every rank's, gathered; truncated: (N,) its completions that hit
    the length limit without an EOS.
    """
    lengths = torch.cat([r.completion_mask.sum(1) for r in rollouts])  # (N,)
    semantic_on = "semantic" in scores[0].terms
    local = {
        "reward": rewards.sum().item(),
        **{f"reward/{k}": torch.cat([s.terms[k] for s in scores]).sum().item() for k in scores[0].terms},
        "parse_failure_rate": float(sum(s.parse_failures for s in scores)),
        "reward_errors": float(sum(s.errors for s in scores)),
        "semantic_scored": float(sum(s.details.get("semantic_scored", 0) for s in scores)),
        "semantic_invalid_boxes": float(sum(s.details.get("semantic_invalid_boxes", 0) for s in scores)),
        "completion_tokens": lengths.sum().item(),
        "truncated": truncated.sum().item(),
    }
    summed = dist.reduce_dict_sum(local, device)
    n, grouped = all_rewards.numel(), all_rewards.view(-1, group_size)
    return {**{k: v / n for k, v in summed.items() if k.startswith("reward") and k != "reward_errors"},
            "reward_std": all_rewards.std().item(),
            "frac_zero_std": (grouped.amax(1) == grouped.amin(1)).float().mean().item(),
            "parse_failure_rate": summed["parse_failure_rate"] / n,
            "reward_errors": int(summed["reward_errors"]),
            **({k: int(summed[k]) for k in ("semantic_scored", "semantic_invalid_boxes")} if semantic_on else {}),
            "truncated_fraction": summed["truncated"] / n,
            "completion_length": summed["completion_tokens"] / n,
            "completion_tokens": int(summed["completion_tokens"])}


def add_stats(totals: dict, stats: dict) -> dict:
    """Add one micro-batch's grpo_loss statistics, {name: (sum, count)}, into running totals (in place)."""
    for name, (value, count) in stats.items():
        total, n = totals.get(name, (0.0, 0.0))
        totals[name] = (total + value, n + count)
    return totals


def update_record(loss: float, stats: dict, grad_norm, lr: float, skipped: bool, device) -> dict:
    """One optimizer update's loss (mean over ranks), loss statistics, gradient norm, learning rate.

    stats: this rank's {name: (sum, count)} over its micro-batches (``add_stats``); each statistic is its sum over
    every rank divided by its count over every rank, i.e. weighted by tokens (or sequences), as TRL logs them.
    """
    flat = {"loss": loss, **{f"{k}/sum": v for k, (v, _) in stats.items()},
            **{f"{k}/count": n for k, (_, n) in stats.items()}}
    summed = dist.reduce_dict_sum(flat, device)
    means = {k: summed[f"{k}/sum"] / summed[f"{k}/count"] if summed[f"{k}/count"] else 0.0 for k in stats}
    return {"loss": summed["loss"] / dist.world_size(), **means, "grad_norm": float(grad_norm), "lr": lr,
            "skipped_update": skipped}


def run_checks(policy, device, config) -> dict:
    """Health of the run after a rollout's updates: the DDP replicas' agreement, the GPU memory peak."""
    checks = {}
    if device.type == "cuda":  # this rank's peak since the start (weights, optimizer, activations, cache)
        checks["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    if dist.world_size() > 1 and not config.fsdp:  # DDP: every rank must hold the same weights; check it
        checksum = torch.stack([p.detach().double().sum() for p in policy.parameters()]).sum().reshape(1)
        checksums = dist.all_gather_cat(checksum.to(device))
        checks["replica_divergence"] = (checksums.max() - checksums.min()).item()
    return checks


class PhaseTimer:
    """Wall seconds per named phase of a step (``with timer("generate"): ...``), summed over calls.

    On a GPU it waits for queued kernels before reading the clock, so each phase gets its own time.
    """

    def __init__(self, device):
        self.device, self.seconds = device, defaultdict(float)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, phase: str):
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.seconds[phase] += time.perf_counter() - t0

    def sampling(self) -> float:
        """Seconds spent producing and scoring the completions (``generate_s`` in metrics.jsonl)."""
        return self.seconds["encode"] + self.seconds["generate"] + self.seconds["rewards"]
