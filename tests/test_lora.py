"""LoRA (grpo_min/lora.py): wrapping, the reference as adapters off, merging, and peft's file format."""
import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from grpo_min import lora
from grpo_min.models import load_model
from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts

N_LAYERS = 2  # the tiny model's decoder layers (and vision blocks)


@pytest.fixture
def tiny(tiny_model_dir):
    """A fresh (model, processor, inputs): two prompts, each with its own image."""
    model, processor, _ = load_model(tiny_model_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(2)]
    batch = encode_prompts(processor, images, ["left pleural effusion", "cardiomegaly"], CHAIN_OF_BOX)
    return model.eval(), processor, batch.inputs


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits  # (B, T, V)


def train_steps(model, inputs, steps=3, lr=1e-2):
    """A few AdamW steps on the adapters alone (next-token loss on the prompt: it only has to move them)."""
    optimizer = torch.optim.AdamW(lora.lora_parameters(model), lr=lr)
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def randomize_b(model, seed=0):
    """Non-zero B everywhere, so that every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=g))


# ---------------------------------------------------------------------------------------------- wrapping
def test_default_targets_are_the_language_models_projections(tiny):
    model, _, _ = tiny
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = lora.add_lora(model, r=4, lora_alpha=8)
    expected = [f"model.language_model.layers.{i}.{part}" for i in range(N_LAYERS) for part in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sorted(names) == sorted(expected) and sorted(lora.lora_layers(model)) == sorted(expected)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trainable)
    assert len(trainable) == 2 * len(expected) == len(lora.lora_parameters(model))
    assert sum(p.numel() for p in lora.lora_parameters(model)) == sum(4 * sum(linears[n]) for n in expected)
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(model))
    with pytest.raises(ValueError, match="already holds LoRA"):
        lora.add_lora(model)


def test_include_vision_adds_the_vision_blocks(tiny):
    model, _, _ = tiny
    names = lora.add_lora(model, r=4, lora_alpha=8, include_vision=True)
    vision = sorted(n for n in names if n.startswith("model.visual."))
    assert vision == sorted(f"model.visual.blocks.{i}.{part}" for i in range(N_LAYERS) for part in
                            ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert len(names) - len(vision) == 7 * N_LAYERS and "lm_head" not in names


def test_bad_targets_and_rank_are_refused(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no nn.Linear.*'q_proj'.*self_attn.q_proj"):
        lora.add_lora(model, target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match=r"match \['model.language_model.layers.0.self_attn \(Qwen2_5_VLAttention"):
        lora.add_lora(model, target_modules=["self_attn"])
    with pytest.raises(ValueError, match="at least 1"):
        lora.add_lora(model, r=0)
    assert not lora.lora_layers(model) and all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------- reference
def test_zero_b_is_the_base_and_adapters_off_stays_the_base_after_training(tiny):
    model, _, inputs = tiny
    base = logits(model, inputs)
    lora.add_lora(model, r=4, lora_alpha=8)
    assert torch.equal(logits(model, inputs), base)  # B = 0 adds exact zeros
    train_steps(model, inputs)
    assert (logits(model, inputs) - base).abs().max() > 1e-3  # the adapters moved the policy
    with lora.adapters_off(model):
        assert torch.equal(logits(model, inputs), base)  # the reference, without a second copy
    assert not torch.equal(logits(model, inputs), base)  # switched back on after the block


def test_gradients_reach_a_and_b(tiny):
    model, _, inputs = tiny
    lora.add_lora(model, r=4, lora_alpha=8)
    layer = lora.lora_layers(model)["model.language_model.layers.0.mlp.down_proj"]
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert layer.lora_B.weight.grad.abs().sum() > 0  # while B = 0, A's gradient (B^T ...) is exactly 0
    assert layer.base_layer.weight.grad is None
    torch.optim.SGD(lora.lora_parameters(model), lr=1e-2).step()
    assert layer.lora_B.weight.abs().sum() > 0
    model.zero_grad()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert layer.lora_A.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- peft
@pytest.mark.parametrize("include_vision", [False, True])
def test_peft_loads_our_adapter(tiny, tiny_model_dir, tmp_path, include_vision):
    from peft import PeftModel

    model, _, inputs = tiny
    names = lora.add_lora(model, r=4, lora_alpha=16, include_vision=include_vision)
    randomize_b(model)
    lora.save_adapter(tmp_path, model, str(tiny_model_dir))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(tiny_model_dir)
    assert lora.is_adapter_folder(tmp_path) and not lora.is_adapter_folder(tiny_model_dir)

    base, _, _ = load_model(tiny_model_dir)
    theirs = PeftModel.from_pretrained(base, tmp_path).eval()
    peft_names = [n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")
                  and "default" in m.lora_A]
    assert sorted(peft_names) == sorted(names)  # the same layers, no more
    torch.testing.assert_close(logits(theirs, inputs), logits(model, inputs), atol=1e-5, rtol=0)


def test_an_adapter_saved_by_peft_loads_here(tiny, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, _, inputs = tiny
    config = LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                        exclude_modules=lora.VISION_TOWER)
    theirs = get_peft_model(base, config).eval()
    with torch.no_grad():  # peft's layers are not ours: fill their B directly
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)

    ours, _, _ = load_model(tiny_model_dir)
    lora.load_adapter(ours.eval(), tmp_path)
    assert len(lora.lora_layers(ours)) == 3 * N_LAYERS
    assert {m.scale for m in lora.lora_layers(ours).values()} == {0.5}
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- files
def test_save_then_load_into_a_fresh_model_resumes_exactly(tiny, tiny_model_dir, tmp_path):
    model, _, inputs = tiny
    lora.add_lora(model, r=4, lora_alpha=8)
    train_steps(model, inputs)
    lora.save_adapter(tmp_path, model, "base")
    fresh, _, _ = load_model(tiny_model_dir)
    lora.load_adapter(fresh.eval(), tmp_path)  # wraps the plain model as the config says
    assert torch.equal(logits(fresh, inputs), logits(model, inputs))
    assert [p.requires_grad for p in fresh.parameters()] == [p.requires_grad for p in model.parameters()]


def test_load_adapter_refuses_what_does_not_fit(tiny, tiny_model_dir, tmp_path):
    model, _, _ = tiny
    lora.add_lora(model, r=4, lora_alpha=8)
    lora.save_adapter(tmp_path, model, "base")
    other, _, _ = load_model(tiny_model_dir)
    lora.add_lora(other, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"missing \[\] \(0\), unexpected .*down_proj.lora_A.weight.*\(24\)"):
        lora.load_adapter(other, tmp_path)
    other, _, _ = load_model(tiny_model_dir)
    lora.add_lora(other, r=8, lora_alpha=8)
    with pytest.raises(ValueError, match=r"r=4, lora_alpha=8; the model's LoRA layers have .*\(8, 8\)"):
        lora.load_adapter(other, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="only plain LoRA.*use_dora"):
        lora.load_adapter(load_model(tiny_model_dir)[0], tmp_path)


def test_state_dict_names_for_the_trainer(tiny):
    """What get_model_state_dict (the trainer's FSDP / DDP path) names our layers, and how they map."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model, _, _ = tiny
    lora.add_lora(model, r=4, lora_alpha=8)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    q = "model.language_model.layers.0.self_attn.q_proj"
    assert {f"{q}.base_layer.weight", f"{q}.base_layer.bias", f"{q}.lora_A.weight", f"{q}.lora_B.weight"} <= set(full)
    adapters = lora.adapter_state_dict(full)
    assert len(adapters) == 2 * 7 * N_LAYERS and f"base_model.model.{q}.lora_A.weight" in adapters
    # Only the trainable tensors: what an adapter checkpoint needs, without gathering the base.
    trainable = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
    assert lora.adapter_state_dict(trainable).keys() == adapters.keys() and len(trainable) == len(adapters)


# ---------------------------------------------------------------------------------------------- merge
def test_merge_gives_a_plain_model_with_the_same_logits(tiny, tmp_path):
    from transformers import AutoModelForImageTextToText

    model, _, inputs = tiny
    lora.add_lora(model, r=4, lora_alpha=8, include_vision=True)
    randomize_b(model)
    wrapped = logits(model, inputs)
    lora.merge_lora(model)
    assert not lora.lora_layers(model)
    assert not [k for k in model.state_dict() if "lora" in k or "base_layer" in k]
    torch.testing.assert_close(logits(model, inputs), wrapped, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, inputs), wrapped, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- dtypes
def test_bfloat16_base_with_float32_adapters(tiny):
    model, _, inputs = tiny
    lora.add_lora(model, r=4, lora_alpha=8)
    randomize_b(model)
    reference = logits(model, inputs)  # all float32
    model.to(torch.bfloat16)
    for m in lora.lora_layers(model).values():  # the base in bfloat16, the adapters kept in float32
        m.lora_A.float(), m.lora_B.float()
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    for autocast in (True, False):  # the trainer's mixed precision, and a plain bfloat16 forward
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            out = model(**inputs, labels=inputs["input_ids"])
        assert out.logits.dtype == torch.bfloat16
        err = (out.logits.detach().float() - reference).abs().max() / reference.abs().max()
        assert err < 0.05, f"bfloat16 logits (autocast {autocast}) off by {err:.3f} of the largest logit"
        out.loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.lora_parameters(model))
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


