"""train.py's command line: options from its Config dataclass, their checks, the demo preset, the banner.

Infrastructure, off the reading path: what an option means is in train.py's Config; how it becomes a flag,
which values are refused before anything loads, and what the offline demo changes, is here.
"""
from __future__ import annotations

import argparse
import math
import textwrap
from dataclasses import fields

from grpo_min import dist
from grpo_min.prompts import load_template

# The demo preset: applied to the options the user did not set, for `--dataset synthetic --model tiny`
# (the embedded default) only. Tuned for a tiny model on 2 CPU cores (docs/RESULTS.md): larger batches and
# learning rate than for a 3B VLM, a frozen vision tower (trainable at lr 3e-4 it lowered val Acc@0.5 from
# 32.5 to 14.5 in 100 steps), and every mechanism of the method at work: a frozen reference (beta > 0) and two
# updates per rollout with a clip range of 0.1, so that the KL and the clipped fraction are visibly non-zero
# (at epsilon 0.2 and this learning rate under 0.1% of tokens are clipped). 800 steps = 400 rollouts: 600
# left the mean test mIoU gain of three seeds at +3.1, under the demo's +4 target.
DEMO_PRESET = dict(batch_size=8, max_completion_length=48, learning_rate=1e-4, warmup_steps=40, beta=0.04,
                   num_iterations=2, epsilon=0.1, max_steps=800, eval_steps=100, freeze_vision=True)
DEMO_LORA_LEARNING_RATE = 5e-4  # `python train.py --lora-r 16`: adapters need a larger rate (docs/RESULTS.md)

REAL_DATA_COMMAND = ("torchrun --nproc_per_node=8 train.py --dataset ms-cxr --data-root DIR --image-root DIR "
                     "--model /path/to/Qwen2.5-VL-3B-Instruct")

# Values that would crash a run much later, or silently train wrong (a negative clip norm flips the
# gradient, a negative epsilon never reinforces a good completion, epsilon 1 or more makes the lower clip bound
# 1 - epsilon zero or negative): refused before anything loads. Every float option must also be finite: an
# infinite weight decay writes NaN weights, a NaN reward weight compares as neither too small nor too large.
_AT_LEAST_1, _POSITIVE, _NON_NEGATIVE = ((lambda v: v >= 1, "at least 1"), (lambda v: v > 0, "a positive number"),
                                         (lambda v: v >= 0, "0 or more"))
