"""GRPO for visual grounding (MedGround-R1), in plain PyTorch.

One step (``grpo_step``): sample G completions per prompt -> score them -> group advantages -> clipped
loss (+ KL to the frozen reference) -> update. ``python train.py`` runs the offline demo (a tiny model,
synthetic chest X-rays); ``python train.py --help`` lists every option; on real data, on GPUs:

    torchrun --nproc_per_node=8 train.py --dataset ms-cxr --data-root DIR --image-root DIR \\
        --model /path/to/Qwen2.5-VL-3B-Instruct
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable
from pathlib import Path

import torch
from tqdm import tqdm

import rewards as R
from data import DATASETS, load_splits, stream_indices
from evaluate import evaluate_samples, metrics_of
from grpo_min import dist
from grpo_min.checkpoint import (MetricsLog, Preemption, check_output_dir, check_resumable, delete_outputs,
                                 load_checkpoint, resume_checkpoint, save_checkpoint, save_model, show_config_changes)
from grpo_min.cli import banner, parse_options
from grpo_min.files import InputError, check_output, write_json, write_text
from grpo_min.lora import adapters_off
from grpo_min.loss import (AGGREGATIONS, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, SCALES, TOKEN_SUM_LOSS_TYPES,
                           group_advantages, grpo_loss, needs_entropies)
from grpo_min.metrics import (REPORT_TO, PhaseTimer, add_stats, check_report_to, rollout_record, run_checks,
                              update_record)
from grpo_min.models import compute_precision, load_policy, load_reference, resolve_dtype, resolve_model_path
from grpo_min.optim import clipped_step, make_optimizer
from grpo_min.prompts import encode_prompts, load_template, special_token_ids
from grpo_min.rollout import completion_logps, generate_completions
from grpo_min.semantic import SemanticScorer, build_scorer, scorer_path


def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # --- what to train ---
    model: str = opt("tiny", "model folder (Qwen2.5-VL / Qwen2-VL save_pretrained); default: tiny, the demo model, "
                     "on --dataset synthetic; required on real data")
    dataset: str = opt("synthetic", "dataset name", choices=DATASETS)
    data_root: str | None = opt(None, "dataset folder (real datasets)")
    image_root: str | None = opt(None, "image folder (default: --data-root)")
    template: str = opt("chain-of-box", "prompt: chain-of-box, plain, or a text file with a {question} slot")
    output_dir: str = opt("runs/grpo", "where metrics.jsonl, checkpoints and the final model go")
    # --- GRPO (names as in TRL's GRPOConfig) ---
    num_generations: int = opt(8, "G: completions sampled per prompt")
    batch_size: int = opt(1, "prompts per process per micro-batch")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer update")
    max_completion_length: int = opt(256, "longest completion sampled, in tokens")
    temperature: float = opt(1.0, "sampling temperature (log-probs use the same)")
    beta: float = opt(0.04, "weight of the k3 KL to the frozen reference; 0 loads no reference")
    epsilon: float = opt(0.2, "clip range: ratio clipped to [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float | None = opt(None, "upper clip range (DAPO's clip-higher); default: --epsilon")
    loss_type: str = opt("grpo", "token aggregation (grpo, bnpo, dr_grpo, dapo) or loss variant (luspo, cispo, sapo, "
                         "vespo; grpo_min/variants.py)", choices=LOSS_TYPES)
    scale_rewards: str = opt("group", "advantage scaling: group std, batch std or none", choices=SCALES)
    num_iterations: int = opt(1, "mu: optimizer updates per rollout (old log-probs from a forward after sampling)")
    # --- GRPO variants, for ablations (TRL 1.16's names; docs/METHOD.md, "Loss variants") ---
    importance_sampling_level: str = opt("token", "one ratio per token, or per sequence (GSPO)",
                                         choices=IMPORTANCE_SAMPLING_LEVELS)
    delta: float | None = opt(None, "two-sided clipping (INTELLECT-2): cap the unclipped ratio at delta (> 1 + "
                              "epsilon_high); default: off")
    use_bias_correction_kl: bool = opt(False, "multiply the k3 KL by the importance ratio (DeepSeek-V3.2; TRL 1.16's "
                                       "default is on)")
    top_entropy_quantile: float = opt(1.0, "policy loss on the top fraction of tokens by entropy, over all ranks (0.2: "
                                      "the top 20%; 1: all tokens)")
    off_policy_mask_threshold: float | None = opt(None, "drop a sequence with A < 0 whose mean log(pi_old / pi) "
                                                  "exceeds this (DeepSeek-V3.2); default: off")
    entropy_coef: float = opt(0.0, "entropy bonus: minus coef x the mean token entropy (0: off)")
    mask_truncated_completions: bool = opt(False, "no loss on completions that hit --max-completion-length without EOS "
                                           "(DAPO); they still count in their group's advantages")
    multi_objective_aggregation: str = opt("sum_then_normalize", "advantages from the weighted sum of the reward "
                                           "terms, or each term z-scored in its group first (GDPO)",
                                           choices=AGGREGATIONS)
    sapo_temperature_pos: float = opt(1.0, "SAPO's gate temperature for A > 0 (--loss-type sapo)")
    sapo_temperature_neg: float = opt(1.05, "SAPO's gate temperature for A <= 0 (--loss-type sapo)")
    vespo_k_pos: float = opt(2.0, "VESPO's gamma-weight power for A >= 0 (--loss-type vespo)")
    vespo_k_neg: float = opt(3.0, "VESPO's gamma-weight power for A < 0 (--loss-type vespo)")
    vespo_lambda_pos: float = opt(3.0, "VESPO's gamma-weight decay for A >= 0 (--loss-type vespo)")
    vespo_lambda_neg: float = opt(2.0, "VESPO's gamma-weight decay for A < 0 (--loss-type vespo)")
    # --- rewards ---
    spatial_reward: str = opt("hard", "hard: 1[IoU > 0.5] (the paper); iou: continuous IoU", choices=("hard", "iou"))
    format_weight: float = opt(1.0, "weight of the format reward")
    spatial_weight: float = opt(1.0, "weight of the spatial reward")
    semantic_model: str = opt("auto", "dual encoder folder for the semantic reward (CLIP, SigLIP, e.g. PubMedCLIP); "
                              "'auto': the tiny synthetic scorer on --dataset synthetic, off on real data; 'none': off")
    semantic_weight: float = opt(1.0, "weight of the semantic reward (0: off)")
    semantic_on: str = opt("all", "score all format-valid completions, or only the spatially wrong ones (IoU <= 0.5)",
                           choices=("all", "negatives"))
    # --- optimisation ---
    learning_rate: float = opt(1e-6, "peak learning rate (AdamW)")
    optim: str = opt("adamw_torch_fused", "AdamW implementation (TRL's names): fused kernels, or torch's default loop",
                     choices=("adamw_torch_fused", "adamw_torch"))
    lr_scheduler: str = opt("constant", "learning-rate schedule after warm-up", choices=("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "linear warm-up steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)")
    max_steps: int | None = opt(None, "optimizer updates to run (overrides --num-train-epochs; 0: no GRPO, the "
                                "starting model evaluated, as an ablation's baseline)")
    num_train_epochs: float = opt(2.0, "passes over the training prompts, when --max-steps is not given")
    # --- checkpoints, resume, faults ---
    save_steps: int = opt(0, "write checkpoint-<step> every N steps (0: only on preemption)")
    save_total_limit: int | None = opt(2, "keep only the last K checkpoints (0: keep all)")
    resume: str | None = opt(None, "'auto' (latest complete checkpoint in --output-dir; none: start from the beginning) "
                             "or a checkpoint folder")
    overwrite: bool = opt(False, "start over in an --output-dir that holds an earlier run's outputs, deleting them")
    max_bad_steps: int = opt(5, "stop after this many updates in a row with a non-finite loss or gradient")
    # --- memory ---
    fsdp: bool = opt(False, "shard policy and reference with FSDP2 (vision tower and each decoder layer a unit)")
    gradient_checkpointing: bool = opt(False, "recompute each decoder layer in the policy's backward, the prompt "
                                       "still shared: far less activation memory (at Qwen2.5-VL-3B's size about 1 "
                                       "instead of 9 MB per completion token, an estimate), a policy pass 1.1x to 1.5x "
                                       "as long (one more forward); sampling and the reference pass unchanged. For long"
                                       " completions, large G or large images")
    freeze_vision: bool = opt(False, "train the language model only; the vision tower stays frozen")
    compile_generation: bool = opt(False, "GPU: sample with a static KV cache and a decode step compiled with CUDA "
                                   "graphs (torch.compile); not with --fsdp")
    # --- LoRA (names as in peft's LoraConfig) ---
    lora_r: int = opt(0, "LoRA rank: adapters on a frozen base, which is also the reference (0: off, full fine-tuning)")
    lora_alpha: float | None = opt(None, "LoRA scale: adapter outputs are multiplied by alpha / r (default: 2 x --lora-r)")
    lora_target_modules: str | None = opt(None, "comma-separated names of the Linear layers to adapt (default: the "
                                          "language model's q/k/v/o_proj and gate/up/down_proj; vision tower excluded)")
    lora_vision: bool = opt(False, "adapt the vision tower too (its attention's qkv and proj, and its MLP)")
    merge_lora: bool = opt(False, "final/ as a plain model, the adapters merged in (default: the adapter, peft's layout)")
    # --- evaluation, precision, misc ---
    eval_steps: int = opt(100, "evaluate on the val split every N steps (0: never)")
    eval_limit: int | None = opt(None, "evaluate on at most N val/test samples")
    eval_batch_size: int = opt(32, "prompts per generate call when evaluating")
    report_to: str = opt("none", "also send every metrics.jsonl value to TensorBoard (event files in "
                         "<output-dir>/tensorboard) or W&B (<output-dir>/wandb); needs that package, which "
                         "requirements.txt does not install", choices=REPORT_TO)
    dtype: str = opt("auto", "compute precision: auto (bfloat16 on GPU, float32 on CPU), float32 or bfloat16; trained "
                     "weights and optimizer state stay float32 (mixed precision); a LoRA base is stored in it",
                     choices=("auto", "float32", "bfloat16"))
    min_pixels: int | None = opt(None, "processor's minimum image area in pixels")
    max_pixels: int | None = opt(None, "processor's maximum image area; default: its own, capped at 1003520 (1280 visual tokens)")
    seed: int = opt(0, "random seed (sampling, data order, the tiny model)")


def parse_config(argv=None) -> Config:
    return parse_options(Config, argv, description=__doc__)


LOSS_OPTIONS = ("beta", "epsilon", "epsilon_high", "loss_type", "max_completion_length", "importance_sampling_level",
                "delta", "use_bias_correction_kl", "top_entropy_quantile", "off_policy_mask_threshold", "entropy_coef",
                "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_k_neg", "vespo_lambda_pos",
                "vespo_lambda_neg")


def loss_options(cfg: Config) -> dict:
    """grpo_loss's keywords from the config: the options of the same names (TRL's), built in this one place."""
    return {name: getattr(cfg, name) for name in LOSS_OPTIONS}


# ====================================================================================== one GRPO step
def grpo_step(cfg: Config, policy, reference, processor, optimizer, scheduler, batches, reward, template: str, *,
              passes: ModelPasses | None = None, updates: int | None = None,
              timer: PhaseTimer | None = None) -> list[dict]:
    """One rollout and its optimizer updates: grpo_min/core.py's step (S1-S6 of docs/METHOD.md), made fast
    and distributed. Tests hold the two equal (tests/test_plain_core.py).

    batches: this rank's micro-batches (lists of data.Sample), whose gradients accumulate into each update.
    reward(texts, samples, images, resized_sizes) -> rewards.Scores (rewards.grounding_reward). policy may be
    wrapped (DDP, FSDP2); reference is None when beta is 0 or with LoRA (the policy with its adapters off
    serves). passes: how forward passes are made (``model_passes``; built from cfg when not given). updates:
    optimizer updates on this rollout (default: mu, --num-iterations). Returns one metrics.jsonl record per
    update (all ranks).
    """
    G, model, updates = cfg.num_generations, dist.unwrap(policy), updates or cfg.num_iterations
    device = next(model.parameters()).device
    timer = timer or PhaseTimer(device)
    passes = passes or model_passes(cfg, processor, device)
    eos = torch.tensor(special_token_ids(processor)["eos"], device=device)

    # S1-S3. Encode each micro-batch's prompts, sample G completions per prompt, and score them.
    rollouts, scores = [], []
    for samples in batches:
        with timer("encode"):
            images = [s.load_image() for s in samples]
            prompts = encode_prompts(processor, images, [s.text for s in samples], template, device=device)
        with timer("generate"), passes.precision():
            rollouts.append(generate_completions(model, processor, prompts, num_generations=G, synced_gpus=cfg.fsdp,
                                                 max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                                 compile_generation=cfg.compile_generation))
        with timer("rewards"):
            scores.append(reward(rollouts[-1].texts, samples, images, prompts.resized_sizes))

    # S4. Group-relative advantages, over the global batch (all ranks), so that "batch" scaling is global.
    rewards = torch.cat([s.total for s in scores])  # (M*B*G,) this rank's completions
    all_rewards = dist.all_gather_cat(rewards.to(device))  # (ranks*M*B*G,)
    if cfg.multi_objective_aggregation == "normalize_then_sum":  # GDPO: each reward term normalised on its own
        advantages = term_advantages(scores, G, device)
    else:
        advantages = group_advantages(all_rewards, G, scale=cfg.scale_rewards)
    advantages = advantages.view(dist.world_size(), -1)[dist.rank()].cpu()  # (M*B*G,) this rank's slice
    truncated = [~torch.isin(r.completion_ids, eos).any(dim=1) for r in rollouts]  # (B*G,) each: no EOS, cut off
    loss_masks = [r.completion_mask * ~t[:, None] if cfg.mask_truncated_completions else r.completion_mask
                  for r, t in zip(rollouts, truncated)]  # (B*G, T) each: DAPO's truncation masking, when asked
    # dapo, cispo and vespo divide by the completion tokens of the global batch; under DDP, which averages
    # gradients over the ranks, each rank's share of it.
    num_items = None
    if cfg.loss_type in TOKEN_SUM_LOSS_TYPES:
        num_items = dist.all_reduce_sum(sum(m.sum() for m in loss_masks).to(device)).item() / dist.world_size()

    # S5. Log-probs without gradients: the sampling policy's (needed only when a rollout serves several updates)
    #     and the reference's.
    old_logps, ref_logps = [], []
    with torch.no_grad(), passes.precision():
        for r in rollouts:
            with timer("old_policy"):
                old_logps.append(passes.logps(model, r) if cfg.num_iterations > 1 else None)
            if cfg.beta == 0:
                ref_logps.append(None)
            elif cfg.lora_r:  # the reference is the policy itself with its adapters off: no second copy
                with timer("reference"), adapters_off(model):
                    ref_logps.append(passes.logps(model, r))
            else:
                with timer("reference"):
                    ref_logps.append(passes.logps(reference, r))

    # S6. `updates` optimizer updates, each accumulating the clipped policy loss (+ beta KL) over the micro-batches.
    records = []
    with_entropies = needs_entropies(cfg.top_entropy_quantile, cfg.entropy_coef)  # scored only when the loss needs them
    for _ in range(updates):
        optimizer.zero_grad(set_to_none=True)
        total_loss, applied_loss, stats = torch.zeros((), device=device), 0.0, {}
        for m, r in enumerate(rollouts):
            adv = advantages[m * len(r.texts):(m + 1) * len(r.texts)].to(device)  # (B*G,)
            with timer("policy"), dist.no_sync_unless_last(policy, m == len(rollouts) - 1):
                with passes.precision():  # the forward in the compute precision; log-probs come out in float32
                    scored = passes.logps(policy, r, entropies=with_entropies)
                logps, entropies = scored if with_entropies else (scored, None)  # (B*G, T) each
                old = old_logps[m] if old_logps[m] is not None else logps.detach()  # one update: ratio 1
                loss, micro_stats = grpo_loss(logps, old, adv, loss_masks[m], ref_logps=ref_logps[m],
                                              entropies=entropies, num_items_in_batch=num_items, **loss_options(cfg))
                # dapo (cispo, vespo) is already normalised by the global token count (x ranks: DDP averages
                # gradients), so its micro-batch losses add up; the other types average over the micro-batches.
                share = 1 if cfg.loss_type in TOKEN_SUM_LOSS_TYPES else len(rollouts)
                (loss / share).backward()
            total_loss += loss.detach()
            applied_loss += loss.item() / share  # the objective as applied
            add_stats(stats, micro_stats)  # sums and counts: weighted by tokens over micro-batches and ranks
        with timer("optimizer"):
            grad_norm, skipped, lr = clipped_step(policy, optimizer, scheduler, total_loss, cfg.max_grad_norm)
        records.append(update_record(applied_loss, stats, grad_norm, lr, skipped, device))
    rollout_stats = rollout_record(scores, rollouts, rewards, all_rewards, G, device, torch.cat(truncated))
    return [{**rollout_stats, **record} for record in records]


@dataclass
class ModelPasses:
    """How a run's forward passes are made, fixed once per run: their precision, and the scoring pass."""

    precision: Callable  # () -> context manager: autocast to the compute dtype (weights stay float32)
    # (model, rollout.Rollout, entropies=False) -> (B*G, T) log-probs of its completion tokens, float32; with
    # entropies=True, (log-probs, per-token entropies)
    logps: Callable


