"""grpo_min/core.py (GRPO in one plain file) and train.grpo_step (the same step, made fast) compute the same update.

Given the same sampled completions, one rollout's updates through either path give the same losses and the same
weights afterwards (float32, CPU), for beta 0 and 0.04, one and two updates per rollout, two loss types; and the
plain sampler's greedy tokens are the fast sampler's. Both call the loss by their own module's name, so patching
either alone breaks the equality: shown at the end.
"""
import copy

import pytest
import torch

import data
import rewards as R
import train
from grpo_min import core
from grpo_min.models import load_model
from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts, special_token_ids
from grpo_min.rollout import Rollout, generate_completions
from tests.train_with_test_reward import score_with_digits

G, T = 4, 16


@pytest.fixture(scope="module")
def start(tiny_model_dir):
    """The warm-started tiny model, two training prompts, and one fixed rollout of G completions each."""
    model, processor, _ = load_model(tiny_model_dir)
    samples = [data.synthetic_sample(i, "train") for i in range(2)]
    prompts = encode_prompts(processor, [s.load_image() for s in samples], [s.text for s in samples], CHAIN_OF_BOX)
    torch.manual_seed(0)
    completion_ids, mask = core.sample(model, processor, prompts, G, T)  # (B*G, T)
    assert (mask == 0).any() and mask.sum(1).min() >= 1  # some completions end early: padding is exercised
    return model.train(), processor, samples, completion_ids, mask


def reward(texts, samples, images, sizes):
    """Digits in the text earn reward (tests/train_with_test_reward.py): the completions get different rewards."""
    targets = [R.Target(box=s.box, orig_size=(s.width, s.height), resized_size=size)
               for s, size in zip(samples, sizes) for _ in range(G)]
    return score_with_digits(texts, targets, R.RewardConfig())


def optimizer_of(policy):
    """Plain SGD, so that the weights after an update differ exactly as the two paths' gradients do. (AdamW's first
    step, lr * g / (|g| + eps), turns gradient components near 1e-9, which two correct paths round differently, into
    steps that differ by their full size: with AdamW, 44 of 75,264 weights of the patch embedding differed by 1e-6.)"""
    return torch.optim.SGD(policy.parameters(), lr=0.05)


def fast_update(start, beta, mu, loss_type, monkeypatch):
    """train.grpo_step on the fixed rollout: (losses of its mu updates, the weights after them)."""
    model, processor, samples, completion_ids, mask = start
    policy, reference = copy.deepcopy(model), copy.deepcopy(model).eval() if beta else None
    texts = processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    monkeypatch.setattr(train, "generate_completions",
                        lambda _, __, prompts, **kw: Rollout(prompts, completion_ids, mask, texts))
    cfg = train.Config(num_generations=G, max_completion_length=T, beta=beta, num_iterations=mu, loss_type=loss_type,
                       max_grad_norm=1.0)
    optimizer = optimizer_of(policy)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: 1.0)
    records = train.grpo_step(cfg, policy, reference, processor, optimizer, scheduler, [samples], reward, CHAIN_OF_BOX)
    return [r["loss"] for r in records], list(policy.parameters())


def plain_update(start, beta, mu, loss_type, monkeypatch):
    """grpo_min.core.grpo_step on the same rollout: (losses of its mu updates, the weights after them)."""
    model, processor, samples, completion_ids, mask = start
    policy, reference = copy.deepcopy(model), copy.deepcopy(model).eval() if beta else None
    monkeypatch.setattr(core, "sample", lambda *a, **k: (completion_ids, mask))
    settings = core.Settings(num_generations=G, max_completion_length=T, beta=beta, num_iterations=mu,
                             max_grad_norm=1.0, loss=dict(loss_type=loss_type))
    optimizer = optimizer_of(policy)
    record = core.grpo_step(policy, reference, processor, optimizer, samples, reward, CHAIN_OF_BOX, settings)
    return record["losses"], list(policy.parameters())


