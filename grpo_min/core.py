"""GRPO in one file: the whole algorithm, plain and single-process, to read top to bottom.

One GRPO step on a vision-language model (DeepSeekMath's GRPO, arXiv 2402.03300, as MedGround-R1 uses it):

    S1 encode B prompts (image + phrase)          -> prompts
    S2 sample G completions per prompt            -> (B*G, T) tokens
    S3 reward each completion                     -> (B*G,) rewards
    S4 group-relative advantages                  -> (B*G,)          eq. (1) of docs/METHOD.md
    S5 log-probs of the sampling policy and of the frozen reference (no gradients)
    S6 mu updates: log-probs with gradients -> clipped loss + beta KL -> clip the gradient -> optimizer step
                                                                     eqs. (2)-(5), in grpo_min/loss.py

``train.grpo_step`` runs the same step made fast and distributed (each prompt once per group, a static KV
cache, DDP/FSDP2, LoRA); tests/test_plain_core.py holds the two equal, update for update. This file is the
reference: it trades speed for plainness (each prompt is simply repeated G times), and imports nothing
about distribution, checkpoints, options or logging.

Shapes: B prompts, G completions per prompt, N = B*G rows (each prompt's G rows adjacent), P prompt tokens
(left-padded), T completion tokens (right-padded after the first end-of-sequence), V vocabulary.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch

from grpo_min.loss import group_advantages, grpo_loss
from grpo_min.prompts import encode_prompts, special_token_ids


@dataclass
class Settings:
    """What one step needs to know (the names of TRL's GRPOConfig)."""

    num_generations: int = 8  # G: completions per prompt
    max_completion_length: int = 48  # T: longest completion, in tokens
    temperature: float = 1.0  # sampling temperature; the log-probs divide the logits by it too
    beta: float = 0.04  # weight of the KL to the reference; 0 skips the reference entirely
    num_iterations: int = 1  # mu: optimizer updates per batch of samples
    scale_rewards: str = "group"  # advantage scaling: "group", "batch" or "none" (Dr. GRPO)
    max_grad_norm: float = 1.0  # gradient clipping
    # The rest of grpo_loss's keywords (epsilon, epsilon_high, loss_type, importance_sampling_level, ...): the
    # loss variants reach the core here, except those that need token entropies (train.py computes them).
    loss: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------- S2: sampling
def repeat_prompts(inputs: dict, G: int) -> dict:
    """The processor's tensors for B prompts -> for N = B*G rows, each prompt G times in adjacent rows.

    Every tensor has one row per prompt except ``pixel_values``, which holds the patches of all B images
    one after the other: it is cut per image (``image_grid_thw``: patches per image) and each image repeated.
    """
    rows = {k: v.repeat_interleave(G, dim=0) for k, v in inputs.items() if k != "pixel_values"}
    patches = inputs["pixel_values"].split(inputs["image_grid_thw"].prod(-1).tolist())  # B x (patches, D)
    rows["pixel_values"] = torch.cat([p for p in patches for _ in range(G)])  # (G * all patches, D)
    return rows


def cache_name(model) -> str:
    """The KV cache's keyword: ``cache`` in recent transformers 5 releases, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample(model, processor, prompts, G: int, max_new_tokens: int, temperature: float = 1.0,
           greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """S2: G completions per prompt, one token at a time on the model's own KV cache.

    Returns tokens (N, T) and their mask (N, T): 1 up to and including each row's first end-of-sequence
    token, 0 after it (those positions hold the pad token). T is the longest completion, at most
    ``max_new_tokens``. Tokens come from softmax(logits / temperature) over the whole vocabulary minus the
    image/video placeholders (which a weak model could emit and which would break the next forward):
    exactly the distribution ``completion_logps`` scores. ``greedy`` takes the most likely token instead.
    """
    ids = special_token_ids(processor)
    was_training = model.training
    model.eval()
    rows = repeat_prompts(prompts.inputs, G)  # every tensor (N, ...)
    # Qwen2.5-VL's rotary positions have three axes (time, height, width) over the image; the model computes
    # the prompt's, and text after the prompt advances all three from one past the prompt's largest.
    positions, _ = model.model.get_rope_index(
        input_ids=rows["input_ids"], mm_token_type_ids=rows["mm_token_type_ids"],
        image_grid_thw=rows["image_grid_thw"], attention_mask=rows["attention_mask"])  # (3, N, P)
    next_position = positions.amax(dim=(0, 2)) + 1  # (N,)
    out = model(**rows, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = cache_name(model)  # the KV cache's keyword, in the forward's arguments and in its output
    attention_mask = rows["attention_mask"]  # (N, P), grows by one column per token
    device = attention_mask.device
    never = torch.zeros(out.logits.shape[-1], device=device).index_fill(
        0, torch.tensor(ids["never"], device=device), -torch.inf)  # (V,)
    eos = torch.tensor(ids["eos"], device=device)
    done = torch.zeros(len(attention_mask), dtype=torch.bool, device=device)  # (N,) rows that have emitted EOS
    tokens = []
    for t in range(max_new_tokens):
        scores = out.logits[:, -1].float() / temperature + never  # (N, V)
        token = scores.argmax(-1) if greedy else torch.multinomial(scores.softmax(-1), 1).squeeze(-1)  # (N,)
        token = token.masked_fill(done, ids["pad"])  # (N,) finished rows get padding
        tokens.append(token)
        done |= torch.isin(token, eos)
        if done.all():
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)  # (N, P+t+1)
        position = (next_position + t).view(1, -1, 1).expand(3, -1, 1)  # (3, N, 1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position, use_cache=True,
                    **{cache: getattr(out, cache)})
    model.train(was_training)
    completion_ids = torch.stack(tokens, dim=1)  # (N, T)
    is_eos = torch.isin(completion_ids, eos)  # (N, T)
    mask = ((is_eos.cumsum(dim=1) - is_eos.long()) == 0).float()  # (N, T) 1 up to and including the first EOS
    return completion_ids, mask


# ------------------------------------------------------------------------------------- S5, S6: log-probs
def completion_logps(model, prompts, completion_ids: torch.Tensor, G: int, temperature: float = 1.0,
                     never_ids: list[int] = ()) -> torch.Tensor:
    """log pi(o_t | prompt, o_<t) of every completion token (N, T): one forward over prompt + completion.

    The logits are divided by the sampling temperature and the never-sampled tokens excluded, so that the
    scored distribution is the sampled one. ``logits_to_keep`` keeps only the last T + 1 positions: position
    P - 1 + t predicts completion token t, and the very last one predicts nothing we score.
    """
    rows = repeat_prompts(prompts.inputs, G)  # (N, P) and the images, G times each
    T = completion_ids.shape[1]
    logits = model(input_ids=torch.cat([rows["input_ids"], completion_ids], dim=1),  # (N, P+T)
                   attention_mask=torch.cat([rows["attention_mask"], torch.ones_like(completion_ids)], dim=1),
                   # 1 on image tokens, 0 on text: without it Qwen2.5-VL silently falls back to 1-D positions
                   mm_token_type_ids=torch.cat([rows["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1),
                   pixel_values=rows["pixel_values"], image_grid_thw=rows["image_grid_thw"],
                   logits_to_keep=T + 1, use_cache=False).logits[:, :-1]  # (N, T, V)
    logits = logits.float() / temperature  # (N, T, V)
    logits[..., list(never_ids)] = -torch.inf  # (N, T, V)
    return logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # (N, T)


# ------------------------------------------------------------------------------------- one step
def grpo_step(policy, reference, processor, optimizer, samples: list, reward_fn, template: str, s: Settings,
              scheduler=None) -> dict:
    """S1-S6 on B samples: sample, reward, advantages, then ``s.num_iterations`` optimizer updates.

    samples: B data.Sample records (``.load_image()``, ``.text``: the phrase). reference: the frozen starting
    model (None when ``s.beta == 0``). ``reward_fn(texts, samples, images, resized_sizes)`` scores the N
    completions (each sample's G adjacent): it returns an object whose ``.total`` is the (N,) rewards, e.g.
    rewards.grounding_reward(...)'s ``rewards.Scores``; ``resized_sizes`` are the images' (width, height)
    after the processor's resize, the frame Qwen2.5-VL's boxes are in.
    Returns the mean reward and the loss of each update.
    """
    G = s.num_generations
    # S1. B prompts: the chat template around the image and the question, tokenized with left padding.
    images = [x.load_image() for x in samples]
    prompts = encode_prompts(processor, images, [x.text for x in samples], template)
    # S2. G completions per prompt, from the current policy.
    completion_ids, mask = sample(policy, processor, prompts, G, s.max_completion_length, s.temperature)  # (N, T)
    texts = processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)  # N strings
    # S3. The reward of each completion, computed here in the loop.
    rewards = reward_fn(texts, samples, images, prompts.resized_sizes).total  # (N,)
    # S4. Each completion's advantage: its reward relative to its own group's.      eq. (1)
    advantages = group_advantages(rewards, G, scale=s.scale_rewards)  # (N,)
    losses = grpo_update(policy, reference, optimizer, prompts, completion_ids, mask, advantages, s,
                         never_ids=special_token_ids(processor)["never"], scheduler=scheduler)
    return {"reward": rewards.mean().item(), "losses": losses}


def grpo_update(policy, reference, optimizer, prompts, completion_ids: torch.Tensor, mask: torch.Tensor,
                advantages: torch.Tensor, s: Settings, never_ids: list[int] = (), scheduler=None) -> list[float]:
    """S5-S6 on one batch of sampled completions: ``s.num_iterations`` optimizer updates; their losses.

    completion_ids, mask: (N, T); advantages: (N,). The sampling policy's log-probs are computed once,
    before the first update (with one update per batch they equal the policy's own, detached: ratio 1).
    """
    score = lambda model: completion_logps(model, prompts, completion_ids, s.num_generations,  # noqa: E731
                                           s.temperature, never_ids)  # (N, T)
    # S5. Log-probs that take no gradient: the policy that sampled (pi_old) and the frozen reference.
    with torch.no_grad():
        old_logps = score(policy) if s.num_iterations > 1 else None  # (N, T)
        ref_logps = score(reference) if s.beta > 0 else None  # (N, T)
    losses = []
    for _ in range(s.num_iterations):
        # S6. The policy's log-probs, with gradients; the clipped surrogate + beta KL.   eqs. (2)-(5)
        logps = score(policy)  # (N, T)
        old = old_logps if old_logps is not None else logps.detach()  # (N, T)
        loss, _ = grpo_loss(logps, old, advantages, mask, ref_logps=ref_logps, beta=s.beta,
                            max_completion_length=s.max_completion_length, **s.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), s.max_grad_norm)
        optimizer.step()
        if scheduler is not None:  # the learning rate of the next update
            scheduler.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------- a training loop
def train(policy, processor, dataset: list, reward_fn, template: str, s: Settings, *, steps: int,
          prompts_per_step: int = 8, learning_rate: float = 1e-4, warmup_steps: int = 20, seed: int = 0,
          log_every: int = 10) -> list[dict]:
    """A short GRPO run: ``steps`` batches of ``prompts_per_step`` prompts, each serving mu updates.

    The reference is a frozen copy of the starting policy. The learning rate rises linearly over
    ``warmup_steps`` optimizer updates, then stays. Returns one record per step (and prints some).
    """
    torch.manual_seed(seed)
    policy.train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if s.beta > 0 else None
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: min(1.0, (update + 1) / warmup_steps))
    order = torch.randperm(len(dataset)).tolist()
    history = []
    for step in range(steps):
        start = step * prompts_per_step % len(order)
        batch = [dataset[i] for i in (order + order)[start:start + prompts_per_step]]
        record = grpo_step(policy, reference, processor, optimizer, batch, reward_fn, template, s, scheduler)
        history.append(record)
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: reward {record['reward']:.3f}  loss {record['losses'][-1]:+.4f}")
    return history
