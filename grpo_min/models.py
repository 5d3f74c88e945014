"""Loading policies: any local Qwen2.5-VL / Qwen2-VL folder, or ``tiny`` (built and cached here).

    >>> model, processor, frame = load_model("tiny")              # doctest: +SKIP
    >>> model, processor, frame = load_model("/ckpt/Qwen2.5-VL-3B-Instruct", dtype="bfloat16")  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

# The box frame a model family reads and writes (docs/METHOD.md, "Box coordinate frames").
BOX_FRAMES = {"qwen2_5_vl": "absolute", "qwen2_vl": "norm1000"}
DEFAULT_MAX_PIXELS = 1003520  # 1,280 visual tokens of 28 x 28 pixels
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model: str, seed: int = 0) -> Path:
    """``tiny`` -> the cached warm-started tiny model (built on first use); else the folder itself."""
    if model == "tiny":
        from grpo_min.tiny import tiny_model_path

        return tiny_model_path(seed=seed)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model!r}: expected a local model folder with config.json (e.g. a download of "
            "Qwen/Qwen2.5-VL-3B-Instruct, or a checkpoint written by this trainer), or 'tiny'")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in BOX_FRAMES:  # checked before any weights load
        raise ValueError(f"--model {model!r}: model type {model_type!r} is not supported; expected one of "
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

    Training keeps weights, gradients and AdamW's state in float32 and computes in ``dtype`` under
    ``torch.autocast`` (mixed precision). Weights stored in bfloat16 would lose the updates: an AdamW
    step moves a weight by about the learning rate (1e-6 in MedGround-R1's settings), far below
    bfloat16's resolution of 1/128 of the weight's size, so most of them round back to the old value.
    float32 computes as is.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               min_pixels: int | None = None, max_pixels: int | None = None, trust_remote_code: bool = False):
    """(model, processor, box_frame) from a ``save_pretrained`` folder, via the Auto classes.

    ``max_pixels=None`` keeps the processor's own limit but caps it at ``DEFAULT_MAX_PIXELS``: Qwen's
    saved 12.8 M-pixel cap would turn a native chest X-ray into ~9,900 visual tokens per completion.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
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
        raise ValueError(f"{path}: model type {model_type!r} is not supported; expected one of "
                         f"{sorted(BOX_FRAMES)} (their box frames are known)")
    return model.to(device), processor, BOX_FRAMES[model_type]


def load_reference(path: str | Path, *, dtype: torch.dtype, device) -> torch.nn.Module:
    """The frozen reference policy: a second copy of the starting weights, eval mode, no gradients."""
    ref, _, _ = load_model(path, dtype=dtype, device=device)
    ref.eval().requires_grad_(False)
    return ref
