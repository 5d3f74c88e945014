"""The semantic consistency reward's scorer: does the content of the predicted box match the phrase?

MedGround-R1's headline idea (docs/METHOD.md, "Rewards"): a spatially wrong box that still lands on the
described finding should earn more than one that lands on nothing. Our definition of the term:

    crop = original image cut to the predicted box (model frame -> original pixels, clipped),
           padded to a square with black (the processor's centre crop would cut elongated findings)
    R_semantic = clip(cos(image_tower(crop), text_tower(phrase)), 0, 1)

computed by a frozen dual encoder: one image forward per crop and one text forward per phrase not
seen before (phrase embeddings are cached), each alone and on one CPU thread, so that a completion's
reward depends on that completion only, not on the others scored in its step (see ``embed_images``).

``SemanticScorer`` wraps any transformers dual encoder saved in a folder (``CLIPModel``, ``SiglipModel``;
e.g. PubMedCLIP) through ``AutoModel`` + ``AutoProcessor``. The demo's scorer, a tiny CLIP trained on
synthetic crops, is built by grpo_min/tiny_scorer.py and loaded through the same ``from_pretrained``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from grpo_min.boxes import Box, clip_box, from_model_frame

MIN_SIDE = 2.0  # pixels of the original image: a thinner box has no content to judge and scores 0
MAX_CROP_SIDE = 512  # larger crops are shrunk first: dual encoders read 224-384 px, resizing costs time


@contextmanager
def one_thread():
    """Run torch's CPU ops on one thread inside the block.

    The scorer's ops are tiny (64 crops of 37 tokens, width 64): a second thread gains little, and
    when the CPU is shared, threads waiting on each other made them 10-30x slower (measured on 2
    busy cores: ``score`` 0.4-0.5 s on 2 threads, 0.03 s on 1). One thread also fixes how each
    reduction is split, so a result does not depend on the thread count its caller runs with.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def crop_to_square(image: Image.Image, box: Box) -> Image.Image:
    """The pixels of ``box`` (original image pixels, already clipped), centred on a black square.

    >>> crop_to_square(Image.new("RGB", (100, 100), "white"), (10, 20, 50, 30)).size
    (40, 40)
    """
    x1, y1, x2, y2 = math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])
    crop = image.crop((x1, y1, x2, y2))
    if max(crop.size) > MAX_CROP_SIDE:  # real radiographs are ~3000 px: a lung-sized crop is huge
        crop.thumbnail((MAX_CROP_SIDE, MAX_CROP_SIDE), Image.Resampling.BICUBIC)
    side = max(crop.size)
    square = Image.new(crop.mode, (side, side))  # black: X-ray background, and no texture to match
    square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return square


def prediction_box(box: Box | None, target) -> Box | None:
    """A completion's box (``parse_answer``'s, model frame) in original pixels, clipped to the image; None if
    there is none or it is degenerate."""
    if box is None:
        return None
    box = from_model_frame(box, target.orig_size, target.resized_size, target.frame)
    box = clip_box(box, *target.orig_size)  # None when nothing of it lies inside the image
    if box is None or box[2] - box[0] < MIN_SIDE or box[3] - box[1] < MIN_SIDE:
        return None
    return box


def scorer_path(choice: str, dataset: str, weight: float = 1.0) -> str | None:
    """What ``--semantic-model`` means: a dual-encoder folder, "tiny" (the demo's scorer), or None (the reward off).

    "auto" is the tiny scorer on the synthetic data and off on real data: the tiny scorer has only seen
    synthetic crops and must never judge real images. Raises FileNotFoundError for a folder that is not there.
    """
    if choice == "none" or weight == 0:
        return None
    if choice == "auto":
        return "tiny" if dataset == "synthetic" else None
    if not (Path(choice) / "config.json").is_file():
        raise FileNotFoundError(f"--semantic-model {choice!r}: expected auto, none, or a local dual-encoder folder "
                                "with config.json (CLIP, SigLIP, ...; nothing is downloaded)")
    return choice


def build_scorer(path: str) -> str:
    """``path`` itself, or for "tiny" the cached tiny scorer's folder (built on first use, one judge for every seed)."""
    if path != "tiny":
        return path
    from grpo_min.tiny_scorer import tiny_scorer_path

    return str(tiny_scorer_path(seed=0))


def require_dual_encoder(model, where: str = "") -> None:
    """Raise a TypeError that says what is expected unless ``model`` has an image and a text tower."""
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise TypeError(
            f"the semantic reward needs a dual encoder: a model with get_image_features and get_text_features "
            f"embedding images and texts in one space (e.g. transformers' CLIPModel or SiglipModel), but "
            f"{where or 'the model'} holds a {type(model).__name__}")


