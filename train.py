"""GRPO for visual grounding (MedGround-R1), in plain PyTorch.

One step: sample G completions per prompt -> score them -> group advantages -> clipped loss (+ KL to
the frozen reference) -> update -> log. Run ``python train.py`` for the offline demo (tiny model,
synthetic chest X-rays), ``python train.py --help`` for every option, or on GPUs:

    torchrun --nproc_per_node=8 train.py --dataset medrpg --data-root DIR --model /ckpt/Qwen2.5-VL-3B-Instruct
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import signal
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

import rewards as R
from data import DATASETS, DatasetError, check_images, load_dataset
from evaluate import metrics_of, predict
from grpo_min import dist
from grpo_min.checkpoint import (CheckpointError, check_checkpoint, check_output_dir, delete_outputs, find_resume_path,
                                 load_checkpoint, save_checkpoint, save_model)
from grpo_min.loss import group_advantages, grpo_loss
from grpo_min.models import compute_precision, load_model, load_reference, resolve_dtype, resolve_model_path
from grpo_min.prompts import load_template
from grpo_min.rollout import completion_logps, encode_prompts, generate_completions, special_token_ids


def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # --- what to train ---
    model: str = opt("tiny", "model folder (Qwen2.5-VL / Qwen2-VL save_pretrained), or 'tiny' for the demo model "
                     "(the word tiny also applies the demo preset to every option you do not set)")
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
    loss_type: str = opt("grpo", "token aggregation", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    scale_rewards: str = opt("group", "advantage scaling: group std, batch std or none", choices=("group", "batch", "none"))
    num_iterations: int = opt(1, "mu: updates per rollout (old log-probs from a forward after sampling)")
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
    max_steps: int | None = opt(None, "optimizer updates to run (overrides --num-train-epochs)")
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
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory)")
    freeze_vision: bool = opt(False, "train the language model only; the vision tower stays frozen")
    # --- evaluation, precision, misc ---
    eval_steps: int = opt(100, "evaluate on the val split every N steps (0: never)")
    eval_limit: int | None = opt(None, "evaluate on at most N val/test samples")
    eval_batch_size: int = opt(32, "prompts per generate call when evaluating")
    dtype: str = opt("auto", "compute precision: auto (bfloat16 on GPU, float32 on CPU), float32 or bfloat16; weights and "
                     "optimizer state stay float32 (mixed precision)", choices=("auto", "float32", "bfloat16"))
    min_pixels: int | None = opt(None, "processor's minimum image area in pixels")
    max_pixels: int | None = opt(None, "processor's maximum image area; default: its own, capped at 1003520 (1280 visual tokens)")
    seed: int = opt(0, "random seed (sampling, data order, the tiny model)")


# The demo preset: applied to the options the user did not set when --model tiny. Tuned for a tiny
# model on 2 CPU cores (see README, "The demo"): larger batches and learning rate than for a 3B VLM.
# Measured (README, "The demo"): with the vision tower trainable, lr 3e-4 lowered val Acc@0.5 from 32.5
# to 14.5 in 100 steps; frozen vision at lr 1e-4 keeps it stable.
TINY_PRESET = dict(batch_size=8, max_completion_length=48, learning_rate=1e-4, warmup_steps=20, beta=0.0,
                   max_steps=300, eval_steps=50, freeze_vision=True)


# Values that would crash a run much later, or silently train wrong (a negative clip norm flips the
# gradient, a negative epsilon never reinforces a good completion): refused before anything loads.
AT_LEAST_1, POSITIVE, NON_NEGATIVE = ((lambda v: v >= 1, "at least 1"), (lambda v: v > 0, "a positive number"),
                                      (lambda v: v >= 0, "0 or more"))
LIMITS = {
    "num_generations": (lambda v: v >= 2, "at least 2: a group of one has nothing to be relative to"),
    "batch_size": AT_LEAST_1, "gradient_accumulation_steps": AT_LEAST_1, "num_iterations": AT_LEAST_1,
    "max_completion_length": AT_LEAST_1, "max_bad_steps": AT_LEAST_1, "eval_batch_size": AT_LEAST_1,
    "temperature": POSITIVE, "epsilon": POSITIVE, "epsilon_high": POSITIVE, "learning_rate": POSITIVE,
    "num_train_epochs": POSITIVE,
    "beta": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "semantic_weight": NON_NEGATIVE,
    "max_grad_norm": (lambda v: v >= 0, "0 (no clipping) or more"),
    "max_steps": (lambda v: v >= 1, "at least 1 (leave it out to train --num-train-epochs)"),
    "save_steps": (lambda v: v >= 0, "0 (only on preemption) or more"),
    "save_total_limit": (lambda v: v >= 0, "0 (keep all) or more"),
    "eval_steps": (lambda v: v >= 0, "0 (never) or more"),
    "eval_limit": (lambda v: v >= 1, "at least 1 (leave it out to evaluate whole splits)"),
}


def parse_config(argv=None) -> Config:
    preset_text = ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in TINY_PRESET.items())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS,
                                     epilog=textwrap.fill(f"With --model tiny (the default) a demo preset replaces "
                                                          f"some defaults above: {preset_text}. Any option you "
                                                          "give wins over it.", 100, break_on_hyphens=False))
    for f in fields(Config):
        name, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        help += "" if "default:" in help else f" (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help)
            continue
        kind = int if "int" in f.type else float if "float" in f.type else str
        parser.add_argument(name, type=kind, choices=f.metadata.get("choices"), help=help)
    given = vars(parser.parse_args(argv))
    preset = {k: v for k, v in TINY_PRESET.items() if k not in given} if given.get("model", "tiny") == "tiny" else {}
    if "num_train_epochs" in given:  # training by epochs: the preset's step count must not override it
        preset.pop("max_steps", None)
    config = Config(**{**preset, **given})
    for name, (ok, expected) in LIMITS.items():
        value = getattr(config, name)
        if value is not None and not ok(value):
            parser.error(f"--{name.replace('_', '-')} {value}: expected {expected}")
    if preset:
        dist.print0("Demo preset for --model tiny (override any option to change it): " +
                    ", ".join(f"{k}={v}" for k, v in preset.items()))
    return config


def make_optimizer(model, cfg: Config, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    # fused=True updates all tensors in a few kernels instead of a Python loop over them: the same
    # AdamW update (tests/test_core.py compares the two), about 4x faster on 2 CPU cores for a 53 M
    # model (docs/PERFORMANCE.md). FSDP2's sharded parameters (DTensor) keep the default implementation.
    fused = cfg.optim == "adamw_torch_fused" and not any(_is_dtensor(p) for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused or None)

    def factor(step):  # LambdaLR multiplier of the peak learning rate
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[
            cfg.lr_scheduler]

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensor
        return False
    return isinstance(t, DTensor)


def prompt_indices(step: int, micro: int, cfg: Config, n: int, origin: tuple[int, int] = (0, 0)) -> list[int]:
    """Which training samples micro-batch ``micro`` of ``step`` uses on this rank.

    The data order is a fixed function of the seed: each epoch is a seeded permutation, consumed in
    order, every rank taking its own slice (a group never spans ranks). ``origin`` = (step, position
    in that stream) of the checkpoint a run resumed from, (0, 0) for a fresh run: a resumed run then
    continues exactly where the interrupted one stopped, even on another number of ranks or with
    another batch size.
    """
    start = data_position(step, cfg, origin) + (micro * dist.world_size() + dist.rank()) * cfg.batch_size
    return [int(epoch_order(cfg.seed, epoch, n)[pos]) for epoch, pos in
            (divmod(k, n) for k in range(start, start + cfg.batch_size))]


def data_position(step: int, cfg: Config, origin: tuple[int, int] = (0, 0)) -> int:
    """How many training prompts (all ranks together) were used before ``step``."""
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * dist.world_size()
    return origin[1] + (step - origin[0]) * per_step


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The seeded order of the n training samples in one epoch (computed once per epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def load_semantic_scorer(cfg: Config, device):
    """The frozen dual encoder of the semantic reward, or None when that reward is off."""
    from grpo_min.semantic import SemanticScorer, tiny_scorer_path

    choice = cfg.semantic_model
    if choice == "none" or cfg.semantic_weight == 0 or (choice == "auto" and cfg.dataset != "synthetic"):
        if choice == "auto" and cfg.dataset != "synthetic":
            dist.print0("Semantic reward: off (real data and no --semantic-model given; the tiny synthetic "
                        "scorer is never used on real data). Pass --semantic-model PATH to a CLIP-style folder.")
        return None
    if choice == "auto":  # the tiny scorer, fitted on synthetic crops; one judge for every training seed
        choice = dist.on_main_first(lambda: tiny_scorer_path(seed=0))
    elif not (Path(choice) / "config.json").is_file():
        raise SystemExit(f"error: --semantic-model {choice!r}: expected auto, none, or a local dual-encoder folder "
                         "with config.json (CLIP, SigLIP, ...; nothing is downloaded)")
    scorer = SemanticScorer.from_pretrained(choice, device=device, dtype=resolve_dtype(cfg.dtype, device))
    dist.print0(f"Semantic reward: {choice} (weight {cfg.semantic_weight}, on {cfg.semantic_on} format-valid completions)")
    return scorer


def load_template_or_exit(template: str) -> str:
    try:
        return load_template(template)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def load_splits(cfg: Config):
    """train / val / test, with every image opened once before training starts (bad ones dropped, reported)."""
    data_args = dict(data_root=cfg.data_root, image_root=cfg.image_root, seed=cfg.seed)
    try:  # rank 0 first: it may build a cache (M3D-RefSeg slices) that the other ranks then read
        splits = dist.on_main_first(lambda: [load_dataset(cfg.dataset, s, **data_args) for s in ("train", "val", "test")])
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    checked = []
    for name, ds in zip(("train", "val", "test"), splits):
        source = getattr(ds, "source", "")
        ds, report = check_images(ds)
        dist.print0(f"{cfg.dataset}/{name} images: {report}")
        if len(ds) == 0 and not (name == "val" and not cfg.eval_steps):  # val is read only by --eval-steps
            dropped = report.total + getattr(getattr(ds, "skipped", None), "total", 0)  # images + rows at load
            why = "every sample was skipped: see the reports above" if dropped else "the split is empty"
            raise SystemExit(f"error: {cfg.dataset}/{name} has no usable sample ({why}"
                             f"{'; ' + source if source else ''})")
        checked.append(ds)
    return checked


def evaluate_split(model, processor, samples, template, frame, cfg: Config, device) -> tuple[dict, list[dict]]:
    n = len(samples) if cfg.eval_limit is None else min(cfg.eval_limit, len(samples))
    with compute_precision(device, resolve_dtype(cfg.dtype, device)):
        rows = predict(model, processor, [samples[i] for i in range(n)], template, frame, cfg.eval_batch_size,
                       cfg.max_completion_length, progress=False, device=device)
    return metrics_of(rows), rows


class Preemption:
    """Remember a SIGTERM / SIGINT (SLURM sends SIGTERM before killing a job) until the step ends."""

    def __init__(self):
        self.requested, self.training = False, True
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        """Give the signals back to their earlier handlers (a caller of main() gets its Ctrl-C back)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        if not self.training:  # the final evaluation and save: nothing left to checkpoint
            print(f"[rank {dist.rank()}] got signal {signum}: training is done, finishing the final evaluation and "
                  "save (signal again to stop now)", flush=True)
            return
        print(f"[rank {dist.rank()}] got signal {signum}: saving a checkpoint at the end of this step", flush=True)

    def any_rank(self, device) -> bool:
        return dist.all_reduce_sum(torch.tensor([float(self.requested)], device=device)).item() > 0


