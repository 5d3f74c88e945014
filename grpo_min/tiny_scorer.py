"""The embedded demo's semantic scorer: a tiny CLIP trained here on crops of the synthetic chest X-rays.

MedGround-R1's semantic reward needs a frozen medical dual encoder (grpo_min/semantic.py). None can be
downloaded here, so ``--semantic-model auto`` on the synthetic data builds this one: a tiny ``CLIPModel``
trained contrastively on crops of the synthetic images (positives: boxes on the finding; negatives: the
other finding types, the distractor finding and normal tissue), cached like the tiny VLM and loaded back
through the same ``SemanticScorer.from_pretrained`` as any real checkpoint. A crop cannot see laterality
or zone ("left", "upper"), so the tiny scorer in effect learns the finding type.

``python -m grpo_min.tiny_scorer --report`` builds it (or reuses the cache) and measures it on held-out
synthetic crops: phrase -> crop retrieval among the finding types, and on- vs off-finding separation.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from grpo_min.boxes import Box, clip_box, parse_answer
from grpo_min.optim import make_optimizer
from grpo_min.semantic import SemanticScorer, crop_to_square, one_thread
from grpo_min.synthetic import FINDINGS, SYNTHETIC_VERSION, synthetic_findings, synthetic_phrases, synthetic_sample

RECIPE_VERSION = 2  # bump when anything below changes what gets built
SCORER_ARCH = dict(image_size=24, patch_size=4, hidden_size=64, layers=2, heads=4, projection_dim=64,  # both towers
                   temperature=0.1)  # of the contrastive loss, fixed
SCORER_TRAINING = dict(train_images=600, positives_per_image=4, normals_per_image=4,  # the crop pool
                       steps=300, batch_size=64, learning_rate=2e-3, warmup_steps=20)
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]  # ids 0-3; eos_token_id 3 (not 2: CLIP's legacy rule)


def build_scorer_processor(image_size: int = SCORER_ARCH["image_size"]):
    """A ``CLIPProcessor``: a word-level tokenizer over the synthetic phrases, and a CLIP image processor."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, CLIPProcessor, PreTrainedTokenizerFast

    words = sorted({w for p in synthetic_phrases() for w in p.lower().split()})
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # CLIP's text tower pools the hidden state at the first eos_token_id: every text must end with it.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>", model_max_length=16)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size},
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_scorer_model(processor, seed: int = 0, image_size=24, patch_size=4, hidden_size=64, layers=2, heads=4,
                       projection_dim=64, temperature=0.1):
    """A randomly initialised tiny ``CLIPModel`` (about 0.15 M parameters) for ``processor``'s tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                 num_attention_heads=heads)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=len(processor.tokenizer), max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim, logit_scale_init_value=math.log(1 / temperature),
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.logit_scale.requires_grad_(False)  # a fixed temperature keeps the cosines calibrated
    return model


def jittered_box(box: Box, rng: np.random.Generator, size: int) -> Box:
    """A box still on the finding: centre shifted up to 30% of a side, sides scaled 0.7x-1.8x."""
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = (box[0] + box[2]) / 2 + rng.uniform(-0.3, 0.3) * w, (box[1] + box[3]) / 2 + rng.uniform(-0.3, 0.3) * h
    w, h = w * math.exp(rng.uniform(math.log(0.7), math.log(1.8))), h * math.exp(rng.uniform(math.log(0.7), math.log(1.8)))
    return clip_box((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), size, size) or box


def _overlap(a: Box, b: Box) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def normal_box(avoid: list[Box], rng: np.random.Generator, size: int, tries: int = 50) -> Box | None:
    """A random box (6-100 px a side) on normal tissue: under 10% of it or of any finding overlaps."""
    for _ in range(tries):
        w = math.exp(rng.uniform(math.log(6), math.log(100)))
        h = min(size, w * math.exp(rng.uniform(-0.5, 0.5)))
        x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
        box = (x, y, x + w, y + h)
        if all(_overlap(box, f) < 0.1 * min(w * h, (f[2] - f[0]) * (f[3] - f[1])) for f in avoid):
            return box
    return None


def crop_pool(split: str, n_images: int, positives: int, normals: int, seed: int = 0):
    """Crops of ``n_images`` synthetic images, with the finding type of each (-1: normal tissue).

    Per image: ``positives`` jittered crops of the described finding, two of the distractor (if any),
    ``normals`` of normal tissue. Returns (crops, kinds, phrases) as parallel lists.
    """
    rng = np.random.default_rng([seed, 7])
    crops, kinds, phrases = [], [], []
    for i in range(n_images):
        sample, findings = synthetic_findings(i, split, seed)
        image, size = sample.load_image(), sample.width
        for j, (kind, phrase, box) in enumerate(findings):
            for _ in range(positives if j == 0 else 2):
                crops.append(crop_to_square(image, jittered_box(box, rng, size)))
                kinds.append(FINDINGS.index(kind)), phrases.append(phrase)
        for _ in range(normals):
            box = normal_box([f[2] for f in findings], rng, size)
            if box is not None:
                crops.append(crop_to_square(image, box))
                kinds.append(-1), phrases.append(None)
    return crops, kinds, phrases


def contrastive_loss(model, pixels, crop_kinds, input_ids, attention_mask, text_kinds, own_crop):
    """InfoNCE both ways over T phrases and C crops; crop ``own_crop[t]`` is phrase t's positive.

    phrase -> crop runs over every crop, normal tissue and other findings included (the explicit
    negatives); crop -> phrase over the phrases. Pairs of the same finding type other than the own
    one are neither positive nor negative (masked): the batch holds many nodules.
    """
    image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)  # (C, D)
    text = F.normalize(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output,
                       dim=-1)  # (T, D)
    logits = model.logit_scale.exp() * text @ image.T  # (T, C)
    rows = torch.arange(len(own_crop))
    same_kind = text_kinds[:, None] == crop_kinds[None, :]  # (T, C)
    same_kind[rows, own_crop] = False
    logits = logits.masked_fill(same_kind, float("-inf"))
    phrase_to_crop = F.cross_entropy(logits, own_crop)
    crop_to_phrase = F.cross_entropy(logits[:, own_crop].T, rows)  # (T crops, T phrases)
    return (phrase_to_crop + crop_to_phrase) / 2


def train_scorer(model, processor, seed: int = 0, train_images=600, positives_per_image=4, normals_per_image=4,
                 steps=300, batch_size=64, learning_rate=2e-3, warmup_steps=20):
    """Fit ``model`` on a fixed pool of synthetic training crops (deterministic for a seed)."""
    crops, kinds, phrases = crop_pool("train", train_images, positives_per_image, normals_per_image, seed)
    pixels = processor(images=crops, return_tensors="pt")["pixel_values"]  # (P, 3, S, S)
    kinds = torch.tensor(kinds)
    finding_rows = (kinds >= 0).nonzero().squeeze(1)
    normal_rows = (kinds < 0).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    # Linear warm-up, then a cosine decay to 0: the last steps settle the weights that get saved.
    opt, sched = make_optimizer(model.parameters(), lr=learning_rate, weight_decay=0.01, fused=False,
                                warmup_steps=warmup_steps, total_steps=steps, schedule="cosine")
    model.train()
    for step in range(steps):
        # batch_size finding crops (described findings and distractors) with their phrases, and as
        # many normal-tissue crops.
        pick = finding_rows[torch.randperm(len(finding_rows), generator=gen)[:batch_size]]
        normals = normal_rows[torch.randperm(len(normal_rows), generator=gen)[:batch_size]]
        rows = torch.cat([pick, normals])
        enc = processor.tokenizer([phrases[r] for r in pick.tolist()], padding=True, return_tensors="pt")
        loss = contrastive_loss(model, pixels[rows], kinds[rows], enc["input_ids"], enc["attention_mask"],
                                kinds[pick], torch.arange(len(pick)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  scorer step {step:4d}  loss {loss.item():.3f}")
    return model.eval()


def tiny_scorer_path(seed: int = 0, **overrides) -> Path:
    """Build (or reuse from the cache) the tiny CLIP scorer; return its folder.

    The folder name hashes the recipe, so a changed recipe never reuses stale weights. Building is
    deterministic for a seed. ``overrides`` (e.g. ``steps=100``) give a cheaper scorer for tests.
    """
    from grpo_min.tiny import cached_build

    unknown = overrides.keys() - SCORER_ARCH.keys() - SCORER_TRAINING.keys()
    if unknown:
        raise TypeError(f"unknown scorer recipe keys {sorted(unknown)}")
    arch = {k: overrides.get(k, v) for k, v in SCORER_ARCH.items()}
    training = {k: overrides.get(k, v) for k, v in SCORER_TRAINING.items()}
    recipe = dict(arch, **training, version=RECIPE_VERSION, data_version=SYNTHETIC_VERSION, seed=seed)

    def build():
        print(f"Building the tiny CLIP scorer (seed {seed}) on synthetic crops")
        processor = build_scorer_processor(arch["image_size"])
        model = build_scorer_model(processor, seed, **arch)
        with one_thread():  # about 30x faster than two threads on a busy CPU (see one_thread)
            train_scorer(model, processor, seed, **training)
        return model, processor

    return cached_build(f"tiny-clip-scorer-seed{seed}", recipe, build)


# ----------------------------------------------------------------------------------------------
# The report: is the reward signal or noise? (held-out synthetic crops)
# ----------------------------------------------------------------------------------------------
def roc_auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a random positive scores above a random negative), ties counting half (Mann-Whitney U).

    >>> roc_auc(torch.tensor([0.9, 0.4]), torch.tensor([0.5, 0.1]))
    0.75
    """
    greater = (positive[:, None] > negative[None, :]).float().mean()
    ties = (positive[:, None] == negative[None, :]).float().mean()
    return float(greater + ties / 2)


