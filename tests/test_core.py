"""The core: synthetic data, the tiny model, rollouts, and a short end-to-end training run."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import evaluate
from grpo_min import tiny
from grpo_min.boxes import accuracy_at
from grpo_min.prompts import CHAIN_OF_BOX, PLAIN, encode_prompts, load_template, render_question, special_token_ids
from grpo_min.rollout import completion_logps, completion_mask_from_ids, generate_completions
from tests.fixtures import plain_logps

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- data
def test_synthetic_is_deterministic_and_splits_are_disjoint():
    a, b = data.synthetic_sample(7, "train", seed=3), data.synthetic_sample(7, "train", seed=3)
    assert a.text == b.text and a.box == b.box
    assert np.array_equal(np.asarray(a.load_image()), np.asarray(b.load_image()))
    c = data.synthetic_sample(7, "train", seed=4)
    assert not np.array_equal(np.asarray(a.load_image()), np.asarray(c.load_image()))
    images = {split: {data.synthetic_sample(i, split).load_image().tobytes() for i in range(30)}
              for split in ("train", "val", "test")}
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"]


def test_synthetic_samples_are_well_formed():
    for i in range(40):
        s = data.synthetic_sample(i, "val")
        x1, y1, x2, y2 = s.box
        assert 0 <= x1 < x2 <= s.width and 0 <= y1 < y2 <= s.height
        assert s.category in data.FINDINGS and s.text in data.synthetic_phrases()
        assert s.load_image().mode == "RGB" and s.load_image().size == (s.width, s.height)
        name, region = s.anatomy[0]
        assert name in data.synthetic_phrases()
        if s.category != "cardiomegaly":  # laterality: the patient's right lung is on the image's left
            centre = (x1 + x2) / 2
            assert (centre < s.width / 2) == (" right " in f" {s.text} ")


def test_phrase_alone_cannot_pin_the_box():
    """The best image-blind guess (mean training box per phrase) stays under 20% Acc@0.5."""
    train, test = data.SyntheticDataset("train", size=600), data.SyntheticDataset("test")
    ious = data.phrase_only_baseline(train, test)
    assert len(ious) == 200
    assert accuracy_at(ious, 0.5) < 20.0


# ---------------------------------------------------------------------------------------------- prompts
def test_templates_are_the_papers_character_for_character(tmp_path):
    """chain-of-box: the paper's figure (title.png); plain: the released code; the question: every released log."""
    question = ("Please provide the bounding box coordinate of the region this sentence describes: small left apical "
                "pneumothorax.")
    assert render_question("small left apical pneumothorax", CHAIN_OF_BOX) == (
        question + " First output the thinking process in <think> </think> tags and then output the final answer in "
        "<answer> </answer> tags. In the <think> section, generate a step-by-step reasoning process. If you identify "
        "a region of interest, append its bounding box in the format [x1, y1, x2, y2]. Output the final answer in "
        "JSON format.")
    assert render_question("small left apical pneumothorax", PLAIN) == (
        question + " First output the thinking process in <think> </think> tags and then output the final answer in "
        "<answer> </answer> tags. Output the final answer in JSON format.")
    assert render_question(" small left apical pneumothorax. ", PLAIN) == render_question(
        "small left apical pneumothorax", PLAIN)  # one final full stop, whatever the phrase brought
    custom = tmp_path / "t.txt"
    custom.write_text('Answer as {"bbox_2d": [..]}. {question}')
    assert load_template(str(custom)).format(question="Q?") == 'Answer as {"bbox_2d": [..]}. Q?'
    (tmp_path / "bad.txt").write_text("no slot")
    with pytest.raises(ValueError, match="question"):
        load_template(str(tmp_path / "bad.txt"))
    with pytest.raises(FileNotFoundError):
        load_template("no-such-template")


# ---------------------------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def random_tiny():
    processor = tiny.build_processor()
    return tiny.build_model(processor, seed=1).eval(), processor


