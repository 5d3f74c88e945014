"""scripts/ablate.py (variants x seeds, resume, failures, intervals) and --report-to (TensorBoard, W&B)."""
import doctest
import importlib.util
import json
import math
import statistics
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import ablate  # noqa: E402

T_975 = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045}  # Student t tables, 0.975 quantile


def test_t_quantiles_and_intervals_match_the_tables():
    assert doctest.testmod(ablate).failed == 0
    for df, t in T_975.items():
        assert ablate.t_quantile(0.975, df) == pytest.approx(t, abs=5e-4)
    assert ablate.t_quantile(0.995, 4) == pytest.approx(4.604, abs=5e-4)
    gains = [15.5, 25.0, 11.5]  # the demo's three seeds, Acc@0.5
    half = 4.303 * statistics.stdev(gains) / math.sqrt(3)
    stat = ablate.mean_interval(gains)
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(17.3333, abs=1e-4)
    assert (stat["low"], stat["high"]) == pytest.approx((17.3333 - half, 17.3333 + half), abs=2e-3)
    one = ablate.mean_interval([4.0])
    assert one == {"n": 1, "mean": 4.0, "low": None, "high": None}
    assert ablate.cell(one) == "+4.00 (n = 1, no interval)"


def small_run_options(model_dir) -> list[str]:
    return ["--model", str(model_dir), "--max-steps", "2", "--batch-size", "1", "--num-generations", "2",
            "--max-completion-length", "16", "--eval-steps", "0", "--eval-limit", "4", "--semantic-model", "none"]


