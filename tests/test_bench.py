"""The throughput benchmark (python scripts/bench.py) and the fast paths it measures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
from grpo_min import tiny
from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts, special_token_ids
from grpo_min.rollout import completion_logps, generate_completions
from tests.fixtures import plain_logps

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
    """Sharing the prompt (default) scores like the plain path, gradients included, for prompts of different
    lengths (left padding); with LoRA adapters (non-zero B, so that they count) too, and switched off they give
    the base's log-probs. (With gradient checkpointing: tests/test_checkpointing.py.)"""
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

    def logps_and_grads(score=completion_logps):
        model.zero_grad(set_to_none=True)
        logps = score(model, prompts, rollout.completion_ids, rollout.completion_mask, group_size=3, temperature=0.7,
                      never_ids=never) * rollout.completion_mask
        (logps * rollout.completion_mask).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, plain_grads = logps_and_grads(plain_logps)
    shared, shared_grads = logps_and_grads()
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
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
        plain = plain_logps(model, prompts, ids, mask, group_size=2)
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_real_size_benchmark_runs_and_reports_out_of_memory(tmp_path):
    """scripts/bench_real_size.py end to end on the tiny model (one grpo_min column; TRL needs its own venv),
    and a run that passes the memory limit is reported as out of memory, not lost."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_real_size import run_watched

    hog = [sys.executable, "-c", "import time; x = bytearray(400 * 2 ** 20); x[::4096] = b'1' * len(x[::4096]); "
           "time.sleep(30)"]
    with open(tmp_path / "log.txt", "w") as log:
        assert run_watched(hog, dict(os.environ), log, timeout=60, memory_limit_mb=200) == (
            None, "out of memory (stopped above 0.2 GB)")
    cmd = [sys.executable, "scripts/bench_real_size.py", "--model", "tiny", "--shapes", "2x4", "--steps", "2",
           "--lora-r", "4", "--sides", "grpo_min --gradient-checkpointing", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 2 x 4 |"))
    assert row.count(" s, ") == 1 and row.count(" GB") == 1, result.stdout  # seconds per step, peak memory
    runs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["gradient_checkpointing"], r["lora_r"], r["dtype"]) for r in runs] == [(True, 4, "bfloat16")]