def test_tokenizer_splits_digits_and_keeps_special_tokens(random_tiny):
    _, processor = random_tiny
    tok = processor.tokenizer
    pieces = tok.tokenize('<answer>{"bbox_2d":[105,7,88,123]}</answer>')
    assert pieces[0] == "<answer>" and pieces[-1] == "</answer>"
    assert all(len(p.lstrip("Ġ")) <= 1 for p in pieces if any(ch.isdigit() for ch in p))
    for name in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>"):
        assert len(tok(name, add_special_tokens=False)["input_ids"]) == 1
    text = '<think>left lower zone [1,2,3,4]</think><answer>{"bbox_2d":[5,6,7,8]}</answer>'
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def _prompts(processor, n=2, split="val"):
    samples = [data.synthetic_sample(i, split) for i in range(n)]
    return samples, encode_prompts(processor, [s.load_image() for s in samples], [s.text for s in samples],
                                   CHAIN_OF_BOX)


def test_random_model_never_emits_image_tokens_and_mask_stops_at_eos(random_tiny):
    model, processor = random_tiny
    _, prompts = _prompts(processor, n=3)
    torch.manual_seed(0)
    out = generate_completions(model, processor, prompts, num_generations=4, max_new_tokens=40)
    ids = special_token_ids(processor)
    assert out.completion_ids.shape[0] == 12
    assert not torch.isin(out.completion_ids, torch.tensor(ids["never"])).any()
    assert prompts.resized_sizes == [(112, 112)] * 3  # 224 px synthetic images -> the tiny model's frame
    # the mask covers each completion up to and including its first EOS; after it, only padding
    for ids_row, mask_row in zip(out.completion_ids.tolist(), out.completion_mask.tolist()):
        ends = [t for t, token in enumerate(ids_row) if token in ids["eos"]]
        n = ends[0] + 1 if ends else len(ids_row)
        assert mask_row == [1.0] * n + [0.0] * (len(ids_row) - n)
        assert set(ids_row[n:]) <= {ids["pad"]}


def test_completions_are_masked_and_padded_after_their_first_eos(random_tiny, monkeypatch):
    model, processor = random_tiny
    _, prompts = _prompts(processor, n=1)
    ids = special_token_ids(processor)
    eos, pad = ids["eos"][0], ids["pad"]
    sampled = torch.tensor([[5, 6, eos, 7, 8], [5, eos, eos, 9, 9], [5, 6, 7, 8, 9]])  # what each draw returns
    draws = iter(sampled.T)
    monkeypatch.setattr(torch, "multinomial", lambda probs, n: next(draws)[:, None])
    out = generate_completions(model, processor, prompts, num_generations=3, max_new_tokens=5)
    assert out.completion_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert out.completion_ids.tolist() == [[5, 6, eos, pad, pad], [5, eos, pad, pad, pad], [5, 6, 7, 8, 9]]


def test_a_qwen2_vl_folder_loads_with_its_frame_and_scores_alike_on_every_path(tmp_path):
    """Qwen2-VL (boxes in 0-1000) through load_model, sampling and both scoring paths; Qwen's saved
    12.8 M-pixel limit is capped unless asked for."""
    from grpo_min.models import DEFAULT_MAX_PIXELS, load_model
    from tests.fixtures import qwen2_vl_folder

    qwen2_vl_folder(tmp_path, shipped_pixel_limits=True)  # its processor's limits as Qwen ships them

    assert load_model(tmp_path, max_pixels=112 * 112)[1].image_processor.size["longest_edge"] == 112 * 112
    model, processor, frame = load_model(tmp_path)
    assert frame == "norm1000" and processor.image_processor.size["longest_edge"] == DEFAULT_MAX_PIXELS
    _, prompts = _prompts(processor, n=2)
    torch.manual_seed(0)
    out = generate_completions(model, processor, prompts, num_generations=3, max_new_tokens=6)
    kw = dict(group_size=3, never_ids=special_token_ids(processor)["never"])
    plain = plain_logps(model, prompts, out.completion_ids, out.completion_mask, **kw)
    fast = completion_logps(model, prompts, out.completion_ids, out.completion_mask, **kw)
    assert torch.allclose(fast * out.completion_mask, plain * out.completion_mask, atol=1e-5)


