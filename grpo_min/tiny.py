"""The embedded default model: a tiny Qwen2.5-VL built from a config, warm-started on synthetic data.

No weights can be downloaded here, so ``--model tiny`` builds one (0.94 M parameters):

1. a byte-level BPE tokenizer trained in memory on the prompts and answers of the synthetic task,
   with Qwen's special tokens and digits split one per token (as Qwen's own tokenizer does);
2. a ``Qwen2VLImageProcessor`` that resizes the 224 px synthetic images to 112 x 112 (16 visual
   tokens), so the model's box frame (112 px) differs from the data's (224 px), as on real data;
3. ``Qwen2_5_VLForConditionalGeneration`` from a small config, random init;
4. **the warm start**, standing in for the imperfect prior of a pretrained VLM: supervised steps on
   the synthetic training split whose targets use the answer format and *loose* boxes (the truth
   padded by 30% of the finding's size on each side, as general-purpose VLMs tend to draw them;
   a perfect copy of such a box has IoU 1/1.6^2 = 0.39 with the truth, under the 0.5 of Acc@0.5),
   with one Chain-of-Box step naming the anatomical region and its exact box. GRPO's job is then
   to tighten the boxes.

The result is written with ``save_pretrained`` to a cache folder keyed by the recipe and the seed,
and loaded back through the same ``--model PATH`` code as any real checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from grpo_min.optim import make_optimizer

RECIPE_VERSION = 3  # bump when anything below changes what gets built
WARM_START = dict(steps=400, batch_size=32, learning_rate=2e-3, warmup_steps=20, loose_pad=0.3)
IMAGE_PIXELS = 112 * 112  # the processor resizes every image to at most this many pixels

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen2.5-VL's chat format (image placeholder inside the user turn), written as Jinja. Unlike
# Qwen's own template it adds no default system turn: 10 fewer tokens per prompt for the demo.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("GRPO_MIN_CACHE", Path.home() / ".cache" / "grpo_min"))


# ----------------------------------------------------------------------------------------------
# Tokenizer and processor
# ----------------------------------------------------------------------------------------------
def _corpus() -> list[str]:
    """Text the tiny tokenizer is fitted on: every template, synthetic phrase and answer shape."""
    from grpo_min.prompts import TEMPLATES, render_question
    from grpo_min.synthetic import synthetic_phrases

    phrases = synthetic_phrases()
    texts = ["system user assistant"] * 3
    texts += [render_question(p, t) for p in phrases for t in TEMPLATES.values()]
    texts += [f"<think>{p} [12,34,56,78]</think>" for p in phrases]
    texts += ['<answer>{"bbox_2d":[12,34,56,78]}</answer>'] * 10 + ['{"bbox_2d": [1, 2, 3, 4]}', "0123456789"]
    return texts


def build_processor(image_pixels: int = IMAGE_PIXELS):
    """A Qwen2.5-VL processor with a tokenizer fitted in memory (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token=None, additional_special_tokens=SPECIAL_TOKENS[3:])
    tokenizer.add_tokens(TAGS)  # one token each, like words (not special: they must decode)
    tokenizer.padding_side = "left"
    size = {"shortest_edge": 56 * 56, "longest_edge": image_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def build_model(processor, seed: int = 0):
    """A randomly initialised tiny Qwen2.5-VL whose special-token ids match ``processor``."""
    return random_model("tiny", processor, seed)


# ----------------------------------------------------------------------------------------------
# Random-weight models of other sizes (benchmarks)
# ----------------------------------------------------------------------------------------------
# Random-weight models with Qwen2.5-VL's layout. The tokenizer is always the tiny model's (a few
# hundred tokens, fitted in memory: nothing to download). "50m" keeps that small vocabulary, so its
# ~50 M parameters are decoder and vision blocks (where CPU arithmetic goes); "3b" and "7b" copy
# Qwen2.5-VL-3B/7B-Instruct's published dimensions, including the 151,936-row vocabulary, so that the
# LM head and log-softmax cost what they cost on the real model (ids past the tokenizer decode to "").
MODEL_CONFIGS = {
    "tiny": dict(  # the demo model (build_model)
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[4, 6, 6], rope_theta=10000.0, vocab_size=None,
                  tie_word_embeddings=False, max_position_embeddings=2048),  # mrope_section sums to head_dim / 2
        vision=dict(depth=2, hidden_size=64, intermediate_size=256, num_heads=4, out_hidden_size=128,
                    fullatt_block_indexes=[1])),
    "34m": dict(
        text=dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12], rope_theta=10000.0, vocab_size=None,
                  tie_word_embeddings=False),
        vision=dict(depth=8, hidden_size=384, intermediate_size=768, num_heads=6, out_hidden_size=512,
                    fullatt_block_indexes=[3, 7])),
    "50m": dict(
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12], rope_theta=10000.0, vocab_size=None,
                  tie_word_embeddings=False),
        vision=dict(depth=8, hidden_size=384, intermediate_size=1536, num_heads=6, out_hidden_size=512,
                    fullatt_block_indexes=[3, 7])),
    "3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, mrope_section=[16, 24, 24], rope_theta=1000000.0, vocab_size=151936,
                  tie_word_embeddings=True),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    fullatt_block_indexes=[7, 15, 23, 31])),
    "7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, mrope_section=[16, 24, 24], rope_theta=1000000.0, vocab_size=152064,
                  tie_word_embeddings=False),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    fullatt_block_indexes=[7, 15, 23, 31])),
}


