"""Rollouts: encode prompts, sample G completions per prompt, and score completion tokens.

Two model passes matter in GRPO and both live here:

* ``generate_completions``: sample a group of G completions for each of B prompts (HF ``generate``
  with ``num_return_sequences=G``; it runs the vision tower once per prompt).
* ``completion_logps``: per-token log-probabilities of the completion tokens under a model, the
  quantity that the loss, the old policy and the reference policy all need. Its fast path runs each
  prompt (image included) once per group instead of G times; the plain path stays as the reference.

Shapes: B prompts, G completions each, P prompt tokens (left-padded), T completion tokens
(right-padded). Rows of every (B*G, ...) tensor hold each prompt's G completions adjacently.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from grpo_min.prompts import render_prompt


@dataclass
class PromptBatch:
    """B encoded prompts plus what is needed to map boxes between frames."""

    inputs: dict  # processor output: input_ids (B, P), attention_mask, pixel_values, image_grid_thw, ...
    resized_sizes: list[tuple[int, int]]  # (width, height) of each image after the processor's resize


@dataclass
class Rollout:
    """A group of G sampled completions for each of B prompts."""

    prompts: PromptBatch
    completion_ids: torch.Tensor  # (B*G, T) long, padded after the first EOS
    completion_mask: torch.Tensor  # (B*G, T) float, 1 up to and including the first EOS
    texts: list[str]  # B*G decoded completions
    group_size: int


def special_token_ids(processor) -> dict:
    """EOS ids (the chat turn end and end-of-text), the pad id, and ids generation must never emit."""
    tok = processor.tokenizer
    ids = lambda names: [i for i in tok.convert_tokens_to_ids(names) if i is not None and i != tok.unk_token_id]
    eos = ids(["<|im_end|>", "<|endoftext|>"])
    # A weak or random policy can sample an image/video placeholder; the next forward would then
    # fail ("Image features and image tokens do not match"), so they are masked out, both when
    # sampling and when scoring, which keeps the scored distribution equal to the sampled one.
    never = ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[-1]
    return {"eos": eos, "pad": pad, "never": never}


def encode_prompts(processor, images, phrases, template: str, device=None) -> PromptBatch:
    """Render and tokenize B prompts (left padding, so that generation continues every row)."""
    texts = [render_prompt(processor, p, template) for p in phrases]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=list(images), padding=True, return_tensors="pt")
    patch = processor.image_processor.patch_size
    sizes = [(int(w) * patch, int(h) * patch) for _, h, w in inputs["image_grid_thw"].tolist()]
    inputs = {k: v.to(device) if device is not None and torch.is_tensor(v) else v for k, v in inputs.items()}
    return PromptBatch(inputs=inputs, resized_sizes=sizes)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it.

    >>> completion_mask_from_ids(torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]]), eos_ids=[2])
    tensor([[1., 1., 0., 0.],
            [1., 1., 1., 1.]])
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # (N, T)
    eos_seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # (N, T) True strictly after the 1st EOS
    return (~eos_seen_before).float()


def sampling_config(ids: dict, num_generations: int, max_new_tokens: int, temperature: float = 1.0,
                    greedy: bool = False) -> GenerationConfig:
    """Pure sampling from softmax(logits / temperature), minus the never-emitted tokens.

    top_k=0 and top_p=1.0 are explicit on purpose: left unset (None), transformers fills them from
    the model's generation config (top_k=50 by default), and the completions would then come from a
    truncated distribution that the log-probs of the loss do not describe.
    """
    if greedy:
        return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, num_return_sequences=num_generations,
                                eos_token_id=ids["eos"], pad_token_id=ids["pad"], suppress_tokens=ids["never"])
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None,
                            max_new_tokens=max_new_tokens, num_return_sequences=num_generations,
                            eos_token_id=ids["eos"], pad_token_id=ids["pad"], suppress_tokens=ids["never"])


@torch.no_grad()
def generate_completions(model, processor, prompts: PromptBatch, *, num_generations: int, max_new_tokens: int,
                         temperature: float = 1.0, greedy: bool = False, synced_gpus: bool = False) -> Rollout:
    """Sample ``num_generations`` completions for each prompt (pure sampling: no top-k, no top-p)."""
    ids = special_token_ids(processor)
    config = sampling_config(ids, num_generations, max_new_tokens, temperature, greedy)
    was_training = model.training
    # generate() fills every field left None in `config` from the model's own generation_config
    # (the checkpoint's generation_config.json): Qwen2.5-VL-Instruct ships repetition_penalty 1.05,
    # and a fine-tuned folder may carry no_repeat_ngram_size, min_length, ... Any of these would
    # sample from a distribution that the loss's log-probs do not describe, so a blank one stands in
    # while sampling: only `config` and the library's neutral defaults apply.
    # Greedy decoding (evaluation) keeps the checkpoint's defaults, as the released evaluation does.
    saved_defaults = model.generation_config
    if not greedy:
        model.generation_config = GenerationConfig()
    model.eval()
    try:
        out = model.generate(**prompts.inputs, generation_config=config, synced_gpus=synced_gpus)  # (B*G, P+T)
    finally:
        model.generation_config = saved_defaults
        model.train(was_training)
    completion_ids = out[:, prompts.inputs["input_ids"].shape[1]:]  # (B*G, T)
    mask = completion_mask_from_ids(completion_ids, ids["eos"])  # (B*G, T)
    completion_ids = completion_ids.masked_fill(mask == 0, ids["pad"])
    texts = processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(prompts, completion_ids, mask, texts, num_generations)


def completion_logps(model, prompts: PromptBatch, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     *, group_size: int, temperature: float = 1.0, never_ids: list[int] | None = None,
                     encode_image_once: bool = True, share_prompt: bool = True) -> torch.Tensor:
    """Log-probabilities (B*G, T) of each completion token under ``model``, from logits / temperature.

    The plain path (``encode_image_once=False``) scores B*G rows of prompt + completion, with
    ``pixel_values`` repeated G times: each prompt, image included, goes through the model G times.
    The fast path (default) gives the same numbers (tests compare log-probs and gradients, fp32,
    to 1e-5) doing each prompt's work once per group:

    * normally by sharing the whole prompt: ``_logps_sharing_the_prompt`` runs the B prompts once
      and the B*G completions on top of their KV cache;
    * with gradient checkpointing, which cannot keep that cache, by sharing the vision features
      only: each of the B images is encoded once and its features, repeated G times, go to the
      language model (``mm_encoder_outputs``), which still reads B*G whole rows. ``share_prompt=False``
      selects this path too (train.py does, for every pass of a run with gradient checkpointing, so
      that policy, reference and old policy compute alike).

    Gradients flow into the vision tower on every path.
    """
    inner = getattr(model, "module", model)  # under DDP the model itself is reached through .module
    if encode_image_once and share_prompt and not _drops_kv_cache(inner):
        return _logps_sharing_the_prompt(model, prompts, completion_ids, completion_mask, group_size=group_size,
                                         temperature=temperature, never_ids=never_ids)
    inputs = prompts.inputs
    rep = lambda t: t.repeat_interleave(group_size, dim=0)
    T = completion_ids.shape[1]
    input_ids = torch.cat([rep(inputs["input_ids"]), completion_ids], dim=1)  # (B*G, P+T)
    attention_mask = torch.cat([rep(inputs["attention_mask"]), completion_mask.long()], dim=1)  # (B*G, P+T)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, image_grid_thw=rep(inputs["image_grid_thw"]),
                  logits_to_keep=T + 1, use_cache=False)
    if "mm_token_type_ids" in inputs:  # without it M-RoPE silently falls back to 1-D positions
        kwargs["mm_token_type_ids"] = torch.cat(
            [rep(inputs["mm_token_type_ids"]), torch.zeros_like(completion_ids)], dim=1)  # (B*G, P+T)
    if encode_image_once:
        features = inner.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        per_image = features.pooler_output  # B tensors of (visual tokens, hidden)
        repeated = tuple(f for f in per_image for _ in range(group_size))  # B*G, each image G times
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=repeated)}
    else:
        counts = (inputs["image_grid_thw"].prod(-1)).tolist()  # patches per image
        per_image = torch.split(inputs["pixel_values"], counts)
        kwargs["pixel_values"] = torch.cat([p for p in per_image for _ in range(group_size)])
    logits = model(**kwargs).logits[:, :-1, :]  # (B*G, T, V): position t predicts completion token t
    return token_logps(logits, completion_ids, temperature, never_ids)


def _logps_sharing_the_prompt(model, prompts: PromptBatch, completion_ids: torch.Tensor,
                              completion_mask: torch.Tensor, *, group_size: int, temperature: float,
                              never_ids: list[int] | None) -> torch.Tensor:
    """``completion_logps``'s fast path: each prompt goes through the model once, not G times.

    The G completions of a group share their prompt, and under the causal mask no prompt token sees
    a completion token, so the prompt's keys and values are the same in all G rows. Step 1 runs the
    B prompts alone (vision tower included) and keeps their KV cache; step 2 repeats the cache G times
    and runs only the B*G completions on top of it. The tokens the model processes drop from
    G * (P + T) to P + G * T per group (docs/PERFORMANCE.md: a 346-token prompt with a 448 px image,
    G = 8, T = 32: from 3,024 to 602), and the vision tower runs once per image. Gradients flow back
    through the repeated cache into step 1. Step 1 is called on the model inside a DDP wrapper and
    step 2 through the wrapper, so that DDP sees one forward per backward (FSDP2 handles both).
    """
    inputs, inner = prompts.inputs, getattr(model, "module", model)
    G, (P, T) = group_size, (inputs["input_ids"].shape[1], completion_ids.shape[1])
    # 1. The B prompts, once. The last prompt position predicts completion token 0.
    if T == 1:  # step 2 must run anyway: DDP syncs gradients and FSDP gathers weights in the wrapper's call, on
        # every rank alike. Score one masked copy of the token after it, and keep the first column.
        twice, mask = completion_ids.repeat(1, 2), torch.cat([completion_mask, torch.zeros_like(completion_mask)], 1)
        return _logps_sharing_the_prompt(model, prompts, twice, mask, group_size=G, temperature=temperature,
                                         never_ids=never_ids)[:, :1]
    out = inner(**inputs, use_cache=True, logits_to_keep=1)
    first = out.logits.repeat_interleave(G, dim=0)  # (B*G, 1, V)
    cache_name = _cache_argument(inner)
    cache = getattr(out, cache_name)
    if cache is None or cache.get_seq_length() != P:  # never score completions without their prompt
        raise RuntimeError("the prompt pass returned no KV cache; call completion_logps(encode_image_once=False)")
    cache.batch_repeat_interleave(G)  # keys and values (B*G, heads, P, head dim) per layer, each prompt G times
    # 2. The completions, on top of the cache. Token t sits at its prompt's next M-RoPE position + t
    #    (for text the three M-RoPE axes are equal); padding after EOS gets position 0, as
    #    get_rope_index gives padding in the plain path. The last token predicts nothing we score.
    prompt_positions, _ = inner.model.get_rope_index(
        input_ids=inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])  # (3, B, P)
    next_position = (prompt_positions.amax(dim=(0, 2)) + 1).repeat_interleave(G)  # (B*G,)
    fed_mask = completion_mask[:, :-1].long()  # (B*G, T-1)
    positions = (next_position[:, None] + torch.arange(T - 1, device=fed_mask.device)) * fed_mask  # (B*G, T-1)
    attention_mask = torch.cat([inputs["attention_mask"].repeat_interleave(G, dim=0), fed_mask], dim=1)  # (B*G, P+T-1)
    rest = model(input_ids=completion_ids[:, :-1], attention_mask=attention_mask, use_cache=False,
                 position_ids=positions.expand(3, -1, -1), **{cache_name: cache}).logits  # (B*G, T-1, V)
    logits = torch.cat([first, rest], dim=1)  # (B*G, T, V): position t predicts completion token t
    return token_logps(logits, completion_ids, temperature, never_ids)


def _drops_kv_cache(model) -> bool:
    """True when a forward would drop the KV cache: gradient checkpointing in a pass with gradients."""
    return model.training and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _cache_argument(model) -> str:
    """The KV cache's name in forward() and its output: ``cache`` in recent transformers 5, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                never_ids: list[int] | None = None, chunk: int = 8) -> torch.Tensor:
    """log softmax(logits / temperature)[target], in float32, a few rows at a time.

    Done in row chunks so that the float32 copy of a (rows, T, vocabulary) block stays small: with
    Qwen's 151k vocabulary a full-batch float32 log_softmax is the usual memory peak.
    """
    out = []
    for lg, tg in zip(logits.split(chunk), targets.split(chunk)):
        lg = lg.float() / temperature  # (c, T, V)
        if never_ids:
            lg = lg.index_fill(-1, torch.tensor(never_ids, device=lg.device), float("-inf"))
        picked = lg.gather(-1, tg.unsqueeze(-1)).squeeze(-1)  # (c, T)
        out.append(picked - torch.logsumexp(lg, dim=-1))  # (c, T)
    return torch.cat(out)  # (B*G, T)