def load_policy(path, cfg: Config, dtype, device):
    """(policy, processor, box frame): the model to train, in training mode, with the memory options."""
    policy, processor, frame = load_model(path, dtype=dtype, device=device, min_pixels=cfg.min_pixels,
                                          max_pixels=cfg.max_pixels)
    policy.train()  # from_pretrained returns eval mode, in which transformers skips gradient checkpointing
    if cfg.freeze_vision:
        policy.model.visual.requires_grad_(False)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, processor, frame


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut off by a crash counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def warn_config_changes(saved: dict, cfg: Config):
    ignore = {"resume", "overwrite", "output_dir", "max_steps", "num_train_epochs", "eval_steps", "eval_limit",
              "save_steps", "save_total_limit"}
    changed = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if k not in ignore and saved.get(k) != v}
    if changed:
        dist.print0("WARNING: resuming with a different configuration: " +
                    "; ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in changed.items()))


def main(argv=None):
    cfg = parse_config(argv)
    preemption = Preemption()
    try:
        return run(cfg, preemption)
    finally:
        preemption.restore()


def run(cfg: Config, preemption: Preemption):
    device = dist.setup()
    torch.manual_seed(cfg.seed + dist.rank())
    out = Path(cfg.output_dir)
    resume_path = find_resume_path(cfg.resume, out) if cfg.resume else None
    resume_state = check_checkpoint(resume_path) if resume_path is not None else None  # its trainer_state.json
    if resume_path is None and cfg.resume == "auto":
        dist.print0(f"--resume auto: no complete checkpoint in {out}; starting from the beginning")
    template = load_template_or_exit(cfg.template)
    t_start = time.time()

    # ------------------------------------------------------------------ models and data
    dtype = resolve_dtype(cfg.dtype, device)  # the compute precision; weights are loaded in float32
    amp = lambda: compute_precision(device, dtype)  # noqa: E731
    try:
        model_path = dist.on_main_first(lambda: resolve_model_path(cfg.model, cfg.seed))
    except (FileNotFoundError, ValueError) as e:  # no such folder, or a model family that is not supported
        raise SystemExit(f"error: {e}")
    # An earlier run in --output-dir: refused, or (--overwrite) deleted once every input has been checked.
    earlier_run = check_output_dir(out, resume_path, resume_state and resume_state["step"], overwrite=cfg.overwrite,
                                   resume_auto=cfg.resume == "auto",
                                   keep=tuple(p for p in (model_path, resume_path) if p is not None))
    # The data and the reward's scorer before the models: a mistake there is named in seconds, not
    # after minutes of loading a 7B checkpoint.
    train_set, val_set, test_set = load_splits(cfg)
    semantic_scorer = load_semantic_scorer(cfg, device)
    # Resuming loads the policy from the checkpoint; the reference is always the starting model.
    policy, processor, frame = load_policy(resume_path or model_path, cfg, torch.float32, device)
    # The reference runs exactly as the policy does (float32 weights, same autocast), so that its
    # log-probs equal the policy's at the start and the KL starts at 0.
    reference = load_reference(model_path, dtype=torch.float32, device=device) if cfg.beta > 0 else None
    reward_config = R.RewardConfig(format_weight=cfg.format_weight, spatial_weight=cfg.spatial_weight,
                                   spatial_kind=cfg.spatial_reward,
                                   semantic_weight=cfg.semantic_weight if semantic_scorer else 0.0,
                                   semantic_on=cfg.semantic_on)
    never_ids = special_token_ids(processor)["never"]
    # Gradient checkpointing cannot keep the prompt's KV cache in the policy's pass; the reference and
    # old-policy passes then take the same path, so that all three compute alike (KL 0 and ratio 1 at
    # the start, also in bfloat16).
    share_prompt = not cfg.gradient_checkpointing
    delete_outputs(earlier_run)  # only now: a refused run leaves the folder as it was
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    G = cfg.num_generations
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * dist.world_size()
    origin = (0, 0)  # (step, training-prompt position) the run starts from; a resumed run's comes from its checkpoint
    if resume_state is not None:
        origin = (resume_state["step"], resume_state.get("data_position", resume_state["step"] * per_step))
    # By epochs: the prompts left to see, in steps of this run's size (which may differ from the checkpoint's).
    total_steps = cfg.max_steps or origin[0] + math.ceil((cfg.num_train_epochs * len(train_set) - origin[1]) / per_step)
    dist.print0(f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f} M parameters, {len(train_set)} training "
                f"prompts, {total_steps} steps x {per_step} prompts x {G} completions, box frame '{frame}'")
    policy = dist.wrap(policy, fsdp=cfg.fsdp)
    if reference is not None and cfg.fsdp:
        reference = dist.wrap(reference, fsdp=True)
    raw = dist.unwrap(policy)
    if cfg.fsdp:  # FSDP2 must see one forward through the root before generate() calls submodules
        first = train_set[0]
        warm = encode_prompts(processor, [first.load_image()], [first.text], template, device=device)
        one_token = warm.inputs["input_ids"][:, -1:]
        for model in (policy, reference):
            if model is not None:
                with torch.no_grad(), amp():
                    completion_logps(model, warm, one_token, torch.ones_like(one_token, dtype=torch.float), group_size=1)
                model.reshard()  # the root stays unsharded after a forward; the optimizer must see the shards
    optimizer, scheduler = make_optimizer(policy, cfg, total_steps)

    start_step, bad_steps = 0, 0
    if resume_path is not None:
        state = load_checkpoint(resume_path, policy, optimizer, scheduler)
        warn_config_changes(state["config"], cfg)
        start_step, before = state["step"], state["before"]
        dist.print0(f"resumed from {resume_path} at step {start_step} (training prompt {origin[1]})")
        if state.get("world_size") != dist.world_size():
            dist.print0(f"WARNING: the checkpoint was written by {state.get('world_size')} processes, this run has "
                        f"{dist.world_size()}: the data continues where it stopped, but sampling starts from freshly "
                        "seeded generators, so the run will not repeat the uninterrupted one exactly.")
    else:
        before, _ = evaluate_split(raw, processor, test_set, template, frame, cfg, device)
        dist.print0(f"before GRPO, test: {json.dumps(before)}")
        # Seeded again here: building a model on first use (the tiny demo) draws random numbers, and
        # sampling must not depend on whether the model came from the cache. A resumed run instead
        # continues from the generator state saved in its checkpoint.
        torch.manual_seed(cfg.seed + dist.rank())
    log = None
    if dist.is_main():  # a resumed run rewrites the lines logged after its checkpoint
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        kept = [l for l in lines if _logged_step(l) <= start_step]
        (out / "metrics.jsonl").write_text("".join(l + "\n" for l in kept))
        log = open(out / "metrics.jsonl", "a")

    def checkpoint(step):
        return save_checkpoint(out, step, policy, processor, optimizer, scheduler,
                               {"config": asdict(cfg), "before": before,
                                "data_position": data_position(step, cfg, origin)},
                               cfg.save_total_limit)

    # ------------------------------------------------------------------ the GRPO loop
    for step in tqdm(range(start_step, total_steps), desc="GRPO", disable=not dist.is_main(),
                     initial=start_step, total=total_steps):
        t0 = time.time()
        # 1. Sample G completions for each prompt of each micro-batch, and score them.
        rollouts, all_scores = [], []
        for micro in range(cfg.gradient_accumulation_steps):
            samples = [train_set[i] for i in prompt_indices(step, micro, cfg, len(train_set), origin)]
            images = [s.load_image() for s in samples]
            prompts = encode_prompts(processor, images, [s.text for s in samples], template, device=device)
            with amp():
                rollout = generate_completions(raw, processor, prompts, num_generations=G, synced_gpus=cfg.fsdp,
                                               max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature)
            targets = [R.Target(box=s.box, orig_size=(s.width, s.height), resized_size=size, frame=frame,
                                phrase=s.text, image=img)
                       for s, img, size in zip(samples, images, prompts.resized_sizes) for _ in range(G)]
            rollouts.append(rollout)
            all_scores.append(R.score_completions(rollout.texts, targets, reward_config, semantic_scorer))
        t_gen = time.time() - t0

        # 2. Group-relative advantages, over the global batch (all ranks) so "batch" scaling is global.
        rewards = torch.cat([s.total for s in all_scores])  # (M*B*G,) this rank's completions
        global_rewards = dist.all_gather_cat(rewards.to(device))  # (ranks*M*B*G,)
        advantages = group_advantages(global_rewards, G, scale=cfg.scale_rewards)
        advantages = advantages.view(dist.world_size(), -1)[dist.rank()].cpu()  # (M*B*G,) this rank's slice
        num_items = dist.all_reduce_sum(torch.tensor(float(sum(r.completion_mask.sum() for r in rollouts)),
                                                     device=device)).item()  # dapo's normaliser

        # 3. Log-probs of the sampling policy (only when a rollout is reused, mu > 1) and of the reference.
        old_logps, ref_logps = [], []
        with torch.no_grad(), amp():
            for r in rollouts:
                args = (r.prompts, r.completion_ids, r.completion_mask)
                kw = dict(group_size=G, temperature=cfg.temperature, never_ids=never_ids, share_prompt=share_prompt)
                old_logps.append(completion_logps(raw, *args, **kw) if cfg.num_iterations > 1 else None)
                ref_logps.append(completion_logps(reference, *args, **kw) if reference is not None else None)

        # 4. The clipped policy loss, mu updates per rollout, gradient accumulation over micro-batches.
        stats_sum, grad_norm, skipped = {}, torch.tensor(0.0), False
        for _ in range(cfg.num_iterations):
            optimizer.zero_grad(set_to_none=True)
            total_loss = torch.zeros((), device=device)
            for m, r in enumerate(rollouts):
                adv = advantages[m * len(r.texts):(m + 1) * len(r.texts)].to(device)  # (B*G,)
                with dist.no_sync_unless_last(policy, m == len(rollouts) - 1):
                    with amp():  # the forward in the compute precision; log-probs come out in float32
                        logps = completion_logps(policy, r.prompts, r.completion_ids, r.completion_mask, group_size=G,
                                                 temperature=cfg.temperature, never_ids=never_ids,
                                                 share_prompt=share_prompt)  # (B*G, T)
                    old = old_logps[m] if old_logps[m] is not None else logps.detach()  # mu = 1: ratio 1
                    loss, stats = grpo_loss(logps, old, adv, r.completion_mask, ref_logps=ref_logps[m],
                                            beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                                            loss_type=cfg.loss_type, max_completion_length=cfg.max_completion_length,
                                            num_items_in_batch=num_items / dist.world_size())
                    # dapo is already normalised by the global token count (x ranks: DDP averages
                    # gradients), so its micro-batch losses add up; the other types average over them.
                    share = 1 if cfg.loss_type == "dapo" else len(rollouts)
                    (loss / share).backward()
                    total_loss += loss.detach()
                stats_sum["loss"] = stats_sum.get("loss", 0.0) + loss.item() / share / cfg.num_iterations  # as applied
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + v / len(rollouts) / cfg.num_iterations
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor; the global norm is the same on every rank
                grad_norm = grad_norm.full_tensor()
            # A non-finite loss or gradient on any rank skips this update everywhere: nothing is applied.
            finite = torch.isfinite(total_loss) & torch.isfinite(grad_norm.to(device))
            if dist.all_reduce_sum((~finite).float().reshape(1)).item() > 0:
                skipped = True
                optimizer.zero_grad(set_to_none=True)
                break
            optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the rate this step's update used (read before the schedule moves on)
        scheduler.step()
        bad_steps = bad_steps + 1 if skipped else 0

        # 5. Log one line per step (statistics reduced over ranks).
        lengths = torch.cat([r.completion_mask.sum(1) for r in rollouts])  # (M*B*G,)
        grouped = global_rewards.view(-1, G)
        local = {
            "reward": rewards.sum().item(), **{f"reward/{k}": torch.cat([s.terms[k] for s in all_scores]).sum().item()
                                              for k in all_scores[0].terms},
            "parse_failure_rate": float(sum(s.parse_failures for s in all_scores)),
            "reward_errors": float(sum(s.errors for s in all_scores)),
            "semantic_invalid_boxes": float(sum(s.details.get("semantic_invalid_boxes", 0) for s in all_scores)),
            "completion_length": lengths.sum().item(), "completion_tokens": lengths.sum().item(),
            **{k: v for k, v in stats_sum.items()},
        }
        summed = dist.reduce_dict_sum(local, device)
        n_completions = global_rewards.numel()
        record = {"step": step + 1, **{k: v / n_completions for k, v in summed.items() if k.startswith("reward")},
                  "reward_std": global_rewards.std().item(),
                  "frac_zero_std": (grouped.amax(1) == grouped.amin(1)).float().mean().item(),
                  "parse_failure_rate": summed["parse_failure_rate"] / n_completions,
                  "reward_errors": int(summed["reward_errors"]),
                  **({"semantic_invalid_boxes": int(summed["semantic_invalid_boxes"])} if semantic_scorer else {}),
                  **{k: summed[k] / dist.world_size() for k in ["loss", *stats_sum] if k != "loss"},
                  "loss": summed["loss"] / dist.world_size(), "grad_norm": float(grad_norm),
                  "completion_length": summed["completion_length"] / n_completions,
                  "completion_tokens": int(summed["completion_tokens"]),
                  "generate_s": round(t_gen, 3), "step_time_s": round(time.time() - t0, 3),
                  "lr": lr, "skipped_update": skipped}
        if device.type == "cuda":  # this rank's peak since the start (weights, optimizer, activations, cache)
            record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
        if dist.world_size() > 1 and not cfg.fsdp:  # DDP: every rank must hold the same weights; check it
            checksum = dist.all_gather_cat(torch.stack([p.detach().double().sum() for p in policy.parameters()])
                                           .sum().reshape(1).to(device))
            record["replica_divergence"] = (checksum.max() - checksum.min()).item()
        if cfg.eval_steps and ((step + 1) % cfg.eval_steps == 0 or step + 1 == total_steps):
            metrics, rows = evaluate_split(raw, processor, val_set, template, frame, cfg, device)
            record.update({"eval/acc@0.5": metrics["acc@0.5"], "eval/miou": metrics["miou"],
                           "eval/parse_failures": metrics["parse_failures"]})
            if dist.is_main():
                (out / "completions").mkdir(exist_ok=True)
                with open(out / "completions" / f"step-{step + 1:06d}.txt", "w") as f:
                    for row in rows[:8]:
                        f.write(f"{row['phrase']}  (truth {row['ground_truth']}, IoU {row['iou']:.2f})\n"
                                f"  {row['output']}\n\n")
                tqdm.write(f"step {step + 1}: val acc@0.5 {metrics['acc@0.5']:.2f}  miou {metrics['miou']:.2f}  "
                           f"reward {record['reward']:.3f}")
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if bad_steps >= cfg.max_bad_steps:
            dist.print0(f"Stopping: {bad_steps} updates in a row had a non-finite loss or gradient norm (none was "
                        f"applied). The last good checkpoint in {out} is intact; lower --learning-rate or check "
                        "the data, then --resume auto.")
            dist.cleanup()
            return 1
        if preemption.any_rank(device):
            path = checkpoint(step + 1)
            dist.print0(f"Preempted: saved {path}. Resume with the same command plus --resume auto.")
            dist.cleanup()
            return 0
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0:
            checkpoint(step + 1)

    # ------------------------------------------------------------------ the end: test numbers, final model
    preemption.training = False
    after, _ = evaluate_split(raw, processor, test_set, template, frame, cfg, device)
    save_model(out / "final", policy, processor)
    if dist.is_main():
        summary = {"before": before, "after": after, "wall_s": round(time.time() - t_start, 1)}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"after GRPO, test: {json.dumps(after)}")
        print(f"test acc@0.5 {before['acc@0.5']:.2f} -> {after['acc@0.5']:.2f}, miou {before['miou']:.2f} -> "
              f"{after['miou']:.2f} ({summary['wall_s']:.0f} s). Final model: {out / 'final'}")
    dist.cleanup()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckpointError as e:  # a refused checkpoint or output folder: the message says what to do
        sys.exit(f"error: {e}")
