"""Every loss variant end to end, and the pieces train.py adds around them: each --loss-type trains 2 updates of
the tiny model on one rollout (--num-iterations 2: the second update's ratios differ from 1) with finite, logged
statistics; the masks, the entropies and the per-term (GDPO) advantages reach the loss; statistics are weighted by
tokens over micro-batches. Values of the variants themselves are tested against TRL in tests/test_loss.py."""
import json
import math

import pytest
import torch

from grpo_min.loss import grpo_loss
from grpo_min.metrics import add_stats, update_record
from grpo_min.rollout import token_logps
from tests.train_with_test_reward import score_with_digits


def score_with_a_digits_term(completions, targets, config, semantic_scorer=None):
    """tests/train_with_test_reward.py's reward, its digits fraction also a term of its own (weight 1), for GDPO."""
    scores = score_with_digits(completions, targets, config, semantic_scorer)
    digits = scores.total - sum(scores.weights[k] * scores.terms[k] for k in scores.terms)
    scores.terms["digits"], scores.weights["digits"] = digits, 1.0
    return scores


# Each loss type once, the other options spread over the runs so that every one runs end to end.
RUNS = {
    "grpo": ["--importance-sampling-level", "sequence", "--delta", "1.5", "--use-bias-correction-kl"],
    "bnpo": ["--top-entropy-quantile", "0.5", "--entropy-coef", "0.01"],
    "dr_grpo": ["--off-policy-mask-threshold", "0.0"],
    "dapo": ["--mask-truncated-completions", "--epsilon-high", "0.28"],
    "luspo": ["--importance-sampling-level", "sequence"],
    "cispo": ["--epsilon-high", "1.05"],
    "sapo": ["--sapo-temperature-neg", "1.2"],
    "vespo": ["--multi-objective-aggregation", "normalize_then_sum"],
}
EXPECTED = {"grpo": ["clip_fraction", "kl"], "bnpo": ["entropy", "entropy_kept", "clip_fraction"],
            "dr_grpo": ["off_policy_dropped"], "dapo": ["clip_fraction"], "luspo": ["clip_fraction"],
            "cispo": ["clip_fraction"], "sapo": [], "vespo": ["vespo_phi"]}


@pytest.mark.parametrize("loss_type", RUNS)
def test_each_loss_type_trains(loss_type, tiny_model_dir, tmp_path, monkeypatch):
    import train

    seen = []

    def spy(*args, **kw):
        loss, stats = grpo_loss(*args, **kw)
        seen.append((args[3].clone(), kw))
        return loss, stats

    monkeypatch.setattr(train, "grpo_loss", spy)
    monkeypatch.setattr(train.R, "score_completions", score_with_a_digits_term)
    out = tmp_path / loss_type
    argv = ["--model", str(tiny_model_dir), "--max-steps", "2", "--num-iterations", "2", "--batch-size", "1",
            "--num-generations", "4", "--max-completion-length", "12", "--eval-steps", "0", "--eval-limit", "1",
            "--learning-rate", "1e-2", "--beta", "0.04", "--output-dir", str(out), "--loss-type", loss_type,
            *RUNS[loss_type]]
    assert train.main(argv) is None
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(not line["skipped_update"] for line in lines)
    for line in lines:
        for key in ["loss", "grad_norm", "kl", "truncated_fraction", *EXPECTED[loss_type]]:
            assert math.isfinite(line[key]), (key, line)
        assert 0 <= line["truncated_fraction"] <= 1
    assert lines[1]["grad_norm"] > 0 and lines[0]["kl"] == 0.0  # the first update starts at the reference
    assert len(seen) == 2 and seen[0][1]["loss_type"] == loss_type
    if loss_type == "bnpo":  # the entropies reach the loss, and the mask keeps about half the tokens
        assert seen[0][1]["entropies"] is not None and 0 < lines[0]["entropy_kept"] < 1 and lines[0]["entropy"] > 0
    else:
        assert seen[0][1]["entropies"] is None  # computed in the scoring pass only when an option needs them
    if loss_type == "dapo":  # the loss mask drops exactly the truncated completions
        mask = seen[0][0]
        assert lines[0]["truncated_fraction"] == pytest.approx((mask.sum(1) == 0).float().mean().item())
        assert lines[0]["truncated_fraction"] > 0  # (12 tokens: some completions are cut off)