def model_passes(cfg: Config, processor, device) -> ModelPasses:
    """This run's ModelPasses: the compute precision, and scoring that runs each prompt once per group, its G
    completions on the prompt's KV cache (rollout.completion_logps), with or without gradient checkpointing."""
    dtype = resolve_dtype(cfg.dtype, device)
    never = special_token_ids(processor)["never"]

    def logps(model, r, entropies=False):
        return completion_logps(model, r.prompts, r.completion_ids, r.completion_mask, group_size=cfg.num_generations,
                                temperature=cfg.temperature, never_ids=never, entropies=entropies)

    return ModelPasses(precision=lambda: compute_precision(device, dtype), logps=logps)


# ====================================================================================== the run
def main(argv=None):
    cfg = parse_config(argv)
    with Preemption() as preemption:
        try:
            return train(cfg, preemption)
        except InputError as e:  # a refused input or output (model, scorer, checkpoint, folder): the message says why
            raise SystemExit(f"error: {e}")


def train(cfg: Config, preemption: Preemption):
    t_start = time.time()
    device = dist.setup()
    torch.manual_seed(cfg.seed + dist.rank())
    out = Path(cfg.output_dir)
    template = load_template(cfg.template)  # (checked when the options were parsed)
    check_report_to(cfg.report_to)  # its package, named before anything loads
    resume_path, resume_state = check_folders(cfg, out)  # the output folder, and the checkpoint to resume from

    # ------------------------------------------------------------------ data, then models
    # The data first: a mistake there is named in seconds, before any model is built, downloaded or loaded.
    train_set, val_set, test_set = load_splits(cfg.dataset, data_root=cfg.data_root, image_root=cfg.image_root,
                                               seed=cfg.seed, need_val=cfg.eval_steps > 0)
    mu, per_rollout = cfg.num_iterations, cfg.batch_size * cfg.gradient_accumulation_steps * dist.world_size()
    origin = (0, 0)  # (step, training-prompt position) the run starts from; a resumed run's comes from its checkpoint
    if resume_state is not None:
        origin = (resume_state["step"], resume_state.get("data_position", resume_state["step"] * per_rollout))
    # By epochs: the prompts left to see, in rollouts of this run's size (which may differ from the checkpoint's).
    total_steps = cfg.max_steps if cfg.max_steps is not None else origin[0] + mu * math.ceil(
        (cfg.num_train_epochs * len(train_set) - origin[1]) / per_rollout)
    if origin[0] > total_steps:  # (equal: a run cut off after its last checkpoint; it evaluates and saves final/)
        raise InputError(f"{resume_path} is at step {origin[0]}, past the end of this run ({total_steps} steps): "
                         "nothing would train; raise --max-steps or --num-train-epochs")
    semantic_path = scorer_path(cfg.semantic_model, cfg.dataset, cfg.semantic_weight)
    model_path = dist.on_main_first(lambda: resolve_model_path(cfg.model, cfg.seed))  # a folder that loads
    # An earlier run in --output-dir: refused, or (--overwrite) deleted once every input has been checked.
    earlier_run = check_output_dir(out, resume_path, resume_state and resume_state["step"], overwrite=cfg.overwrite,
                                   resume_auto=cfg.resume == "auto",
                                   keep=tuple(p for p in (model_path, resume_path) if p is not None))
    semantic_scorer = semantic_path and SemanticScorer.from_pretrained(
        dist.on_main_first(lambda: build_scorer(semantic_path)), device=device, dtype=resolve_dtype(cfg.dtype, device))
    # Resuming loads the policy from the checkpoint (LoRA: the adapter; the base from --model). The reference is the
    # starting model (LoRA: the policy, adapters off) and computes exactly as the policy does: the KL starts at 0.
    policy, processor, frame = load_policy(model_path, cfg, device, resume_path)
    reference = load_reference(model_path, dtype=torch.float32, device=device) if cfg.beta and not cfg.lora_r else None
    reward = R.grounding_reward(R.RewardConfig(format_weight=cfg.format_weight, spatial_weight=cfg.spatial_weight,
                                               spatial_kind=cfg.spatial_reward, semantic_on=cfg.semantic_on,
                                               semantic_weight=cfg.semantic_weight if semantic_scorer else 0.0),
                                semantic_scorer, frame=frame, num_generations=cfg.num_generations)

    delete_outputs(earlier_run)  # only now: a refused run leaves the folder as it was
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(cfg))
    policy = dist.wrap(policy, fsdp=cfg.fsdp)
    reference = dist.wrap(reference, fsdp=True) if reference is not None and cfg.fsdp else reference
    dist.print0(banner(cfg, model_path=model_path, policy=policy, frame=frame, splits=(train_set, val_set, test_set),
                       semantic_path=semantic_path, total_steps=total_steps))
    optimizer, scheduler = make_optimizer(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                          fused=cfg.optim == "adamw_torch_fused", warmup_steps=cfg.warmup_steps,
                                          total_steps=total_steps, schedule=cfg.lr_scheduler)
    evaluate = lambda samples: evaluate_samples(  # noqa: E731  greedy decoding; rows of predictions
        dist.unwrap(policy), processor, samples, template, frame, limit=cfg.eval_limit, device=device,
        batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_completion_length, dtype=resolve_dtype(cfg.dtype, device),
        synced_gpus=cfg.fsdp)

    passes = model_passes(cfg, processor, device)

    step, bad_steps = 0, 0
    if resume_path is not None:
        state = load_checkpoint(resume_path, policy, optimizer, scheduler)
        show_config_changes(state["config"], asdict(cfg), step=state["step"])
        step, before = state["step"], state["before"]
        dist.print0(f"resumed from {resume_path} at step {step} (training prompt {origin[1]})")
        if state.get("world_size") != dist.world_size():
            dist.print0(f"WARNING: the checkpoint was written by {state.get('world_size')} processes, this run has "
                        f"{dist.world_size()}: the data continues where it stopped, but sampling starts from freshly "
                        "seeded generators, so the run will not repeat the uninterrupted one exactly.")
    else:
        before = metrics_of(evaluate(test_set))
        dist.print0(f"before GRPO, test: {json.dumps(before)}")
        # Seeded again here: building a model on first use (the tiny demo) draws random numbers, and
        # sampling must not depend on whether the model came from the cache. A resumed run instead
        # continues from the generator state saved in its checkpoint.
        torch.manual_seed(cfg.seed + dist.rank())
    log = MetricsLog(out, step, report_to=cfg.report_to, config=asdict(cfg))
    checkpoint = lambda: save_checkpoint(  # noqa: E731
        out, step, policy, processor, optimizer, scheduler,
        {"config": asdict(cfg), "before": before, "data_position": data_position(step, cfg, origin)},
        cfg.save_total_limit, base_model=model_path)

    # ------------------------------------------------------------------ the GRPO loop
    bar = tqdm(total=total_steps, initial=step, desc="GRPO", disable=not dist.is_main())
    while step < total_steps:
        t0, timer, first, last = time.time(), PhaseTimer(device), step, min(step + mu, total_steps)
        records = grpo_step(cfg, policy, reference, processor, optimizer, scheduler,
                            rollout_batches(train_set, step, cfg, origin), reward, template, passes=passes,
                            updates=last - first, timer=timer)
        crossed = lambda every: every and last // every > first // every  # noqa: E731  (a rollout spans mu steps)
        records[-1].update(run_checks(policy, device, cfg))
        for record in records:
            step, bad_steps = step + 1, bad_steps + 1 if record["skipped_update"] else 0
            record.update(step=step, generate_s=round(timer.sampling(), 3),
                          step_time_s=round((time.time() - t0) / len(records), 3))
            if step == last and cfg.eval_steps and (crossed(cfg.eval_steps) or step == total_steps):
                record.update(eval_metrics(evaluate(val_set), out, step, record))
            log.write(record)
        bar.update(len(records))
        if bad_steps >= cfg.max_bad_steps:
            dist.print0(f"Stopping: {bad_steps} updates in a row had a non-finite loss or gradient norm (none was "
                        f"applied). The last good checkpoint in {out} is intact; lower --learning-rate or check "
                        "the data, then --resume auto.")
            log.close()
            dist.cleanup()
            return 1
        if preemption.any_rank(device):
            dist.print0(f"Preempted: saved {checkpoint()}. Resume with the same command plus --resume auto.")
            log.close()
            dist.cleanup()
            return 0
        if crossed(cfg.save_steps):
            checkpoint()

    # ------------------------------------------------------------------ the end: test numbers, final model
    preemption.training = False
    log.close()
    after = metrics_of(evaluate(test_set))
    save_model(out / "final", policy, processor, base_model=model_path, merge=cfg.merge_lora)
    if dist.is_main():
        summary = {"before": before, "after": after, "wall_s": round(time.time() - t_start, 1)}
        write_json(out / "summary.json", summary)
        print(f"after GRPO, test: {json.dumps(after)}")
        print(f"test acc@0.5 {before['acc@0.5']:.2f} -> {after['acc@0.5']:.2f}, miou {before['miou']:.2f} -> "
              f"{after['miou']:.2f} ({summary['wall_s']:.0f} s). Final model: {out / 'final'}")
    dist.cleanup()


