"""LoRA in plain PyTorch: low-rank adapters on a frozen model, saved in peft's file layout.

Each targeted ``nn.Linear`` (W: in -> out) is replaced in place by a ``LoraLinear`` that holds it:

    y = W x + (lora_alpha / r) * B (A (dropout(x)))       A: (r, in), B: (out, r), B = 0 at the start

Only A and B train: r * (in + out) numbers per layer instead of in * out. Since B starts at 0, the
adapted model starts equal to the base; with the adapters switched off (``adapters_off``) the same
model *is* the base, which serves as GRPO's reference policy without a second copy of the weights.

    >>> model, processor, _ = load_model("tiny")                   # doctest: +SKIP
    >>> add_lora(model, r=16, lora_alpha=32)                       # doctest: +SKIP
    >>> with adapters_off(model): ref_logits = model(**inputs).logits   # doctest: +SKIP
    >>> save_adapter("out/adapter", model, "Qwen/Qwen2.5-VL-3B-Instruct")  # doctest: +SKIP

``save_adapter`` writes adapter_config.json and adapter_model.safetensors with peft's names, so
``peft.PeftModel.from_pretrained(base, folder)`` and vLLM (``--enable-lora``) read the folder as is;
``merge_lora`` folds the adapters into W for a plain ``save_pretrained`` model.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from grpo_min.files import InputError, read_json_object

# Qwen2.5-VL (transformers 5) names them model.language_model.layers.N.self_attn.q_proj, ...mlp.down_proj.
LANGUAGE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The vision blocks (model.visual.blocks.N) name their attention attn.qkv / attn.proj; their MLP
# reuses gate_proj / up_proj / down_proj, so the names above alone would reach into the tower.
VISION_TARGETS = ("attn.qkv", "attn.proj")  # not bare "proj": the patch embedding is a Conv3d named proj
VISION_TOWER = r".*\.visual\..*"  # as peft's exclude_modules: a regex the whole module name must match
PEFT_PREFIX = "base_model.model."  # peft's key = PEFT_PREFIX + module name + ".lora_A.weight"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class LoraLinear(nn.Module):
    """``base_layer(x) + scale * lora_B(lora_A(dropout(x)))``, or ``base_layer(x)`` while switched off."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float):
        super().__init__()
        self.base_layer, self.r, self.lora_alpha, self.enabled = base_layer, r, lora_alpha, True
        self.scale = lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # float32 even when W is bfloat16: an AdamW step moves a weight by about the learning rate
        # (1e-5..1e-4), which bfloat16 (8 bits of mantissa) rounds away on all but the smallest
        # weights. W itself is never updated, so keeping it in bfloat16 loses nothing.
        kw = dict(bias=False, device=base_layer.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(base_layer.in_features, r, **kw)   # weight (r, in)
        self.lora_B = nn.Linear(r, base_layer.out_features, **kw)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init, as peft's
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        y = self.base_layer(x)  # (..., out), in the base's dtype (bfloat16 under autocast)
        if not self.enabled:
            return y
        # Without autocast a bfloat16 x must become float32 to meet A; under autocast the matmuls run
        # in bfloat16 anyway (the cast back is exact). A zero B adds exact zeros: y is returned as is.
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # (..., out)
        return (y + self.scale * delta).to(y.dtype)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Module name -> LoraLinear, e.g. ``model.language_model.layers.0.self_attn.q_proj``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors (every A and B), for the optimizer."""
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def add_lora(model: nn.Module, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
             target_modules: list[str] | None = None, include_vision: bool = False) -> list[str]:
    """Freeze ``model`` and wrap its targeted Linear layers in place; return their names.

    A Linear is targeted when its name equals a ``target_modules`` entry or ends with ``.`` + one (peft's
    rule); by default the language model's attention and MLP projections, the vision tower left out (as
    EasyR1 does). ``include_vision`` adapts the tower too (by default its attention's qkv and proj too).
    train.py turns every dropout off (``models.disable_dropout``): a random mask would make the log-probs noisy.
    """
    if target_modules is None:
        target_modules = list(LANGUAGE_TARGETS) + (list(VISION_TARGETS) if include_vision else [])
    return _wrap(model, r, lora_alpha, lora_dropout, list(target_modules), None if include_vision else VISION_TOWER)


def _wrap(model, r, lora_alpha, lora_dropout, target_modules, exclude_modules) -> list[str]:
    if r < 1:
        raise InputError(f"LoRA rank r must be at least 1, got {r}")
    if lora_layers(model):
        raise InputError("the model already holds LoRA layers")
    named = [(n, m) for n, m in model.named_modules() if not (exclude_modules and re.fullmatch(exclude_modules, n))]
    chosen = [(n, m) for n, m in named if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not chosen:
        linears = [n for n, m in named if isinstance(m, nn.Linear)]
        endings = sorted({n.rpartition('.')[2] for n in linears})
        raise InputError(f"target_modules {target_modules} match no nn.Linear of the model (excluded: "
                         f"{exclude_modules}); its Linear layers end in {endings}, e.g. {linears[0]}")
    if others := [f"{n} ({type(m).__name__})" for n, m in chosen if type(m) is not nn.Linear]:
        raise InputError(f"target_modules {target_modules} match {others[:3]}: LoRA wraps only nn.Linear layers")
    model.requires_grad_(False)
    for name, linear in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoraLinear(linear, r, lora_alpha, lora_dropout))
    # What save_adapter writes to adapter_config.json, under peft's names: peft then wraps the same layers.
    model.lora_config = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             target_modules=list(target_modules), exclude_modules=exclude_modules)
    return [n for n, _ in chosen]


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within the block every LoraLinear returns its base output: the model is the reference policy."""
    layers = lora_layers(model).values()
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base (W += scale * B A) and put the plain Linear back (all frozen)."""
    for name, m in lora_layers(model).items():
        w = m.base_layer.weight  # (out, in)
        w.copy_(w.float() + m.scale * (m.lora_B.weight @ m.lora_A.weight))  # (out, r) @ (r, in), one rounding
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.base_layer)
    vars(model).pop("lora_config", None)
    return model


def adapter_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The A and B tensors of a model state dict under peft's names.

    ``state_dict``: ``model.state_dict()`` or a full ``get_model_state_dict`` (FSDP / DDP) of the LoRA
    model; both name a layer's tensors ``<module>.base_layer.weight``, ``<module>.lora_A.weight``, ...

    >>> adapter_state_dict({"m.q_proj.base_layer.weight": w, "m.q_proj.lora_A.weight": a})  # doctest: +SKIP
    {'base_model.model.m.q_proj.lora_A.weight': a}
    """
    return {PEFT_PREFIX + k: v for k, v in state_dict.items() if re.search(r"\.lora_[AB]\.weight$", k)}


def save_adapter(folder, model: nn.Module, base_model_name_or_path: str, state_dict: dict | None = None):
    """Write ``folder/adapter_config.json`` and ``adapter_model.safetensors`` as peft does (rank 0 only).

    ``model``: the LoRA model itself (``dist.unwrap`` it under DDP). ``state_dict`` (default
    ``model.state_dict()``): under FSDP, the gathered ``get_model_state_dict(model, options=
    StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))``, which
    holds just the adapters.
    """
    from safetensors.torch import save_file

    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base_model_name_or_path),
                  **model.lora_config, bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False,
                  init_lora_weights=True, inference_mode=True)
    tensors = adapter_state_dict(model.state_dict() if state_dict is None else state_dict)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / WEIGHTS_FILE)