def test_gdpo_advantages_reach_the_loss(tiny_model_dir, tmp_path, monkeypatch):
    """--multi-objective-aggregation normalize_then_sum: advantages from the per-term rewards, each z-scored in
    its group, weighted and summed, then z-scored over the batch."""
    import train
    from grpo_min.loss import group_advantages

    seen = {}

    def advantages_spy(rewards, group_size, scale="group", **kw):
        seen.update(rewards=rewards, **kw)
        seen["advantages"] = group_advantages(rewards, group_size, scale, **kw)
        return seen["advantages"]

    monkeypatch.setattr(train, "group_advantages", advantages_spy)
    monkeypatch.setattr(train.R, "score_completions", score_with_a_digits_term)
    argv = ["--model", str(tiny_model_dir), "--max-steps", "1", "--batch-size", "2", "--num-generations", "3",
            "--max-completion-length", "12", "--eval-steps", "0", "--eval-limit", "1", "--output-dir",
            str(tmp_path), "--multi-objective-aggregation", "normalize_then_sum", "--format-weight", "0.5"]
    assert train.main(argv) is None
    # format, spatial, semantic (the tiny scorer), digits: (6 completions, 4 terms) and their weights
    assert seen["aggregation"] == "normalize_then_sum" and seen["rewards"].shape == (6, 4)
    assert seen["weights"] == [0.5, 1.0, 1.0, 1.0]
    assert seen["advantages"].abs().sum() > 0 and abs(seen["advantages"].mean().item()) < 1e-6


def test_truncation_and_variant_options_are_checked(capsys):
    import train

    with pytest.raises(SystemExit):
        train.parse_config(["--sapo-temperature-pos", "2"])  # SAPO's option without --loss-type sapo
    assert "--sapo-temperature-pos acts only with --loss-type sapo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_config(["--top-entropy-quantile", "0"])
    assert "--top-entropy-quantile 0.0: expected above 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_config(["--multi-objective-aggregation", "normalize_then_sum", "--scale-rewards", "batch"])
    assert "--scale-rewards does not apply" in capsys.readouterr().err
    cfg = train.parse_config(["--loss-type", "vespo", "--vespo-k-neg", "2.5",
                              "--importance-sampling-level", "sequence"])
    options = train.loss_options(cfg)
    assert (options["loss_type"], options["vespo_k_neg"], options["importance_sampling_level"]) == ("vespo", 2.5,
                                                                                                     "sequence")
    assert options["use_bias_correction_kl"] is False and options["delta"] is None  # the defaults: GRPO as before


def test_entropies_are_those_of_the_scored_distribution():
    """token_logps's entropies: H = -sum p log p of softmax(logits / T) without the never-tokens; differentiable."""
    logits = torch.randn(2, 3, 7, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3))
    logps, entropies = token_logps(logits, targets, temperature=0.7, never_ids=[5, 6], entropies=True)
    reference = torch.log_softmax(logits[..., :5].detach() / 0.7, dim=-1)
    torch.testing.assert_close(entropies.detach(), -(reference.exp() * reference).sum(-1))
    torch.testing.assert_close(logps.detach(), reference.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    assert torch.equal(logps, token_logps(logits, targets, temperature=0.7, never_ids=[5, 6]))  # unchanged without
    entropies.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[..., 5:].abs().sum() == 0


def test_statistics_are_weighted_by_tokens_over_micro_batches():
    """Two micro-batches of 1 and 3 tokens: the logged clip_fraction and kl are token means over both
    (TRL's weighting), not the mean of the two micro-batch means."""
    a_logps = torch.zeros(1, 3)  # micro-batch a: 1 token, clipped (ratio 1.5, A > 0), KL 1 - ln 2
    a = grpo_loss(a_logps, a_logps - math.log(1.5), torch.ones(1), torch.tensor([[1.0, 0.0, 0.0]]),
                  ref_logps=a_logps + math.log(2.0), beta=0.1)[1]
    b_logps = torch.zeros(1, 3)  # micro-batch b: 3 tokens, none clipped, KL 0
    b = grpo_loss(b_logps, b_logps, torch.ones(1), torch.ones(1, 3), ref_logps=b_logps, beta=0.1)[1]
    record = update_record(0.0, add_stats(add_stats({}, a), b), torch.tensor(1.0), 1e-3, False, torch.device("cpu"))
    assert record["clip_fraction"] == pytest.approx(1 / 4)  # (the mean of means would be 1/2)
    assert record["kl"] == pytest.approx((1 - math.log(2.0)) / 4)