def distribution(values: torch.Tensor, bins: int = 10) -> str:
    """Mean, std, quantiles and a text histogram over [0, 1] of rewards (clipped cosines)."""
    q = torch.quantile(values, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist()
    counts = torch.histc(values, bins=bins, min=0.0, max=1.0)
    bars = " ".join(f"{int(c):4d}" for c in counts.tolist())
    return (f"n={len(values)} mean={values.mean():.3f} std={values.std():.3f} "
            f"p5/25/50/75/95={'/'.join(f'{v:.2f}' for v in q)}\n      histogram over [0,1] in {bins} bins: {bars}")


def evaluate_scorer(scorer: SemanticScorer, split: str = "test", n_images: int = 200, seed: int = 0) -> dict:
    """Retrieval (phrase -> crop among the finding types) and on- vs off-finding separation."""
    rng = np.random.default_rng([seed, 11])
    samples, truth_crops, on, off_normal, off_distractor = [], [], [], [], []
    for i in range(n_images):
        sample, findings = synthetic_findings(i, split, seed)
        image, size = sample.load_image(), sample.width
        samples.append(sample)
        truth_crops.append(crop_to_square(image, sample.box))
        for box in [sample.box] + [jittered_box(sample.box, rng, size) for _ in range(2)]:
            on.append((crop_to_square(image, box), sample.text, sample.category))
        for _ in range(3):
            box = normal_box([f[2] for f in findings], rng, size)
            if box is not None:
                off_normal.append((crop_to_square(image, box), sample.text, sample.category))
        off_distractor += [(crop_to_square(image, box), sample.text, sample.category) for _, _, box in findings[1:]]

    # Retrieval: each phrase against its own finding's crop and one crop of every other finding type.
    kinds = [s.category for s in samples]
    by_kind = {k: [j for j, kk in enumerate(kinds) if kk == k] for k in FINDINGS}
    sim = scorer.embed_phrases([s.text for s in samples]) @ scorer.embed_images(truth_crops).T  # (n, n)
    hits, per_kind = [], {k: [] for k in FINDINGS}
    for i, kind in enumerate(kinds):
        others = [by_kind[k][i % len(by_kind[k])] for k in FINDINGS if k != kind and by_kind[k]]
        hit = bool(sim[i, i] > sim[i, others].max())
        hits.append(hit), per_kind[kind].append(hit)

    def rewards(pairs):
        return scorer.similarity([c for c, _, _ in pairs], [p for _, p, _ in pairs]).clamp(0, 1)

    r_on, r_normal, r_distractor = rewards(on), rewards(off_normal), rewards(off_distractor)
    r_off = torch.cat([r_normal, r_distractor])
    auc_per_kind = {}
    for k in FINDINGS:
        pos = r_on[[c == k for _, _, c in on]]
        neg = torch.cat([r_normal[[c == k for _, _, c in off_normal]], r_distractor[[c == k for _, _, c in off_distractor]]])
        if len(pos) and len(neg):
            auc_per_kind[k] = roc_auc(pos, neg)
    return dict(retrieval_top1=float(np.mean(hits)), retrieval_per_kind={k: float(np.mean(v)) for k, v in per_kind.items() if v},
                auc=roc_auc(r_on, r_off), auc_per_kind=auc_per_kind, on=r_on, off_normal=r_normal, off_distractor=r_distractor)


def time_scorer(scorer: SemanticScorer, prompts: int = 8, group: int = 8, repeats: int = 20) -> dict:
    """Seconds per ``score`` call on prompts x group completions (the default run's 64 crops + 8 phrases)."""
    rng = np.random.default_rng(0)
    completions, targets = [], []
    for i in range(prompts):
        s = synthetic_sample(i, "val")
        target = SimpleNamespace(box=s.box, orig_size=(s.width, s.height), resized_size=(112, 112),  # as rewards.Target
                                 frame="absolute", phrase=s.text, image=s.load_image())
        for _ in range(group):
            x, y, w, h = rng.uniform(0, 90, 2).tolist() + rng.uniform(4, 40, 2).tolist()
            completions.append(f"<think>.</think><answer>[{x:.0f},{y:.0f},{x + w:.0f},{y + h:.0f}]</answer>")
            targets.append(target)
    eligible = [True] * len(completions)
    times = {}
    for name, clear in (("cold (phrases embedded)", True), ("warm (phrases cached)", False)):
        runs = []
        for _ in range(repeats):
            if clear:
                scorer._phrase_cache.clear()
            t0 = time.perf_counter()
            scorer.score([parse_answer(c) for c in completions], targets, eligible)
            runs.append(time.perf_counter() - t0)
        times[name] = float(np.median(runs))
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the tiny semantic scorer and report how well it separates crops.")
    p.add_argument("--report", action="store_true", help="measure retrieval, separation and speed on held-out crops")
    p.add_argument("--model", default="tiny", help="a dual-encoder folder, or 'tiny' for the embedded scorer")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny scorer's build")
    p.add_argument("--images", type=int, default=200, help="held-out synthetic test images to measure on")
    args = p.parse_args(argv)

    path = tiny_scorer_path(args.seed) if args.model == "tiny" else Path(args.model)
    print(f"semantic scorer: {path}")
    if not args.report:
        return
    scorer = SemanticScorer.from_pretrained(path)
    result = evaluate_scorer(scorer, n_images=args.images)
    print(f"retrieval phrase -> crop among the finding types, top-1: {100 * result['retrieval_top1']:.2f}% "
          f"(chance {100 / 6:.1f}%)")
    print("  per type: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["retrieval_per_kind"].items()))
    print(f"on- vs off-finding crops, same phrase: ROC AUC {result['auc']:.4f}")
    print("  per type: " + ", ".join(f"{k} {v:.3f}" for k, v in result["auc_per_kind"].items()))
    print("rewards (clipped cosine) of")
    print("  on-finding crops (truth box + 2 jittered):  " + distribution(result["on"]))
    print("  off-finding: normal tissue:                 " + distribution(result["off_normal"]))
    print("  off-finding: the distractor finding:        " + distribution(result["off_distractor"]))
    for name, seconds in time_scorer(scorer).items():
        print(f"score() on 64 completions (8 images x 8 boxes, 8 phrases), {name}: {1000 * seconds:.1f} ms "
              f"(crops, processor and forwards; one CPU thread)")


if __name__ == "__main__":
    main()
