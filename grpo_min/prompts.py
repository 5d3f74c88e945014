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

from pathlib import Path

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
