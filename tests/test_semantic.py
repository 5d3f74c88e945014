"""Tests for grpo_min/semantic.py (the semantic consistency reward's scorer) and grpo_min/tiny_scorer.py (the tiny CLIP behind it)."""

import doctest
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import rewards as R
from data import FINDINGS
from grpo_min import semantic, tiny_scorer
from grpo_min.boxes import parse_answer, to_model_frame
from grpo_min.semantic import SemanticScorer, crop_to_square
from grpo_min.tiny_scorer import normal_box

RESIZED = (112, 112)  # the tiny VLM's frame for the 224 px synthetic images


@pytest.fixture(scope="session")
def scorer():
    """The default tiny scorer, exactly as training uses it (built once per session into the private
    cache conftest.py sets up: about 20 s on 2 idle cores). Reduced recipes (fewer images or steps)
    fit it less well and leave some on-finding crops below a normal-tissue crop."""
    return SemanticScorer.from_pretrained(tiny_scorer.tiny_scorer_path(0))


def answer(box) -> str:
    return "<think>the finding</think><answer>[" + ",".join(f"{v:.1f}" for v in box) + "]</answer>"


def target_of(sample) -> R.Target:
    return R.Target(box=sample.box, orig_size=(sample.width, sample.height), resized_size=RESIZED,
                    phrase=sample.text, image=sample.load_image())


@pytest.mark.parametrize("module", [semantic, tiny_scorer])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_crop_is_padded_to_a_square_not_cut():
    from PIL import Image

    image = Image.new("RGB", (100, 100), "white")
    crop = crop_to_square(image, (10, 40, 90, 60))  # 80 x 20: elongated
    assert crop.size == (80, 80)
    pixels = np.asarray(crop)
    assert pixels[40, :].min() == 255  # the whole finding is kept ...
    assert pixels[0, :].max() == 0 and pixels[-1, :].max() == 0  # ... and centred on black


def test_on_finding_crop_scores_higher_than_off_finding_crops_for_each_type(scorer):
    """Held-out images, 5 per finding type: the truth box's crop against normal-tissue crops of the
    same image and the distractor finding's crop, all scored with the image's phrase."""
    rng = np.random.default_rng(0)
    margins = {kind: [] for kind in FINDINGS}  # on-finding score minus each off-finding score
    counts = {kind: 0 for kind in FINDINGS}
    for i in range(200):
        sample, findings = tiny_scorer.synthetic_findings(i, "test", 0)
        if counts[sample.category] == 5:
            continue
        counts[sample.category] += 1
        off = [normal_box([f[2] for f in findings], rng, sample.width) for _ in range(3)]
        off = [b for b in off if b is not None] + [f[2] for f in findings[1:]]
        image = sample.load_image()
        scores = scorer.similarity([crop_to_square(image, b) for b in [sample.box] + off], [sample.text] * (1 + len(off)))
        margins[sample.category] += (scores[0] - scores[1:]).tolist()
    for kind, m in margins.items():
        m = np.array(m)
        # At the time of writing every pair is ordered; the slack keeps the test about the
        # scorer rather than about one crop if the synthetic generator changes.
        assert len(m) >= 15 and (m > 0).mean() >= 0.9 and m.mean() > 0.3, (kind, m.round(2).tolist())


def boxes_of(completions):
    """What SemanticScorer.score takes: each completion's parsed box (model frame)."""
    return [parse_answer(c) for c in completions]


def random_answers(seed, images, per_image, corner_max, sizes):
    """Answers with random boxes on the first val images: (completions, their targets)."""
    from data import synthetic_sample

    rng = np.random.default_rng(seed)
    completions, targets = [], []
    for i in range(images):
        target = target_of(synthetic_sample(i, "val"))
        for _ in range(per_image):
            x, y = rng.uniform(0, corner_max, 2)
            completions.append(answer((x, y, x + rng.uniform(*sizes), y + rng.uniform(*sizes))))
            targets.append(target)
    return completions, targets


def test_batched_scores_equal_one_by_one(scorer):
    """Bitwise: each crop and each phrase is embedded alone (SemanticScorer.embed_images)."""
    completions, targets = random_answers(seed=1, images=4, per_image=4, corner_max=90, sizes=(3, 30))
    eligible = [True] * len(completions)
    batched, details = scorer.score(boxes_of(completions), targets, eligible)
    assert batched.shape == (16,) and batched.dtype == torch.float32
    assert details == {"semantic_scored": 16, "semantic_invalid_boxes": 0}
    scorer._phrase_cache.clear()
    one_by_one = torch.cat([scorer.score(boxes_of([c]), [t], [True])[0] for c, t in zip(completions, targets)])
    assert torch.equal(batched, one_by_one), (batched - one_by_one).abs().max()
    assert ((batched >= 0) & (batched <= 1)).all() and batched.max() > 0


