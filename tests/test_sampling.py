"""The sampling loop of grpo_min.rollout: HF generate's greedy tokens, the scored distribution, FSDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

import data
from grpo_min import rollout
from evaluate import repetition_penalty
from grpo_min.models import load_model
from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts, special_token_ids
from grpo_min.rollout import completion_logps, completion_mask_from_ids, generate_completions
from tests.fixtures import qwen2_vl_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["qwen2.5-vl warm-started", "qwen2-vl random"])
def model_and_processor(request, tmp_path_factory):
    """The warm-started tiny Qwen2.5-VL (conftest's, built once per session) and a random Qwen2-VL."""
    if request.param.startswith("qwen2.5"):
        folder = request.getfixturevalue("tiny_model_dir")
    else:
        folder = qwen2_vl_folder(tmp_path_factory.mktemp("qwen2-vl"))
    model, processor, _ = load_model(folder)
    return model.eval(), processor


def two_prompts(processor):
    """Two prompts of different lengths (left padding) with images of different sizes."""
    samples = [data.synthetic_sample(i, "val") for i in range(2)]
    images = [samples[0].load_image(), samples[1].load_image().resize((336, 140))]
    prompts = encode_prompts(processor, images, [samples[0].text, samples[1].text + " on the frontal view"],
                             CHAIN_OF_BOX)
    assert (prompts.inputs["attention_mask"] == 0).any()  # the shorter prompt is left-padded
    assert not torch.equal(*prompts.inputs["image_grid_thw"])
    return prompts


def hf_greedy(model, processor, prompts, max_new_tokens):
    """HF generate's greedy tokens, padded after each row's first EOS as generate_completions pads them. Fields
    left unset come from the model's generation_config (its repetition_penalty included)."""
    ids = special_token_ids(processor)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=ids["eos"],
                              pad_token_id=ids["pad"], suppress_tokens=ids["never"])
    out = model.generate(**prompts.inputs, generation_config=config)[:, prompts.inputs["input_ids"].shape[1]:]
    return out.masked_fill(completion_mask_from_ids(out, ids["eos"]) == 0, ids["pad"])


def loop_greedy(model, processor, prompts, max_new_tokens):
    """Greedy evaluation's decoding: our loop with the checkpoint's repetition penalty (evaluate.py's)."""
    return generate_completions(model, processor, prompts, num_generations=1, max_new_tokens=max_new_tokens,
                                greedy=True, logits_processor=repetition_penalty(model, prompts)).completion_ids


@pytest.mark.parametrize("repetition_penalty", [None, 1.05])
def test_greedy_decoding_gives_hf_generates_tokens(model_and_processor, repetition_penalty, monkeypatch):
    """Same tokens as HF generate (greedy), with the checkpoint's repetition penalty or without (Qwen's
    checkpoints ship 1.05); EOS, padding and the suppressed tokens as in generate_completions. A hook
    on the LM head ends row 0 with EOS at its 5th token in both, so the rows end at different steps."""
    model, processor = model_and_processor
    monkeypatch.setattr(model.generation_config, "repetition_penalty", repetition_penalty)
    eos = special_token_ids(processor)["eos"][0]
    calls = [0]

    def end_row_0(module, args, logits):  # (B, 1, V) at every call: the prompt pass, then one per token
        calls[0] += 1
        if calls[0] == 5:
            logits[0, -1, eos] = 1e4
        return logits

    hook = model.lm_head.register_forward_hook(end_row_0)
    try:
        prompts = two_prompts(processor)
        ours = loop_greedy(model, processor, prompts, 48)
        calls[0] = 0
        theirs = hf_greedy(model, processor, prompts, 48)
    finally:
        hook.remove()
    assert torch.equal(ours, theirs), (ours, theirs)
    assert ours[0, 4] == eos and (ours[0, 5:] == special_token_ids(processor)["pad"]).all()
    assert ours.shape[1] > 5  # row 1 went on


def sampled_logps_are_the_scored_ones(model, processor, monkeypatch):
    """Samples 3 completions of two prompts, recording the distribution each token was drawn from at
    torch.multinomial, and checks that it gives the token the log-prob completion_logps scores."""
    never = special_token_ids(processor)["never"]
    drawn_from = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, n: drawn_from.append(probs.clone()) or real(probs, n))
    prompts = two_prompts(processor)
    torch.manual_seed(0)
    out = generate_completions(model, processor, prompts, num_generations=3, max_new_tokens=24, temperature=0.7)
    probs = torch.stack(drawn_from, dim=1)  # (B*G, T, V)
    assert probs.shape[:2] == out.completion_ids.shape and (probs[..., never] == 0).all()
    sampled = probs.gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1).log()  # (B*G, T)
    scored = completion_logps(model, prompts, out.completion_ids, out.completion_mask, group_size=3, temperature=0.7,
                              never_ids=never)
    mask = out.completion_mask
    torch.testing.assert_close(scored * mask, sampled * mask, atol=1e-5, rtol=0)