def test_an_ablation_runs_resumes_reports_failures_and_its_statistics(tiny_model_dir, tmp_path):
    out, common = tmp_path / "ablation", small_run_options(tiny_model_dir)
    variants = ["--variant", "grpo=--loss-type grpo", "--variant", "dapo=--loss-type dapo --beta 0"]
    argv = ["--seeds", "0", "1", *variants, "--output-dir", str(out), "--jobs", "2", "--", *common]
    assert ablate.main(argv) == 0
    data = json.loads((out / "ablation.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["grpo", "dapo"] and data["baseline"] == "grpo"
    for v in data["variants"]:
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        for r in v["runs"]:
            summary = json.loads((Path(r["path"]) / "summary.json").read_text())
            assert r["before"]["acc@0.5"] == summary["before"]["acc@0.5"] and r["after"]["miou"] == summary["after"]["miou"]
    assert json.loads((out / "dapo" / "seed-1" / "config.json").read_text())["beta"] == 0  # variant options win
    assert (out / "ablation.png").stat().st_size > 0 and "| dapo | `--loss-type dapo --beta 0` | 2 |" in \
        (out / "ablation.md").read_text()

    # Known numbers in three finished runs; the fourth made unfinished; a variant train.py refuses added.
    hand = {("grpo", 0): (10.0, 20.0, 30.0, 34.0), ("grpo", 1): (12.0, 30.0, 31.0, 36.5),
            ("dapo", 0): (10.0, 25.0, 30.0, 33.0)}  # acc before, after, miou before, after
    for (v, s), (ab, aa, mb, ma) in hand.items():
        (out / v / f"seed-{s}" / "summary.json").write_text(json.dumps(
            {"before": {"acc@0.5": ab, "miou": mb}, "after": {"acc@0.5": aa, "miou": ma}, "wall_s": 1.0}))
    (out / "dapo" / "seed-1" / "summary.json").unlink()
    finished_log = (out / "grpo" / "seed-0" / "train.log").read_text()
    assert ablate.main(argv[:-len(common) - 1] + ["--variant", "bad=--beta -1", "--", *common]) == 1
    assert (out / "grpo" / "seed-0" / "train.log").read_text() == finished_log  # a finished run is not run again
    assert (out / "dapo" / "seed-1" / "train.log").read_text().count("\n=== ") == 2  # the unfinished one ran again
    data = json.loads((out / "ablation.json").read_text())
    grpo, dapo, bad = data["variants"]
    rerun = json.loads((out / "dapo" / "seed-1" / "summary.json").read_text())
    assert [r["exit_code"] for r in bad["runs"]] == [2, 2] and all(r["failed"] for r in bad["runs"])
    assert any("--beta -1" in line for line in bad["runs"][0]["log_tail"])
    assert bad["gain"]["acc@0.5"]["n"] == 0 and bad["vs_first"]["miou"]["n"] == 0

    # By hand: t(0.975, 1) = 12.706 for two seeds.
    def interval(values):
        m, half = statistics.mean(values), 12.7062 * statistics.stdev(values) / math.sqrt(len(values))
        return pytest.approx((m, m - half, m + half), abs=1e-3)

    stat = lambda s: (s["mean"], s["low"], s["high"])  # noqa: E731
    assert stat(grpo["gain"]["acc@0.5"]) == interval([20.0 - 10.0, 30.0 - 12.0])
    assert stat(grpo["gain"]["miou"]) == interval([34.0 - 30.0, 36.5 - 31.0])
    assert stat(dapo["gain"]["acc@0.5"]) == interval([25.0 - 10.0, rerun["after"]["acc@0.5"] - rerun["before"]["acc@0.5"]])
    assert stat(dapo["vs_first"]["acc@0.5"]) == interval([25.0 - 20.0, rerun["after"]["acc@0.5"] - 30.0])
    assert stat(dapo["vs_first"]["miou"]) == interval([33.0 - 34.0, rerun["after"]["miou"] - 36.5])
    assert dapo["vs_first"]["acc@0.5"]["seeds"] == [0, 1]
    md = (out / "ablation.md").read_text()
    assert "| grpo | 1 | 12.00 -> 30.00 (+18.00) | 31.00 -> 36.50 (+5.50) |" in md
    assert "| bad | 0 | not finished (exit code 2)" in md

    # The same folder with a variant's options changed: refused before anything runs.
    changed = ["--seeds", "0", "--variant", "grpo=--loss-type bnpo", "--output-dir", str(out), "--", *common]
    with pytest.raises(SystemExit, match="hold runs of other train.py options"):
        ablate.main(changed)


# ---------------------------------------------------------------------------------------------- --report-to
def train_reporting(model_dir, out: Path, report_to: str):
    import train

    train.main(small_run_options(model_dir) + ["--eval-steps", "2", "--num-generations", "4", "--beta", "0.04",
                                               "--output-dir", str(out), "--report-to", report_to])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def numbers(line: dict) -> dict:
    return {k: float(v) for k, v in line.items() if k != "step" and isinstance(v, (int, float))}


def test_tensorboard_events_hold_every_metrics_line(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (requirements-dev.txt installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = train_reporting(tiny_model_dir, tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert set(events.Tags()["scalars"]) == {k for line in lines for k in numbers(line)}
    for line in lines:
        for key, value in numbers(line).items():
            [event] = [e for e in events.Scalars(key) if e.step == line["step"]]
            assert event.value == pytest.approx(value, rel=1e-6, abs=1e-30), key  # stored as float32
    assert "eval/acc@0.5" in numbers(lines[-1]) and len(lines) == 2


def test_a_resumed_run_hides_the_tensorboard_events_logged_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (requirements-dev.txt installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from grpo_min.metrics import Reporter

    for start, values in ((0, {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}), (2, {3: 30.0, 4: 40.0})):  # crashed, resumed at 2
        reporter = Reporter("tensorboard", tmp_path, start, {})
        for step, value in values.items():
            reporter.log({"step": step, "reward": value, "skipped_update": False, "note": "text is left out"})
        reporter.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert set(events.Tags()["scalars"]) == {"reward", "skipped_update"}


def test_wandb_offline_run_holds_every_metrics_line(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (requirements-dev.txt installs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(sys, "exit", sys.exit)  # wandb.init replaces sys.exit with a hook of its own: put it back after
    lines = train_reporting(tiny_model_dir, tmp_path / "run", "wandb")
    run_id = (tmp_path / "run" / "wandb" / "run_id").read_text().strip()
    [log] = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history = {h["_step"]: h for h in wandb_history(log)}
    assert sorted(history) == [line["step"] for line in lines]
    for line in lines:
        assert {k: history[line["step"]][k] for k in numbers(line)} == pytest.approx(numbers(line))


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file: W&B's record log (a 7-byte file header, then LevelDB-log
    chunks of protobuf Records in 32 KiB blocks: 4-byte checksum, 2-byte length, 1-byte type)."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="this wandb has no protobuf module to read "
                             "its run files with")
    data, pos, payload, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = payload + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a record's full or last chunk
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_a_missing_report_to_package_is_one_line_naming_it(tmp_path, monkeypatch):
    import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit, match=r"^error: --report-to wandb needs the 'wandb' package, which grpo_min does "
                                         r"not install: pip install wandb$"):
        train.main(["--output-dir", str(tmp_path / "o"), "--report-to", "wandb"])
    assert not (tmp_path / "o").exists()  # stopped before anything was built or written