@contextmanager
def torch_threads(n: int):
    """Run the block with torch's CPU ops on n threads, as a caller of the scorer might."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_embeddings_and_scores_do_not_depend_on_the_batch_or_the_thread_count(scorer, threads):
    """Bitwise, for batch sizes 1, 2, 3, 7 and 8 (odd sizes change the kernels chosen) and the caller on
    1 or 2 threads: a crop's embedding, a phrase's and a completion's score must be functions of that
    crop, phrase or completion alone, because how many completions a step scores together varies.
    Batched, a crop's embedding moved by ~5e-8 between batches of 1 and 2 on an Intel Xeon, and a phrase
    embedded on 2 threads differed from one embedded on 1 on an AMD EPYC."""
    completions, targets = random_answers(seed=3, images=8, per_image=1, corner_max=80, sizes=(8, 30))
    crops = [crop_to_square(t.image, semantic.prediction_box(box, t)) for box, t in zip(boxes_of(completions), targets)]
    phrases = [t.phrase for t in targets]
    assert len(set(phrases)) > 1 and len({c.size for c in crops}) > 1
    fresh = lambda: SemanticScorer(scorer.model, scorer.processor)  # same weights, an empty phrase cache
    with torch_threads(1):  # the reference: each one alone
        crop_alone = [fresh().embed_images([c])[0] for c in crops]
        phrase_alone = [fresh().embed_phrases([p])[0] for p in phrases]
        score_alone = [fresh().score(boxes_of([c]), [t], [True])[0][0] for c, t in zip(completions, targets)]
    with torch_threads(threads):
        for n in (1, 2, 3, 7, 8):
            crop_batch, phrase_batch = fresh().embed_images(crops[:n]), fresh().embed_phrases(phrases[:n])
            score_batch = fresh().score(boxes_of(completions[:n]), targets[:n], [True] * n)[0]
            for i in range(n):
                assert torch.equal(crop_batch[i], crop_alone[i]), ("crop", n, i)
                assert torch.equal(phrase_batch[i], phrase_alone[i]), ("phrase", n, i)
                assert torch.equal(score_batch[i], score_alone[i]), ("score", n, i)


LONG_PHRASE = "large left upper zone mass with a small right pleural effusion and a nodule"


def test_a_phrase_embedding_does_not_depend_on_the_phrases_embedded_with_it(scorer):
    """Bitwise: padded next to a longer phrase, a phrase's embedding used to move by ~3e-8."""
    try:
        scorer._phrase_cache.clear()
        alone = scorer.embed_phrases(["nodule"])[0]
        scorer._phrase_cache.clear()
        with_a_longer_one = scorer.embed_phrases(["nodule", LONG_PHRASE])[0]
        assert torch.equal(alone, with_a_longer_one)
    finally:
        scorer._phrase_cache.clear()


def test_rewards_do_not_depend_on_what_the_phrase_cache_held(scorer):
    """A resumed run starts with an empty cache: its rewards must equal, bitwise, those of a run whose
    cache was filled by earlier steps (README: resume reproduces an uninterrupted run exactly)."""
    completions, targets = random_answers(seed=2, images=6, per_image=3, corner_max=80, sizes=(8, 30))
    eligible = [True] * len(completions)
    warm = SemanticScorer(scorer.model, scorer.processor)  # same weights, a cache of its own
    for t in targets:  # earlier steps: each phrase first embedded next to another one
        warm.embed_phrases([t.phrase, LONG_PHRASE])
    fresh = SemanticScorer(scorer.model, scorer.processor)
    boxes = boxes_of(completions)
    assert torch.equal(fresh.score(boxes, targets, eligible)[0], warm.score(boxes, targets, eligible)[0])


def test_a_full_phrase_cache_starts_over_without_losing_the_batch(scorer):
    """Past 10,000 cached phrases the cache is emptied; a batch mixing a cached and a new phrase must
    still get both (the reset used to drop the cached one mid-batch: KeyError, semantic reward 0)."""
    fresh = scorer.embed_phrases(["left apical pneumothorax", "right lower zone nodule"])
    scorer._phrase_cache.update({f"filler {i}": fresh[0] for i in range(10_000)})
    assert "left apical pneumothorax" in scorer._phrase_cache and len(scorer._phrase_cache) > 10_000
    try:
        again = scorer.embed_phrases(["left apical pneumothorax", "a phrase never seen"])
        assert len(scorer._phrase_cache) == 2
        torch.testing.assert_close(again[0], fresh[0])
    finally:
        scorer._phrase_cache.clear()


def test_bad_boxes_score_zero_and_are_counted(scorer):
    from data import synthetic_sample

    target = target_of(synthetic_sample(0, "val"))
    inside = (10.0, 20.0, 60.0, 70.0)  # model frame (112 px)
    completions = [
        "<think>x</think><answer>no box here</answer>",  # unparseable
        answer((30, 30, 30, 50)),  # zero width
        answer((30, 30, 30.5, 50)),  # under MIN_SIDE (1 px in the 224 px original)
        answer((120, 10, 150, 40)),  # fully outside the 112 x 112 frame
        answer((-40, 20, 60, 70)),  # partially outside: clipped to (0, 20, 60, 70)
        answer(inside),
        answer(inside),  # not eligible: scores 0, not counted
    ]
    eligible = [True] * 6 + [False]
    scores, details = scorer.score(boxes_of(completions), [target] * 7, eligible)
    assert scores[:4].tolist() == [0, 0, 0, 0] and scores[6] == 0
    assert details == {"semantic_scored": 2, "semantic_invalid_boxes": 4}
    clipped = scorer.score(boxes_of([answer((0, 20, 60, 70))]), [target], [True])[0]
    assert torch.equal(scores[4:5], clipped)  # the same crop, scored alone either way


