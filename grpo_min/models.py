"""Loading policies: any local Qwen2.5-VL / Qwen2-VL folder, a LoRA adapter folder on top of one, or
``tiny`` (built and cached here).

    >>> model, processor, frame = load_model("tiny")              # doctest: +SKIP
    >>> model, processor, frame = load_model("/ckpt/Qwen2.5-VL-3B-Instruct", dtype="bfloat16")  # doctest: +SKIP
    >>> model, processor, frame = load_model("runs/lora/final")   # its base, then the adapter  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from grpo_min import lora
from grpo_min.files import InputError, brief, read_json_object
from grpo_min.lora import is_adapter_folder

# The box frame a model family reads and writes (docs/METHOD.md, "Box coordinate frames").
BOX_FRAMES = {"qwen2_5_vl": "absolute", "qwen2_vl": "norm1000"}
DEFAULT_MAX_PIXELS = 1003520  # 1,280 visual tokens of 28 x 28 pixels
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model: str, seed: int = 0) -> Path:
    """``tiny`` -> the cached warm-started tiny model (built on first use); else the folder itself, once it is
    known to load: a model folder of a supported family, or an adapter folder whose base is one."""
    if model == "tiny":
        from grpo_min.tiny import tiny_model_path

        return tiny_model_path(seed=seed)
    path = Path(model)
    if is_adapter_folder(path):
        base = adapter_base(path)
        try:
            resolve_model_path(base)
        except InputError as e:
            raise InputError(f"--model {model!r} is a LoRA adapter for base_model_name_or_path {base!r}, which does "
                             f"not load here (edit that entry of its adapter_config.json to point at a local folder): "
                             f"{e}")
        return path
    if not (path / "config.json").is_file():
        raise InputError(
            f"--model {model!r}: expected a local model folder with config.json (e.g. a download of "
            "Qwen/Qwen2.5-VL-3B-Instruct, or a checkpoint written by this trainer), or 'tiny'")
    model_type = read_json_object(path / "config.json").get("model_type")
    if model_type not in BOX_FRAMES:  # checked before any weights load
        raise InputError(f"--model {model!r}: model type {model_type!r} is not supported; expected one of "
                         f"{sorted(BOX_FRAMES)} (their box frames are known)")
    return path


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def compute_precision(device: torch.device, dtype: torch.dtype):
    """The context every forward pass of policy and reference runs in during training.

    Training keeps the weights it updates, their gradients and AdamW's state in float32 (a LoRA run's frozen
    base is stored in ``dtype``) and computes in ``dtype`` under ``torch.autocast`` (mixed precision).
    Weights stored in bfloat16 would lose the updates: an AdamW step moves a weight by about the
    learning rate (1e-6 in MedGround-R1's settings), far below bfloat16's resolution of 1/128 of the
    weight's size, so most of them round back to the old value. float32 computes as is.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def adapter_base(path) -> str:
    """The base model an adapter folder was trained on (its adapter_config.json's base_model_name_or_path)."""
    file = Path(path) / "adapter_config.json"
    base = read_json_object(file).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InputError(f"{file}: no base_model_name_or_path (expected the folder of the model it adapts)")
    return base


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               min_pixels: int | None = None, max_pixels: int | None = None, trust_remote_code: bool = False,
               merge_adapter: bool = False):
    """(model, processor, box_frame) from a ``save_pretrained`` folder, via the Auto classes.

    ``path`` may also be a LoRA adapter folder (``is_adapter_folder``): its base (base_model_name_or_path)
    loads in ``dtype``, then the float32 adapters on top, as ``peft.PeftModel.from_pretrained`` would, or
    folded into the base with ``merge_adapter`` (a plain model, e.g. the starting point of a new run). The
    processor comes from the adapter folder when it holds one (train.py saves it there), else from the base.

    ``max_pixels=None`` keeps the processor's own limit but caps it at ``DEFAULT_MAX_PIXELS``: Qwen's
    saved 12.8 M-pixel cap would turn a native chest X-ray into ~9,900 visual tokens per completion.
    """
    try:
        model, processor = _load(path, dtype, trust_remote_code, merge_adapter)
    except InputError:
        raise
    except Exception as e:  # OSError, ValueError, KeyError, safetensors' own error, ...
        # missing or truncated weights, missing processor files, a config of the wrong shape: one line naming it
        raise InputError(f"{path}: cannot load the model ({brief(e)})") from e
    image_token = getattr(processor, "image_token", None)
    if image_token is None or processor.tokenizer.convert_tokens_to_ids(image_token) != model.config.image_token_id:
        # transformers builds an empty tokenizer when the folder's tokenizer files are missing, rather than failing
        raise InputError(f"{path}: the processor's tokenizer does not know the model's image token (id "
                         f"{model.config.image_token_id}): are tokenizer.json / tokenizer_config.json missing?")
    size = dict(processor.image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    elif size.get("longest_edge", 0) > DEFAULT_MAX_PIXELS:
        size["longest_edge"] = DEFAULT_MAX_PIXELS
    processor.image_processor.size = size
    model_type = model.config.model_type
    if model_type not in BOX_FRAMES:
        raise InputError(f"{path}: model type {model_type!r} is not supported; expected one of "
                         f"{sorted(BOX_FRAMES)} (their box frames are known)")
    return model.to(device), processor, BOX_FRAMES[model_type]


def _load(path, dtype, trust_remote_code, merge_adapter):
    """(model, processor) of ``load_model``, before the processor's image size and the family are checked."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if is_adapter_folder(path):
        # The base itself may be an adapter folder (a run started from an earlier run's adapter): merged.
        model, processor, _ = load_model(adapter_base(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                         merge_adapter=True)
        lora.load_adapter(model, path)
        if merge_adapter:
            lora.merge_lora(model)
        if any((Path(path) / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, processor


def load_reference(path: str | Path, *, dtype: torch.dtype, device) -> torch.nn.Module:
    """The frozen reference policy of full fine-tuning: a second copy of the starting weights, eval mode, no
    gradients. (With LoRA the policy itself, adapters switched off, is the reference: ``lora.adapters_off``.)"""
    ref, _, _ = load_model(path, dtype=dtype, device=device, merge_adapter=True)
    ref.eval().requires_grad_(False)
    return ref


def load_policy(model_path: str | Path, cfg, device, resume_path: str | Path | None = None):
    """(policy, processor, box frame): the model to train, ready (``prepare_policy``), and its processor.

    ``cfg``: train.py's Config. Full fine-tuning: every weight float32 (``compute_precision`` says why), the
    checkpoint's when resuming. LoRA (``cfg.lora_r`` > 0): the base from ``model_path``, stored in the compute
    dtype (bfloat16 on a GPU: frozen, it loses nothing and takes half the memory), and the checkpoint's
    adapters when resuming.
    """
    if resume_path is not None and is_adapter_folder(resume_path) != (cfg.lora_r > 0):
        raise InputError(f"{resume_path} was written by a {'LoRA' if is_adapter_folder(resume_path) else 'full'} "
                         f"fine-tuning run: resume it with the same --lora-r as that run (its config.json says)")
    dtype = resolve_dtype(cfg.dtype, torch.device(device)) if cfg.lora_r else torch.float32
    source = resume_path if resume_path is not None and not cfg.lora_r else model_path
    policy, processor, frame = load_model(source, dtype=dtype, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                          merge_adapter=True)
    return prepare_policy(policy, cfg, device, adapter=resume_path if cfg.lora_r else None), processor, frame


def prepare_policy(model: torch.nn.Module, cfg, device, adapter: str | Path | None = None) -> torch.nn.Module:
    """``model`` made ready to train with ``cfg``'s options (train.py's Config), in place, and returned.

    LoRA (``cfg.lora_r`` > 0): the model frozen and its targeted layers wrapped with float32 adapters
    (lora.py says why float32), fresh or, with ``adapter``, a saved adapter folder's. Then: dropout off
    (``disable_dropout``), moved to ``device``, training mode, the vision tower frozen, gradient checkpointing,
    as the options say.
    """
    if cfg.lora_r:
        targets = cfg.lora_target_modules.split(",") if cfg.lora_target_modules else None
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)  # the same A on every rank: FSDP shards each rank's own copy, unsynced
            lora.add_lora(model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets,
                          include_vision=cfg.lora_vision)
        if adapter is not None:
            lora.load_adapter(model, adapter)
    disable_dropout(model)
    model.to(device).train()  # from_pretrained returns eval mode, in which transformers skips gradient checkpointing
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of ``model`` set to 0, as TRL's ``disable_dropout``, in place.

    GRPO compares one distribution across passes: sampling (eval mode), then the old-policy, reference and
    policy passes (training mode). Dropout in training mode draws a new mask in each pass, so the ratio of the
    policy to the old policy would differ from 1 on the first update and tokens would be clipped for no reason;
    "sampled = scored" needs the same network in every pass. Covers nn.Dropout (a LoRA adapter's, e.g. from a peft
    folder with lora_dropout > 0) and the attention dropout that transformers' attention layers apply themselves.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    for config in (model.config, *(getattr(model.config, k, None) for k in ("text_config", "vision_config"))):
        if config is not None and hasattr(config, "attention_dropout"):
            config.attention_dropout = 0.0
    return model
