"""Scale-out and resume: DDP on 2 CPU ranks (gloo), exact resume, SIGTERM, bad checkpoints, NaN steps."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"step_time_s", "generate_s"}


def small_run(model_dir, out_dir, *extra):
    # with a reward term the short runs can earn (tests/train_with_test_reward.py): the weights move
    return ["tests/train_with_test_reward.py", "--model", str(model_dir), "--batch-size", "2", "--num-generations", "4",
            "--max-completion-length", "16", "--eval-steps", "0", "--eval-limit", "4", "--learning-rate", "1e-3",
            "--beta", "0.04", "--output-dir", str(out_dir), *extra]


def run(args, nproc=1, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    result = subprocess.run(launcher + args, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env, **kw)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def weights(folder):
    """A full model's tensors, or a LoRA adapter's (peft's names)."""
    folder = Path(folder)
    return load_file(folder / ("adapter_model.safetensors" if is_adapter(folder) else "model.safetensors"))


def is_adapter(folder):
    return (Path(folder) / "adapter_config.json").exists()


def moved(model_dir, final):
    """How far training moved the weights: a full model's from the start, an adapter's B from its initial 0."""
    if is_adapter(final):
        return max(v.abs().max().item() for k, v in weights(final).items() if ".lora_B." in k)
    return max_diff(weights(model_dir), weights(final))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metrics(folder):
    return [json.loads(l) for l in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def without_timing(line):
    return {k: v for k, v in line.items() if k not in TIMING}


LORA = ("--lora-r", "8")  # LoRA adapters on the default targets (alpha 16)
# (processes, options) of each kind of straight run; the one-process LoRA run also serves two updates per rollout
KINDS = {"1": (1, ()), "2": (2, ()), "1-lora": (1, (*LORA, "--num-iterations", "2")), "2-lora": (2, LORA)}


def straight(model_dir, out, nproc, *extra):
    """4 steps straight, checkpoints at steps 2 and 4."""
    run(small_run(model_dir, out, "--max-steps", "4", "--save-steps", "2", "--save-total-limit", "3", *extra),
        nproc=nproc, env={"GRPO_MIN_TEST_TRACE": str(out.with_name(out.name + "-trace"))})  # what each rank trained on
    # Every step had a gradient and the weights moved: the resume tests compare weights that changed.
    assert all(l["grad_norm"] > 0 and l["frac_zero_std"] < 1 for l in metrics(out))
    if "--num-iterations" not in extra:  # one update per rollout: the ratio is exactly 1
        assert all(l["clip_fraction"] == 0 for l in metrics(out))
    assert moved(model_dir, out / "final") > 1e-3
    return out


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory):
    """straight_run(kind) -> the folder of a straight run of that kind (KINDS), run once per module."""
    done = {}

    def get(kind):
        if kind not in done:
            nproc, extra = KINDS[kind]
            done[kind] = straight(tiny_model_dir, tmp_path_factory.mktemp(f"straight{kind}"), nproc, *extra)
        return done[kind]
    return get


@pytest.fixture(scope="module")
def straight1(straight_run):
    return straight_run("1")


@pytest.fixture(scope="module")
def straight2(straight_run):
    return straight_run("2")


@pytest.mark.parametrize("kind", ["1", "2", "1-lora"])
def test_resume_is_exact(kind, straight_run, tiny_model_dir, tmp_path):
    """4 steps straight == 2 steps + resume + 2 steps: same final weights, same metrics lines. A LoRA run
    loads its base from --model and its adapter from the checkpoint, and ends with the very same adapter."""
    first, (nproc, extra) = straight_run(kind), KINDS[kind]
    assert (first / "checkpoint-2" / "COMPLETE").exists() and (first / "checkpoint-4").exists()
    resumed = tmp_path / "resumed"
    run(small_run(tiny_model_dir, resumed, "--max-steps", "4", "--resume", str(first / "checkpoint-2"), *extra),
        nproc=nproc)
    # bitwise: the same CPU and thread count, the semantic reward on (tests/train_with_test_reward.py adds to it)
    assert max_diff(weights(first / "final"), weights(resumed / "final")) == 0.0
    assert [without_timing(l) for l in metrics(first)[2:]] == [without_timing(l) for l in metrics(resumed)]
    if nproc == 2:  # DDP: the replicas agree after every step
        assert all(l["replica_divergence"] == 0.0 for l in metrics(first) + metrics(resumed))


def test_a_lora_run_writes_adapters_that_peft_and_evaluate_load(straight_run, tiny_model_dir, tmp_path):
    """--lora-r: the reference is the policy with its adapters off (KL exactly 0 at step 1); checkpoints and
    final/ hold the adapter in peft's layout with the processor (checkpoints also optimizer, scheduler and RNG
    state); peft gives the same logits as our load_model; evaluate.py takes the folder as --model."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    import data
    import evaluate
    from grpo_min.checkpoint import check_checkpoint
    from grpo_min.models import load_model, load_policy
    from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts
    from train import parse_config

    out = straight_run("1-lora")
    lines = metrics(out)
    assert lines[0]["kl"] == 0.0 and lines[-1]["kl"] > 0  # the same model as the reference, then it moved away
    assert lines[0]["reward"] == lines[1]["reward"] != lines[2]["reward"]  # --num-iterations 2: shared rollouts
    for folder in (out / "checkpoint-2", out / "final"):
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "tokenizer.json"} <= files
        assert "model.safetensors" not in files and "config.json" not in files  # the base is not copied
    assert {"optimizer.pt", "scheduler.pt", "rng_state_rank0.pt", "trainer_state.json", "COMPLETE"} <= \
        {p.name for p in (out / "checkpoint-2").iterdir()}
    assert check_checkpoint(out / "checkpoint-2")["step"] == 2
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16.0, 0.0)
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and "q_proj" in config["target_modules"]
    optimizer = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(weights(out / "final")) == 2 * 7 * 2  # A and B of 7 layers x 2 blocks

    ours, processor, _ = load_model(out / "final")
    theirs = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), out / "final")
    sample = data.synthetic_sample(0, "val")
    inputs = encode_prompts(processor, [sample.load_image()], [sample.text], CHAIN_OF_BOX).inputs
    with torch.no_grad():
        logits, peft_logits = ours.eval()(**inputs).logits, theirs.eval()(**inputs).logits
        base_logits = load_model(tiny_model_dir)[0].eval()(**inputs).logits
    torch.testing.assert_close(peft_logits, logits, atol=1e-5, rtol=0)
    assert (logits - base_logits).abs().max() > 1e-3  # (the adapter counts)

    assert evaluate.main(["--model", str(out / "final"), "--limit", "2", "--max-new-tokens", "16",
                          "--output-dir", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 2
    # a checkpoint resumes only as the kind of run that wrote it
    with pytest.raises(ValueError, match="written by a LoRA fine-tuning run"):
        load_policy(tiny_model_dir, parse_config(["--model", str(tiny_model_dir)]), "cpu", out / "checkpoint-2")
    with pytest.raises(ValueError, match=r"r=8, lora_alpha=16.0; the model's LoRA layers have .* \[\(4, 8.0\)\]"):
        load_policy(tiny_model_dir, parse_config(["--model", str(tiny_model_dir), "--lora-r", "4"]), "cpu",
                    out / "checkpoint-2")


def test_ddp_with_lora_keeps_the_replicas_equal(straight_run):
    """DDP on 2 ranks with --lora-r: only the adapters are synchronised (the base is frozen); every rank
    holds the same adapters after every step, and the reference is the base on each."""
    out = straight_run("2-lora")  # (the adapters moved: straight() checks)
    lines = metrics(out)
    assert all(l["replica_divergence"] == 0.0 for l in lines) and lines[0]["kl"] == 0.0 and lines[-1]["kl"] > 0
    assert {p.name for p in (out / "checkpoint-2").glob("rng_state_rank*.pt")} == {"rng_state_rank0.pt",
                                                                                   "rng_state_rank1.pt"}


def test_ddp_ranks_agree_and_metrics_are_global(straight2):
    from grpo_min.loss import group_advantages

    trace = straight2.with_name(straight2.name + "-trace")
    ranks = [[json.loads(l) for l in (trace / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    for step, line in enumerate(metrics(straight2)):
        assert line["replica_divergence"] == 0.0  # identical weights on both ranks after every step
        # Statistics are reduced over ranks: 2 ranks x 2 prompts x 4 completions.
        assert line["completion_tokens"] == pytest.approx(line["completion_length"] * 2 * 2 * 4)
        rewards = [torch.tensor(r[2 * step]["rewards"]) for r in ranks]  # each rank's own 8 completions
        assert line["reward"] == pytest.approx(torch.cat(rewards).mean().item(), rel=1e-6)  # both ranks' mean
        for r in (0, 1):  # each rank's loss got the advantages of its own completions (groups never span ranks)
            used = torch.tensor(ranks[r][2 * step + 1]["advantages"])
            assert torch.allclose(used, group_advantages(rewards[r], 4), atol=1e-6)
        assert not torch.equal(rewards[0], rewards[1])  # (so that using the other rank's would show)
    state = json.loads((straight2 / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["data_position"] == 2 * 2 * 2
    assert (straight2 / "checkpoint-2" / "rng_state_rank1.pt").exists()


def test_batch_scaling_dapo_and_entropy_quantile_use_both_ranks_statistics(tiny_model_dir, tmp_path):
    """--scale-rewards batch divides by the std of ALL ranks' rewards, dapo (cispo, vespo: the same code) normalises
    by ALL ranks' completion tokens, --top-entropy-quantile takes its quantile over ALL ranks' tokens: each rank's
    loss must get the numbers computed from both ranks, not from its own half. The logged statistics are
    token-weighted over both ranks (which differ in tokens)."""
    from grpo_min.loss import group_advantages

    out, trace = tmp_path / "run", tmp_path / "trace"
    run(small_run(tiny_model_dir, out, "--max-steps", "2", "--scale-rewards", "batch", "--loss-type", "dapo",
                  "--top-entropy-quantile", "0.5"), nproc=2, env={"GRPO_MIN_TEST_TRACE": str(trace)})
    ranks = [[json.loads(l) for l in (trace / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    local_differs = False
    for step, line in enumerate(metrics(out)):
        rewards = [torch.tensor(r[2 * step]["rewards"]) for r in ranks]
        used = [r[2 * step + 1] for r in ranks]
        expected = group_advantages(torch.cat(rewards), 4, scale="batch").view(2, -1)
        tokens = used[0]["tokens"] + used[1]["tokens"]
        assert line["completion_tokens"] == tokens
        for r in (0, 1):
            assert torch.allclose(torch.tensor(used[r]["advantages"]), expected[r], atol=1e-6)
            # (one rank's own statistics give other advantages, so a missing all-gather shows)
            assert not torch.allclose(group_advantages(rewards[r], 4, scale="batch"), expected[r], atol=1e-4)
            # dapo: the global token count, per rank (DDP then averages the ranks' gradients)
            assert used[r]["num_items_in_batch"] == tokens / 2 != used[r]["tokens"]
        entropies = [torch.tensor(u["entropies"]).float() for u in used]
        threshold = torch.quantile(torch.cat(entropies), 0.5)  # over both ranks' tokens
        for r in (0, 1):
            kept, count = used[r]["stats"]["entropy_kept"]
            assert count == used[r]["tokens"] and kept == (entropies[r] >= threshold).sum().item()
            local_differs |= kept != (entropies[r] >= torch.quantile(entropies[r], 0.5)).sum().item()
        for name in ("entropy_kept", "entropy", "kl", "clip_fraction"):  # sums over both ranks / their tokens
            weighted = sum(u["stats"][name][0] for u in used) / sum(u["stats"][name][1] for u in used)
            assert line[name] == pytest.approx(weighted, rel=1e-6, abs=1e-9)
    assert local_differs  # one rank's own quantile would have kept other tokens


@pytest.mark.parametrize("kind", ["1", "2", "1-lora"])
def test_sigterm_saves_and_resumes_to_the_same_result(kind, straight_run, tiny_model_dir, tmp_path):
    """SIGTERM mid-run (to every process, as SLURM does): a checkpoint at the end of the current step on
    every rank, exit 0 with the resume command; resuming gives the uninterrupted run's weights."""
    (nproc, extra), uninterrupted = KINDS[kind], straight_run(kind)
    if kind == "2" and importlib.util.find_spec("tensorboard"):  # and rank 0 alone reports, through the preemption
        extra = (*extra, "--report-to", "tensorboard")
    out = tmp_path / "preempted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    proc = subprocess.Popen(launcher + small_run(tiny_model_dir, out, "--max-steps", "4", *extra), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    if nproc == 1:  # (torchrun's own agent reports the signal it got; the workers exit 0)
        assert proc.returncode == 0, output[-3000:]
    assert "Preempted" in output and "--resume auto" in output, output[-3000:]
    saved = [p for p in out.glob("checkpoint-*") if (p / "COMPLETE").exists()]
    assert len(saved) == 1 and not (out / "final").exists()
    assert len(list(saved[0].glob("rng_state_rank*.pt"))) == nproc
    run(small_run(tiny_model_dir, out, "--max-steps", "4", "--resume", "auto", *extra), nproc=nproc)
    assert max_diff(weights(uninterrupted / "final"), weights(out / "final")) == 0.0
    assert [l["step"] for l in metrics(out)] == [1, 2, 3, 4]
    if "--report-to" in extra:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per launch: rank 0's
        events = EventAccumulator(str(out / "tensorboard")).Reload()
        assert [e.step for e in events.Scalars("reward")] == [1, 2, 3, 4]
        assert [e.value for e in events.Scalars("reward")] == pytest.approx([l["reward"] for l in metrics(out)])


def test_corrupt_or_half_written_checkpoints_are_refused(straight1, tiny_model_dir, tmp_path):
    straight = straight1
    half = tmp_path / "checkpoint-9.tmp"
    shutil.copytree(straight / "checkpoint-2", half)
    (half / "COMPLETE").unlink()
    no_marker = tmp_path / "checkpoint-8"
    shutil.copytree(half, no_marker)
    truncated = tmp_path / "checkpoint-7"
    shutil.copytree(straight / "checkpoint-2", truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    for path, message in ((no_marker, "not a complete checkpoint"), (truncated, "model.safetensors does not match its checksum"),
                          (straight / "final", "not a checkpoint (train.py writes")):
        result = subprocess.run([sys.executable] + small_run(tiny_model_dir, tmp_path / "x", "--resume", str(path)),
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    from grpo_min.checkpoint import complete_checkpoints

    assert complete_checkpoints(tmp_path) == [truncated]  # marker present: only its checksums catch it
    assert complete_checkpoints(straight) == [straight / "checkpoint-2", straight / "checkpoint-4"]


def test_an_output_dir_never_mixes_two_runs_checkpoints(straight1, tiny_model_dir, tmp_path):
    """A fresh run next to an earlier run's checkpoints, or a resume from an earlier step next to
    later ones, stops before training: pruning and --resume auto go by step number."""
    used = tmp_path / "used"
    shutil.copytree(straight1, used)  # checkpoint-2, checkpoint-4, final, metrics.jsonl, summary.json
    config = (used / "config.json").read_text()
    for extra, message in (((), "holds an earlier run (checkpoint-2, checkpoint-4, final, summary.json, metrics.jsonl)"),
                           (("--resume", str(used / "checkpoint-2")), "holds checkpoint-4, later than the step-2")):
        result = subprocess.run([sys.executable] + small_run(tiny_model_dir, used, "--max-steps", "4",
                                                             "--learning-rate", "3e-3", *extra),
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in used.iterdir()) == sorted(p.name for p in straight1.iterdir())  # nothing touched
    assert (used / "config.json").read_text() == config
    # a checkpoint of another folder resumed into this one counts as a new run here
    other = tmp_path / "other"
    shutil.copytree(straight1 / "checkpoint-2", other / "checkpoint-2")
    result = subprocess.run([sys.executable] + small_run(tiny_model_dir, used, "--resume", str(other / "checkpoint-2")),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "holds an earlier run" in result.stderr, result.stderr[-2000:]
    # --overwrite never deletes what the run loads
    result = subprocess.run([sys.executable] + small_run(used / "final", used, "--overwrite"),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "which this run loads" in result.stderr, result.stderr[-2000:]
    assert (used / "final" / "config.json").exists()
    run(small_run(tiny_model_dir, used, "--max-steps", "1", "--overwrite"))  # start over, deleting the old run
    assert not list(used.glob("checkpoint-*")) and [l["step"] for l in metrics(used)] == [1]


def test_resume_auto_restarts_a_run_cut_off_before_its_first_checkpoint(tiny_model_dir, tmp_path):
    """A requeued job always passes --resume auto: what a run killed before its first complete
    checkpoint left (a half-written checkpoint, a log with a cut-off line) is its own, so it starts over."""
    from grpo_min.checkpoint import CheckpointError, check_output_dir

    out = tmp_path / "cut"
    (out / "checkpoint-2.tmp").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "rew')
    result = run(small_run(tiny_model_dir, out, "--max-steps", "1", "--resume", "auto"))
    assert "no complete checkpoint" in result.stdout and "holds an earlier run" not in result.stderr
    assert [l["step"] for l in metrics(out)] == [1] and (out / "final").exists()
    assert not (out / "checkpoint-2.tmp").exists()
    # a finished run (final/, summary.json) is never deleted that way
    with pytest.raises(CheckpointError, match="holds an earlier run"):
        check_output_dir(out, None, resume_auto=True)
    assert check_output_dir(out, None, overwrite=True)  # (what --overwrite would delete)


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    from grpo_min import tiny
    from grpo_min.checkpoint import complete_checkpoints, save_checkpoint

    processor = tiny.build_processor()
    model = tiny.build_model(processor, seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in (300, 400):  # left by some other timeline
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "COMPLETE").write_text("ok\n")
    save_checkpoint(tmp_path, 50, model, processor, optimizer, scheduler, {}, save_total_limit=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-50", "checkpoint-400"]
    save_checkpoint(tmp_path, 60, model, processor, optimizer, scheduler, {}, save_total_limit=1)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-60"]


def test_resuming_on_another_number_of_ranks_continues_the_data(straight2, tiny_model_dir, tmp_path):
    """A checkpoint of 2 ranks resumed on 1: the data goes on from the saved position (not from
    step x the new prompts per step, which would repeat prompts), and the run says what differs."""
    import train

    import data

    cfg = train.parse_config(["--model", str(tiny_model_dir), "--batch-size", "2"])
    order, samples = data.epoch_order(cfg.seed, 0, 2000), list(range(2000))  # the "samples" are their own indices
    # 2 ranks x 2 prompts per step: steps 0-1 used positions 0-7; a 1-rank resume at step 2 takes 8, 9, 10, 11.
    resumed = [train.rollout_batches(samples, step, cfg, origin=(2, 8))[0] for step in (2, 3)]
    assert resumed == [order[8:10].tolist(), order[10:12].tolist()]
    assert train.rollout_batches(samples, 2, cfg)[0] == order[4:6].tolist()  # what a fresh 1-rank run would use
    # By epochs: 12 prompts in all, 8 seen by the 2-rank run; 2 per step on 1 rank leaves steps 3 and 4.
    result = run(small_run(tiny_model_dir, tmp_path / "r", "--num-train-epochs", "0.006",
                           "--resume", str(straight2 / "checkpoint-2")))
    assert "at step 2 (training prompt 8)" in result.stdout
    assert "written by 2 processes, this run has 1" in result.stdout
    assert [l["step"] for l in metrics(tmp_path / "r")] == [3, 4]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_non_finite_updates_are_skipped_then_the_run_stops(lora, tiny_model_dir, tmp_path, monkeypatch):
    import train
    from grpo_min import lora as lora_module

    real_loss = train.grpo_loss

    def nan_loss(*args, **kw):
        loss, stats = real_loss(*args, **kw)
        return loss * float("nan"), stats

    monkeypatch.setattr(train, "grpo_loss", nan_loss)
    extra = LORA if lora else ()
    start = {k: v.clone() for k, v in weights(tiny_model_dir).items()}
    if lora:  # the adapters a run starts from (A drawn from --seed, B = 0)
        cfg = train.parse_config(["--model", str(tiny_model_dir), *extra])
        start = lora_module.adapter_state_dict(train.load_policy(tiny_model_dir, cfg, "cpu")[0].state_dict())
        assert all(not v.any() for k, v in start.items() if ".lora_B." in k)
    out = tmp_path / "nan"
    code = train.main(small_run(tiny_model_dir, out, "--max-steps", "6", "--max-bad-steps", "2",
                                "--save-steps", "1", *extra)[1:])
    assert code == 1
    lines = metrics(out)
    assert [l["skipped_update"] for l in lines] == [True, True]
    assert not (out / "final").exists()
    # Nothing was applied: the checkpoint written after the first (skipped) step holds the start weights.
    assert max_diff(start, weights(out / "checkpoint-1")) == 0.0


def test_resuming_with_other_options_names_them_and_they_take_effect(straight1, tiny_model_dir, tmp_path):
    """A changed learning rate reaches the optimizer and the schedule (metrics.jsonl's lr), not just the banner."""
    result = run(small_run(tiny_model_dir, tmp_path / "r", "--max-steps", "3", "--epsilon", "0.3",
                           "--learning-rate", "2e-3", "--resume", str(straight1 / "checkpoint-2")))
    assert "resuming with a different configuration, which applies from step 2 on" in result.stdout
    assert "--epsilon was 0.2, now 0.3" in result.stdout and "--learning-rate was 0.001, now 0.002" in result.stdout
    assert [(l["step"], l["lr"]) for l in metrics(tmp_path / "r")] == [(3, 2e-3)]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_two_ranks_trains_checkpoints_and_resumes_exactly(lora, tiny_model_dir, tmp_path):
    """--fsdp (FSDP2, vision tower and decoder layers as units) on 2 gloo ranks: checkpoints hold full
    weights that plain transformers loads, and resuming from one reproduces the straight run. With LoRA
    (a bfloat16 base under float32 adapters, as on a GPU): adapter checkpoints, and --merge-lora writes
    final/ as a plain model equal to the base with the last checkpoint's adapter."""
    from transformers import AutoModelForImageTextToText

    extra = (*LORA, "--merge-lora", "--dtype", "bfloat16") if lora else ()
    first = tmp_path / "fsdp"
    result = run(small_run(tiny_model_dir, first, "--max-steps", "2", "--save-steps", "1", "--fsdp", *extra), nproc=2)
    assert "parallel  FSDPQwen2_5_VLForConditionalGeneration on 2 rank(s)" in result.stdout  # FSDP2's sharded class
    assert all("replica_divergence" not in l for l in metrics(first))  # (a DDP run logs its replica check)
    assert is_adapter(first / "checkpoint-1") == lora and not is_adapter(first / "final")
    AutoModelForImageTextToText.from_pretrained(first / "final")
    if lora:
        assert metrics(first)[0]["kl"] == 0.0  # even in bfloat16: the reference is the same model, adapters off
        assert_same_logits(first / "final", first / "checkpoint-2")
    resumed = tmp_path / "fsdp-resumed"
    run(small_run(tiny_model_dir, resumed, "--max-steps", "2", "--fsdp", "--resume", str(first / "checkpoint-1"),
                  *extra), nproc=2)
    assert max_diff(weights(first / "final"), weights(resumed / "final")) == 0.0
    assert [without_timing(l) for l in metrics(first)[1:]] == [without_timing(l) for l in metrics(resumed)]


def assert_same_logits(folder, other):
    """Two model folders (full or adapter, load_model reads both) give the same logits (float32, to 1e-5)."""
    import data
    from grpo_min.models import load_model
    from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts

    (a, processor, _), (b, _, _) = load_model(folder), load_model(other)
    sample = data.synthetic_sample(0, "val")
    inputs = encode_prompts(processor, [sample.load_image()], [sample.text], CHAIN_OF_BOX).inputs
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(**inputs).logits, b.eval()(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_logged_loss_is_the_objective_that_was_backpropagated(loss_type, tiny_model_dir, tmp_path, monkeypatch):
    """With 2 micro-batches, the other loss types average the micro-batch losses; dapo's are already
    normalised by the whole batch's token count, so they add up. The log must say the same."""
    import train

    losses = []

    def recording_loss(*args, **kw):
        loss, stats = grpo_loss(*args, **kw)
        losses.append(loss.item())
        return loss, stats

    from grpo_min.loss import grpo_loss
    from tests.train_with_test_reward import score_with_digits
    monkeypatch.setattr(train, "grpo_loss", recording_loss)
    monkeypatch.setattr(train.R, "score_completions", score_with_digits)  # a reward these completions can earn
    out = tmp_path / loss_type
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = small_run(tiny_model_dir, out, "--max-steps", "1", "--gradient-accumulation-steps", "2",
                     "--loss-type", loss_type)[1:]
    assert train.main(argv) is None
    assert len(losses) == 2 and all(abs(l) > 0 for l in losses)
    expected = sum(losses) if loss_type == "dapo" else sum(losses) / 2
    assert metrics(out)[0]["loss"] == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_checkpointed_scoring_gives_the_plain_gradients_under_ddp_and_fsdp(tmp_path):
    """Gradient checkpointing with the prompt shared (grpo_min/recompute.py) under DDP and FSDP2, full
    fine-tuning and LoRA, 2 gloo ranks each scoring its own prompt (tests/checkpointing_worker.py): the
    synchronised gradients equal the plain path's without checkpointing (fp32, 1e-5) on both ranks."""
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/checkpointing_worker.py",
         str(tmp_path)], nproc=1)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(ranks[0]) == ["ddp-full", "ddp-lora", "fsdp-full", "fsdp-lora"]
    for kind, result in ranks[0].items():
        assert result["max_grad"] > 1e-3 and result["max_diff"] <= 1e-5 * max(1.0, result["max_grad"]), (kind, result)
        assert ranks[1][kind]["grad_sum"] == pytest.approx(result["grad_sum"], rel=1e-6), kind  # synchronised


def test_bfloat16_compute_keeps_float32_weights_so_small_updates_land(tiny_model_dir):
    """--dtype bfloat16 computes under autocast over float32 weights and optimizer state. An AdamW step
    moves a weight by about the learning rate (1e-6 here), far below bfloat16's resolution: bfloat16
    weights would round most updates away. The reference computes exactly as the policy (KL 0 at start)."""
    import data
    import train
    from grpo_min.models import compute_precision, load_reference
    from grpo_min.optim import make_optimizer
    from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts
    from grpo_min.rollout import completion_logps
    from grpo_min.tiny import warm_start_target

    cpu = torch.device("cpu")
    cfg = train.parse_config(["--model", str(tiny_model_dir), "--dtype", "bfloat16", "--learning-rate", "1e-6"])
    policy, processor, _ = train.load_policy(tiny_model_dir, cfg, cpu)
    reference = load_reference(tiny_model_dir, dtype=torch.float32, device=cpu)
    samples = [data.synthetic_sample(i, "val") for i in range(2)]
    prompts = encode_prompts(processor, [s.load_image() for s in samples], [s.text for s in samples], CHAIN_OF_BOX)
    processor.tokenizer.padding_side = "right"
    enc = processor.tokenizer([warm_start_target(s, size) for s, size in zip(samples, prompts.resized_sizes)],
                              padding=True, return_tensors="pt", add_special_tokens=False)
    processor.tokenizer.padding_side = "left"
    ids, mask = enc["input_ids"], enc["attention_mask"].float()
    with compute_precision(cpu, torch.bfloat16):
        logps = completion_logps(policy, prompts, ids, mask, group_size=1)
        with torch.no_grad():
            ref_logps = completion_logps(reference, prompts, ids, mask, group_size=1)
    assert torch.equal(logps.detach(), ref_logps)
    with torch.no_grad():
        full = completion_logps(policy, prompts, ids, mask, group_size=1)
    assert (logps.detach() - full).abs().max() > 1e-4  # autocast did compute in bfloat16
    (-(logps * mask).sum() / mask.sum()).backward()
    optimizer, _ = make_optimizer(policy.parameters(), lr=cfg.learning_rate)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer.step()
    after = dict(policy.named_parameters())
    assert {p.dtype for p in after.values()} == {torch.float32}
    moved = sum(int((after[n] != w).sum()) for n, w in before.items())
    assert moved > 0.5 * sum(w.numel() for w in before.values())
    kept_in_bf16 = sum(int((after[n].bfloat16() != w.bfloat16()).sum()) for n, w in before.items())
    assert kept_in_bf16 < 0.05 * moved  # what bfloat16 weights would have kept of those updates


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_memory_options_run(lora, tiny_model_dir, tmp_path):
    """--gradient-checkpointing (the prompt still shared: tests/test_checkpointing.py), accumulation, frozen vision,
    bfloat16 compute. With LoRA (a bfloat16 base here) and --merge-lora in one process: final/ is a plain
    float32 model, the base with the last checkpoint's adapter merged in."""
    out = tmp_path / "mem"
    extra = (*LORA, "--merge-lora", "--save-steps", "2") if lora else ()
    run(small_run(tiny_model_dir, out, "--max-steps", "2", "--gradient-checkpointing",
                  "--gradient-accumulation-steps", "2", "--freeze-vision", "--warmup-steps", "2", "--dtype", "bfloat16",
                  *extra))
    assert {w.dtype for w in weights(out / "final").values()} == {torch.float32}  # bfloat16 compute, float32 weights
    if lora:
        assert not is_adapter(out / "final") and is_adapter(out / "checkpoint-2")
        assert_same_logits(out / "final", out / "checkpoint-2")
    lines = metrics(out)
    assert [l["step"] for l in lines] == [1, 2]
    assert [l["lr"] for l in lines] == pytest.approx([5e-4, 1e-3])  # the rate each update used (warm-up 1/2, 2/2)
    # the checkpointed policy pass computes what the reference's pass does, so even in bfloat16 the KL starts at 0
    assert lines[0]["kl"] == 0.0
    # 2 micro-batches x 2 prompts x 4 completions per step
    assert all(l["completion_tokens"] == pytest.approx(l["completion_length"] * 2 * 2 * 4) for l in lines)
    start, end = weights(tiny_model_dir), weights(out / "final")
    assert all(torch.equal(start[k], end[k]) for k in start if "visual" in k)  # the vision tower stayed frozen
    assert not all(torch.equal(start[k], end[k]) for k in start if "visual" not in k)  # (the rest trained)


def test_num_iterations_counts_updates_and_resumes_exactly(tiny_model_dir, tmp_path):
    """--num-iterations 2: one rollout serves two steps (optimizer updates, as TRL counts them); --max-steps,
    the warm-up and the schedule count updates; checkpoints fall at the end of a rollout, and a run resumed
    from one repeats the uninterrupted run exactly."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    options = ("--num-iterations", "2", "--max-steps", "4", "--warmup-steps", "4")
    run(small_run(tiny_model_dir, first, *options, "--save-steps", "2", "--save-total-limit", "3"))
    lines = metrics(first)
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    assert [l["lr"] for l in lines] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # warm-up over 4 updates
    assert lines[0]["reward"] == lines[1]["reward"] and lines[2]["reward"] == lines[3]["reward"]  # shared rollouts
    assert lines[1]["reward"] != lines[2]["reward"]
    assert lines[0]["clip_fraction"] == 0 and lines[1]["clip_fraction"] > 0  # on-policy, then off by one update
    state = json.loads((first / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data_position"] == 2  # one rollout of 2 prompts so far
    run(small_run(tiny_model_dir, resumed, *options, "--resume", str(first / "checkpoint-2")))
    assert max_diff(weights(first / "final"), weights(resumed / "final")) == 0.0
    assert [without_timing(l) for l in lines[2:]] == [without_timing(l) for l in metrics(resumed)]
