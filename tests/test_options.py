"""train.py's command line on real data: what --model means there, the demo preset, the start-up banner,
and data mistakes named before any model is built."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures import write_jsonl_fixture, write_ms_cxr_fixture

ROOT = Path(__file__).resolve().parents[1]


def test_real_data_needs_model_and_the_error_shows_the_command(capsys):
    import train

    with pytest.raises(SystemExit) as stop:
        train.parse_config(["--dataset", "ms-cxr", "--data-root", "x"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--dataset ms-cxr needs --model" in err
    assert "torchrun --nproc_per_node=8 train.py --dataset ms-cxr --data-root" in err
    assert "--model /path/to/Qwen2.5-VL-3B-Instruct" in err


def test_the_demo_preset_applies_to_the_demo_only(capsys):
    import train

    demo = train.parse_config([])
    assert (demo.model, demo.max_steps, demo.batch_size) == ("tiny", 800, 8)
    assert demo.beta > 0 and demo.num_iterations == 2  # the reference and clipping are at work in the demo
    assert "Demo preset" in capsys.readouterr().out
    assert train.parse_config(["--lora-r", "16"]).learning_rate == 5e-4  # adapters get the LoRA demo's rate
    assert train.parse_config(["--lora-r", "16", "--learning-rate", "1e-3"]).learning_rate == 1e-3
    capsys.readouterr()
    smoke = train.parse_config(["--dataset", "jsonl", "--data-root", "x", "--model", "tiny"])
    assert (smoke.max_steps, smoke.batch_size, smoke.beta, smoke.learning_rate) == (None, 1, 0.04, 1e-6)
    out = capsys.readouterr().out
    assert "Demo preset" not in out and "WARNING: --model tiny has never seen a real image" in out
    real = train.parse_config(["--dataset", "synthetic", "--model", "/some/folder"])
    assert (real.max_steps, real.batch_size) == (None, 1)  # a real model on the synthetic data: no preset either


def test_data_mistakes_are_named_within_seconds_before_any_model_is_built(tmp_path):
    """On a fresh HOME with an empty model cache: no tiny model, no scorer is built before the data is checked."""
    cache, home = tmp_path / "cache", tmp_path / "home"
    cache.mkdir(), home.mkdir()
    env = {**os.environ, "GRPO_MIN_CACHE": str(cache), "HOME": str(home), "OMP_NUM_THREADS": "1"}
    images_missing = write_ms_cxr_fixture(tmp_path / "ms")[0]  # annotations without the MIMIC image folder
    for data_args, expected in [([], "--data-root is required"),
                                (["--data-root", str(tmp_path / "nowhere")], "does not exist"),
                                (["--data-root", str(tmp_path)], "MS_CXR_Local_Alignment_v1.1.0.csv"),
                                (["--data-root", str(images_missing)], "has no usable sample")]:
        t0 = time.time()
        result = subprocess.run([sys.executable, "train.py", "--dataset", "ms-cxr", "--model", "tiny", *data_args,
                                 "--output-dir", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode != 0 and expected in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert list(cache.iterdir()) == [], "a model was built before the data was checked"
        assert time.time() - t0 < 120  # seconds, not the minutes a tiny-model build takes (no timing target)


def test_the_banner_says_what_is_trained_and_which_rewards_are_on(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Every run's start-up block names model, data sizes, template, the reward terms (the semantic one with its
    scorer or why it is off), G, batch, steps, beta and learning rate, before the first step."""
    import train

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(train, "grpo_step", stop)
    root = write_jsonl_fixture(tmp_path / "data")
    argv = ["--model", str(tiny_model_dir), "--dataset", "jsonl", "--data-root", str(root), "--max-steps", "3",
            "--eval-limit", "1", "--output-dir", str(tmp_path / "o"), "--overwrite"]
    with pytest.raises(Stop):
        train.main(argv)
    out = capsys.readouterr().out
    assert f"model     {tiny_model_dir}" in out and "box frame 'absolute'" in out
    assert "data      jsonl: train " in out and "prompt    chain-of-box template" in out
    assert "semantic OFF (real data and no --semantic-model" in out
    assert "format x1 + spatial x1 (IoU > 0.5)" in out
    assert "G 8, 1 prompts per update" in out and "3 steps" in out and "beta 0.04" in out and "lr 1e-06" in out
    with pytest.raises(Stop):
        train.main(argv + ["--semantic-model", "none", "--beta", "0", "--spatial-reward", "iou"])
    out = capsys.readouterr().out
    assert "semantic OFF (--semantic-model none)" in out and "beta 0 (no reference loaded)" in out
    assert "spatial x1 (IoU)" in out


@pytest.mark.parametrize("argv, expected", [
    (["--lora-alpha", "8"], "--lora-alpha: LoRA is off; add --lora-r R"),
    (["--merge-lora", "--lora-alpha", "8"], "--lora-alpha, --merge-lora: LoRA is off"),
    (["--lora-r", "8", "--lora-vision", "--freeze-vision"], "--freeze-vision keeps it unchanged: choose one"),
    (["--lora-r", "8", "--lora-target-modules", "q_proj,,v_proj"], "expected comma-separated module names"),
])
def test_lora_options_that_contradict_or_would_do_nothing_are_refused(argv, expected, capsys):
    import train

    with pytest.raises(SystemExit) as stop:
        train.parse_config(argv)
    assert stop.value.code == 2 and expected in capsys.readouterr().err


def test_lora_defaults_and_the_demo_preset(tiny_model_dir, tmp_path):
    import train

    cfg = train.parse_config(["--lora-r", "8", "--lora-target-modules", " q_proj, v_proj"])
    assert (cfg.lora_alpha, cfg.lora_target_modules) == (16.0, "q_proj,v_proj")
    assert cfg.freeze_vision  # the demo's frozen tower (the default LoRA targets leave it alone anyway) ...
    assert not train.parse_config(["--lora-r", "8", "--lora-vision"]).freeze_vision  # ... unless it gets adapters
    assert train.parse_config([]).lora_alpha is None  # LoRA off
    # a target that names no layer of the model stops with one line, before training
    with pytest.raises(SystemExit, match=r"error: target_modules \['qkv_proj'\] match no nn.Linear"):
        train.main(["--model", str(tiny_model_dir), "--lora-r", "8", "--lora-target-modules", "qkv_proj",
                    "--semantic-model", "none", "--output-dir", str(tmp_path / "o")])