def is_adapter_folder(path) -> bool:
    """True for a folder ``save_adapter`` (or peft's ``save_pretrained``) wrote, False for a full model."""
    return (Path(path) / CONFIG_FILE).is_file()


def _read_config(folder: Path) -> dict:
    """An adapter folder's adapter_config.json, its LoRA settings checked (InputError naming the file)."""
    cfg = read_json_object(folder / CONFIG_FILE)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0  # noqa: E731
    if not (isinstance(cfg.get("r"), int) and number(cfg["r"])) or not number(cfg.get("lora_alpha")):
        raise InputError(f"{folder / CONFIG_FILE}: expected r (a whole number, 1 or more) and lora_alpha (a positive "
                         f"number); got r={cfg.get('r')!r}, lora_alpha={cfg.get('lora_alpha')!r}")
    return cfg


@torch.no_grad()
def load_adapter(model: nn.Module, folder) -> nn.Module:
    """Load a saved adapter (ours or peft's) into ``model``, first wrapping it as the config says if
    it holds no LoRA layers yet; refuse keys, shapes or settings that do not match."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = _read_config(folder)
    unsupported = {k: cfg.get(k) for k in ("use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                                           "modules_to_save", "layers_to_transform", "target_parameters") if cfg.get(k)}
    if cfg.get("peft_type") != "LORA" or cfg.get("bias", "none") != "none" or unsupported:
        raise InputError(f"{folder}: only plain LoRA adapters load here (peft_type LORA, bias none); this one has "
                         f"peft_type={cfg.get('peft_type')!r} bias={cfg.get('bias')!r} {unsupported or ''}")
    if not (folder / WEIGHTS_FILE).is_file():
        raise InputError(f"{folder}: no {WEIGHTS_FILE} (adapters in pickle files are not read)")
    if not lora_layers(model):
        if not isinstance(cfg.get("target_modules"), list) or not isinstance(cfg.get("exclude_modules") or "", str):
            raise InputError(f"{folder}: expected target_modules as a list of names and exclude_modules as null or one "
                             f"regex; got {cfg.get('target_modules')!r} and {cfg.get('exclude_modules')!r}")
        _wrap(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), cfg["target_modules"],
              cfg.get("exclude_modules"))
    settings = {(m.r, m.lora_alpha) for m in lora_layers(model).values()}
    if settings != {(cfg["r"], cfg["lora_alpha"])}:
        raise InputError(f"{folder}: r={cfg['r']}, lora_alpha={cfg['lora_alpha']}; the model's LoRA layers have "
                         f"(r, lora_alpha) {sorted(settings)}")
    saved, own = load_file(folder / WEIGHTS_FILE), adapter_state_dict(model.state_dict())
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    wrong = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in saved and saved[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise InputError(f"{folder} does not fit this model: missing {missing[:3]} ({len(missing)}), unexpected "
                         f"{unexpected[:3]} ({len(unexpected)}), shapes (saved vs model) {wrong[:3]}")
    for k, v in own.items():
        v.copy_(saved[k])
    return model