LIMITS = {
    "num_generations": (lambda v: v >= 2, "at least 2: a group of one has nothing to be relative to"),
    "batch_size": _AT_LEAST_1, "gradient_accumulation_steps": _AT_LEAST_1, "num_iterations": _AT_LEAST_1,
    "max_completion_length": _AT_LEAST_1, "max_bad_steps": _AT_LEAST_1, "eval_batch_size": _AT_LEAST_1,
    "temperature": _POSITIVE, "epsilon_high": _POSITIVE, "learning_rate": _POSITIVE,
    "num_train_epochs": _POSITIVE,
    "epsilon": (lambda v: 0 < v < 1, "above 0 and below 1 (the ratio's lower bound is 1 - epsilon)"),
    "beta": _NON_NEGATIVE, "weight_decay": _NON_NEGATIVE, "warmup_steps": _NON_NEGATIVE,
    "semantic_weight": _NON_NEGATIVE, "format_weight": _NON_NEGATIVE, "spatial_weight": _NON_NEGATIVE,
    "seed": (lambda v: 0 <= v < 2**32, "0 or more and below 2**32"),
    "min_pixels": (lambda v: v >= 1, "at least 1"),
    "max_pixels": (lambda v: v >= 56 * 56, "at least 3136 (56 x 56 pixels: one visual token)"),
    "max_grad_norm": (lambda v: v >= 0, "0 (no clipping) or more"),
    "max_steps": (lambda v: v >= 0, "0 (no GRPO) or more (leave it out to train --num-train-epochs)"),
    "save_steps": (lambda v: v >= 0, "0 (only on preemption) or more"),
    "save_total_limit": (lambda v: v >= 0, "0 (keep all) or more"),
    "eval_steps": (lambda v: v >= 0, "0 (never) or more"),
    "eval_limit": (lambda v: v >= 1, "at least 1 (leave it out to evaluate whole splits)"),
    "lora_r": (lambda v: v >= 0, "0 (off: full fine-tuning) or more"), "lora_alpha": _POSITIVE,
    "delta": (lambda v: v > 1, "above 1 (above 1 + epsilon_high to matter)"),
    "top_entropy_quantile": (lambda v: 0 < v <= 1, "above 0 and at most 1 (1: every token)"),
    "off_policy_mask_threshold": _NON_NEGATIVE, "entropy_coef": _NON_NEGATIVE,
    "sapo_temperature_pos": _POSITIVE, "sapo_temperature_neg": _POSITIVE, "vespo_k_pos": _NON_NEGATIVE,
    "vespo_k_neg": _NON_NEGATIVE, "vespo_lambda_pos": _POSITIVE, "vespo_lambda_neg": _POSITIVE,
}
# Options that shape the adapters: with LoRA off (--lora-r 0) they would silently do nothing.
LORA_OPTIONS = ("lora_alpha", "lora_target_modules", "lora_vision", "merge_lora")
# Loss options that act only with some --loss-type values (grpo_min/variants.py): elsewhere they would do nothing.
LOSS_TYPE_OPTIONS = {"delta": ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"),
                     "sapo_temperature_pos": ("sapo",), "sapo_temperature_neg": ("sapo",),
                     **{f"vespo_{p}": ("vespo",) for p in ("k_pos", "k_neg", "lambda_pos", "lambda_neg")}}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_options(config_class, argv=None, description: str = ""):
    """A ``config_class`` instance from the command line: every field a flag, its metadata's help a help line.

    The demo preset fills the fields the user left out when the run is the demo; values outside LIMITS
    stop with an error that names the flag and what it expects; on a real dataset ``--model`` is required.
    """
    preset_text = ", ".join(flag(k) + ("" if v is True else f" {v}") for k, v in DEMO_PRESET.items())
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        epilog=textwrap.fill(f"The demo (--dataset synthetic --model tiny, the defaults) replaces some defaults "
                             f"above: {preset_text} (with --lora-r: --learning-rate {DEMO_LORA_LEARNING_RATE}). "
                             "Any option you give wins over it.", 100,
                             break_on_hyphens=False))
    for f in fields(config_class):
        help = f.metadata["help"]
        help += "" if "default:" in help else f" (default: {f.default})"
        help = help.replace("%", "%%")  # argparse formats help lines with %: a literal one must be doubled
        if f.type == "bool":
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help)
            continue
        kind = int if "int" in f.type else float if "float" in f.type else str
        parser.add_argument(flag(f.name), type=kind, choices=f.metadata.get("choices"), help=help)
    given = vars(parser.parse_args(argv))

    dataset = given.get("dataset", "synthetic")
    if dataset != "synthetic" and "model" not in given:  # the tiny demo model has never seen a real image
        parser.error(f"--dataset {dataset} needs --model: a Qwen2.5-VL or Qwen2-VL folder, e.g.\n  {REAL_DATA_COMMAND}")
    model = given.get("model", "tiny")
    preset = {k: v for k, v in DEMO_PRESET.items() if k not in given} if (dataset, model) == ("synthetic", "tiny") else {}
    if "num_train_epochs" in given:  # training by epochs: the preset's step count must not override it
        preset.pop("max_steps", None)
    if given.get("lora_vision"):  # adapters in the vision tower: the preset's frozen tower must not refuse them
        preset.pop("freeze_vision", None)
    if given.get("lora_r") and "learning_rate" in preset:
        preset["learning_rate"] = DEMO_LORA_LEARNING_RATE
    config = config_class(**{**preset, **given, "model": model})
    for f in fields(config_class):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"{flag(f.name)} {value}: expected a finite number")
    for name, (ok, expected) in LIMITS.items():
        value = getattr(config, name, None)
        if value is not None and not ok(value):
            parser.error(f"{flag(name)} {value}: expected {expected}")
    if config.min_pixels is not None and config.max_pixels is not None and config.min_pixels > config.max_pixels:
        parser.error(f"--min-pixels {config.min_pixels} is above --max-pixels {config.max_pixels}")
    try:  # a template file that is missing, unreadable or lacks its {question} slot
        load_template(config.template)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    if config.compile_generation and config.fsdp:
        parser.error("--compile-generation does not combine with --fsdp: FSDP gathers weights inside each forward, "
                     "which a CUDA graph cannot replay")
    check_loss_options(parser, config, {f.name: f.default for f in fields(config_class)})
    check_lora(parser, config, {f.name: f.default for f in fields(config_class)})
    if preset:
        dist.print0("Demo preset (override any option to change it): " +
                    ", ".join(f"{k}={v}" for k, v in preset.items()))
    if model == "tiny" and dataset != "synthetic":
        dist.print0("WARNING: --model tiny has never seen a real image: this run only smoke-tests the pipeline.")
    return config


