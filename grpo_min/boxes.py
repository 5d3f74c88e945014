"""Box helpers shared by the rewards, the training loop and the evaluation.

A box is `(x1, y1, x2, y2)`: the top-left and the bottom-right corner, in pixels, floats.

Three jobs live here, each a handful of pure functions (no torch, no model):

1. Reading a model's answer: `parse_answer` (the box, or None) and `answer_has_format`
   (the format reward's test). The parser is lenient about *how* a box is written (JSON, bare
   list, code fence, Qwen2-VL's `(x1,y1),(x2,y2)`) but strict about *where* it is: only the
   `<answer>` counts, never a box named along the way inside `<think>`.
2. Scoring: `iou`, `accuracy_at`, `summarize_ious` (docs/METHOD.md, "Evaluation").
3. Coordinate frames (docs/METHOD.md, "Box coordinate frames"). Datasets store boxes in pixels of the
   original image; Qwen2.5-VL reads and writes absolute pixels of the image *after* its processor
   resized it (`smart_resize`); Qwen2-VL used a 0-1000 grid. `to_model_frame` converts a ground
   truth box for the reward, `from_model_frame` maps a prediction back for evaluation and crops.

Sizes are `(width, height)` everywhere in this module, except `smart_resize`, which keeps the
`(height, width)` order of the Qwen / transformers function it reproduces.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2)

# ----------------------------------------------------------------------------------------------
# Parsing a completion
# ----------------------------------------------------------------------------------------------

# One number: optional sign, digits with an optional fraction (or a bare fraction), optional
# exponent. "nan" / "inf" are deliberately not numbers. Every piece of the box patterns below is
# followed by a character class it cannot overlap with (digit vs. space vs. comma vs. bracket), so
# a failed match gives up after one pass over the text: no catastrophic backtracking, and a search
# only starts at a '[' or '(', so the total work stays linear in the length of the output.
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_COMMA = r"\s*,\s*"
_BOX_PATTERN = re.compile(
    # [x1, y1, x2, y2]: a bare list, the value of "bbox_2d" / "bbox" / "box", or nested [[...]].
    rf"\[\s*({_NUMBER}){_COMMA}({_NUMBER}){_COMMA}({_NUMBER}){_COMMA}({_NUMBER})\s*\]"
    # (x1,y1),(x2,y2): Qwen2-VL, between <|box_start|> and <|box_end|> (or with those special
    # tokens already removed by skip_special_tokens=True when decoding).
    rf"|\(\s*({_NUMBER}){_COMMA}({_NUMBER})\s*\){_COMMA}\(\s*({_NUMBER}){_COMMA}({_NUMBER})\s*\)"
)
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"</answer>", re.IGNORECASE)
_THINK_TAG = re.compile(r"</?think>", re.IGNORECASE)


def _answer_span(text: str) -> str | None:
    """The part of a completion that may hold the predicted box (None: no part may).

    >>> _answer_span("<think>left lung [1, 2, 3, 4]</think> <answer>[5, 6, 7, 8]</answer>")
    '[5, 6, 7, 8]'
    >>> _answer_span("<think>left lung [1, 2, 3, 4]</think>") is None
    True
    >>> _answer_span("The box is [5, 6, 7, 8].")
    'The box is [5, 6, 7, 8].'
    """
    last_open = None
    for last_open in _ANSWER_OPEN.finditer(text):
        pass
    if last_open is not None:
        # The last <answer> is the final word: an earlier one may be the tag merely mentioned
        # inside the reasoning. Read up to </answer>, or to the end when the output was cut off.
        close = _ANSWER_CLOSE.search(text, last_open.end())
        return text[last_open.end() : close.start() if close else len(text)]
    if _THINK_TAG.search(text):
        return None  # the model reasoned but never answered: a box in <think> is not an answer
    return text  # no template at all (a model prompted without it): the whole text is the answer


def _first_box(text: str) -> Box | None:
    """The first box written in `text`, corners ordered, or None.

    >>> _first_box('[{"bbox_2d": [30, 40, 10, 20]}, {"bbox_2d": [1, 2, 3, 4]}]')
    (10.0, 20.0, 30.0, 40.0)
    """
    for match in _BOX_PATTERN.finditer(text):
        x1, y1, x2, y2 = (float(group) for group in match.groups() if group is not None)
        if all(math.isfinite(v) for v in (x1, y1, x2, y2)):  # "1e999" parses to inf: skip it
            return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    return None


def parse_answer(text: str) -> Box | None:
    """The predicted box of a completion, or None. Never raises (None or a non-str -> None).

    Where the box is looked for:
    - after the last `<answer>`, up to the next `</answer>` (or to the end of the text when the
      output was cut off before `</answer>`);
    - no `<answer>` but a `<think>` or `</think>`: None. A box named inside the reasoning
      ("Chain-of-Box": "the left lung [10, 20, 50, 90] shows ...") is a step, not the answer;
    - neither tag (a model prompted without the template): the whole text.
    Tags are matched case-insensitively.

    How a box may be written (the first one in the searched text wins, whatever the form):
    - `[x1, y1, x2, y2]`: bare, nested `[[...]]`, or as the value of any JSON key (`bbox_2d`,
      `bbox`, `box`, ...), so `{"bbox_2d": [...]}`, a list of such objects and a JSON block in a
      code fence (closed or cut off) all work without a JSON parser;
    - `(x1,y1),(x2,y2)`: Qwen2-VL's `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`, spaces allowed.
    Numbers may be integers, decimals, negative or in exponent notation. A list that does not hold
    exactly four numbers is not a box ("nan", "inf" and unfinished lists are skipped); a number
    too large for a float (inf) disqualifies its box.

    Corner order: models sometimes swap corners, so the box is returned ordered
    `(min x, min y, max x, max y)`. A zero-area box (x1 == x2) is still returned; it scores
    IoU 0. Coordinates outside the image are kept as written: `clip_box` handles them.

    >>> parse_answer('<think>The right lower lobe [300, 400, 520, 610] is dense.</think>'
    ...              '<answer>{"bbox_2d": [310, 405, 515, 600], "label": "consolidation"}</answer>')
    (310.0, 405.0, 515.0, 600.0)
    >>> parse_answer('<think>ok</think><answer>```json\\n[{"bbox_2d": [12, 8.5, 40, 33]')
    (12.0, 8.5, 40.0, 33.0)
    >>> parse_answer("<|box_start|>(120,45),(300,210)<|box_end|>")
    (120.0, 45.0, 300.0, 210.0)
    >>> parse_answer("<answer>[50, 60, 10, 20]</answer>")
    (10.0, 20.0, 50.0, 60.0)
    >>> parse_answer("<think>the mass [1, 2, 3, 4]</think>") is None
    True
    >>> parse_answer("<answer>[1, 2, 3]</answer>") is None
    True
    """
    if not isinstance(text, str):
        return None
    span = _answer_span(text)
    return None if span is None else _first_box(span)


def answer_has_format(text: str) -> bool:
    """The format reward's test: `<think>...</think>` then `<answer>...</answer>`, and a box.

    Only whitespace may stand before `<think>`, between `</think>` and `<answer>`, and after
    `</answer>`; each of the four (lowercase) tags appears exactly once; the answer holds a box
    `parse_answer` can read. The reasoning may be empty.

    >>> answer_has_format("<think>left base</think>\\n<answer>[1, 2, 30, 40]</answer>")
    True
    >>> answer_has_format("<answer>[1, 2, 30, 40]</answer><think>left base</think>")
    False
    >>> answer_has_format("<think>left base</think><answer>the left base</answer>")
    False
    """
    return has_answer_layout(text) and parse_answer(text) is not None


def has_answer_layout(text: str) -> bool:
    """`answer_has_format` without the box: the four tags, once each, in order, only whitespace around them."""
    if not isinstance(text, str):
        return False
    body = text.strip()
    if not (body.startswith("<think>") and body.endswith("</answer>")):
        return False
    if any(body.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    think_end = body.index("</think>") + len("</think>")
    answer_start = body.index("<answer>")
    return not (answer_start < think_end or body[think_end:answer_start].strip())


def format_box(box: Box) -> str:
    """A box as the models write it: integers (Python's `round`), comma separated, no spaces (fewer tokens).

    >>> format_box((10.4, 20.6, 300.0, 400.5))
    '[10,21,300,400]'
    """
    return "[" + ",".join(str(round(v)) for v in box) + "]"


# ----------------------------------------------------------------------------------------------
# Scoring (docs/METHOD.md, "Evaluation")
# ----------------------------------------------------------------------------------------------


def _has_area(box: Box) -> bool:
    x1, y1, x2, y2 = box
    return all(math.isfinite(v) for v in box) and x2 > x1 and y2 > y1


def iou(a: Box | None, b: Box | None) -> float:
    """Intersection over union, areas `(x2 - x1) * (y2 - y1)` (no +1 pixel convention).

    None, zero-area, inverted (x2 < x1 or y2 < y1) or non-finite boxes give 0.0; never NaN.

    >>> iou((0, 0, 10, 10), (5, 0, 15, 10))  # overlap 50, union 150
    0.3333333333333333
    >>> iou((0, 0, 10, 10), None)
    0.0
    """
    if a is None or b is None or not (_has_area(a) and _has_area(b)):
        return 0.0
    overlap_w = min(a[2], b[2]) - max(a[0], b[0])
    overlap_h = min(a[3], b[3]) - max(a[1], b[1])
    if overlap_w <= 0 or overlap_h <= 0:
        return 0.0
    intersection = overlap_w * overlap_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    if not union > 0:  # areas of tiny boxes (sides ~1e-300) underflow to 0
        return 0.0
    value = intersection / union
    # Boxes near the float limit overflow to inf/inf = NaN; rounding may overshoot 1 a hair.
    return float(min(value, 1.0)) if math.isfinite(value) else 0.0


def accuracy_at(ious: Sequence[float], threshold: float) -> float:
    """Percent (0-100) of IoUs strictly greater than `threshold`; empty -> 0.0.

    >>> accuracy_at([0.2, 0.5, 0.51, 0.9], 0.5)  # 0.5 itself does not count
    50.0
    """
    if len(ious) == 0:
        return 0.0
    return 100.0 * sum(1 for value in ious if value > threshold) / len(ious)


def summarize_ious(ious: Sequence[float], parse_failures: int = 0) -> dict:
    """The evaluation's numbers: percentages with two decimals, plus the counts.

    `ious` holds one value per sample, with 0.0 for each of the `parse_failures` samples whose
    answer had no box (they count in n, Acc@t and mIoU, as docs/METHOD.md asks).

    >>> summarize_ious([1.0, 0.6, 0.4, 0.0], parse_failures=1)
    {'n': 4, 'parse_failures': 1, 'acc@0.3': 75.0, 'acc@0.5': 50.0, 'acc@0.7': 25.0, 'miou': 50.0}
    """
    values = [float(v) for v in ious]
    if not 0 <= parse_failures <= len(values):
        raise ValueError(f"parse_failures={parse_failures} must lie in [0, {len(values)}] (n)")
    mean = sum(values) / len(values) if values else 0.0
    return {
        "n": len(values),
        "parse_failures": parse_failures,
        "acc@0.3": round(accuracy_at(values, 0.3), 2),
        "acc@0.5": round(accuracy_at(values, 0.5), 2),
        "acc@0.7": round(accuracy_at(values, 0.7), 2),
        "miou": round(100.0 * mean, 2),
    }


# ----------------------------------------------------------------------------------------------
# Coordinate frames (docs/METHOD.md, "Box coordinate frames")
# ----------------------------------------------------------------------------------------------


def clip_box(box: Box, width: float, height: float) -> Box | None:
    """Clip a box to the image `[0, width] x [0, height]`; None if no positive area is left.

    >>> clip_box((-5, 10, 120, 50), 100, 80)
    (0.0, 10.0, 100.0, 50.0)
    >>> clip_box((110, 10, 120, 50), 100, 80) is None
    True
    """
    limits = (width, height, width, height)
    x1, y1, x2, y2 = (min(max(float(v), 0.0), float(limit)) for v, limit in zip(box, limits))
    if not (x2 > x1 and y2 > y1):  # also False for NaN
        return None
    return (x1, y1, x2, y2)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """The size Qwen2-VL / Qwen2.5-VL's image processor resizes an image to.

    !!! ARGUMENT ORDER IS (height, width) AND SO IS THE RESULT: (resized_height, resized_width).
    !!! The rest of this module uses (width, height); swap when passing sizes along.

    Same rule, and the same results, as `smart_resize` in transformers' Qwen2-VL image processor
    (the processor's `min_pixels` / `max_pixels`, or `size["shortest_edge"]` / `["longest_edge"]`):
    1. round each side to the nearest multiple of `factor` (28 = patch 14 x merge 2);
    2. if that area exceeds `max_pixels`, shrink both sides by sqrt(area / max_pixels) and round
       each *down* to a multiple of `factor` (never below `factor`);
    3. else if it is below `min_pixels`, grow both sides by sqrt(min_pixels / area) and round each
       *up* to a multiple of `factor`.
    Raises ValueError for a non-positive side or an aspect ratio above 200. Like the installed
    transformers, a side shorter than `factor` is allowed (step 3 grows it).

    >>> smart_resize(3056, 2544, max_pixels=1003520)  # (height, width) of a 2544 x 3056 image
    (1092, 896)
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image sides must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {max(height, width) / min(height, width)}")
    new_height = round(height / factor) * factor
    new_width = round(width / factor) * factor
    if new_height * new_width > max_pixels:
        shrink = math.sqrt((height * width) / max_pixels)
        new_height = max(factor, math.floor(height / shrink / factor) * factor)
        new_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_height * new_width < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * grow / factor) * factor
        new_width = math.ceil(width * grow / factor) * factor
    return new_height, new_width


def _frame_size(frame: str, resized_size: tuple[int, int]) -> tuple[float, float]:
    """The (width, height) the model's coordinates span."""
    if frame == "absolute":  # Qwen2.5-VL: pixels of the resized image
        return resized_size
    if frame == "norm1000":  # Qwen2-VL: a 0-1000 grid over the image, whatever its size
        return (1000.0, 1000.0)
    raise ValueError(f"unknown box frame {frame!r}; expected 'absolute' or 'norm1000'")


def _rescale(box: Box, from_size: tuple[float, float], to_size: tuple[float, float]) -> Box:
    if min(*from_size, *to_size) <= 0:
        raise ValueError(f"sizes must be positive, got {from_size} and {to_size}")
    (from_w, from_h), (to_w, to_h) = from_size, to_size
    x1, y1, x2, y2 = box
    return (x1 * to_w / from_w, y1 * to_h / from_h, x2 * to_w / from_w, y2 * to_h / from_h)


def to_model_frame(
    box: Box, orig_size: tuple[int, int], resized_size: tuple[int, int], frame: str = "absolute"
) -> Box:
    """Original-image pixels -> the model's frame. Sizes are (width, height); no rounding.

    frame="absolute" (Qwen2.5-VL): pixels of the image after the processor's resize, whose
    (width, height) is `resized_size` (`image_grid_thw` * patch size, or `smart_resize` swapped).
    frame="norm1000" (Qwen2-VL): a 0-1000 grid; `resized_size` is not used. Other -> ValueError.

    >>> to_model_frame((636, 764, 1272, 1528), (2544, 3056), (896, 1092))
    (224.0, 273.0, 448.0, 546.0)
    >>> to_model_frame((636, 764, 1272, 1528), (2544, 3056), (896, 1092), frame="norm1000")
    (250.0, 250.0, 500.0, 500.0)
    """
    return _rescale(box, orig_size, _frame_size(frame, resized_size))


def from_model_frame(
    box: Box, orig_size: tuple[int, int], resized_size: tuple[int, int], frame: str = "absolute"
) -> Box:
    """The model's frame -> original-image pixels: the inverse of `to_model_frame`.

    >>> from_model_frame((224, 273, 448, 546), (2544, 3056), (896, 1092))
    (636.0, 764.0, 1272.0, 1528.0)
    """
    return _rescale(box, _frame_size(frame, resized_size), orig_size)