def test_completion_mask_covers_up_to_first_eos():
    ids = torch.tensor([[4, 9, 2, 5, 2], [4, 4, 4, 4, 4], [2, 7, 7, 7, 7]])
    mask = completion_mask_from_ids(ids, eos_ids=[2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_encoding_each_image_once_gives_the_same_logps(random_tiny):
    """The fast path (each prompt once per group) equals the plain path (grpo_min/core.py: once per completion)."""
    model, processor = random_tiny
    _, prompts = _prompts(processor, n=2)
    torch.manual_seed(0)
    out = generate_completions(model, processor, prompts, num_generations=3, max_new_tokens=16)
    args = (model, prompts, out.completion_ids, out.completion_mask)
    fast = completion_logps(*args, group_size=3, temperature=0.7)
    plain = plain_logps(*args, group_size=3, temperature=0.7)
    assert fast.shape == out.completion_ids.shape
    torch.testing.assert_close(fast * out.completion_mask, plain * out.completion_mask, atol=1e-5, rtol=0)


def test_the_checkpoints_own_sampling_defaults_do_not_change_the_samples(random_tiny):
    """A checkpoint's generation_config.json (Qwen2.5-VL-Instruct ships repetition_penalty 1.05) must
    not reach sampling: the samples would then come from a distribution the loss does not score."""
    model, processor = random_tiny
    _, prompts = _prompts(processor, n=2)

    def sample():
        torch.manual_seed(0)
        return generate_completions(model, processor, prompts, num_generations=3, max_new_tokens=12).completion_ids

    plain = sample()
    saved = model.generation_config
    hostile = copy.deepcopy(saved)
    hostile.repetition_penalty, hostile.no_repeat_ngram_size, hostile.min_new_tokens = 3.0, 1, 12
    hostile.top_k, hostile.top_p, hostile.typical_p, hostile.temperature = 1, 0.01, 0.2, 0.05
    model.generation_config = hostile
    try:
        assert torch.equal(sample(), plain)
        assert model.generation_config is hostile  # and the model's own config is left as it was
        # The same hostile config reaching HF generate() does change the samples: the test can fail.
        ids = special_token_ids(processor)
        torch.manual_seed(0)
        direct = model.generate(**prompts.inputs, do_sample=True, max_new_tokens=12, num_return_sequences=3,
                                eos_token_id=ids["eos"], pad_token_id=ids["pad"], suppress_tokens=ids["never"])
        assert not torch.equal(direct[:, prompts.inputs["input_ids"].shape[1]:], plain)
    finally:
        model.generation_config = saved


def test_warm_start_is_deterministic(tmp_path, monkeypatch):
    builds = []
    for k in range(2):
        monkeypatch.setenv("GRPO_MIN_CACHE", str(tmp_path / f"cache{k}"))
        path = tiny.tiny_model_path(seed=5, steps=2, batch_size=4)
        from safetensors.torch import load_file

        builds.append(load_file(path / "model.safetensors"))
    assert builds[0].keys() == builds[1].keys()
    assert all(torch.equal(builds[0][k], builds[1][k]) for k in builds[0])


def test_warm_start_overrides_reach_the_build(tmp_path, monkeypatch):
    """An override (e.g. loose_pad) must change what is trained, not only the cache key."""
    monkeypatch.setenv("GRPO_MIN_CACHE", str(tmp_path))
    seen = {}
    monkeypatch.setattr(tiny, "warm_start", lambda model, processor, template, seed=0, **kw: seen.update(kw) or model)
    path = tiny.tiny_model_path(seed=0, steps=1, loose_pad=0.5)
    assert seen == {"steps": 1, "loose_pad": 0.5}
    assert json.loads((path / "recipe.json").read_text())["loose_pad"] == 0.5


def test_warm_start_targets_are_loose_boxes():
    """Default targets pad the truth by WARM_START['loose_pad'] per side: IoU 1 / (1 + 2 pad)^2 when unclipped."""
    from grpo_min.boxes import iou, parse_answer

    pad = tiny.WARM_START["loose_pad"]
    samples = [s for s in data.SyntheticDataset("val", seed=0)][:40]
    checked = 0
    for s in samples:
        x1, y1, x2, y2 = s.box
        w, h = x2 - x1, y2 - y1
        if x1 - pad * w < 0 or y1 - pad * h < 0 or x2 + pad * w > s.width or y2 + pad * h > s.height:
            continue  # clipped at the border: a different IoU
        answer = parse_answer(tiny.warm_start_target(s, (s.width, s.height)))  # same frame as the data
        assert answer is not None
        assert iou(answer, s.box) == pytest.approx(1 / (1 + 2 * pad) ** 2, abs=0.03)  # integer rounding
        checked += 1
    assert checked >= 10
    assert 1 / (1 + 2 * pad) ** 2 < 0.5  # a faithful copy of a warm-start box fails Acc@0.5: GRPO must tighten


def test_tiny_model_round_trips_through_plain_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grpo_min.models import load_model

    model, processor, frame = load_model(tiny_model_dir)
    assert frame == "absolute" and model.config.model_type == "qwen2_5_vl"
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "copy")
    AutoProcessor.from_pretrained(tmp_path / "copy")
    saved, loaded = model.state_dict(), again.state_dict()
    assert saved.keys() == loaded.keys(), sorted(saved.keys() ^ loaded.keys())  # no weight lost, renamed or added
    for k, a in saved.items():
        assert torch.equal(a, loaded[k]), k  # bitwise: saving and loading copy the bytes


def test_short_warm_start_learns_the_answer_layout(tiny_model_dir):
    """The tests' 20-step warm start already writes the Chain-of-Box layout (the numbers inside are
    still junk at that point; the full recipe's answers all parse: 0 parse failures in 200 test samples before
    GRPO, docs/RESULTS.md)."""
    from evaluate import metrics_of, predict
    from grpo_min.models import load_model

    model, processor, frame = load_model(tiny_model_dir)
    rows = predict(model, processor, data.SyntheticDataset("val", size=8), CHAIN_OF_BOX, frame,
                   max_new_tokens=48, progress=False)
    assert metrics_of(rows)["n"] == 8
    assert sum(r["output"].startswith("<think>") for r in rows) >= 6


# ---------------------------------------------------------------------------------------------- train.py
def test_train_help():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for option in ("--num-generations", "--beta", "--epsilon-high", "--loss-type", "--scale-rewards",
                   "--max-completion-length", "--temperature", "--learning-rate", "--template", "--num-iterations",
                   "--lora-r", "--lora-target-modules", "--merge-lora"):
        assert option in out.stdout
    assert "(default: 2 x --lora-r)" in " ".join(out.stdout.split())
    assert "replaces some defaults above: --batch-size 8," in " ".join(out.stdout.split())


def test_fused_adamw_makes_the_same_updates_as_the_default(random_tiny):
    from grpo_min.optim import make_optimizer

    model, _ = random_tiny
    copies = {name: copy.deepcopy(model) for name in ("adamw_torch_fused", "adamw_torch")}
    optimizers = {name: make_optimizer(m.parameters(), lr=1e-3, weight_decay=0.01, fused=name == "adamw_torch_fused",
                                       warmup_steps=2, total_steps=10) for name, m in copies.items()}
    assert optimizers["adamw_torch_fused"][0].defaults["fused"] is True
    assert not optimizers["adamw_torch"][0].defaults["fused"]
    g = torch.Generator().manual_seed(0)
    for _ in range(4):  # the same random gradients for both, then one update each
        grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        for name, m in copies.items():
            for p, grad in zip(m.parameters(), grads):
                p.grad = grad.clone()
            opt, sched = optimizers[name]
            opt.step(), sched.step()
    fused, plain = (list(m.parameters()) for m in copies.values())
    assert any(not torch.equal(a, b) for a, b in zip(fused, model.parameters()))  # the weights moved
    assert max((a - b).abs().max().item() for a, b in zip(fused, plain)) < 1e-6


REQUIRED_KEYS = {"step", "reward", "reward/format", "reward/spatial", "reward_std", "frac_zero_std",
                 "parse_failure_rate", "kl", "clip_fraction", "loss", "grad_norm", "completion_length",
                 "completion_tokens", "step_time_s", "lr"}


def test_two_step_training_run(tiny_model_dir, tmp_path):
    out_dir = tmp_path / "run"
    # tests/train_with_test_reward.py: train.py plus a reward term these short completions can earn
    cmd = [sys.executable, "tests/train_with_test_reward.py", "--model", str(tiny_model_dir), "--max-steps", "2",
           "--batch-size", "2", "--num-generations", "4", "--max-completion-length", "24", "--eval-steps", "2",
           "--eval-limit", "4", "--beta", "0.04", "--num-iterations", "2", "--learning-rate", "1e-3",
           "--output-dir", str(out_dir)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2]
    for line in lines:
        assert REQUIRED_KEYS <= line.keys()
        assert 0.0 <= line["reward/semantic"] <= 1.0  # the semantic reward runs inside the loop (synthetic default)
        # every completion is either judged by the scorer, or eligible with an unusable box, or not eligible
        assert line["semantic_scored"] + line["semantic_invalid_boxes"] <= 2 * 4
        assert line["completion_tokens"] > 0 and np.isfinite(line["loss"]) and line["grad_norm"] > 0
    assert lines[1]["kl"] > 0  # the policy has moved away from the reference
    # --num-iterations 2: one rollout serves both steps (updates). The first update is on-policy (ratio 1:
    # nothing clipped); the second sees the ratio the first one moved, and clips some tokens.
    assert lines[0]["reward"] == lines[1]["reward"] and lines[0]["completion_tokens"] == lines[1]["completion_tokens"]
    assert lines[0]["clip_fraction"] == 0.0 and lines[1]["clip_fraction"] > 0
    assert "eval/acc@0.5" in lines[-1] and "eval/miou" in lines[-1]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert {"before", "after", "wall_s"} <= summary.keys() and summary["after"]["n"] == 4
    assert (out_dir / "completions" / "step-000002.txt").read_text().strip()
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(out_dir / "final")
    assert json.loads((out_dir / "config.json").read_text())["num_iterations"] == 2


def test_sampling_does_not_depend_on_whether_the_model_was_built_or_loaded(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny demo builds its model on first use, which draws random numbers; the next run loads it."""
    import train
    from grpo_min.models import resolve_model_path

    def building(model, seed=0):  # as on a first run: the build consumes the global generator
        torch.rand(1000)
        return resolve_model_path(model, seed)

    rewards = []
    for resolve in (resolve_model_path, building):
        monkeypatch.setattr(train, "resolve_model_path", resolve)
        out = tmp_path / resolve.__name__
        train.main(["--model", str(tiny_model_dir), "--max-steps", "2", "--batch-size", "2", "--num-generations", "4",
                    "--max-completion-length", "16", "--eval-steps", "0", "--eval-limit", "2",
                    "--semantic-model", "none", "--output-dir", str(out)])
        lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        rewards.append([(l["reward"], l["completion_tokens"], l["loss"]) for l in lines])
    assert len(rewards[0]) == 2 and rewards[0] == rewards[1]


def test_reward_weights_and_the_continuous_spatial_reward_reach_the_total():
    import rewards as R

    target = R.Target(box=(20, 20, 60, 60), orig_size=(224, 224), resized_size=(112, 112))
    tight = '<think>a</think><answer>{"bbox_2d":[10,10,30,30]}</answer>'  # the truth, in the 112 px frame
    loose = '<think>a</think><answer>{"bbox_2d":[10,10,40,40]}</answer>'  # IoU 400 / 900 = 0.444 with it
    texts, targets = [tight, loose], [target] * 2
    hard = R.score_completions(texts, targets, R.RewardConfig(format_weight=0.5, spatial_weight=2.0))
    assert hard.total.tolist() == [2.5, 0.5]  # 0.5 x format + 2 x (IoU > 0.5)
    iou = R.score_completions(texts, targets, R.RewardConfig(spatial_kind="iou"))
    assert iou.terms["spatial"].tolist() == pytest.approx([1.0, 4 / 9]) and iou.total.tolist() == pytest.approx([2.0, 13 / 9])


def test_learning_rate_schedules_and_the_epoch_order():
    import train
    from grpo_min.optim import make_optimizer

    model = torch.nn.Linear(2, 2)
    rates = {}
    for kind in ("constant", "linear", "cosine"):
        _, scheduler = make_optimizer(model.parameters(), lr=1.0, fused=False, warmup_steps=2, total_steps=6,
                                      schedule=kind)
        rates[kind] = []
        for _ in range(6):
            rates[kind].append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step()
            scheduler.step()
    assert rates["constant"] == pytest.approx([0.5, 1, 1, 1, 1, 1])
    # warm-up to the peak over 2 steps, then the decay over the 4 after it (reaching 0 after the last)
    assert rates["linear"] == pytest.approx([0.5, 1, 1, 0.75, 0.5, 0.25])
    assert rates["cosine"] == pytest.approx([0.5, 1, 1, 0.853553, 0.5, 0.146447], abs=1e-6)
    # each epoch is its own permutation of the prompts, and the stream runs on across epochs
    cfg = train.Config(batch_size=3, seed=0)
    first, second = data.epoch_order(0, 0, 6).tolist(), data.epoch_order(0, 1, 6).tolist()
    assert sorted(first) == sorted(second) == list(range(6)) and first != second
    samples = list(range(6))  # the "samples" are their own indices
    assert [train.rollout_batches(samples, step, cfg)[0] for step in range(4)] == [first[:3], first[3:], second[:3],
                                                                                 second[3:]]


def test_rewards_never_raise_and_count_failures():
    import rewards as R

    class BrokenScorer:
        def score(self, completions, targets, eligible):
            raise RuntimeError("dual encoder exploded")

    target = R.Target(box=(20, 20, 60, 60), orig_size=(224, 224), resized_size=(112, 112), phrase="x")
    good = '<think>a</think><answer>{"bbox_2d":[10,10,30,30]}</answer>'  # (20,20,60,60) in the 112 px frame
    texts = [good, "no box at all", "<think>[1,2,3,4]</think>", None]
    scores = R.score_completions(texts, [target] * 4, R.RewardConfig(semantic_weight=1.0), BrokenScorer())
    assert scores.terms["spatial"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert scores.terms["format"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert scores.parse_failures == 3 and scores.errors == 1  # the one eligible completion the scorer failed on
    assert scores.terms["semantic"].tolist() == [0.0] * 4 and scores.total.tolist() == [2.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("option, value, expected", [
    ("--max-grad-norm", "-1", "0 (no clipping) or more"), ("--epsilon", "-0.1", "above 0 and below 1"),
    ("--num-generations", "1", "at least 2"), ("--max-steps", "-1", "0 (no GRPO) or more"), ("--eval-steps", "-1", "0 (never)"),
    ("--batch-size", "0", "at least 1"), ("--temperature", "0", "a positive number"), ("--eval-limit", "0", "at least 1"),
    ("--lora-r", "-1", "0 (off: full fine-tuning) or more"), ("--lora-alpha", "0", "a positive number"),
    ("--weight-decay", "inf", "a finite number"), ("--format-weight", "nan", "a finite number"),
    ("--spatial-weight", "-1", "0 or more"), ("--epsilon", "5", "above 0 and below 1"), ("--seed", "-1", "0 or more"),
    ("--num-train-epochs", "inf", "a finite number"), ("--max-pixels", "0", "at least 3136"),
    ("--min-pixels", "0", "at least 1"), ("--learning-rate", "inf", "a finite number"),
])
def test_options_that_would_train_wrong_or_crash_later_are_refused_at_once(option, value, expected, capsys):
    import train

    with pytest.raises(SystemExit) as stop:
        train.parse_config([option, value])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"error: {option} {value}" in err and f": expected {expected}" in err


def test_a_model_folder_of_another_family_is_refused_before_loading(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    argv = ["train.py", "--model", str(tmp_path / "m"), "--output-dir", str(tmp_path / "o")]
    result = subprocess.run([sys.executable, *argv],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "model type 'gpt2' is not supported" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_data_and_scorer_mistakes_are_named_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    import signal

    import train
    from tests.fixtures import write_jsonl_fixture

    class ReachedTheModels(Exception):
        pass

    def reached(*a, **k):
        raise ReachedTheModels

    monkeypatch.setattr(train, "load_policy", reached)
    monkeypatch.setattr(train, "load_reference", reached)
    ctrl_c = signal.getsignal(signal.SIGINT)
    base = ["--model", str(tiny_model_dir), "--beta", "0.04", "--dataset", "jsonl", "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="expected train.jsonl"):
        train.main(base + ["--data-root", str(tmp_path / "nowhere")])
    root = write_jsonl_fixture(tmp_path / "data")
    with pytest.raises(SystemExit, match="--semantic-model '/no/such/scorer'"):
        train.main(base + ["--data-root", str(root), "--semantic-model", "/no/such/scorer"])
    # an empty val split: fatal only when --eval-steps would read it, and the message says why
    (root / "val.jsonl").write_text("")
    with pytest.raises(SystemExit, match=r"jsonl/val has no usable sample \(the split is empty; .*val.jsonl"):
        train.main(base + ["--data-root", str(root), "--eval-steps", "10"])
    with pytest.raises(ReachedTheModels):  # the data passed: the models are next
        train.main(base + ["--data-root", str(root), "--eval-steps", "0", "--semantic-model", "none"])
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # main() gives Ctrl-C back to its caller


def test_a_cut_off_metrics_line_counts_as_after_the_checkpoint():
    from grpo_min.checkpoint import _logged_step

    assert _logged_step('{"step": 3, "reward": 1.0}') == 3
    assert _logged_step('{"step": 5, "rew') == float("inf")


def test_under_torchrun_only_rank_0_prints_even_before_the_group_is_joined(monkeypatch):
    from grpo_min import dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert dist.rank() == 1 and not dist.is_main()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a stray RANK in a one-process run changes nothing
    assert dist.rank() == 0


def test_the_demo_preset_leaves_training_by_epochs_alone():
    import train

    assert train.parse_config([]).max_steps == 800  # the demo's step count (400 rollouts x 2 updates)
    assert train.parse_config(["--num-train-epochs", "1"]).max_steps is None  # by epochs, as asked


def test_changing_the_prompt_texts_asks_for_a_new_tiny_recipe():
    """The tiny model's tokenizer is fitted on the rendered prompts and its warm start reads them, but
    its cache key does not hash them: whoever edits QUESTION or a template must bump
    grpo_min.tiny.RECIPE_VERSION (so no stale cached model is reused), then update this fingerprint."""
    import hashlib

    from grpo_min.prompts import QUESTION, TEMPLATES

    fingerprint = hashlib.sha256(json.dumps([QUESTION, sorted(TEMPLATES.items())]).encode()).hexdigest()[:12]
    assert (tiny.RECIPE_VERSION, fingerprint) == (3, "c7a27a7e691c")


def test_a_concurrent_build_of_the_same_cached_model_is_harmless(tmp_path, monkeypatch):
    """Two processes building one cache entry (two runs started together): the first to finish wins,
    the other's files are discarded, and no temporary folder is left behind."""
    monkeypatch.setenv("GRPO_MIN_CACHE", str(tmp_path))
    processor = tiny.build_processor()
    other = []

    def build():
        if not other:  # while this build runs, another process completes the same one
            other.append(tiny.cached_build("x", {"a": 1}, lambda: (tiny.build_model(processor, 0), processor)))
        return tiny.build_model(processor, 0), processor

    path = tiny.cached_build("x", {"a": 1}, build)
    assert path == other[0] and (path / "recipe.json").exists() and (path / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_greedy_evaluation_keeps_the_checkpoints_decoding_defaults(random_tiny):
    """Evaluation decodes as the released evaluation does: greedy, with the checkpoint's own defaults
    (Qwen2.5-VL-Instruct's repetition_penalty 1.05). Only sampling for training ignores them."""
    model, processor = random_tiny
    _, prompts = _prompts(processor, n=2)

    def decode(greedy, seed=0):  # greedy: as evaluate.py decodes; else as training samples
        torch.manual_seed(seed)
        penalty = evaluate.repetition_penalty(model, prompts) if greedy else None
        return generate_completions(model, processor, prompts, num_generations=1, max_new_tokens=24,
                                    greedy=greedy, logits_processor=penalty).completion_ids

    plain = decode(greedy=True)
    # Greedy means no sampling: the random seed cannot matter. (It does when sampling: the check has teeth.)
    assert torch.equal(decode(greedy=True, seed=1), plain)
    assert not torch.equal(decode(greedy=False, seed=1), decode(greedy=False, seed=2))
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.repetition_penalty = 5.0
    try:
        penalised = decode(greedy=True)
    finally:
        model.generation_config = saved
    assert not torch.equal(penalised, plain)


def _one_step_with_sgd(model_dir, max_grad_norm):
    """One grpo_step from the tiny model, plain SGD at lr 1: the weights move by exactly minus the applied gradient."""
    import rewards as R
    import train
    from grpo_min.models import load_model
    from tests.train_with_test_reward import score_with_digits

    model, processor, _ = load_model(model_dir)
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cfg = train.Config(num_generations=4, max_completion_length=16, beta=0.0, max_grad_norm=max_grad_norm)
    samples = [data.synthetic_sample(i, "train") for i in range(2)]

    def reward(texts, samples, images, sizes):  # digits in the text: these completions earn different rewards
        targets = [R.Target(box=s.box, orig_size=(s.width, s.height), resized_size=size)
                   for s, size in zip(samples, sizes) for _ in range(4)]
        return score_with_digits(texts, targets, R.RewardConfig())

    torch.manual_seed(0)  # the same rollouts in both runs
    [record] = train.grpo_step(cfg, model, None, processor, optimizer, scheduler, [samples], reward, CHAIN_OF_BOX)
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])  # = applied gradient
    return record, step


def test_gradient_clipping_logs_the_norm_before_and_applies_the_clipped_gradient(tiny_model_dir):
    free, free_step = _one_step_with_sgd(tiny_model_dir, max_grad_norm=0)  # 0: no clipping
    clipped, clipped_step = _one_step_with_sgd(tiny_model_dir, max_grad_norm=1e-3)
    assert free["grad_norm"] > 1e-2  # far above the limit, so that clipping has to act
    assert free_step.norm().item() == pytest.approx(free["grad_norm"], rel=1e-4)  # unclipped: the whole gradient
    assert clipped["grad_norm"] == pytest.approx(free["grad_norm"], rel=1e-5)  # logged before clipping
    assert clipped_step.norm().item() == pytest.approx(1e-3, rel=1e-3)  # the update was clipped to the limit
    # the same direction (cosine, as the weights' float32 rounding blurs the smallest components of a 1e-3 step)
    assert torch.nn.functional.cosine_similarity(clipped_step, free_step, dim=0).item() > 0.9999


def test_each_grpo_option_reaches_the_loss_and_the_reward(tiny_model_dir, tmp_path, monkeypatch):
    """Options from the command line arrive, unswapped, where they act: every value below is distinct, so passing
    one option's value in another's place (say epsilon for epsilon_high) fails here."""
    import train
    from grpo_min.loss import group_advantages, grpo_loss

    seen = {}

    def loss_spy(*args, **kw):
        seen.setdefault("loss", kw)
        return grpo_loss(*args, **kw)

    def advantages_spy(rewards, group_size, scale):
        seen["advantages"] = dict(group_size=group_size, scale=scale)
        return group_advantages(rewards, group_size, scale=scale)

    def reward_spy(completions, targets, config, semantic_scorer=None):
        seen["reward"] = config
        return real_score(completions, targets, config, semantic_scorer)

    real_score = train.R.score_completions
    monkeypatch.setattr(train, "grpo_loss", loss_spy)
    monkeypatch.setattr(train, "group_advantages", advantages_spy)
    monkeypatch.setattr(train.R, "score_completions", reward_spy)
    argv = ["--model", str(tiny_model_dir), "--max-steps", "1", "--batch-size", "1", "--num-generations", "3",
            "--max-completion-length", "12", "--eval-steps", "0", "--eval-limit", "1", "--output-dir", str(tmp_path),
            "--epsilon", "0.13", "--epsilon-high", "0.29", "--beta", "0.07", "--loss-type", "bnpo",
            "--scale-rewards", "batch", "--spatial-reward", "iou", "--semantic-on", "negatives",
            "--format-weight", "0.5", "--spatial-weight", "1.5", "--semantic-weight", "0.7"]
    assert train.main(argv) is None
    loss = seen["loss"]
    assert (loss["epsilon"], loss["epsilon_high"], loss["beta"]) == (0.13, 0.29, 0.07)
    assert (loss["loss_type"], loss["max_completion_length"]) == ("bnpo", 12)
    assert seen["advantages"] == dict(group_size=3, scale="batch")
    config = seen["reward"]
    assert (config.spatial_kind, config.semantic_on) == ("iou", "negatives")
    assert (config.format_weight, config.spatial_weight, config.semantic_weight) == (0.5, 1.5, 0.7)