def test_loads_a_clip_folder_written_by_save_pretrained(tmp_path):
    processor = tiny_scorer.build_scorer_processor(image_size=24)
    tiny_scorer.build_scorer_model(processor, seed=3, image_size=24, hidden_size=32).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    scorer = SemanticScorer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert type(scorer.model).__name__ == "CLIPModel" and not scorer.model.training
    assert {p.dtype for p in scorer.model.parameters()} == {torch.bfloat16}  # the towers compute in it
    assert not any(p.requires_grad for p in scorer.model.parameters())
    from data import synthetic_sample

    s = synthetic_sample(0, "val")
    sims = scorer.similarity([crop_to_square(s.load_image(), s.box)] * 2, [s.text, "cardiomegaly"])
    assert sims.shape == (2,) and sims.dtype == torch.float32 and sims.abs().max() <= 1.0 + 1e-3


def test_loads_a_siglip_folder(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    processor = tiny_scorer.build_scorer_processor(image_size=24)  # a SigLIP folder would hold its own
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = SiglipConfig(text_config=dict(tower, vocab_size=len(processor.tokenizer), max_position_embeddings=16),
                          vision_config=dict(tower, image_size=24, patch_size=4))
    SiglipModel(config).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    scorer = SemanticScorer.from_pretrained(tmp_path)
    assert scorer.padding == "max_length"
    from data import synthetic_sample

    s = synthetic_sample(0, "val")
    assert scorer.similarity([crop_to_square(s.load_image(), s.box)], [s.text]).shape == (1,)


def test_a_folder_without_image_and_text_towers_gives_a_clear_error(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"get_image_features and get_text_features.*CLIPModel.*BertModel"):
        SemanticScorer.from_pretrained(tmp_path)


def test_tiny_scorer_build_is_deterministic():
    tiny = dict(train_images=12, steps=3, batch_size=8)
    first = tiny_scorer.tiny_scorer_path(5, **tiny)
    weights = SemanticScorer.from_pretrained(first).model.state_dict()
    import shutil

    shutil.rmtree(first)
    again = SemanticScorer.from_pretrained(tiny_scorer.tiny_scorer_path(5, **tiny)).model.state_dict()
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    with pytest.raises(TypeError, match="unknown scorer recipe keys"):
        tiny_scorer.tiny_scorer_path(5, step=3)


def test_score_completions_adds_the_semantic_term(scorer):
    from data import synthetic_sample

    sample = next(s for s in (synthetic_sample(i, "test") for i in range(50)) if s.category == "mass")
    target = target_of(sample)
    truth = to_model_frame(sample.box, (sample.width, sample.height), RESIZED)
    cx, cy = (truth[0] + truth[2]) / 2, (truth[1] + truth[3]) / 2
    w, h = truth[2] - truth[0], truth[3] - truth[1]
    wide = (cx - w, cy - h, cx + w, cy + h)  # on the finding, IoU 0.25: spatially negative
    far = next(b for b in (normal_box([sample.box], np.random.default_rng(k), sample.width) for k in range(50)) if b)
    far = to_model_frame(far, (sample.width, sample.height), RESIZED)
    completions = [answer(truth), answer(wide), answer(far), "[1, 2, 30, 40]", "nothing"]
    targets = [target] * len(completions)

    config = R.RewardConfig(semantic_weight=0.5)
    scores = R.score_completions(completions, targets, config, semantic_scorer=scorer)
    semantic_term = scores.terms["semantic"]
    assert semantic_term[1] > semantic_term[2] + 0.2  # the wrong box on the finding earns more
    assert semantic_term[0] > 0.3 and semantic_term[3] == 0 and semantic_term[4] == 0  # no format: no term
    expected = scores.terms["format"] + scores.terms["spatial"] + 0.5 * semantic_term
    torch.testing.assert_close(scores.total, expected)
    assert scores.details == {"semantic_scored": 3, "semantic_invalid_boxes": 0}

    negatives = R.score_completions(completions, targets, R.RewardConfig(semantic_weight=1.0, semantic_on="negatives"),
                                    semantic_scorer=scorer)
    assert negatives.ious[0] > 0.5 and negatives.terms["semantic"][0] == 0  # spatially positive: not scored
    assert torch.equal(negatives.terms["semantic"][1:], semantic_term[1:])  # fewer crops per call: same scores
    assert negatives.details["semantic_scored"] == 2

    off = R.score_completions(completions, targets, R.RewardConfig(semantic_weight=0.0), semantic_scorer=scorer)
    assert "semantic" not in off.terms