def assert_same_update(start, beta, mu, loss_type, monkeypatch):
    fast_losses, fast_weights = fast_update(start, beta, mu, loss_type, monkeypatch)
    plain_losses, plain_weights = plain_update(start, beta, mu, loss_type, monkeypatch)
    assert len(fast_losses) == len(plain_losses) == mu
    # 1e-6 relative, plus 1e-7 absolute: a few float32 ulps of a loss near 0.05, which two correct paths round
    # differently (with 2 threads, the 2nd update's loss differed by 1.2e-6 relative, 6.7e-8 absolute)
    assert fast_losses == pytest.approx(plain_losses, rel=1e-6, abs=1e-7), (fast_losses, plain_losses)
    moved = 0.0
    for (name, before), fast, plain in zip(start[0].named_parameters(), fast_weights, plain_weights):
        torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (fast - before).abs().max().item())
    assert moved > 1e-4  # the update did move the weights


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("mu", [1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_the_plain_core_and_grpo_step_make_the_same_update(start, beta, mu, loss_type, monkeypatch):
    assert_same_update(start, beta, mu, loss_type, monkeypatch)


@pytest.mark.parametrize("patched", [train, core])
def test_patching_the_loss_of_one_path_alone_breaks_the_equality(start, patched, monkeypatch):
    """Each path calls the loss through its own module (train.grpo_loss, grpo_min.core.grpo_loss): an ablation patch
    reaches exactly the path it names, and the equality test above notices a difference in either."""
    loss = patched.grpo_loss
    monkeypatch.setattr(patched, "grpo_loss", lambda *a, **k: (lambda out: (1.5 * out[0], out[1]))(loss(*a, **k)))
    with pytest.raises(AssertionError):
        assert_same_update(start, 0.04, 2, "grpo", monkeypatch)


def test_the_plain_sampler_decodes_greedily_as_the_fast_one(tiny_model_dir):
    """Two prompts of different lengths (left padding) and image sizes: the same greedy tokens, padding included."""
    model, processor, _ = load_model(tiny_model_dir)
    samples = [data.synthetic_sample(i, "val") for i in range(2)]
    images = [samples[0].load_image(), samples[1].load_image().resize((336, 140))]
    prompts = encode_prompts(processor, images, [samples[0].text, samples[1].text + " on the frontal view"],
                             CHAIN_OF_BOX)
    assert (prompts.inputs["attention_mask"] == 0).any()
    plain_ids, plain_mask = core.sample(model, processor, prompts, 2, 40, greedy=True)
    fast = generate_completions(model, processor, prompts, num_generations=2, max_new_tokens=40, greedy=True)
    assert torch.equal(plain_ids, fast.completion_ids) and torch.equal(plain_mask, fast.completion_mask)
    assert plain_ids.shape[1] > 4 and (plain_ids != special_token_ids(processor)["pad"]).any()


def test_the_core_trains_the_demo_model(tiny_model_dir, capsys):
    """core.train, as the README shows it, runs GRPO steps and moves the weights. (The README passes
    rewards.grounding_reward; this short warm start earns it nothing yet, so the digits reward stands in.)"""
    model, processor, _ = load_model(tiny_model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    train_set = [data.synthetic_sample(i, "train") for i in range(8)]
    history = core.train(model, processor, train_set, reward, CHAIN_OF_BOX,
                         core.Settings(num_generations=4, max_completion_length=24, num_iterations=2),
                         steps=2, prompts_per_step=2)
    assert len(history) == 2 and all(len(h["losses"]) == 2 for h in history)
    assert all(h["reward"] > 0 for h in history)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert "step 2/2: reward" in capsys.readouterr().out


def test_the_readmes_core_snippet_runs(tiny_model_dir, monkeypatch, capsys):
    """The README's lines that train the demo model through the core, run as written (1 step, the test's model)."""
    from pathlib import Path

    from grpo_min import tiny

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = readme.split("## Read in this order")[1].split("```python\n")[1].split("```")[0]
    assert "core.train(" in snippet and "steps=200" in snippet
    monkeypatch.setattr(tiny, "tiny_model_path", lambda seed=0: tiny_model_dir)
    exec(snippet.replace("steps=200", "steps=1"), {})
    assert "step 1/1: reward" in capsys.readouterr().out