# ====================================================================================== helpers of the run
def term_advantages(scores, group_size: int, device) -> torch.Tensor:
    """GDPO's advantages over the global batch (all ranks): each reward term z-scored within its group, summed
    with the terms' weights, the sum z-scored over the batch (``group_advantages(aggregation="normalize_then_sum")``).
    A truncated completion keeps its rewards here: --mask-truncated-completions acts on the loss only."""
    names = list(scores[0].terms)
    terms = torch.stack([torch.cat([s.terms[k] for s in scores]) for k in names], dim=1)  # (M*B*G, K)
    return group_advantages(dist.all_gather_cat(terms.to(device)), group_size, aggregation="normalize_then_sum",
                            weights=[scores[0].weights[k] for k in names])  # (ranks*M*B*G,)


def check_folders(cfg: Config, out: Path) -> tuple[Path | None, dict | None]:
    """Before anything loads: --output-dir is writable and apart from every input (--output-dir M would write
    config.json over the model's), and the checkpoint to resume from, validated (its trainer state; one that
    trained another set of parameters is refused). Returns (checkpoint folder, trainer state), or (None, None)."""
    check_output(out, {"--model": None if cfg.model == "tiny" else cfg.model, "--data-root": cfg.data_root,
                       "--image-root": cfg.image_root, "--resume": None if cfg.resume == "auto" else cfg.resume,
                       "--semantic-model": None if cfg.semantic_model in ("auto", "none") else cfg.semantic_model})
    resume_path, resume_state = resume_checkpoint(cfg.resume, out) if cfg.resume else (None, None)
    if resume_path is None and cfg.resume == "auto":
        dist.print0(f"--resume auto: no complete checkpoint in {out}; starting from the beginning")
    if resume_state is not None:
        check_resumable(resume_state["config"], asdict(cfg), resume_path)
    return resume_path, resume_state


