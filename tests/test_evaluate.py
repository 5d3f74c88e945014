"""evaluate.py: metric definitions, prediction files (ours and the MedGround-R1 / VLM-R1 log), tables,
pictures, and an end-to-end evaluation of the tiny model. The parser itself is tested in test_boxes.py."""
import doctest
import json
from pathlib import Path

import pytest
from PIL import Image

import evaluate
from data import load_dataset
from evaluate import compare_table, load_predictions, metrics_of, row_from_record
from grpo_min.boxes import from_model_frame, iou, parse_answer
from grpo_min.models import load_model

TRUTH = [0, 0, 10, 10]


def row(box, category=None, truth=TRUTH):
    """A prediction row as predict() writes it (boxes in original pixels)."""
    return {"id": "x", "phrase": "p", "category": category, "ground_truth": truth, "output": "",
            "box": box, "iou": iou(box, truth)}


def write_log(path: Path, outputs: list, truth=(100, 120, 300, 340), **extra) -> Path:
    results = [{"image": f"img{i}.jpg", "question": "Please provide the bounding box coordinate of the region "
                "this sentence describes: left basal opacity.", "ground_truth": list(truth), "model_output": out,
                **extra} for i, out in enumerate(outputs)]
    path.write_text(json.dumps({"accuracy": 0.0, "results": results}))
    return path


def test_docstring_examples():
    result = doctest.testmod(evaluate)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------- metrics
def test_thresholds_are_strict():
    rows = [row([0, 0, 10, 3]),  # IoU 0.3 exactly: counts nowhere
            row([0, 0, 10, 5]),  # 0.5 exactly: counts at 0.3 only
            row([0, 0, 10, 7]),  # 0.7 exactly: counts at 0.3 and 0.5
            row([0, 0, 10, 10])]  # 1.0: counts everywhere
    assert [r["iou"] for r in rows] == pytest.approx([0.3, 0.5, 0.7, 1.0])
    m = metrics_of(rows)
    assert m == {"n": 4, "parse_failures": 0, "acc@0.3": 75.0, "acc@0.5": 50.0, "acc@0.7": 25.0, "miou": 62.5}


def test_parse_failures_count_as_zero_and_empty_or_inverted_boxes_score_zero():
    rows = [row([0, 0, 10, 10]), row(None), row(None),
            row([0, 0, 0, 10]),  # empty (zero width): a box, IoU 0, not a parse failure
            row([10, 10, 0, 0]),  # inverted corners written as is: IoU 0
            row([0, 0, 10, 10], truth=[10, 10, 0, 0])]  # inverted ground truth: IoU 0
    m = metrics_of(rows)
    assert (m["n"], m["parse_failures"]) == (6, 2)
    assert (m["acc@0.5"], m["miou"]) == (16.67, 16.67)  # 1 of 6, two decimals
    assert metrics_of([]) == {"n": 0, "parse_failures": 0, "acc@0.3": 0.0, "acc@0.5": 0.0, "acc@0.7": 0.0,
                              "miou": 0.0}


def test_per_category_only_when_categories_are_known():
    assert "per_category" not in metrics_of([row([0, 0, 10, 10]), row(None)])
    m = metrics_of([row([0, 0, 10, 10], "mass"), row(None, "mass"), row([0, 0, 10, 6], "nodule"), row(None)])
    assert sorted(m["per_category"]) == ["mass", "nodule", "unknown"]
    assert m["per_category"]["mass"] == {"n": 2, "parse_failures": 1, "acc@0.3": 50.0, "acc@0.5": 50.0,
                                         "acc@0.7": 50.0, "miou": 50.0}
    assert m["per_category"]["nodule"]["acc@0.5"] == 100.0 and m["per_category"]["nodule"]["acc@0.7"] == 0.0
    assert sum(c["n"] for c in m["per_category"].values()) == m["n"]
    assert sum(c["parse_failures"] for c in m["per_category"].values()) == m["parse_failures"]


