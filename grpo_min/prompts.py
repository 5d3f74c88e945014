"""Prompts: MedGround-R1's question and its two templates, Chain-of-Box and plain, character for character.

The image comes first in the user turn, then the templated question. Templates are plain strings with a
``{question}`` slot; a user can pass a text file of their own (``--template path.txt``).

- ``QUESTION``: the question of the released code; every released log shows it.
- ``CHAIN_OF_BOX``: the template printed in the paper's figure (official repository, title.png). Its
  sentence "If you identify a region of interest, append its bounding box in the format [x1, y1, x2, y2]."
  is the Chain-of-Box part: the reasoning names regions with their boxes.
- ``PLAIN``: the released code's template (eval/test_rec_r1.py, open-r1-multimodal/src/open_r1/grpo_rec.py),
  without the Chain-of-Box sentence.

    >>> render_question("small left apical pneumothorax", PLAIN)[:86]
    'Please provide the bounding box coordinate of the region this sentence describes: small'
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

QUESTION = "Please provide the bounding box coordinate of the region this sentence describes: {phrase}."

PLAIN = ("{question} First output the thinking process in <think> </think> tags and then output the final answer in "
         "<answer> </answer> tags. Output the final answer in JSON format.")

CHAIN_OF_BOX = ("{question} First output the thinking process in <think> </think> tags and then output the final "
                "answer in <answer> </answer> tags. In the <think> section, generate a step-by-step reasoning "
                "process. If you identify a region of interest, append its bounding box in the format "
                "[x1, y1, x2, y2]. Output the final answer in JSON format.")

TEMPLATES = {"chain-of-box": CHAIN_OF_BOX, "plain": PLAIN}


def load_template(name_or_path: str) -> str:
    """A template by name (``chain-of-box``, ``plain``) or from a text file with a ``{question}`` slot."""
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--template {name_or_path!r}: not a known template ({', '.join(TEMPLATES)}) and no such file")
    text = path.read_text()
    if "{question}" not in text:
        raise ValueError(f"template file {path} must contain the slot {{question}}")
    return text.replace("{", "{{").replace("}", "}}").replace("{{question}}", "{question}")


def render_question(phrase: str, template: str) -> str:
    """The user turn's text for one phrase."""
    return template.format(question=QUESTION.format(phrase=phrase.strip().rstrip(".")))


def build_messages(phrase: str, template: str) -> list[dict]:
    """Chat messages for the processor's chat template: the image first, then the question."""
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": render_question(phrase, template)}]}]


def render_prompt(processor, phrase: str, template: str) -> str:
    """The full prompt string, rendered by the processor's own chat template (generation prompt on)."""
    return processor.apply_chat_template(build_messages(phrase, template), tokenize=False,
                                         add_generation_prompt=True)


@dataclass
class PromptBatch:
    """B encoded prompts plus what is needed to map boxes between frames."""

    inputs: dict  # processor output: input_ids (B, P), attention_mask, pixel_values, image_grid_thw, ...
    resized_sizes: list[tuple[int, int]]  # (width, height) of each image after the processor's resize


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
