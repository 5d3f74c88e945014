"""Gradient checkpointing that keeps the prompt shared (grpo_min/recompute.py): the plain path's gradients,
every decoder layer recomputed, fewer saved activations. (DDP and FSDP2: tests/test_distributed.py.)"""
import pytest
import torch

import data
from grpo_min import lora, tiny
from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts, special_token_ids
from grpo_min.rollout import completion_logps, generate_completions
from tests.fixtures import plain_logps

G = 3


def model_and_rollout(lora_r: int):
    """The random tiny model (LoRA adapters with a non-zero B, so that they count), training mode, and G
    sampled completions for each of two prompts of different lengths (left padding)."""
    processor = tiny.build_processor()
    model = tiny.build_model(processor, seed=1)
    if lora_r:
        lora.add_lora(model, r=lora_r, lora_alpha=2 * lora_r)
        for layer in lora.lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    samples = [data.synthetic_sample(i, "val") for i in range(2)]
    phrases = [samples[0].text, samples[1].text + " on the frontal view"]
    prompts = encode_prompts(processor, [s.load_image() for s in samples], phrases, CHAIN_OF_BOX)
    assert (prompts.inputs["attention_mask"] == 0).any()
    torch.manual_seed(0)
    rollout = generate_completions(model, processor, prompts, num_generations=G, max_new_tokens=12)
    assert (rollout.completion_mask == 0).any() or rollout.completion_ids.shape[1] == 12
    return model.train(), prompts, rollout, special_token_ids(processor)["never"]


def score(model, prompts, rollout, never, oracle=False):
    """Log-probs (B*G, T) under the completion mask: the trainer's scoring, or (oracle) grpo_min/core.py's."""
    logps = (plain_logps if oracle else completion_logps)(model, prompts, rollout.completion_ids,
                                                           rollout.completion_mask, group_size=G, temperature=0.7,
                                                           never_ids=never)
    return logps * rollout.completion_mask  # (B*G, T)


def enable_checkpointing(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as prepare_policy


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_checkpointed_scoring_shares_the_prompt_and_gives_the_plain_gradients(lora_r):
    """With gradient checkpointing the prompt still goes through the model once per group (a pass of B
    rows, then one of B*G completion rows) and every decoder layer runs again in the backward; log-probs
    and gradients are the plain path's (fp32, 1e-5), and the log-probs are bitwise those of a pass without
    gradients (the reference's and the old policy's): the KL starts at exactly 0."""
    model, prompts, rollout, never = model_and_rollout(lora_r)

    def logps_and_grads(**kw):
        model.zero_grad(set_to_none=True)
        logps = score(model, prompts, rollout, never, **kw)
        (logps * rollout.completion_mask).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, plain_grads = logps_and_grads(oracle=True)  # B*G whole rows, nothing recomputed
    enable_checkpointing(model)
    rows = []  # (rows, tokens, gradients on) of each call of a decoder layer's MLP
    # a pre-hook: torch stops a recomputation as soon as it has what the backward needs, before the MLP returns
    model.model.language_model.layers[-1].mlp.register_forward_pre_hook(
        lambda m, args: rows.append((*args[0].shape[:2], torch.is_grad_enabled())))
    model.zero_grad(set_to_none=True)
    logps = score(model, prompts, rollout, never)
    B, P, T = len(prompts.resized_sizes), prompts.inputs["input_ids"].shape[1], rollout.completion_ids.shape[1]
    assert rows == [(B, P, True), (B * G, T - 1, True)]  # the prompt once, then the completions on its keys
    (logps * rollout.completion_mask).sum().backward()
    assert rows[2:] == [(B * G, T - 1, True), (B, P, True)]  # both passes ran again, in the backward
    with torch.no_grad():
        assert torch.equal(score(model, prompts, rollout, never), logps.detach())  # what the reference computes
    torch.testing.assert_close(logps.detach(), plain, atol=1e-5, rtol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-5, msg=name)
        assert grad.abs().sum() > 0 or not lora_r, name  # every adapter gets a gradient
    if not lora_r:
        assert plain_grads["model.visual.patch_embed.proj.weight"].abs().sum() > 0  # the vision tower learns too


def saved_activation_bytes(model, prompts, rollout, never) -> int:
    """Bytes of the tensors autograd keeps for the backward of one policy pass (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        score(model, prompts, rollout, never)
    return sum(storages.values())


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_the_checkpointed_policy_pass_keeps_fewer_saved_activations(lora_r):
    """What --gradient-checkpointing is for: the policy pass keeps far fewer activations for the backward
    (what is recomputed is not kept), so that the memory it saves cannot silently vanish again."""
    model, prompts, rollout, never = model_and_rollout(lora_r)
    kept = saved_activation_bytes(model, prompts, rollout, never)
    enable_checkpointing(model)
    checkpointed = saved_activation_bytes(model, prompts, rollout, never)
    assert checkpointed < 0.3 * kept, (checkpointed, kept)


def test_train_py_policy_checkpoints(tiny_model_dir):
    """--gradient-checkpointing reaches train.py's policy: from_pretrained returns a model in eval mode, where
    transformers silently skips checkpointing, so load_policy must leave it in train mode; sampling (no
    gradients: nothing to recompute) leaves it so too."""
    import train

    cfg = train.parse_config(["--model", str(tiny_model_dir), "--gradient-checkpointing"])
    policy, processor, _ = train.load_policy(tiny_model_dir, cfg, torch.device("cpu"))
    sample = data.synthetic_sample(0, "val")
    prompts = encode_prompts(processor, [sample.load_image()], [sample.text], CHAIN_OF_BOX)
    rollout = generate_completions(policy, processor, prompts, num_generations=2, max_new_tokens=8)
    assert policy.training
    calls = []
    policy.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    logps = completion_logps(policy, prompts, rollout.completion_ids, rollout.completion_mask, group_size=2)
    assert len(calls) == 2  # the prompt pass and the completion pass
    (logps * rollout.completion_mask).sum().backward()
    assert len(calls) == 4  # each ran again in the backward