# ---------------------------------------------------------------------------------------------- prediction files
# Answers shaped like released Qwen2.5-VL / MedGround-R1 outputs (values made up), truth (100, 120, 300, 340).
LOG_OUTPUTS = [
    # 0: fenced JSON, closed
    '<think>The opacity sits at the left base.</think>\n<answer>\n```json\n[\n  {"bbox_2d": [100, 120, 300, 340], '
    '"label": "opacity"}\n]\n```\n</answer>',
    # 1: fenced JSON cut off before </answer> (the official parser finds nothing here)
    '<think>Left lower zone.</think>\n<answer>\n```json\n[\n  {"bbox_2d": [110, 130, 290, 330], "label": "opa',
    # 2: several boxes in the answer: the first is the answer
    '<think>Two candidates.</think><answer>[{"bbox_2d": [100, 120, 300, 340]}, {"bbox_2d": [0, 0, 50, 50]}]'
    '</answer>',
    # 3: a box only inside <think> (a Chain-of-Box step), no answer: a parse failure
    '<think>The left lung [90, 100, 310, 400] shows an opacity at its base',
    # 4: a Chain-of-Box step and a different answer: the answer counts
    '<think>The left lung [0, 0, 400, 400] shows it.</think><answer>{"bbox_2d": [100, 120, 300, 340]}</answer>',
    # 5: no template at all: read as a whole
    'The region is at [100, 120, 300, 340].',
    # 6: an answer with no box
    '<think>I cannot see it.</think><answer>No finding.</answer>',
    # 7: empty, 8: not text at all
    '', None,
    # 9: corners swapped by the model: reordered by the parser
    '<answer>[300, 340, 100, 120]</answer>',
]


def test_medground_log_is_detected_and_parsed(tmp_path):
    rows, kind = load_predictions(write_log(tmp_path / "log.json", LOG_OUTPUTS))
    assert "MedGround-R1 / VLM-R1" in kind
    assert [r["box"] is not None for r in rows] == [True, True, True, False, True, True, False, False, False, True]
    ious = [r["iou"] for r in rows]
    assert ious[0] == ious[2] == ious[4] == ious[5] == ious[9] == 1.0
    assert ious[1] == pytest.approx(180 * 200 / (200 * 220))  # same frame: no rescaling
    assert rows[0]["id"] == "img0.jpg" and "left basal opacity" in rows[0]["phrase"]
    m = metrics_of(rows)
    assert (m["n"], m["parse_failures"]) == (10, 4) and m["acc@0.5"] == 60.0 and "per_category" not in m


def test_log_with_categories_scored_from_the_command_line(tmp_path, capsys):
    write_log(tmp_path / "log.json", LOG_OUTPUTS[:4], category="Lung Opacity")
    assert evaluate.main(["--predictions", str(tmp_path / "log.json"), "--output-dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "detected format: MedGround-R1" in printed and "Lung Opacity" in printed
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["n"], metrics["parse_failures"], metrics["acc@0.5"]) == (4, 1, 75.0)
    assert metrics["per_category"]["Lung Opacity"]["n"] == 4
    rescored = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["box"] for r in rescored][3] is None and rescored[0]["box"] == [100.0, 120.0, 300.0, 340.0]


def test_our_predictions_rescore_to_the_same_numbers(tmp_path):
    rows = [row([0, 0, 10, 5], "mass"), row(None, "mass"), row([1, 1, 9, 9.5], "nodule")]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again, kind = load_predictions(path)
    assert "grpo_min predictions" in kind
    assert [r["iou"] for r in again] == [r["iou"] for r in rows]
    assert metrics_of(again) == metrics_of(rows)
    single = tmp_path / "one.jsonl"
    single.write_text(json.dumps(rows[0]) + "\n")
    assert len(load_predictions(single)[0]) == 1


def test_an_answer_too_large_to_map_back_is_a_parse_failure_as_when_rescored(monkeypatch):
    # [1e308, ...] is a finite number in the model's frame but infinite once scaled to the original
    # image; the row would be read back by --predictions as no box, so it must count as none here too.
    from types import SimpleNamespace
    texts = ["<answer>[1e308, 0, 1.5e308, 10]</answer>", "<answer>[10, 20, 30, 40]</answer>"]
    monkeypatch.setattr(evaluate, "encode_prompts", lambda *a, **k: SimpleNamespace(resized_sizes=[(56, 56)] * 2))
    monkeypatch.setattr(evaluate, "generate_completions", lambda *a, **k: SimpleNamespace(texts=texts))
    monkeypatch.setattr(evaluate, "repetition_penalty", lambda *a: None)
    boxes = [box for _, box in evaluate.decode_boxes(None, None, [None] * 2, ["mass"] * 2, [(112, 112)] * 2, "")]
    assert boxes == [None, (20.0, 40.0, 60.0, 80.0)]