def check_loss_options(parser, config, defaults: dict):
    """Refuse loss options that would do nothing with the chosen --loss-type or advantage aggregation."""
    for name, loss_types in LOSS_TYPE_OPTIONS.items():
        if getattr(config, name) != defaults[name] and config.loss_type not in loss_types:
            parser.error(f"{flag(name)} acts only with --loss-type {' or '.join(loss_types)}, not {config.loss_type}")
    if config.multi_objective_aggregation == "normalize_then_sum" and config.scale_rewards != defaults["scale_rewards"]:
        parser.error("--scale-rewards does not apply to --multi-objective-aggregation normalize_then_sum (GDPO "
                     "always scales by the batch std)")


def check_lora(parser, config, defaults: dict):
    """Refuse LoRA options that contradict each other or would do nothing; fill in lora_alpha's default (2 r)."""
    if not config.lora_r:
        unused = [flag(k) for k in LORA_OPTIONS if getattr(config, k) != defaults[k]]
        if unused:
            parser.error(f"{', '.join(unused)}: LoRA is off; add --lora-r R (e.g. 16) to train adapters")
        return
    if config.lora_vision and config.freeze_vision:
        parser.error("--lora-vision trains adapters in the vision tower, --freeze-vision keeps it unchanged: "
                     "choose one")
    if config.lora_target_modules is not None:
        names = [t.strip() for t in config.lora_target_modules.split(",")]
        if not all(names):
            parser.error(f"--lora-target-modules {config.lora_target_modules!r}: expected comma-separated module "
                         "names, e.g. q_proj,v_proj")
        config.lora_target_modules = ",".join(names)
    if config.lora_alpha is None:
        config.lora_alpha = float(2 * config.lora_r)


def banner(cfg, *, model_path, policy, frame: str, splits, semantic_path, total_steps: int) -> str:
    """The start-up block every run prints: what is trained, on what, rewarded how, with which settings."""
    ranks = dist.world_size()
    parameters = sum(p.numel() for p in policy.parameters())
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    prompts = ranks * cfg.batch_size * cfg.gradient_accumulation_steps
    if semantic_path is None:
        why = ("--semantic-model none" if cfg.semantic_model == "none" else "--semantic-weight 0"
               if cfg.semantic_weight == 0 else "real data and no --semantic-model: the tiny synthetic scorer never "
               "judges real images; pass --semantic-model PATH to a CLIP-style folder")
        semantic = f"semantic OFF ({why})"
    else:
        scorer = "the tiny synthetic scorer" if semantic_path == "tiny" else semantic_path
        semantic = f"semantic x{cfg.semantic_weight:g} ({scorer}, on {cfg.semantic_on} format-valid completions)"
    spatial = "IoU > 0.5" if cfg.spatial_reward == "hard" else "IoU"
    lines = [
        ("model", f"{model_path} ({parameters / 1e6:.2f} M parameters, {trained / 1e6:.2f} M trained, box frame "
                  f"'{frame}')"),
        ("data", f"{cfg.dataset}: " + ", ".join(f"{name} {len(s)}" for name, s in zip(("train", "val", "test"), splits))),
        ("prompt", f"{cfg.template} template"),
        ("rewards", f"format x{cfg.format_weight:g} + spatial x{cfg.spatial_weight:g} ({spatial}) + {semantic}"),
        ("GRPO", f"G {cfg.num_generations}, {prompts} prompts per update ({ranks} rank(s) x {cfg.batch_size} x "
                 f"{cfg.gradient_accumulation_steps} accumulation), {total_steps} steps, {cfg.num_iterations} update(s) "
                 f"per rollout, beta {cfg.beta:g}" + (" (no reference loaded)" if cfg.beta == 0 else
                                                      " (reference: the base, adapters off)" if cfg.lora_r else "") +
                 f", epsilon {cfg.epsilon:g}, loss {cfg.loss_type}"),
        ("optimizer", f"AdamW lr {cfg.learning_rate:g} ({cfg.warmup_steps} warm-up steps, then {cfg.lr_scheduler}), "
                      f"weight decay {cfg.weight_decay:g}, clip {cfg.max_grad_norm:g}"),
        ("parallel", f"{type(policy).__name__} on {ranks} rank(s)"),
        ("output", cfg.output_dir),
    ]
    if cfg.lora_r:
        lines.insert(1, ("LoRA", f"r {cfg.lora_r}, alpha {cfg.lora_alpha:g} on "
                                 f"{cfg.lora_target_modules or 'the language model projections'}"
                                 f"{' and the vision tower' if cfg.lora_vision else ''}; base in "
                                 f"{str(next(policy.parameters()).dtype).replace('torch.', '')}, "
                                 f"final/ {'merged' if cfg.merge_lora else 'an adapter'}"))
    return "\n".join(f"  {k:<9} {v}" for k, v in lines)
