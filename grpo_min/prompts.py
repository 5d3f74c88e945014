"""Prompts: the question, the Chain-of-Box template (MedGround-R1) and the plain one.

The image comes first in the user turn, then the templated question. Templates are plain strings
with a ``{question}`` slot; a user can pass a text file of their own (``--template path.txt``).

    >>> render_question("left apical pneumothorax", PLAIN)[:53]
    'Give the bounding box of the region this phrase descr'
"""
from __future__ import annotations

from pathlib import Path

QUESTION = "Give the bounding box of the region this phrase describes: {phrase}."

# The plain template: reason, then answer (what the released MedGround-R1 code uses).
PLAIN = (
    "{question} Reason inside <think> </think>, then answer inside <answer> </answer> "
    'as JSON {{"bbox_2d": [x1, y1, x2, y2]}}.'
)

# Chain-of-Box: the same, plus the instruction to box every region the reasoning names.
CHAIN_OF_BOX = (
    "{question} Reason inside <think> </think>, writing the box [x1, y1, x2, y2] right after "
    "each region of the image you name, then answer inside <answer> </answer> "
    'as JSON {{"bbox_2d": [x1, y1, x2, y2]}}.'
)

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