def test_bad_files_fail_with_a_clear_message(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(row(None)) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        load_predictions(broken)
    with pytest.raises(ValueError, match="ground-truth"):
        row_from_record({"model_output": "[1, 2, 3, 4]", "ground_truth": [1, 2, 3]}, 0)
    # the command line says the same in one line, no traceback
    with pytest.raises(SystemExit, match="error: .*line 2"):
        evaluate.main(["--predictions", str(broken), "--output-dir", str(tmp_path / "out")])


@pytest.mark.parametrize("argv, message", [
    (["--predictions", "missing.jsonl"], "--predictions: no such file: missing.jsonl"),
    (["--compare", "a.json"], "--compare: no such file: a.json"),
    (["--plot-run", "no-run"], "--plot-run: no such file"),
    (["--limit", "0"], "--limit 0: expected at least 1"),
    (["--split", "validation"], "invalid choice: 'validation'"),
    (["--template", "missing.txt"], "no such file"),
])
def test_command_line_mistakes_are_named_before_any_model_loads(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("grpo_min.models.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr("grpo_min.models.resolve_model_path", lambda *a, **k: pytest.fail("resolved a model"))
    with pytest.raises(SystemExit) as stop:
        evaluate.main(argv)
    assert message in f"{stop.value.code} {capsys.readouterr().err}"


def test_a_split_with_no_usable_sample_stops_before_any_model_loads(tmp_path, monkeypatch):
    """No image found (--image-root forgotten) or an empty split: an error, never a table of zeros."""
    from tests.fixtures import write_jsonl_fixture, write_ms_cxr_fixture

    monkeypatch.setattr("grpo_min.models.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr("grpo_min.models.resolve_model_path", lambda *a, **k: pytest.fail("resolved a model"))
    data_root, _ = write_ms_cxr_fixture(tmp_path)  # the images lie in another folder: --image-root is needed
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--dataset", "ms-cxr", "--data-root", str(data_root), "--output-dir", str(tmp_path / "out")])
    message = str(stop.value.code)
    assert message.startswith("error: ms-cxr/test has no usable sample") and "\n" not in message
    assert "MS_CXR_Local_Alignment_v1.1.0.csv" in message and "--image-root" in message

    jsonl = write_jsonl_fixture(tmp_path / "jsonl")
    (jsonl / "val.jsonl").write_text("")
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--dataset", "jsonl", "--data-root", str(jsonl), "--split", "val",
                       "--output-dir", str(tmp_path / "out")])
    message = str(stop.value.code)
    assert message.startswith("error: jsonl/val has no usable sample") and "val.jsonl" in message
    assert "--image-root" not in message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- tables
def write_metrics(folder: Path, **numbers) -> Path:
    folder.mkdir(parents=True)
    metrics = {"n": 167, "parse_failures": 3, "acc@0.3": 70.0, "acc@0.5": 55.5, "acc@0.7": 30.25, "miou": 50.1,
               **numbers}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder / "metrics.json"


def test_compare_prints_runs_side_by_side_and_the_paper_in_its_setting(tmp_path, capsys):
    a = write_metrics(tmp_path / "plain", dataset="medrpg", split="test")
    b = write_metrics(tmp_path / "chain-of-box", dataset="medrpg", split="test", miou=61.234)
    assert evaluate.main(["--compare", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["n", "parse", "fail", "Acc@0.3", "Acc@0.5", "Acc@0.7", "mIoU"]
    assert lines[1].split() == ["plain", "167", "3", "70.00", "55.50", "30.25", "50.10"]
    assert lines[2].split()[-1] == "61.23"
    assert len({len(line) for line in lines[:4]}) == 1  # fixed width
    assert "83.12" in lines[3] and "79.02" in lines[3] and "MS-CXR" in lines[3]
    assert "33.65" in lines[4] and "37.13" in lines[4]

    other = write_metrics(tmp_path / "synthetic", dataset="synthetic", split="test")
    assert "paper" not in compare_table([other])
    table = compare_table([other], paper="chestx-ray8")
    assert "62.18" in table and "53.12" in table and "33.65" not in table


def test_model_evaluation_table_lists_categories():
    table = evaluate.metrics_table(metrics_of([row([0, 0, 10, 10], "mass"), row(None, "nodule")]))
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["all", "mass", "nodule"]


# ---------------------------------------------------------------------------------------------- pictures
def test_plot_run_draws_one_png(tmp_path, capsys):
    records = [{"step": s, "reward": 1 + s / 50, "reward/format": 0.9, "reward/spatial": s / 50, "kl": 0.001 * s,
                "clip_fraction": 0.01 * (s % 2), "completion_length": 40 - s / 10} for s in range(1, 101)]
    for r in records[49::50]:
        r.update({"eval/acc@0.5": 40.0 + r["step"] / 10, "eval/miou": 45.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluate.main(["--plot-run", str(tmp_path)]) == 0
    with Image.open(tmp_path / "curves.png") as img:
        assert img.size == (1440, 640)
        colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert set(evaluate.PALETTE[:3]) <= colours  # the three reward curves were drawn
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")  # sparse log: no crash
    assert evaluate.plot_run(tmp_path, tmp_path / "sparse.png").is_file()


def test_hits_and_misses_mix_the_best_and_the_worst():
    rows = [{"iou": v} for v in (0.1, 0.9, 0.5, 0.0, 0.7, 0.3)]
    assert evaluate.hits_and_misses(rows, 4) == [1, 3, 4, 0]
    assert sorted(evaluate.hits_and_misses(rows, 10)) == list(range(6))


def test_draw_prediction_size(tmp_path):
    path = evaluate.draw_prediction(Image.new("RGB", (300, 200)), (10, 20, 100, 150), "left effusion",
                                    tmp_path / "p.png")
    with Image.open(path) as img:
        assert img.width == 300 and img.height > 200
        assert img.getpixel((10, 80)) == evaluate.PREDICTION  # the box's left edge


# ---------------------------------------------------------------------------------------------- end to end
TINY = ["--max-pixels", "12544", "--max-new-tokens", "48"]  # keep the tiny processor's 112 x 112 input


def test_end_to_end_on_synthetic_test_split(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The tests' 20-step model writes no readable box yet, so every other answer it generates is replaced,
    after generation, by one with a known box (in the model's frame): what is checked on those rows is
    evaluate's path from an answer to the stored box."""
    real_generate = evaluate.generate_completions

    def some_answers_with_boxes(*args, **kwargs):
        rollout = real_generate(*args, **kwargs)
        known = lambda i: f"<think>x</think><answer>[{3 + i},{40 - i},{61 + 2 * i},{97 - i}]</answer>"  # noqa: E731
        rollout.texts = [known(i) if i % 2 else text for i, text in enumerate(rollout.texts)]
        return rollout

    monkeypatch.setattr(evaluate, "generate_completions", some_answers_with_boxes)
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(tiny_model_dir), "--dataset", "synthetic", "--split", "test", "--limit",
                          "8", "--batch-size", "4", "--save-vis", "4", "--output-dir", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "all" in printed and "Acc@0.5" in printed

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8
    # The stored box is the answer's box mapped from the model's frame (the processor's resized image)
    # to original pixels, rounded to 0.01 px.
    _, processor, frame = load_model(tiny_model_dir, max_pixels=12544)
    samples = {s.id: s for s in load_dataset("synthetic", "test", limit=8)}
    for r in rows:
        assert {"id", "phrase", "category", "ground_truth", "output", "box", "iou"} <= r.keys()
        s = samples[r["id"]]
        assert r["ground_truth"] == list(s.box)
        answer = parse_answer(r["output"])
        assert (r["box"] is None) == (answer is None), r
        if answer is not None:
            _, h, w = processor.image_processor(images=[s.load_image()], return_tensors="pt")["image_grid_thw"][0]
            resized = (int(w) * processor.image_processor.patch_size, int(h) * processor.image_processor.patch_size)
            assert resized != (s.width, s.height)  # the frames differ, so a box left unmapped would show
            assert r["box"] == pytest.approx(from_model_frame(answer, (s.width, s.height), resized, frame), abs=0.005)
    assert sum(r["box"] is not None for r in rows) >= 4, [r["output"] for r in rows]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["split"], metrics["model"]) == ("synthetic", "test", str(tiny_model_dir))
    assert {k: metrics[k] for k in metrics_of(rows)} == metrics_of(rows)
    assert metrics["n"] == 8 and "per_category" in metrics
    assert metrics["parse_failures"] == sum(r["box"] is None for r in rows)

    rescored, _ = load_predictions(out / "predictions.jsonl")
    assert metrics_of(rescored) == metrics_of(rows)
    with Image.open(out / "examples.png") as img:
        assert img.size == (4 * 256, 256 + 28)  # data.draw_grid: 4 columns of 256 px cells, a caption line


def test_single_image(tiny_model_dir, tmp_path, capsys):
    image = tmp_path / "cxr.png"
    Image.new("I;16", (224, 200), 3000).save(image)  # a 16-bit grayscale file, as some datasets ship
    assert evaluate.main(["--model", str(tiny_model_dir), "--image", str(image), "--phrase", "left pleural effusion",
                          "--output-dir", str(tmp_path), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "answer:" in printed and "box (original pixels" in printed
    with Image.open(tmp_path / "prediction.png") as img:
        assert img.width == 224 and img.height > 200
