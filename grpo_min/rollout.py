"""Rollouts, made fast: sample G completions per prompt, and score completion tokens.

Two model passes matter in GRPO and both live here, each the fast version of a function of
grpo_min/core.py (which tests hold them equal to):

* ``generate_completions``: sample a group of G completions for each of B prompts, in a decoding
  loop of plain PyTorch that runs each prompt (image included) once and its G completions on top
  of its KV cache, written in place into a cache allocated once.
* ``completion_logps``: per-token log-probabilities of the completion tokens under a model, the
  quantity that the loss, the old policy and the reference policy all need, with each prompt
  (image included) through the model once per group instead of G times.

Shapes: B prompts, G completions each, P prompt tokens (left-padded), T completion tokens
(right-padded). Rows of every (B*G, ...) tensor hold each prompt's G completions adjacently.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import StaticCache

from grpo_min import dist, recompute
from grpo_min.prompts import PromptBatch, special_token_ids


@dataclass
class Rollout:
    """A group of G sampled completions for each of B prompts."""

    prompts: PromptBatch
    completion_ids: torch.Tensor  # (B*G, T) long, padded after the first EOS
    completion_mask: torch.Tensor  # (B*G, T) float, 1 up to and including the first EOS
    texts: list[str]  # B*G decoded completions


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it.

    >>> completion_mask_from_ids(torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]]), eos_ids=[2])
    tensor([[1., 1., 0., 0.],
            [1., 1., 1., 1.]])
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # (N, T)
    eos_seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # (N, T) True strictly after the 1st EOS
    return (~eos_seen_before).float()


def generate_completions(model, processor, prompts: PromptBatch, *, num_generations: int, max_new_tokens: int,
                         temperature: float = 1.0, greedy: bool = False, logits_processor=None,
                         synced_gpus: bool = False, compile_generation: bool = False) -> Rollout:
    """Sample ``num_generations`` completions for each prompt: pure sampling from softmax(logits / temperature).

    Each prompt, image included, goes through the model once; its KV cache is repeated for the G
    completions of its group (``_prompt_pass``, shared with the scoring pass), then one token per
    step for all B*G rows. HF ``generate(num_return_sequences=G)`` would copy every prompt G times
    before its first forward, and run each prompt G times. grpo_min/core.py's ``sample`` is the plain
    version of this loop (the prompt simply repeated G times); tests hold their greedy tokens equal.

    The samples come from exactly the distribution that ``completion_logps`` scores: the whole
    vocabulary (no top-k, no top-p: a truncated distribution is one the loss's log-probs do not
    describe), no repetition penalty, and nothing from the model's ``generation_config`` (Qwen2.5-VL-
    Instruct's ships repetition_penalty 1.05 and top_k 1). Only the never-emitted tokens are masked,
    here and when scoring. ``greedy=True`` takes the argmax instead. ``logits_processor(scores (N, V),
    last_token (N,) or None) -> scores`` may change the logits before each choice (greedy evaluation
    applies the checkpoint's repetition penalty with it: evaluate.repetition_penalty).

    ``synced_gpus``: under FSDP every rank steps until every rank's completions have ended.
    ``compile_generation``: the decode step compiled with CUDA graphs (``_compiled_forward``), for GPUs.
    """
    ids, G = special_token_ids(processor), num_generations
    was_training = model.training
    model.eval()
    # inference_mode, unlike no_grad, also skips autograd's bookkeeping on every op (version counters, views):
    # 6 to 9% of a decode step of the tiny model, whose steps are mostly per-op overhead. Not under FSDP, whose
    # weights, gathered inside the forward, must stay ordinary tensors for training. The tokens are stacked
    # after the block, into ordinary tensors that the loss can use.
    with torch.no_grad() if synced_gpus else torch.inference_mode():
        try:
            # 1. Each prompt once; the logits of its last position predict completion token 0 of its G rows.
            logits, cache, next_position = _prompt_pass(model, prompts, G)  # (N, V), N = B*G rows; cache; (N,)
            N, V, device = *logits.shape, logits.device
            step = _decode_step(model, cache, prompts, G, max_new_tokens, compiled=compile_generation,
                                through_root=synced_gpus)
            del cache  # copied into the step's own
            never_ids, eos = (torch.tensor(ids[k], dtype=torch.long, device=device) for k in ("never", "eos"))
            never = torch.zeros(V, device=device).index_fill(0, never_ids, -torch.inf)  # (V,): -inf where never emitted
            done = torch.zeros(N, dtype=torch.bool, device=device)  # rows that have emitted EOS
            chosen = []
            # 2. One token per step for all N rows; finished rows get padding.
            for t in range(max_new_tokens):
                scores = logits.float()  # (N, V)
                if logits_processor is not None:
                    scores = logits_processor(scores, chosen[-1] if chosen else None)  # (N, V)
                # The whole vocabulary but the never-emitted tokens, as token_logps scores it: no top-k, no top-p.
                scores = scores / temperature + never  # (N, V)
                token = scores.argmax(-1) if greedy else torch.multinomial(scores.softmax(-1), 1).squeeze(-1)  # (N,)
                token = token.masked_fill(done, ids["pad"])
                chosen.append(token)
                done |= torch.isin(token, eos)
                if t + 1 == max_new_tokens or _every_rank_done(bool(done.all()), synced_gpus, device):
                    break
                logits = step(token, next_position + t, t)  # (N, V): what follows completion token t
        finally:
            model.train(was_training)
    completion_ids = torch.stack(chosen, dim=1)  # (B*G, T)
    mask = completion_mask_from_ids(completion_ids, ids["eos"])  # (B*G, T)
    longest = int(mask.sum(1).max())  # under synced_gpus a rank that waited for the others added only padding
    completion_ids, mask = completion_ids[:, :longest], mask[:, :longest]
    completion_ids = completion_ids.masked_fill(mask == 0, ids["pad"])
    texts = processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(prompts, completion_ids, mask, texts)


def _prompt_pass(model, prompts: PromptBatch, group_size: int, cache=None):
    """The B prompts once, image included, with their KV cache repeated for the G rows of each group.

    Under the causal mask no prompt token sees a completion token, so a prompt's keys and values
    are the same in all G rows of its group. Returns the logits of each prompt's last position,
    which predict completion token 0, (B*G, V); the cache, keys and values (B*G, heads, P, head dim)
    per layer; and each row's next M-RoPE position (B*G,): completion token t sits at next + t on
    all three axes (text advances the three together), one past the prompt's largest position.
    The prompt's positions are computed here once (``get_rope_index``) and handed to the forward.
    Called on the model inside a DDP wrapper (``.module``); FSDP2 gathers the weights in this call.
    ``cache``: the cache the prompt pass fills (default: transformers' own).
    """
    inputs, inner = prompts.inputs, dist.unwrap(model)
    P, G = inputs["input_ids"].shape[1], group_size
    positions, _ = inner.model.get_rope_index(
        input_ids=inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])  # (3, B, P), padding 0
    # A cache handed in is filled whatever use_cache says (use_cache=True would only make transformers warn
    # under gradient checkpointing, which keeps grpo_min/recompute.py's caches).
    out = inner(**inputs, position_ids=positions, use_cache=cache is None, logits_to_keep=1,
                **{_cache_argument(inner): cache})
    cache = getattr(out, _cache_argument(inner))
    if cache is None or cache.get_seq_length() != P:  # never continue a completion without its prompt
        raise RuntimeError("the prompt pass returned no KV cache, which continuing a completion needs")
    cache.batch_repeat_interleave(G)  # each prompt's keys and values G times
    next_position = (positions.amax(dim=(0, 2)) + 1).repeat_interleave(G)  # (B*G,)
    return out.logits[:, -1].repeat_interleave(G, dim=0), cache, next_position


def _decode_step(model, cache, prompts: PromptBatch, G: int, max_new_tokens: int, compiled: bool,
                 through_root: bool):
    """One decode step for all N = B*G rows: f(token (N,), position (N,), t) -> logits (N, V).

    Row n's completion token t goes in at its M-RoPE position (the same on all three axes), sees its
    prompt (left padding masked) and its earlier tokens, and its keys and values go to slot P + t of
    a KV cache allocated once for P + max_new_tokens tokens (HF ``StaticCache``), whose slots [0, P)
    receive the prompt's. Writing in place is cheaper than growing the cache by concatenation, which
    copies it at every step (about 8% of a step on CPU for a 34 M model).
    """
    prompt_mask = prompts.inputs["attention_mask"].repeat_interleave(G, dim=0).bool()  # (N, P)
    (N, P), length = prompt_mask.shape, prompt_mask.shape[1] + max_new_tokens
    if compiled:  # a drop-in forward replayed as a CUDA graph, on a cache rounded up to 256 slots
        length = -(-length // 256) * 256
        static, forward = _compiled_forward(model, N, length)
    else:
        static = StaticCache(config=model.config, max_cache_len=length)
        forward = _one_token_forward(model, static, through_root)
    for layer, prompt_layer in zip(static.layers, cache.layers):
        layer.update(prompt_layer.keys, prompt_layer.values)  # the prompt into slots [0, P)
    in_use = torch.cat([prompt_mask, prompt_mask.new_zeros(N, length - P)], dim=1)  # (N, L) bool: slots to attend
    # SDPA (transformers' default) takes the mask as (N, 1, 1, L). Handed that form, a view that follows
    # in_use, transformers skips rebuilding it from the 2-D mask at every step (about 6% of a decode
    # step of the tiny model); the other attention implementations want the 2-D mask.
    sdpa = model.model.language_model.config._attn_implementation == "sdpa"
    attention_mask = in_use[:, None, None, :] if sdpa else in_use

    def step(token, position, t):
        in_use[:, P + t] = True
        return forward(token[:, None], position.view(1, -1, 1).repeat(3, 1, 1), attention_mask)

    return step


def _one_token_forward(model, static, through_root: bool = False):
    """f(tokens (N, 1), positions (3, N, 1), mask) -> (N, V) logits of the next token; writes the cache in place.

    The language model and the LM head are called directly, not through the root model, whose forward
    serves prompts: at every call it looks for images and for M-RoPE offsets to apply (about 5% of a
    decode step of the tiny model). Under FSDP (``through_root``) the call goes through the root,
    whose forward gathers the weights that the root's shard unit holds (the LM head's among them).
    """
    name = _cache_argument(model)
    text, head = model.model.language_model, model.lm_head

    def forward(token, position, mask):
        inputs = dict(input_ids=token, position_ids=position, attention_mask=mask, use_cache=True, **{name: static})
        if through_root:
            return model(**inputs).logits[:, -1]
        return head(text(**inputs).last_hidden_state)[:, -1]  # (N, 1, hidden) -> (N, V)

    return forward


def _every_rank_done(done_here: bool, synced_gpus: bool, device) -> bool:
    """Whether decoding can stop: here, or under FSDP (``synced_gpus``) on every rank.

    FSDP all-gathers each unit's weights inside its forward, a collective that every rank must join.
    A rank that stopped while another still decodes would leave that one waiting forever, so a rank
    whose rows have all ended keeps stepping (on padding) until all have; one all-reduce per token,
    as HF ``generate(synced_gpus=True)`` does.
    """
    if not synced_gpus or not dist.is_distributed():
        return done_here
    pending = dist.all_reduce_sum(torch.tensor(0.0 if done_here else 1.0, device=device))  # ranks still decoding
    return pending.item() == 0


# ------------------------------------------------------------------ --compile-generation (GPU only)
def _compiled_forward(model, rows: int, length: int):
    """``compile_generation``'s decode step: (static cache, a drop-in for ``_one_token_forward``'s forward).

    On a GPU a decode step is bound by kernel launches, not arithmetic. A CUDA graph replays all of
    a step's kernels in one launch, for tensors of the same shapes and addresses at every step,
    which the fixed-size cache allows (``torch.compile(mode="reduce-overhead")``). The graph holds the
    cache's addresses, so cache and compiled step are kept per model and shape, the cache zeroed
    in place for each generation; compiling takes a while (about a minute), once per shape (``length``
    comes rounded up to 256 slots, so that batches of similar prompt lengths share a graph). Same tokens
    as the plain step (tests/test_sampling.py); not yet run on a GPU (scripts/gpu_check.sh).
    """
    weight = next(model.parameters())
    key = (rows, length, weight.device, weight.dtype, torch.is_autocast_enabled(weight.device.type))
    kept = _COMPILED.setdefault(model, {})
    if key not in kept:
        static = StaticCache(config=model.config, max_cache_len=length)
        kept[key] = static, torch.compile(_one_token_forward(model, static), mode="reduce-overhead", dynamic=False)
    static, graph = kept[key]
    static.reset()

    def forward(*args):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's logits were used: the graph may overwrite them
        return graph(*args).clone()

    return static, forward


# model -> {(rows, cache length, device, dtype, autocast): (cache, compiled step)}, for the life of the
# process (one policy per run).
_COMPILED: dict = {}


def completion_logps(model, prompts: PromptBatch, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     *, group_size: int, temperature: float = 1.0, never_ids: list[int] | None = None,
                     entropies: bool = False):
    """Log-probabilities (B*G, T) of each completion token under ``model``, from logits / temperature, with each
    prompt through the model once per group, not G times (``entropies=True``: and the per-token entropies).

    grpo_min/core.py's ``completion_logps`` is the plain version: B*G whole rows, each prompt and image G
    times. Both give the same numbers (tests compare log-probs and gradients, fp32, to 1e-5), and
    gradients flow into the vision tower on both. The G completions of a group share their prompt. Step 1 runs the B prompts alone (vision tower
    included) and repeats their KV cache G times (``_prompt_pass``, as sampling does); step 2 runs
    only the B*G completions on top of it. The tokens the model processes drop from
    G * (P + T) to P + G * T per group (docs/PERFORMANCE.md: a 346-token prompt with a 448 px image,
    G = 8, T = 32: from 3,024 to 602), and the vision tower runs once per image. Gradients flow back
    through the repeated cache into step 1. Step 1 is called on the model inside a DDP wrapper and
    step 2 through the wrapper, so that DDP sees one forward per backward (FSDP2 handles both).
    The caches are grpo_min/recompute.py's, which a layer can run again in the backward: with
    gradient checkpointing both steps are checkpointed layer by layer and the prompt stays shared.
    """
    inputs, inner = prompts.inputs, dist.unwrap(model)
    G, T = group_size, completion_ids.shape[1]
    if T == 1:  # step 2 must run anyway: DDP syncs gradients and FSDP gathers weights in the wrapper's call, on
        # every rank alike. Score one masked copy of the token after it, and keep the first column.
        twice, mask = completion_ids.repeat(1, 2), torch.cat([completion_mask, torch.zeros_like(completion_mask)], 1)
        scored = completion_logps(model, prompts, twice, mask, group_size=G, temperature=temperature,
                                  never_ids=never_ids, entropies=entropies)
        return tuple(t[:, :1] for t in scored) if entropies else scored[:, :1]
    with recompute.layers_keep_the_cache(inner):
        # 1. The B prompts, once; the last prompt position predicts completion token 0. first: (B*G, V);
        #    prompt_cache: each layer's keys and values, repeated for the B*G rows; next_position: (B*G,).
        first, prompt_cache, next_position = _prompt_pass(model, prompts, G, recompute.RecordingCache())
        # 2. The completions, on top of the prompt's keys and values. Token t sits at its prompt's next M-RoPE
        #    position + t; padding after EOS gets position 0, as get_rope_index gives padding in the plain
        #    path. The last token predicts nothing we score.
        fed_mask = completion_mask[:, :-1].long()  # (B*G, T-1)
        positions = (next_position[:, None] + torch.arange(T - 1, device=fed_mask.device)) * fed_mask  # (B*G, T-1)
        prompt_mask = inputs["attention_mask"].repeat_interleave(G, dim=0)  # (B*G, P)
        attention_mask = torch.cat([prompt_mask, fed_mask], dim=1)  # (B*G, P+T-1)
        rest = model(input_ids=completion_ids[:, :-1], attention_mask=attention_mask, use_cache=False,
                     position_ids=positions.expand(3, -1, -1),
                     **{_cache_argument(inner): recompute.PrefixCache(prompt_cache)}).logits  # (B*G, T-1, V)
    logits = torch.cat([first[:, None], rest], dim=1)  # (B*G, T, V): position t predicts completion token t
    return token_logps(logits, completion_ids, temperature, never_ids, entropies=entropies)


def _cache_argument(model) -> str:
    """The KV cache's name in forward() and its output: ``cache`` in recent transformers 5, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                never_ids: list[int] | None = None, chunk: int = 8, entropies: bool = False):
    """log softmax(logits / temperature)[target], in float32, a few rows at a time.

    Done in row chunks so that the float32 copy of a (rows, T, vocabulary) block stays small: with
    Qwen's 151k vocabulary a full-batch float32 log_softmax is the usual memory peak. With
    ``entropies=True`` returns (log-probs, entropies), both (B*G, T): the entropy of the same scored
    distribution at each position, differentiable (for the loss's entropy options only).
    """
    out, entropy = [], []
    for lg, tg in zip(logits.split(chunk), targets.split(chunk)):
        lg = lg.float() / temperature  # (c, T, V)
        if never_ids:
            lg = lg.index_fill(-1, torch.tensor(never_ids, device=lg.device), float("-inf"))
        picked = lg.gather(-1, tg.unsqueeze(-1)).squeeze(-1)  # (c, T)
        log_z = torch.logsumexp(lg, dim=-1)  # (c, T)
        out.append(picked - log_z)  # (c, T)
        if entropies:  # H = log Z - sum_v p_v logit_v; a never-token has p 0 (its -inf logit read as 0)
            entropy.append(log_z - (torch.softmax(lg, dim=-1) * lg.nan_to_num(neginf=0.0)).sum(-1))  # (c, T)
    return (torch.cat(out), torch.cat(entropy)) if entropies else torch.cat(out)  # (B*G, T)