# ---------------------------------------------------------------------------------------------- adapter folders as models
def test_an_adapter_folder_loads_as_a_model_and_starts_a_run(tiny, tiny_model_dir, tmp_path):
    """load_model (train.py's and evaluate.py's) reads an adapter folder: its base, then the adapter (or merged
    in). A run started from one (--model FOLDER) trains new adapters on that merged model, and their folder,
    whose base is the first adapter's folder, loads back the same way."""
    from grpo_min.files import InputError
    from grpo_min.models import load_policy, resolve_model_path
    from train import parse_config

    model, processor, inputs = tiny
    lora.add_lora(model, r=4, lora_alpha=8)
    randomize_b(model)
    first = tmp_path / "first"
    lora.save_adapter(first, model, str(tiny_model_dir))  # no processor in it: the base's is used
    assert resolve_model_path(str(first)) == first
    loaded, loaded_processor, frame = load_model(first)
    assert frame == "absolute" and loaded_processor.tokenizer.vocab_size == processor.tokenizer.vocab_size
    torch.testing.assert_close(logits(loaded.eval(), inputs), logits(model, inputs), atol=1e-6, rtol=0)
    merged, _, _ = load_model(first, merge_adapter=True)
    assert not lora.lora_layers(merged)
    torch.testing.assert_close(logits(merged.eval(), inputs), logits(model, inputs), atol=1e-5, rtol=0)

    cfg = parse_config(["--model", str(first), "--lora-r", "2"])
    policy, _, _ = load_policy(first, cfg, "cpu")  # the first adapter merged, fresh adapters (B = 0) on top
    assert {m.r for m in lora.lora_layers(policy).values()} == {2}
    torch.testing.assert_close(logits(policy.eval(), inputs), logits(model, inputs), atol=1e-5, rtol=0)
    randomize_b(policy, seed=1)
    second = tmp_path / "second"
    lora.save_adapter(second, policy, str(first))
    torch.testing.assert_close(logits(load_model(second)[0].eval(), inputs), logits(policy, inputs), atol=1e-5, rtol=0)

    config = json.loads((first / "adapter_config.json").read_text())
    (first / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "Qwen/Qwen2.5-VL-3B"}))
    with pytest.raises(InputError, match="a LoRA adapter for base_model_name_or_path 'Qwen/Qwen2.5-VL-3B'"):
        resolve_model_path(str(first))