def random_model(name: str, processor, seed: int):
    """A Qwen2.5-VL with random weights and the dimensions of ``MODEL_CONFIGS[name]``, its special-token ids
    those of ``processor``'s tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    dims = MODEL_CONFIGS[name]
    text, vision = dict(dims["text"]), dims["vision"]
    tok = processor.tokenizer
    tid = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=text.pop("vocab_size") or len(tok),
                         max_position_embeddings=text.pop("max_position_embeddings", 32768),
                         rope_parameters={"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                                          "mrope_section": text.pop("mrope_section")},
                         bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"),
                         pad_token_id=tok.pad_token_id, **text),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, **vision),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # Both end-of-turn tokens, as Qwen's checkpoints list them: TRL stops where the model's
    # generation_config says, grpo_min where special_token_ids says; they must agree.
    model.generation_config.eos_token_id = [tid("<|im_end|>"), tid("<|endoftext|>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


# ----------------------------------------------------------------------------------------------
# The warm start
# ----------------------------------------------------------------------------------------------
def warm_start_target(sample, resized_size, loose_pad: float = WARM_START["loose_pad"]) -> str:
    """The supervised target for one synthetic sample, in the model's frame.

    >>> warm_start_target(s, (112, 112))     # doctest: +SKIP
    '<think>left lower zone [68,66,86,94]</think><answer>{"bbox_2d":[72,78,84,92]}</answer>'
    """
    from grpo_min.boxes import clip_box, format_box, to_model_frame

    x1, y1, x2, y2 = sample.box
    px, py = loose_pad * (x2 - x1), loose_pad * (y2 - y1)
    loose = clip_box((x1 - px, y1 - py, x2 + px, y2 + py), sample.width, sample.height)
    orig = (sample.width, sample.height)
    name, region = sample.anatomy[0]
    region = to_model_frame(region, orig, resized_size)
    answer = to_model_frame(loose, orig, resized_size)
    return f"<think>{name} {format_box(region)}</think><answer>{{\"bbox_2d\":{format_box(answer)}}}</answer>"


def warm_start(model, processor, template: str, seed: int = 0, steps: int = WARM_START["steps"],
               batch_size: int = WARM_START["batch_size"], learning_rate: float = WARM_START["learning_rate"],
               warmup_steps: int = WARM_START["warmup_steps"], loose_pad: float = WARM_START["loose_pad"]):
    """Supervised steps (teacher forcing, token-mean cross-entropy on the target) on synthetic train."""
    from grpo_min.prompts import encode_prompts
    from grpo_min.rollout import completion_logps
    from grpo_min.synthetic import SyntheticDataset

    train = SyntheticDataset("train", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    # Linear warm-up, then a cosine decay to zero: the last, small steps sharpen the boxes.
    opt, sched = make_optimizer(model.parameters(), lr=learning_rate, fused=False, warmup_steps=warmup_steps,
                                total_steps=steps, schedule="cosine")
    tok = processor.tokenizer
    model.train()
    bar = tqdm(range(steps), desc="warm start (supervised)", leave=False)
    for _ in bar:
        idx = torch.randint(len(train), (batch_size,), generator=gen).tolist()
        samples = [train[i] for i in idx]
        prompts = encode_prompts(processor, [s.load_image() for s in samples], [s.text for s in samples], template)
        targets = [warm_start_target(s, size, loose_pad) + "<|im_end|>"
                   for s, size in zip(samples, prompts.resized_sizes)]
        tok.padding_side = "right"
        enc = tok(targets, padding=True, return_tensors="pt", add_special_tokens=False)
        logps = completion_logps(model, prompts, enc["input_ids"], enc["attention_mask"].float(), group_size=1)
        mask = enc["attention_mask"].float()  # (B, T)
        loss = -(logps * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tok.padding_side = "left"
    model.eval()
    return model


def tiny_model_path(seed: int = 0, template: str | None = None, **overrides) -> Path:
    """Build (or reuse from the cache) the warm-started tiny model; return its folder.

    The folder name hashes the recipe, so a changed recipe never reuses stale weights (the prompt
    texts are not in it: tests/test_core.py asks for a RECIPE_VERSION bump when they change). Building
    is deterministic for a seed and a number of threads (float sums depend on the thread count).
    ``overrides`` (e.g. ``steps=20``) give a cheaper model for tests.
    """
    from grpo_min.prompts import CHAIN_OF_BOX
    from grpo_min.synthetic import SYNTHETIC_VERSION

    template = template or CHAIN_OF_BOX
    recipe = dict(WARM_START, **overrides, version=RECIPE_VERSION, data_version=SYNTHETIC_VERSION, seed=seed,
                  template=template)
    recipe.setdefault("image_pixels", IMAGE_PIXELS)
    steps_kw = {k: v for k, v in overrides.items() if k in ("steps", "batch_size", "learning_rate", "warmup_steps",
                                                            "loose_pad")}

    def build():
        print(f"Building the tiny Qwen2.5-VL (seed {seed}) and warm-starting it on synthetic data")
        torch.manual_seed(seed)
        processor = build_processor(recipe["image_pixels"])
        model = build_model(processor, seed)
        warm_start(model, processor, template, seed=seed, **steps_kw)
        return model, processor

    return cached_build(f"tiny-qwen2.5-vl-seed{seed}", recipe, build)


def cached_build(prefix: str, recipe: dict, build) -> Path:
    """``cache_dir()/<prefix>-<hash of recipe>``: built once by ``build() -> (model, processor)``.

    Written under a temporary name of its own and renamed when complete, so an interrupted build is
    never reused and two processes building at once (two runs in two terminals) do not collide: the
    first rename wins, the other build is discarded.
    """
    import shutil
    import tempfile

    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir() / f"{prefix}-{key}"
    if (path / "config.json").exists() and (path / "recipe.json").exists():
        return path
    t0 = time.time()
    model, processor = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1))
    try:
        tmp.rename(path)
    except OSError:  # a concurrent build finished first (the target exists and is not empty)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "recipe.json").exists():
            raise
        return path
    print(f"Built {path} in {time.time() - t0:.0f} s ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          "parameters)")
    return path
