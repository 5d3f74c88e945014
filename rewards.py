"""How a completion is judged: format, spatial and (optionally) semantic rewards.

MedGround-R1 sums three terms, ``r = R_format + R_spatial + R_semantic`` (docs/METHOD.md, "Rewards"). Here
each term is a pure function of (completion text, target); a term that needs a model (the semantic
one) receives a scorer object. Everything that can go wrong in a completion gives that term 0 and is
counted, never raised: a reward must not be able to kill a training run.

Each completion is parsed once (``parse_answer``: its answer's box, or None) and every term reads that box.

    >>> t = Target(box=(10, 10, 50, 50), orig_size=(100, 100), resized_size=(100, 100))
    >>> text = '<think>a</think><answer>{"bbox_2d": [10, 12, 50, 50]}</answer>'
    >>> format_reward(text, parse_answer(text)), spatial_reward(parse_answer(text), t)
    (1.0, 1.0)
    >>> spatial_reward(parse_answer('<answer>[0,0,9,9]</answer>'), t)
    0.0
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grpo_min.boxes import Box, has_answer_layout, iou, parse_answer, to_model_frame


@dataclass
class Target:
    """What a completion is judged against. ``box`` is the truth in ORIGINAL image pixels."""

    box: Box
    orig_size: tuple[int, int]  # (width, height) of the original image
    resized_size: tuple[int, int]  # (width, height) after the processor's resize
    frame: str = "absolute"  # the model family's box frame (grpo_min.models.BOX_FRAMES)
    phrase: str = ""
    image: object = None  # the original PIL image (the semantic reward crops it)

    @property
    def model_box(self) -> Box:
        """The truth in the model's frame: what the completion's numbers are compared with."""
        return to_model_frame(self.box, self.orig_size, self.resized_size, self.frame)


def format_reward(completion: str, box: Box | None) -> float:
    """1 if ``<think>...</think><answer>...</answer>`` and the answer holds a box (``box``, parsed), else 0."""
    return 1.0 if box is not None and has_answer_layout(completion) else 0.0


def spatial_reward(box: Box | None, target: Target, kind: str = "hard") -> float:
    """``hard``: 1 if IoU > 0.5 else 0 (MedGround-R1's released code); ``iou``: the IoU itself (VLM-R1).

    ``box`` is the answer's box in the model's frame (None: no box, 0), compared with the truth there.
    """
    value = iou(box, target.model_box)
    if kind == "hard":
        return 1.0 if value > 0.5 else 0.0
    if kind == "iou":
        return value
    raise ValueError(f"spatial reward kind {kind!r}: expected 'hard' or 'iou'")


@dataclass
class RewardConfig:
    """Which terms, with which weights. A weight of 0 turns a term off."""

    format_weight: float = 1.0
    spatial_weight: float = 1.0
    spatial_kind: str = "hard"
    semantic_weight: float = 0.0
    semantic_on: str = "all"  # "all" format-valid completions, or only "negatives" (IoU <= 0.5)


@dataclass
class Scores:
    """Rewards of N completions: the weighted total and each term (unweighted), all (N,)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    ious: list[float]
    parse_failures: int = 0  # completions with no readable box
    errors: int = 0  # reward evaluations that raised (scored 0)
    details: dict = field(default_factory=dict)


def score_completions(completions: list[str], targets: list[Target], config: RewardConfig,
                      semantic_scorer=None) -> Scores:
    """Score N completions against their N targets (one target per completion)."""
    n = len(completions)
    fmt, spatial, ious = torch.zeros(n), torch.zeros(n), [0.0] * n
    parse_failures = errors = 0
    boxes = [None] * n  # each completion's answer box, model frame
    for i, (text, target) in enumerate(zip(completions, targets)):
        try:
            boxes[i] = parse_answer(text)  # the one parse of this completion
            if boxes[i] is None:
                parse_failures += 1
                continue
            fmt[i] = format_reward(text, boxes[i])
            ious[i] = iou(boxes[i], target.model_box)
            spatial[i] = spatial_reward(boxes[i], target, config.spatial_kind)
        except Exception:  # a reward must never kill the run: score 0, count it
            errors += 1
            fmt[i] = spatial[i] = 0.0
            ious[i] = 0.0
    terms = {"format": fmt, "spatial": spatial}
    total = config.format_weight * fmt + config.spatial_weight * spatial
    details = {}
    if config.semantic_weight and semantic_scorer is not None:
        eligible = [f > 0 and (config.semantic_on == "all" or ious[i] <= 0.5) for i, f in enumerate(fmt.tolist())]
        try:
            semantic, sem_details = semantic_scorer.score(boxes, targets, eligible)
        except Exception:  # the batched scorer failed: no semantic credit this step, counted, run goes on
            semantic, sem_details = torch.zeros(n), {}
            errors += sum(eligible)
        terms["semantic"] = semantic
        total = total + config.semantic_weight * semantic
        details.update(sem_details)
    return Scores(total=total, terms=terms, ious=ious, parse_failures=parse_failures, errors=errors,
                  details=details)


def grounding_reward(config: RewardConfig, semantic_scorer=None, *, frame: str, num_generations: int):
    """The reward function a training step calls: ``reward(texts, samples, images, resized_sizes) -> Scores``.

    texts: N = B * G completions, each sample's G adjacent; samples: the B data.Sample records (truth box in
    original pixels, phrase); images: their B original images; resized_sizes: (width, height) of each after
    the processor's resize, the frame ``frame`` of the model family (grpo_min.models.BOX_FRAMES) boxes are in.
    """
    def reward(texts: list[str], samples: list, images: list, resized_sizes: list) -> Scores:
        targets = [Target(box=s.box, orig_size=(s.width, s.height), resized_size=size, frame=frame, phrase=s.text,
                          image=image)
                   for s, image, size in zip(samples, images, resized_sizes) for _ in range(num_generations)]
        return score_completions(texts, targets, config, semantic_scorer)

    return reward
