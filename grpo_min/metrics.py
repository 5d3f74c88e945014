"""The numbers a step logs: this rank's sums reduced over all ranks into means, phase timings, and where they
go besides metrics.jsonl (--report-to: TensorBoard or W&B).

Infrastructure, off the reading path: ``grpo_step`` hands over what it computed; the keys and their meaning
are README's "Reading a metrics line".
"""
from __future__ import annotations

import importlib.util
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from grpo_min import dist
from grpo_min.files import InputError


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


REPORT_TO = ("none", "tensorboard", "wandb")  # --report-to, TRL's names; each needs the package of that name


def check_report_to(kind: str):
    """Refuse (InputError, one line naming the package) a --report-to whose package is not installed (train.py
    calls this before any model loads)."""
    if kind != "none" and importlib.util.find_spec(kind) is None:
        raise InputError(f"--report-to {kind} needs the '{kind}' package, which grpo_min does not install: "
                         f"pip install {kind}")


class Reporter:
    """Every number of a metrics.jsonl line, also sent to TensorBoard or W&B (rank 0 only, as the file).

    The package is imported here, when asked for, never by grpo_min otherwise. TensorBoard: event files in
    ``<output-dir>/tensorboard`` (``tensorboard --logdir <output-dir>``); a resumed run hides the events logged
    after its checkpoint, as metrics.jsonl drops those lines. W&B: a run named after the output folder, in
    project $WANDB_PROJECT (default grpo_min), its files in ``<output-dir>/wandb``; a resumed run continues the
    same W&B run (its id is kept there), and W&B's own variables apply (WANDB_MODE=offline, WANDB_ENTITY).
    """

    def __init__(self, kind: str, out_dir: Path, start_step: int, config: dict):
        if kind not in REPORT_TO[1:]:
            raise ValueError(f"report_to {kind!r}: expected one of {', '.join(REPORT_TO[1:])}")
        check_report_to(kind)
        self.kind, out_dir = kind, Path(out_dir)
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events from an interrupted run's steps after the checkpoint are dropped from view
            self.writer = SummaryWriter(out_dir / "tensorboard", purge_step=start_step + 1 if start_step else None)
        elif kind == "wandb":
            import wandb

            id_file = out_dir / "wandb" / "run_id"
            id_file.parent.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "grpo_min"), name=out_dir.name,
                                  dir=out_dir, id=id_file.read_text().strip() if id_file.exists() else None,
                                  resume="allow", config=config)
            id_file.write_text(self.run.id + "\n")

    def log(self, record: dict):
        """One metrics.jsonl line: its numbers (booleans as 0 / 1) at its step."""
        step = record["step"]
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.kind == "tensorboard":
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()  # a crash loses no line that metrics.jsonl holds
        else:
            self.run.log(values, step=step)

    def close(self):
        self.writer.close() if self.kind == "tensorboard" else self.run.finish()