def test_sampled_tokens_have_the_log_probs_the_loss_scores(model_and_processor, monkeypatch):
    """The distribution each token was drawn from (recorded at torch.multinomial) gives it the
    log-prob completion_logps scores: temperature, the whole vocabulary, never-emitted tokens at 0."""
    sampled_logps_are_the_scored_ones(*model_and_processor, monkeypatch)


def test_sampling_with_a_seed_is_reproducible(model_and_processor):
    model, processor = model_and_processor
    prompts = two_prompts(processor)

    def sample(seed):
        torch.manual_seed(seed)
        return generate_completions(model, processor, prompts, num_generations=4, max_new_tokens=16).completion_ids

    first = sample(0)
    assert torch.equal(sample(0), first)
    assert not torch.equal(sample(1), first)


def test_a_rollout_can_enter_the_loss(model_and_processor):
    """Sampling runs under inference_mode, whose tensors autograd refuses to save for backward; the rollout's
    must be ordinary tensors, since the loss multiplies log-probs by the completion mask."""
    model, processor = model_and_processor
    out = generate_completions(model, processor, two_prompts(processor), num_generations=2, max_new_tokens=4)
    logps = torch.zeros(out.completion_mask.shape, requires_grad=True)
    (logps * out.completion_mask).sum().backward()
    assert torch.equal(logps.grad, out.completion_mask)


def test_eager_attention_gets_the_mask_it_reads(tiny_model_dir, monkeypatch):
    """The decode step hands SDPA (transformers' default) its mask as (N, 1, 1, L) booleans; eager attention,
    which would add such a mask to its scores as numbers, gets the 2-D mask: the sampled tokens' log-probs
    are still the ones completion_logps gives."""
    model, processor, _ = load_model(tiny_model_dir)
    model.set_attn_implementation("eager")
    assert model.model.language_model.config._attn_implementation == "eager"
    sampled_logps_are_the_scored_ones(model.eval(), processor, monkeypatch)


def test_the_compiled_decoding_layout_gives_the_same_tokens(model_and_processor, monkeypatch):
    """compile_generation's decoding, run here without compiling (torch.compile replaced by the identity;
    CUDA graphs need a GPU): its longer cache (rounded up to 256 slots), kept per model and shape and
    reused by two batches in a row (so it must be reset in between), gives the default path's greedy tokens."""
    model, processor = model_and_processor
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    batches = [two_prompts(processor), encode_prompts(processor, [data.synthetic_sample(5, "val").load_image()] * 2,
                                                      ["left pleural effusion", "cardiomegaly"], CHAIN_OF_BOX)]
    for prompts in batches:
        kw = dict(num_generations=1, max_new_tokens=48, greedy=True)
        static = generate_completions(model, processor, prompts, compile_generation=True, **kw).completion_ids
        assert torch.equal(static, generate_completions(model, processor, prompts, **kw).completion_ids)
    assert len(rollout._COMPILED[model]) == 1  # one cache and step for both batches (same rows, same length)


def test_a_checkpoint_default_that_greedy_decoding_would_ignore_is_refused(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    monkeypatch.setattr(model.generation_config, "no_repeat_ngram_size", 3)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        loop_greedy(model, processor, two_prompts(processor), 4)


def test_fsdp_ranks_that_finish_at_different_steps_all_return(tmp_path):
    """FSDP2 on 2 gloo ranks (tests/sampling_fsdp_worker.py): sampling and greedy evaluation where one
    rank's completions end at step 3 and the other's run to the limit finish (no rank waits forever in
    a weight all-gather), and with the same seed and prompt both ranks sample the same tokens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tests/sampling_fsdp_worker.py", str(tmp_path)]
    try:
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the ranks did not finish within 240 s (a hang): {(e.stderr or b'')[-3000:]}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["same_prompt"] == ranks[1]["same_prompt"]
    for key, limit in (("sampled", 10), ("greedy", 10)):
        (short, long) = (r[key] for r in ranks)
        assert len(short[0]) == 3 and len(long[0]) == limit, (key, short, long)  # rank 0 ended at step 3
    assert all(r["answers"] for r in ranks)
