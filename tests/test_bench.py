"""The throughput benchmark (python scripts/bench.py) and the fast paths it measures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
from grpo_min import rollout as rollout_module
from grpo_min import tiny
from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts, special_token_ids
from grpo_min.rollout import completion_logps, generate_completions

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("lora_r", [0, 4])
def test_bench_runs_and_ends_with_a_json_line(lora_r):
    cmd = [sys.executable, "scripts/bench.py", "--model-config", "tiny", "--image-size", "112", "--steps", "2",
           "--max-completion-length", "8", "--num-generations", "2", "--lora-r", str(lora_r)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert any(line.strip().startswith("generate") for line in lines)  # the per-phase medians
    out = json.loads(lines[-1])
    assert out["image_size"] == 112 and out["visual_tokens"] == 16 and out["measured_steps"] == 1
    # Every phase ran (beta > 0 by default: the reference pass too) and took time. The rewards of 2
    # completions take ~0.1 ms, the JSON's resolution (4 decimals), so they may round to 0.
    phases = {ph: out[f"{ph}_s"] for ph in ("encode", "generate", "rewards", "reference", "policy", "optimizer")}
    assert all(seconds > 0 for ph, seconds in phases.items() if ph != "rewards"), phases
    assert phases["rewards"] >= 0
    # One measured step: its time is the sum of its phases (up to the rounding of 7 numbers).
    assert abs(sum(phases.values()) - out["seconds_per_step"]) <= 5e-4, (phases, out["seconds_per_step"])
    assert out["step_over_generate"] > 1  # generation is only part of a step
    assert 2 <= out["completion_tokens_per_step"] <= 16  # 2 completions of at most 8 tokens
    assert out["completion_tokens_per_s"] == pytest.approx(
        out["completion_tokens_per_step"] / out["seconds_per_step"], rel=0.01)
    assert out["peak_rss_mb"] > 100  # torch and a model are loaded: never a few MB
    assert out["fused_adamw"] is True  # train.py's default optimizer
    # LoRA: adapters alone train (the reference pass above ran: the policy with its adapters off)
    assert out["lora_r"] == lora_r and (out["trained_parameters_m"] < 0.1 * out["parameters_m"]) == bool(lora_r)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_fast_paths_give_the_plain_paths_logps_and_gradients(lora_r, monkeypatch):
    """Sharing the prompt (default), or only the image features (under gradient checkpointing), scores
    like the plain path, gradients included, for prompts of different lengths (left padding); with LoRA
    adapters (non-zero B, so that they count) too, and switched off they give the base's log-probs."""
    from grpo_min import lora

    processor = tiny.build_processor()
    model = tiny.build_model(processor, seed=1)
    if lora_r:
        base = tiny.build_model(processor, seed=1).eval()  # the same weights, without adapters
        lora.add_lora(model, r=lora_r, lora_alpha=2 * lora_r)
        for layer in lora.lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    samples = [data.synthetic_sample(i, "val") for i in range(2)]
    phrases = [samples[0].text, samples[1].text + " on the frontal view"]  # unequal lengths: left padding
    prompts = encode_prompts(processor, [s.load_image() for s in samples], phrases, CHAIN_OF_BOX)
    assert (prompts.inputs["attention_mask"] == 0).any()
    torch.manual_seed(0)
    rollout = generate_completions(model, processor, prompts, num_generations=3, max_new_tokens=12)
    never = special_token_ids(processor)["never"]
    model.train()
    shared_calls = []  # which path ran: count the calls of the prompt-sharing one
    real = rollout_module._logps_sharing_the_prompt
    monkeypatch.setattr(rollout_module, "_logps_sharing_the_prompt",
                        lambda *a, **k: shared_calls.append(1) or real(*a, **k))

    def logps_and_grads(**kw):
        model.zero_grad(set_to_none=True)
        logps = completion_logps(model, prompts, rollout.completion_ids, rollout.completion_mask, group_size=3,
                                 temperature=0.7, never_ids=never, **kw)
        (logps * rollout.completion_mask).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, plain_grads = logps_and_grads(encode_image_once=False)
    assert not shared_calls
    shared, shared_grads = logps_and_grads()
    assert len(shared_calls) == 1
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    features_once, features_grads = logps_and_grads()
    assert len(shared_calls) == 1  # gradient checkpointing drops the KV cache: features-only path
    for logps, grads in ((shared, shared_grads), (features_once, features_grads)):
        torch.testing.assert_close(logps, plain, atol=1e-5, rtol=0)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)
    if not lora_r:
        assert plain_grads["model.visual.patch_embed.proj.weight"].abs().sum() > 0  # the vision tower learns too
        return
    # LoRA: only the adapters train, each gets a gradient; switched off, the model scores as its base
    assert sorted(plain_grads) == sorted(n for n, _ in model.named_parameters() if ".lora_" in n)
    assert all(g.abs().sum() > 0 for g in plain_grads.values())
    with torch.no_grad(), lora.adapters_off(model):
        off = completion_logps(model, prompts, rollout.completion_ids, rollout.completion_mask, group_size=3,
                               temperature=0.7, never_ids=never)
    with torch.no_grad():
        torch.testing.assert_close(off, completion_logps(base, prompts, rollout.completion_ids, rollout.completion_mask,
                                                         group_size=3, temperature=0.7, never_ids=never),
                                   atol=1e-5, rtol=0)
    assert (off - plain).abs().max() > 1e-3  # (the adapters do change the log-probs)


def test_one_token_completions_still_go_through_the_wrapper():
    """With T = 1 the prompt-sharing path must still call the (DDP / FSDP) wrapper once, as it does for
    longer completions: DDP syncs gradients and FSDP gathers weights in that call, on every rank alike.
    A rank whose completions all ended at the first token used to skip it (replicas diverged or hung)."""
    processor = tiny.build_processor()
    model = tiny.build_model(processor, seed=1)
    sample = data.synthetic_sample(0, "val")
    prompts = encode_prompts(processor, [sample.load_image()], [sample.text], CHAIN_OF_BOX)

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel: the model is .module
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, **kw):
            self.calls += 1
            return self.module(**kw)

    wrapped = Wrapper(model)
    for T in (1, 3):
        ids = torch.randint(10, 200, (2, T))
        mask = torch.ones(2, T)
        wrapped.calls = 0
        fast = completion_logps(wrapped, prompts, ids, mask, group_size=2)
        assert wrapped.calls == 1 and fast.shape == (2, T)
        plain = completion_logps(model, prompts, ids, mask, group_size=2, encode_image_once=False)
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