def rollout_batches(train_set, step: int, cfg: Config, origin: tuple[int, int] = (0, 0)) -> list[list]:
    """This rank's micro-batches for the rollout that starts at ``step``.

    The data order is a fixed function of the seed (``data.stream_indices``): a stream of seeded
    permutations, one per epoch, consumed in order, every rank taking its own slice (a group never spans
    ranks). ``origin`` = (step, position in that stream) of the checkpoint a run resumed from, (0, 0) for
    a fresh run: a resumed run then continues exactly where the interrupted one stopped, even on another
    number of ranks or with another batch size.
    """
    start = data_position(step, cfg, origin)
    return [[train_set[i] for i in stream_indices(start + (m * dist.world_size() + dist.rank()) * cfg.batch_size,
                                                  cfg.batch_size, len(train_set), cfg.seed)]
            for m in range(cfg.gradient_accumulation_steps)]


def data_position(step: int, cfg: Config, origin: tuple[int, int] = (0, 0)) -> int:
    """How many training prompts (all ranks together) the rollouts before ``step`` used (mu steps each)."""
    per_rollout = cfg.batch_size * cfg.gradient_accumulation_steps * dist.world_size()
    return origin[1] + math.ceil((step - origin[0]) / cfg.num_iterations) * per_rollout


def eval_metrics(rows: list[dict], out: Path, step: int, record: dict) -> dict:
    """The val metrics for the log line; rank 0 also writes a few answers and prints a line."""
    metrics = metrics_of(rows)
    if dist.is_main():
        write_text(out / "completions" / f"step-{step:06d}.txt", "".join(
            f"{row['phrase']}  (truth {row['ground_truth']}, IoU {row['iou']:.2f})\n  {row['output']}\n\n"
            for row in rows[:8]))
        tqdm.write(f"step {step}: val acc@0.5 {metrics['acc@0.5']:.2f}  miou {metrics['miou']:.2f}  "
                   f"reward {record['reward']:.3f}")
    return {"eval/acc@0.5": metrics["acc@0.5"], "eval/miou": metrics["miou"],
            "eval/parse_failures": metrics["parse_failures"]}


if __name__ == "__main__":
    sys.exit(main())
