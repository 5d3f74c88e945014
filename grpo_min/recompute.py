"""Gradient checkpointing that keeps the prompt shared: KV caches that a recomputed layer can read again.

Scoring runs each prompt once per group and its G completions on top of the prompt's keys and values
(``rollout.completion_logps``). Gradient checkpointing (``--gradient-checkpointing``) keeps
only each decoder layer's input in the forward and runs the layer again in the backward to rebuild
what the backward needs (``torch.utils.checkpoint``, non-reentrant, through transformers'
``GradientCheckpointingLayer``, which wraps the layer's ``forward`` so that FSDP's hooks stay
outside). transformers drops the KV cache of a checkpointed layer, and for a good reason: its caches
*write*, so a layer run again in the backward would append its keys and values a second time. Without
a cache the prompt could not be shared, and every pass went back to B*G whole rows (5x slower at
Qwen2.5-VL-3B's dimensions, and more memory, not less: docs/PERFORMANCE.md).

The two caches here never change what a second run of a layer sees:

* ``RecordingCache`` (the prompt pass): each layer's ``update`` keeps the keys and values it is
  handed, as they are, and returns them. Run again in the backward, the layer hands over equal values.
* ``PrefixCache`` (the completion pass): holds the prompt's keys and values, repeated G times;
  ``update`` returns them with the completions' own appended, ``torch.cat``, and stores nothing. The
  rerun sees exactly the forward's inputs, and the gradient reaches the prompt's keys and values
  through the concatenation, as without checkpointing.

With these, ``layers_keep_the_cache`` lets the checkpointed layers keep the cache (transformers'
``_can_checkpoint_with_cache``) for the two forwards of a scoring pass. Both passes are checkpointed,
the prompt's included: a prompt holds P tokens per group against the completions' G*T, and a real chest
X-ray (up to 1,280 visual tokens) makes P larger than 8 x 64. What stays in memory per layer is its
input, (tokens, hidden), instead of every intermediate (queries, keys and values, attention output,
the MLP's gate, up and product, each LoRA adapter's input); the price is one more forward of each
pass in the backward. Passes without gradients (the reference, the old policy) are never
checkpointed (transformers checkpoints only when gradients are on) and compute the same numbers.
"""
from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer


class _RecordingLayer(DynamicLayer):
    """A prompt layer's keys and values, (B, kv heads, P, head dim), kept as handed over (never appended to)."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states  # a rerun in the backward hands over equal values
        return key_states, value_states


class _PrefixLayer(DynamicLayer):
    """A prompt's keys and values, read-only: ``update`` returns them followed by the new ones, storing nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values  # (B*G, kv heads, P, head dim)

    def update(self, key_states, value_states, *args, **kwargs):  # (B*G, kv heads, t, head dim) each
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class RecordingCache(Cache):
    """The prompt pass's cache: one ``_RecordingLayer`` per decoder layer, created as the layers run."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=_RecordingLayer)


class PrefixCache(Cache):
    """The completion pass's cache: the prompt's keys and values (a filled ``RecordingCache``), read-only."""

    def __init__(self, prompt: Cache):
        super().__init__(layers=[_PrefixLayer(layer.keys, layer.values) for layer in prompt.layers])


@contextlib.contextmanager
def layers_keep_the_cache(model: torch.nn.Module):
    """Within the block, decoder layers that are checkpointed keep the KV cache they are given.

    Only for forwards whose caches are the two above. A layer runs again in the backward, after the
    block has ended, from its forward's own arguments: the setting matters only while they are taken.
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if layers and not hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache"):
        raise RuntimeError("this transformers version drops the KV cache of every checkpointed layer "
                           "(GradientCheckpointingLayer has no _can_checkpoint_with_cache): upgrade transformers to "
                           "train with --gradient-checkpointing")
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            vars(layer).pop("_can_checkpoint_with_cache", None)