class SemanticScorer:
    """A frozen dual encoder scoring (image crop, phrase) pairs by cosine similarity."""

    def __init__(self, model, processor):
        require_dual_encoder(model)
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        # SigLIP was trained on texts padded to the full length, and its tokenizer expects that.
        self.padding = "max_length" if model.config.model_type.startswith("siglip") else True
        self._phrase_cache: dict[str, torch.Tensor] = {}  # phrase -> (D,) unit vector on CPU

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "SemanticScorer":
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(path, dtype=dtype).to(device)
        require_dual_encoder(model, where=str(path))
        return cls(model, AutoProcessor.from_pretrained(path))

    @property
    def device(self):
        return next(self.model.parameters()).device

    @staticmethod
    def _embedding(output) -> torch.Tensor:
        # transformers 5 returns an output object whose pooler_output is the projected embedding;
        # older versions return the tensor itself.
        embedding = getattr(output, "pooler_output", output)
        return F.normalize(embedding.float(), dim=-1).cpu()

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) unit vectors, each image through the image tower alone.

        An image's embedding is a function of that image only: each one is preprocessed and embedded
        on its own, in a forward of the same shape (1, 3, H, W) every time, on one CPU thread. In one
        batched forward its last bits depended on the batch size (a matrix kernel is chosen, and its
        sums are split, by the matrix's size: 1 crop vs 2 moved an embedding by ~5e-8 on an Intel
        Xeon), and the batch is the number of eligible completions, which changes from step to step.
        A fixed-size padded batch would not do: a crop's row could still land in a kernel's edge
        block or an elementwise op's scalar tail depending on its position. The cost, measured inside the
        demo on an idle Xeon (``python scripts/reward_cost.py``): 82 ms per rollout for the tiny scorer's
        crops one at a time against 24 ms in one batched forward, 6.4% of a 0.90 s rollout, nearly all of it
        per-operation overhead (~1 ms per forward of this 2-layer model); a real CLIP's forwards are
        dominated by arithmetic, which batching shortens far less.
        """
        with one_thread():
            # disable_grouping: torchvision-backed processors would otherwise resize same-sized images
            # stacked together, so an image's pixels could depend on which images it came with.
            pixels = self.processor(images=images, return_tensors="pt", disable_grouping=True)["pixel_values"]
            return torch.cat([self._embedding(self.model.get_image_features(  # (1, D) per image
                pixel_values=image[None].to(self.device, self.model.dtype))) for image in pixels])  # (N, D)

    @torch.inference_mode()
    def embed_phrases(self, phrases: list[str]) -> torch.Tensor:
        """(P, D) unit vectors; phrases not seen before go through the text tower one at a time.

        One at a time, not in a padded batch, and on one CPU thread: a batch's padding and shape, or
        another thread count, change the float rounding of each row (about 3e-8), so a cached
        embedding would depend on which phrases it was first embedded with, and a run resumed with an
        empty cache would drift from an uninterrupted one. Phrases are few and cached, so this costs little.
        """
        new = sorted(set(phrases) - self._phrase_cache.keys())
        if new and len(self._phrase_cache) + len(new) > 10_000:  # a real dataset's phrases are mostly unique:
            self._phrase_cache.clear()  # start over, and embed every phrase of this batch
            new = sorted(set(phrases))
        with one_thread():
            for phrase in new:
                enc = self.processor(text=[phrase], padding=self.padding, truncation=True, return_tensors="pt")
                inputs = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                self._phrase_cache[phrase] = self._embedding(self.model.get_text_features(**inputs))[0]  # (D,)
        return torch.stack([self._phrase_cache[p] for p in phrases])  # (P, D)

    def similarity(self, images: list[Image.Image], phrases: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its phrase, (N,) in [-1, 1].

        Each pair's dot product is its own (D,) sum, so it too depends on that pair alone.
        """
        image_vectors, phrase_vectors = self.embed_images(images), self.embed_phrases(phrases)  # (N, D) each
        return torch.stack([(a * b).sum() for a, b in zip(image_vectors, phrase_vectors)])  # (N,)

    def score(self, boxes: list[Box | None], targets: list, eligible: list[bool]) -> tuple[torch.Tensor, dict]:
        """R_semantic of N completions from their answers' boxes (``parse_answer``: model frame, or None), (N,)
        float32 on CPU, and counts for the log.

        Completions not ``eligible`` (no format, or spatially positive under ``semantic_on=negatives``)
        score 0 and are not counted. Eligible ones whose box is unreadable, thinner than
        ``MIN_SIDE`` or outside the image score 0 and count in ``semantic_invalid_boxes``.
        """
        scores = torch.zeros(len(boxes))
        crops, crop_of, phrases, rows = [], {}, [], []  # crop_of: (image, box) -> its index in crops
        for i, (answer_box, target, ok) in enumerate(zip(boxes, targets, eligible)):
            if not ok:
                continue
            box = prediction_box(answer_box, target)
            if box is None:
                continue
            if target.image is None:
                raise ValueError("the semantic reward needs Target.image (the original image)")
            # A group's completions often agree on a box: each distinct crop is embedded once (each crop is
            # embedded alone anyway, so sharing changes no bit of the result).
            if (id(target.image), box) not in crop_of:
                crop_of[id(target.image), box] = len(crops)
                crops.append(crop_to_square(target.image, box))
            phrases.append(target.phrase)
            rows.append((i, crop_of[id(target.image), box]))
        if rows:
            image_vectors = self.embed_images(crops)[[c for _, c in rows]]  # (R, D)
            phrase_vectors = self.embed_phrases(phrases)  # (R, D)
            cosines = torch.stack([(a * b).sum() for a, b in zip(image_vectors, phrase_vectors)])  # (R,) pair by pair
            scores[[i for i, _ in rows]] = cosines.clamp(0.0, 1.0)
        details = {"semantic_scored": len(rows), "semantic_invalid_boxes": sum(map(bool, eligible)) - len(rows)}
        return scores, details
