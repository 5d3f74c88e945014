"""Shared fixtures: a private model cache and a cheaply warm-started tiny Qwen2.5-VL."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Every model the tests build goes to a private cache, never to ~/.cache/grpo_min; subprocesses
# (train.py, torchrun) inherit it through the environment.
_CACHE = tempfile.mkdtemp(prefix="grpo_min_test_cache_")
os.environ["GRPO_MIN_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)  # the models it built, at exit

TEST_WARM_START_STEPS = 20  # a reduced warm start: enough for the answer format to appear


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny model after a short warm start (about 15 s to build, once per session)."""
    from grpo_min.tiny import tiny_model_path

    return tiny_model_path(seed=0, steps=TEST_WARM_START_STEPS)
