"""A run never damages its inputs, trains with the settings it prints, writes every file whole, and answers bad
input with one clear line (never a traceback). Cheap: no training run here (tests/test_distributed.py resumes
real runs); checkpoints are written from a random tiny model, and the garbage tests feed seeded random bytes,
truncations, wrong JSON types and huge numbers to each loader."""
import json
import random
import shutil
import zlib
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(stop) -> str:
    """The message of a SystemExit that stops a command: one line starting with "error:"."""
    message = str(stop.value.code if isinstance(stop.value, SystemExit) else stop.value)
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message


# ================================================================================== 1. outputs apart from inputs
def fake_model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return folder


@pytest.mark.parametrize("where", ["same", "inside"])
def test_train_never_writes_into_the_model_folder(tmp_path, where):
    """`--model M --output-dir M` wrote the run's config.json over M's: the model no longer loaded."""
    import train

    model = fake_model_folder(tmp_path / "M")
    before = (model / "config.json").read_text()
    out = model if where == "same" else model / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", str(model), "--output-dir", str(out), "--max-steps", "1"])
    message = one_line_error(stop)
    assert str(out) in message and f"--model {model}" in message
    assert (model / "config.json").read_text() == before and sorted(p.name for p in model.iterdir()) == ["config.json"]


def test_every_entry_point_refuses_an_output_among_its_inputs_before_loading(tmp_path, monkeypatch):
    import data
    import evaluate
    import train

    model, root = fake_model_folder(tmp_path / "M"), tmp_path / "root"
    root.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    loaded = lambda *a, **k: pytest.fail("loaded data before checking the output")  # noqa: E731
    monkeypatch.setattr(train, "load_splits", loaded)
    monkeypatch.setattr(evaluate, "usable_samples", loaded)
    monkeypatch.setattr(data, "load_dataset", loaded)
    cases = [  # (command, argv, what the one line names)
        (train.main, ["--dataset", "jsonl", "--model", str(model), "--data-root", str(root), "--output-dir", str(root)],
         "--data-root"),
        (train.main, ["--model", str(model), "--image-root", str(root), "--output-dir", str(root)], "--image-root"),
        (train.main, ["--model", str(model), "--output-dir", str(a_file)], "is a file"),
        (train.main, ["--model", str(model), "--output-dir", str(a_file / "run")], "is not a writable folder"),
        (train.main, ["--semantic-model", str(model), "--output-dir", str(model / "x")], "--semantic-model"),
        (evaluate.main, ["--model", str(model), "--output-dir", str(model)], "--model"),
        (evaluate.main, ["--dataset", "jsonl", "--data-root", str(root), "--output-dir", str(root)], "--data-root"),
        (evaluate.main, ["--output-dir", str(a_file)], "is a file"),  # lost the whole evaluation before
        (data.main, ["--dataset", "jsonl", "--data-root", str(root), "--export", str(root / "x.jsonl")],
         "--data-root"),
        (data.main, ["--dataset", "jsonl", "--data-root", str(a_file), "--export", str(a_file)],
         "would be written over"),
    ]
    for command, argv, named in cases:
        with pytest.raises(SystemExit) as stop:
            command(argv)
        assert stop.value.code != 0
        if command is not data.main:  # (data.py's argparse prints its usage line first)
            assert named in one_line_error(stop), (argv, str(stop.value))
    assert a_file.read_text() == "x" and sorted(p.name for p in root.iterdir()) == []


# ================================================================================== 2. resume: the printed settings
@pytest.fixture(scope="module")
def tiny_parts():
    from grpo_min import tiny

    processor = tiny.build_processor()
    return tiny.build_model(processor, seed=0), processor


def optimizer_for(model, lr, weight_decay, schedule="constant", warmup=0, total=10):
    from grpo_min.optim import make_optimizer

    return make_optimizer(model.parameters(), lr=lr, weight_decay=weight_decay, fused=False, warmup_steps=warmup,
                          total_steps=total, schedule=schedule)


def write_checkpoint(out, step, model, processor, argv=(), updates=2, **optim):
    """checkpoint-<step> after ``updates`` AdamW steps on made-up gradients, with a valid trainer state."""
    import train
    from grpo_min.checkpoint import save_checkpoint

    optimizer, scheduler = optimizer_for(model, **{"lr": 1e-3, "weight_decay": 0.0, **optim})
    for _ in range(updates):
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3) if p.requires_grad else None
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    config = asdict(train.parse_config(["--model", "M", *argv]))
    state = {"config": config, "before": {"acc@0.5": 10.0, "miou": 12.0}, "data_position": 2 * step}
    return save_checkpoint(out, step, model, processor, optimizer, scheduler, state), optimizer


def test_resume_trains_with_the_new_learning_rate_weight_decay_and_schedule(tiny_parts, tmp_path):
    """The optimizer and scheduler restored from a checkpoint kept the old lr and weight decay, whatever the
    options said: now only AdamW's moments and the schedule's position come from the checkpoint."""
    from grpo_min.checkpoint import load_checkpoint
    from grpo_min.optim import lr_factor

    model, processor = tiny_parts
    path, saved = write_checkpoint(tmp_path, 2, model, processor, lr=1e-3, weight_decay=0.0)
    optimizer, scheduler = optimizer_for(model, lr=5e-3, weight_decay=0.1, schedule="cosine", warmup=1, total=10)
    load_checkpoint(path, model, optimizer, scheduler)
    expected = 5e-3 * lr_factor(2, 1, 10, "cosine")
    assert [g["lr"] for g in optimizer.param_groups] == [expected, expected] == scheduler.get_last_lr()
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # (matrices only)
    moments = lambda opt: [s["exp_avg"] for s in opt.state.values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(moments(saved), moments(optimizer))) and len(optimizer.state)
    scheduler.step()  # the new schedule goes on from the checkpoint's position
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 * lr_factor(3, 1, 10, "cosine"), rel=1e-12)


def test_a_resume_that_trains_other_parameters_is_refused_in_one_line(tiny_parts, tmp_path, monkeypatch):
    """--freeze-vision changed on resume (or a real dataset, which drops the demo preset's) ended in
    "Missing optimizer state" as a traceback."""
    import train
    from grpo_min.checkpoint import CheckpointError, load_checkpoint

    model, processor = tiny_parts
    path, _ = write_checkpoint(tmp_path / "run", 2, model, processor)
    monkeypatch.setattr(train, "load_splits", lambda *a, **k: pytest.fail("loaded data"))
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", "M", "--freeze-vision", "--resume", str(path), "--output-dir", str(tmp_path / "o")])
    assert "--freeze-vision was False, now True" in one_line_error(stop)
    # a changed set found only once the model is built (say, another model): one line too, nothing loaded
    model.model.visual.requires_grad_(False)
    try:
        optimizer, scheduler = optimizer_for(model, lr=1e-3, weight_decay=0.0)
        with pytest.raises(CheckpointError, match=r"trained \d+ parameter tensors, this run trains \d+"):
            load_checkpoint(path, model, optimizer, scheduler)
        assert not optimizer.state
    finally:
        model.requires_grad_(True)


# ================================================================================== 3. files whole
def test_a_failed_metrics_rewrite_on_resume_keeps_every_line(tmp_path, monkeypatch):
    """On resume metrics.jsonl was emptied and then rewritten: a write cut short (a full disk, `ulimit -f`) lost the
    lines for good. Now the old file stays whole until the new one is complete."""
    import builtins
    import io

    from grpo_min.checkpoint import MetricsLog

    lines = "".join(json.dumps({"step": s, "pad": "x" * 1000}) + "\n" for s in range(1, 5))
    (tmp_path / "metrics.jsonl").write_text(lines)
    real_open = io.open

    class FullDisk:  # a file that takes 2,000 bytes, then fails as a full disk does
        def __init__(self, f):
            self.f, self.left = f, 2000

        def write(self, text):
            self.f.write(text[:self.left])
            self.left -= min(self.left, len(text))
            if self.left == 0:
                raise OSError(28, "No space left on device")
            return len(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def failing_open(file, mode="r", *args, **kw):
        f = real_open(file, mode, *args, **kw)
        return FullDisk(f) if "w" in mode else f

    monkeypatch.setattr(io, "open", failing_open)  # (pathlib's write_text and the builtin open both)
    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(OSError, match="No space left"):
        MetricsLog(tmp_path, 3)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == lines  # all four lines, not two of them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_a_failed_final_save_leaves_no_folder_that_looks_like_a_model(tiny_parts, tmp_path, monkeypatch):
    """final/ was written in place: a failed save left config.json without weights (a raw OSError later)."""
    from grpo_min import checkpoint

    model, processor = tiny_parts

    def config_then_full_disk(folder, *args):
        (Path(folder) / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_model", config_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_model(tmp_path / "final", model, processor)
    assert list(tmp_path.iterdir()) == []


# ================================================================================== 4. checkpoints: checksums, state
def test_a_damaged_checkpoint_is_named_and_resume_auto_falls_back(tiny_parts, tmp_path, capsys):
    """Checkpoint files had no checksum: flipped bytes resumed, then crashed on NaN."""
    from grpo_min.checkpoint import CheckpointError, complete_checkpoints, resume_checkpoint

    model, processor = tiny_parts
    for step in (2, 4):
        write_checkpoint(tmp_path, step, model, processor)
    optimizer_file = tmp_path / "checkpoint-4" / "optimizer.pt"
    data = bytearray(optimizer_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still a loadable file, wrong numbers
    optimizer_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checkpoint-4: optimizer.pt does not match its checksum"):
        resume_checkpoint(str(tmp_path / "checkpoint-4"), tmp_path)  # a folder given by path: refused
    path, state = resume_checkpoint("auto", tmp_path)
    assert path == tmp_path / "checkpoint-2" and state["step"] == 2
    assert "optimizer.pt does not match its checksum (changed or damaged since it was written); falling back to the " \
           "previous checkpoint" in capsys.readouterr().out
    # set aside, so that neither pruning nor the next --resume auto takes it for the latest
    assert complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    assert (tmp_path / "checkpoint-4.corrupt" / "optimizer.pt").exists()
    (tmp_path / "checkpoint-2" / "model.safetensors").unlink()  # the last one damaged too: one line, no fallback
    with pytest.raises(CheckpointError, match="checkpoint-2: model.safetensors is missing"):
        resume_checkpoint("auto", tmp_path)


BAD_STATES = [  # (trainer_state.json, what the line says)
    ({}, "no 'step'"), ([], "expected a JSON object, got list"), ("step", "expected a JSON object, got str"),
    ({"step": "2"}, "'step' is \"2\""), ({"step": -1}, "'step' is -1"), ({"step": True}, "'step' is true"),
    ({"step": 2.5}, "'step' is 2.5"),
    ({"step": 10**9, "config": {}, "before": {"acc@0.5": 1, "miou": 2}}, "but the folder is checkpoint-2"),
    ({"step": 2}, "no 'config'"), ({"step": 2, "config": []}, "'config' is []"),
    ({"step": 2, "config": {}}, "no 'before'"), ({"step": 2, "config": {}, "before": {"acc@0.5": 1}}, "'before'"),
    ({"step": 2, "config": {}, "before": {"acc@0.5": 1, "miou": None}}, "'before'"),
    ({"step": 2, "config": {}, "before": {"acc@0.5": 1, "miou": 2}, "data_position": -4}, "'data_position' is -4"),
    ({"step": 2, "config": {}, "before": {"acc@0.5": 1, "miou": 2}, "world_size": 0}, "'world_size' is 0"),
]


@pytest.mark.parametrize("state, message", BAD_STATES, ids=range(len(BAD_STATES)))
def test_trainer_state_is_validated_field_by_field(state, message, tmp_path):
    """`{}`, `[]`, a missing key or a wrong type ended in tracebacks (one only after final/ was written);
    a step of 1e9 silently trained nothing and exited 0."""
    from grpo_min.checkpoint import CheckpointError, validate_trainer_state

    with pytest.raises(CheckpointError) as stop:
        validate_trainer_state(state, tmp_path / "checkpoint-2")
    assert message in one_line_error(stop) and "checkpoint-2/trainer_state.json" in str(stop.value)


def test_a_checkpoint_past_the_end_of_the_run_is_refused(tiny_parts, tmp_path):
    import train

    model, processor = tiny_parts
    path, _ = write_checkpoint(tmp_path / "run", 9, model, processor)
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", "M", "--max-steps", "4", "--resume", str(path), "--output-dir", str(tmp_path / "o")])
    assert "at step 9, past the end of this run (4 steps)" in one_line_error(stop)


# ================================================================================== 5. model folders
@pytest.fixture(scope="module")
def saved_tiny(tiny_parts, tmp_path_factory):
    """A plain save_pretrained folder of the random tiny model, and an adapter folder on it."""
    from grpo_min import lora

    model, processor = tiny_parts
    folder = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    adapter = folder.with_name("adapter")
    adapted = type(model)(model.config)
    lora.add_lora(adapted, r=2, lora_alpha=4)
    lora.save_adapter(adapter, adapted, str(folder))
    return folder, adapter


def damaged(folder: Path, tmp_path: Path, how) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    how(copy)
    return copy


def edit_json(name, change):
    def how(folder):
        value = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(change(value)))
    return how


def truncate(name):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:200])


MODEL_FOLDER_DAMAGE = {  # how -> what the one line says
    "config.json a list": (lambda f: (f / "config.json").write_text("[]"), "expected a JSON object, got list"),
    "config.json cut off": (truncate("config.json"), "not a readable JSON file"),
    "config.json not UTF-8": (lambda f: (f / "config.json").write_bytes(b'{"model_type": "\xff"}'),
                              "not a readable JSON file"),
    "config.json deeply nested": (lambda f: (f / "config.json").write_text("[" * 100000), "not a readable JSON file"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "cannot load the model"),
    "weights cut off": (truncate("model.safetensors"), "cannot load the model"),
    "no tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                     "tokenizer does not know the model's image token"),  # (transformers makes an empty one)
    "no image processor": (lambda f: [p.unlink() for p in f.glob("*processor*.json")], "cannot load the model"),
    "config of the wrong shape": (edit_json("config.json", lambda c: {**c, "text_config": 7}), "cannot load the model"),
}
ADAPTER_DAMAGE = {
    "no base_model_name_or_path": (edit_json("adapter_config.json", lambda c: {k: v for k, v in c.items()
                                                                             if k != "base_model_name_or_path"}),
                                   "no base_model_name_or_path"),
    "base not a string": (edit_json("adapter_config.json", lambda c: {**c, "base_model_name_or_path": 3}),
                          "no base_model_name_or_path"),
    "r a string": (edit_json("adapter_config.json", lambda c: {**c, "r": "2"}), "expected r (a whole number"),
    "alpha NaN": (edit_json("adapter_config.json", lambda c: {**c, "lora_alpha": float("nan")}), "lora_alpha"),
    "adapter_config.json a list": (lambda f: (f / "adapter_config.json").write_text("[1]"), "expected a JSON object"),
    "target_modules a number": (edit_json("adapter_config.json", lambda c: {**c, "target_modules": 5}),
                                "expected target_modules as a list"),
    "no adapter weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "adapter weights cut off": (truncate("adapter_model.safetensors"), "cannot load the model"),
}


@pytest.mark.parametrize("damage", list(MODEL_FOLDER_DAMAGE) + list(ADAPTER_DAMAGE))
def test_a_damaged_model_folder_is_one_line_naming_it(damage, saved_tiny, tmp_path):
    """A config.json that is a list, missing or cut-off weights, missing processor files, an adapter without
    base_model_name_or_path: tracebacks before, from resolving or loading the model."""
    from grpo_min.files import InputError
    from grpo_min.models import load_model, resolve_model_path

    plain, adapter = saved_tiny
    how, message = MODEL_FOLDER_DAMAGE.get(damage) or ADAPTER_DAMAGE[damage]
    folder = damaged(plain if damage in MODEL_FOLDER_DAMAGE else adapter, tmp_path, how)
    with pytest.raises(InputError) as stop:
        load_model(resolve_model_path(str(folder)))
    assert message in one_line_error(stop) and str(folder) in str(stop.value)


def test_evaluate_and_train_stop_in_one_line_on_a_folder_without_weights(saved_tiny, tmp_path):
    """final/ cut off before its weights met evaluate.py and train.py with a raw OSError."""
    import evaluate
    import train

    folder = damaged(saved_tiny[0], tmp_path, lambda f: (f / "model.safetensors").unlink())
    for command, argv in ((evaluate.main, ["--model", str(folder), "--limit", "1",
                                           "--output-dir", str(tmp_path / "e")]),
                          (train.main, ["--model", str(folder), "--semantic-model", "none", "--eval-steps", "0",
                                        "--output-dir", str(tmp_path / "t")])):
        with pytest.raises(SystemExit) as stop:
            command(argv)
        assert one_line_error(stop).startswith(f"error: {folder}: cannot load the model (OSError")


# ================================================================================== 6. data: named rows, garbage
def jsonl_root(tmp_path, lines: list) -> Path:
    """A jsonl data root whose train.jsonl holds one good row and then ``lines`` (bytes or JSON values)."""
    from tests.fixtures import write_jsonl_fixture

    root = write_jsonl_fixture(tmp_path)
    good = (root / "train.jsonl").read_bytes().splitlines()[0]
    body = [good] + [l if isinstance(l, bytes) else json.dumps(l).encode() for l in lines]
    (root / "train.jsonl").write_bytes(b"\n".join(body) + b"\n")
    return root


def row(**change):
    return {"image": "img/0.png", "text": "made-up phrase", "box": [5, 6, 30, 40], "width": 64, "height": 48, **change}


def test_each_kind_of_bad_row_is_skipped_and_counted_with_its_line(tmp_path, monkeypatch):
    """Each of these stopped the whole load with a traceback."""
    import data
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (300, 300)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 3)  # (PIL's own is 89 M pixels: it refuses twice that)
    cases = {  # line -> (what it holds, the reason it is skipped for)
        2: (row(text="caf\udcff"), None),  # (replaced below by raw bytes)
        3: (row(box=[10**400, 6, 30, 40]), "unparseable number"),
        4: (row(image="img/\u0000.png", width=None), "image unreadable (and no width/height given)"),
        5: (row(image="~nobody_such_user/a.png"), "malformed entry"),
        6: (None, "not valid JSON"),
        7: (row(image=str(bomb), width=None), "image unreadable (and no width/height given)"),
        8: (row(text="x" * 200_000, box=[1e308, 1e308, 1e308, 1e308]), "box of zero or negative size"),
    }
    lines = [json.dumps(v).encode() for v, _ in cases.values()]
    lines[0] = json.dumps(row(text="caf")).encode().replace(b"caf", b"caf\xff")  # one byte that is not UTF-8
    lines[4] = b"[" * 100_000 + b"]" * 100_000  # nested too deeply for the JSON parser (RecursionError)
    root = jsonl_root(tmp_path / "d", lines + [json.dumps(row(text="\udcff")).encode()])  # (a JSON escape of one)
    ds = data.load_dataset("jsonl", "train", data_root=root)
    expected = {"not UTF-8 text": 2, "unparseable number": 1, "image unreadable (and no width/height given)": 2,
                "malformed entry": 1, "not valid JSON": 1, "box of zero or negative size": 1}
    assert len(ds) == 1 and dict(ds.skipped.counts) == expected
    assert ds.skipped.examples[0].startswith("train.jsonl line 2: not UTF-8 text")
    assert ds.skipped.examples[3].startswith("train.jsonl line 5: malformed entry (RuntimeError")  # ~nobody_such_user
    good, report = data.check_images(ds)
    assert len(good) == 1


def test_csv_rows_with_bad_bytes_or_huge_fields_are_skipped(tmp_path):
    import data
    from tests.fixtures import write_chestxray8_fixture

    root = write_chestxray8_fixture(tmp_path)
    file = root / "BBox_List_2017.csv"

    def skipped():
        counts = {}
        for split in ("train", "val", "test"):
            for reason, count in data.load_dataset("chestx-ray8", split, data_root=root).skipped.counts.items():
                counts[reason] = counts.get(reason, 0) + count
        return counts

    before = skipped()
    lines = file.read_bytes().splitlines() + [
        b"00000001_000.png,Mass\xff,10,10,50,50", b"00000001_000.png,Mass," + b"9" * 400 + b",10,50,50",
        b"00000001_000.png,Mass," + b"1" * 140_000 + b",10,50,50"]  # a field over the csv module's 128 KiB
    file.write_bytes(b"\n".join(lines) + b"\n")
    after = skipped()
    assert {k: after[k] - before.get(k, 0) for k in after} == {"not UTF-8 text": 1, "unparseable number": 2}


def test_empty_or_null_m3d_descriptions_are_skipped_not_phrases(tmp_path):
    """M3D-RefSeg descriptions "" or null became the phrases "" and "None"."""
    import data
    from tests.fixtures import write_m3d_fixture

    root = write_m3d_fixture(tmp_path, fmt="npy")
    for case in ("s0001", "s0002"):
        (root / "M3D_RefSeg" / case / "text.json").write_text(json.dumps({"1": "", "2": None}))
    ds = data.load_dataset("m3d-refseg", "train", data_root=root, cache_dir=tmp_path / "cache")
    assert all(s.text.strip() and s.text != "None" for s in ds)
    assert ds.skipped.counts["empty phrase"] >= 1  # (the cases of the train split among s0001, s0002)


# ---------------------------------------------------------------------------------- property-style: garbage in
NASTY_TEXT = [b"\xff\xfe", b"9" * 400, b"-1e999", b"nan", b"\x00", b"~nobody_such_user/a.png", b"x" * 140_000,
              b"[" * 50_000, b'"', b"", b"null", b"\\udcff", b",,,,,,,,", b"\r", b"\xef\xbb\xbf"]
NASTY_JSON = [None, [], {}, "", "\u0000", "~nobody_such_user/a.png", 10**400, -(10**400), 1e308, -1, True, "nan",
              "\udcff", "x" * 140_000, [[1, 2], [3]], {"bbox_2d": "a"}, [None] * 4, "DEEP"]


def mutations(text: bytes, seed: int, count: int, structured: bool):
    """``count`` seeded damaged versions of a file: random bytes, truncations, nasty lines or fields, and (for a
    JSON file, ``structured``) one node of the document replaced by a value of another type or size."""
    rng = random.Random(seed)
    lines = text.splitlines()
    for k in range(count):
        kind = k % (5 if structured else 4)
        if kind == 0:  # random bytes at random places
            out = bytearray(text)
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] = rng.randrange(256)
            yield bytes(out)
        elif kind == 1:  # cut off
            yield text[:rng.randrange(len(text))]
        elif kind == 2:  # one line replaced by a nasty one
            changed = list(lines)
            changed[rng.randrange(len(changed))] = rng.choice(NASTY_TEXT)
            yield b"\n".join(changed)
        elif kind == 3:  # one comma-separated field of one line replaced
            changed = list(lines)
            i = rng.randrange(len(changed))
            fields = changed[i].split(b",")
            fields[rng.randrange(len(fields))] = rng.choice(NASTY_TEXT)
            changed[i] = b",".join(fields)
            yield b"\n".join(changed)
        else:  # a node of the JSON document (each line, for JSONL) replaced by a value of another kind
            docs = [json.loads(l) for l in lines] if len(lines) > 1 else [json.loads(text)]
            d = rng.randrange(len(docs))
            nodes = list(walk(docs[d]))
            value = rng.choice(NASTY_JSON)
            parent, key = rng.choice(nodes) if nodes else (None, None)
            if parent is None:
                docs[d] = value
            else:
                parent[key] = value
            raw = [json.dumps(doc).encode() for doc in docs]
            yield (b"\n".join(raw) if len(lines) > 1 else raw[0]).replace(b'"DEEP"', b"[" * 50_000 + b"]" * 50_000)


def walk(node):
    """(container, key) of every value below ``node``."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield node, key
        yield from walk(value)


def skipped_or_one_line(load, expected_errors):
    """Run ``load``: either it returns (and what it returns is well-formed, which the caller checks) or it raises one
    of ``expected_errors`` with a one-line message. Anything else, a traceback, fails the test."""
    try:
        return load()
    except expected_errors as e:
        message = str(e)
        assert message and "\n" not in message.strip(), message
        return None


DATASET_FILES = {  # loader -> (fixture writer, the annotation file damaged, load_dataset's keywords, JSON?)
    "ms-cxr csv": ("ms-cxr", lambda r: _ms_cxr(r, "csv"), "ms-cxr/MS_CXR_Local_Alignment_v1.1.0.csv", False),
    "ms-cxr json": ("ms-cxr", lambda r: _ms_cxr(r, "json"), "ms-cxr/MS_CXR_Local_Alignment_v1.1.0.json", True),
    "medrpg json": ("medrpg", lambda r: _fixture("write_medrpg_fixture", r, fmt="json"), "data/MS_CXR/train.json",
                    True),
    "chestx-ray8": ("chestx-ray8", lambda r: _fixture("write_chestxray8_fixture", r), "BBox_List_2017.csv", False),
    "jsonl": ("jsonl", lambda r: _fixture("write_jsonl_fixture", r), "train.jsonl", True),
    "m3d-refseg csv": ("m3d-refseg", lambda r: _fixture("write_m3d_fixture", r, fmt="npy"), "M3D_RefSeg_train.csv",
                       False),
    "m3d-refseg text.json": ("m3d-refseg", lambda r: _fixture("write_m3d_fixture", r, fmt="npy"),
                             "M3D_RefSeg/s0001/text.json", True),
}


def _fixture(name, root, **kw):
    import tests.fixtures

    getattr(tests.fixtures, name)(root, **kw)
    return {"data_root": root}


def _ms_cxr(root, fmt):
    from tests.fixtures import write_ms_cxr_fixture

    data_root, image_root = write_ms_cxr_fixture(root, fmt=fmt)
    if fmt == "json":
        (data_root / "MS_CXR_Local_Alignment_v1.1.0.csv").unlink(missing_ok=True)
    return {"data_root": data_root, "image_root": image_root}


def well_formed(ds):
    import math

    import data

    for s in ds:
        assert isinstance(s.text, str) and s.text.strip() and s.text != "None"
        assert len(s.box) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in s.box)
        assert s.box[0] < s.box[2] and s.box[1] < s.box[3] and s.width > 0 and s.height > 0
        s.text.encode("utf-8")  # printable: no lone surrogate
    data.check_images(list(ds)[:1])  # and nothing downstream trips on what was kept


@pytest.mark.parametrize("loader", list(DATASET_FILES))
def test_every_dataset_loader_skips_or_names_garbage_never_a_traceback(loader, tmp_path):
    import data

    name, write, relative, structured = DATASET_FILES[loader]
    root = tmp_path / "d"
    kw = write(root)
    file = root / relative if not relative.startswith("ms-cxr/") else kw["data_root"] / Path(relative).name
    original = file.read_bytes()
    cache = {"cache_dir": tmp_path / "cache"} if name == "m3d-refseg" else {}
    loaded = 0
    for garbage in mutations(original, seed=zlib.crc32(loader.encode()), count=24, structured=structured):
        file.write_bytes(garbage)
        ds = skipped_or_one_line(lambda: data.load_dataset(name, "train", **kw, **cache), data.DatasetError)
        if ds is not None:
            well_formed(ds)
            loaded += 1
    assert loaded >= 3  # (damage to a row spoils that row, not the whole file: the rest still loads)
    file.write_bytes(original)
    assert len(data.load_dataset(name, "train", **kw, **cache)) > 0  # (the fixture itself loads)


def test_medrpg_pth_garbage_is_skipped_or_named(tmp_path):
    """MedRPG's .pth lists: damaged bytes (refused by torch.load: one line) or entries of the wrong kind (skipped)."""
    import data
    from tests.fixtures import write_medrpg_fixture

    root = write_medrpg_fixture(tmp_path / "d")
    file = root / "data" / "MS_CXR" / "MS_CXR_train.pth"
    original, entries = file.read_bytes(), [list(e) for e in torch.load(file, weights_only=True)]
    rng, loaded = random.Random(5), 0
    for k, garbage in enumerate(mutations(original, seed=5, count=8, structured=False)):
        if k % 4 >= 2:  # (line and field edits mean nothing in a zip file: replace a node of the entries instead)
            changed = json.loads(json.dumps([[list(v) if isinstance(v, tuple) else v for v in e] for e in entries]))
            parent, key = rng.choice(list(walk(changed)))
            parent[key] = rng.choice([v for v in NASTY_JSON if v != "DEEP"])
            torch.save(changed, file)
        else:
            file.write_bytes(garbage)
        ds = skipped_or_one_line(lambda: data.load_dataset("medrpg", "train", data_root=root), data.DatasetError)
        if ds is not None:
            well_formed(ds)
            loaded += 1
    assert loaded >= 2


def _predictions_file(folder: Path) -> Path:
    rows = [{"id": str(k), "phrase": "mass", "category": "c", "ground_truth": [10, 20, 30 + k, 40], "output": "x",
             "box": [12, 20, 30, 40 + k], "iou": 0.5} for k in range(6)]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "predictions.jsonl"


def _log_file(folder: Path) -> Path:
    log = {"results": [{"question": "mass", "ground_truth": [[10, 20, 30 + k, 40]], "model_output":
                        f"<answer>[10, 20, 30, {40 + k}]</answer>"} for k in range(6)]}
    (folder / "log.json").write_text(json.dumps(log))
    return folder / "log.json"


def _metrics_jsonl(folder: Path) -> Path:
    lines = [{"step": s, "reward": 0.1 * s, "kl": 0.01, "eval/acc@0.5": 3.0, "grad_norm": 1.0} for s in range(1, 7)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "summary.json").write_text(json.dumps({"before": {"acc@0.5": 1, "miou": 2},
                                                     "after": {"acc@0.5": 3, "miou": 4}}))
    return folder / "metrics.jsonl"


def _metrics_json(folder: Path) -> Path:
    (folder / "metrics.json").write_text(json.dumps({"n": 6, "parse_failures": 0, "acc@0.3": 1.0, "acc@0.5": 2.0,
                                                     "acc@0.7": 3.0, "miou": 4.0}))
    return folder / "metrics.json"


def _trainer_state(folder: Path) -> Path:
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(
        {"step": 2, "config": {"seed": 0}, "before": {"acc@0.5": 1.0, "miou": 2.0}, "data_position": 4,
         "world_size": 1}))
    return folder / "checkpoint-2" / "trainer_state.json"


def _model_config(folder: Path) -> Path:
    (folder / "m").mkdir()
    (folder / "m" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "text_config": {"a": 1}}))
    return folder / "m" / "config.json"


def _adapter_config(folder: Path) -> Path:
    (folder / "m").mkdir()
    _model_config(folder / "m")
    (folder / "a").mkdir()
    (folder / "a" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path":
         str(folder / "m" / "m")}))
    return folder / "a" / "adapter_config.json"


def _read_predictions(file):
    import evaluate

    rows, _ = evaluate.load_predictions(file)
    evaluate.metrics_of(rows)
    assert all(0 <= r["iou"] <= 1 for r in rows)


def _plot(file):
    import evaluate

    evaluate.plot_run(file.parent, file.parent / "curves.png")


def _compare(file):
    import evaluate

    evaluate.compare_table([file])


def _state(file):
    from grpo_min.checkpoint import read_trainer_state

    read_trainer_state(file.parent)


def _resolve(file):
    from grpo_min.models import resolve_model_path

    resolve_model_path(str(file.parent))


def _resume_log(file):
    from grpo_min.checkpoint import MetricsLog

    MetricsLog(file.parent, 3).file.close()  # never fails on its content: unreadable lines count as after step 3


def _errors(*names):
    def get():
        from grpo_min.files import InputError

        return tuple({"ValueError": ValueError, "InputError": InputError,
                      "CheckpointError": __import__("grpo_min.checkpoint").checkpoint.CheckpointError}[n]
                     for n in names)
    return get


OTHER_LOADERS = {  # name -> (writes a good file, reads it, the errors that are one clear line, JSON document?)
    "predictions.jsonl": (_predictions_file, _read_predictions, _errors("ValueError"), True),
    "MedGround-R1 log": (_log_file, _read_predictions, _errors("ValueError"), True),
    "metrics.jsonl (--plot-run)": (_metrics_jsonl, _plot, _errors("ValueError"), True),
    "metrics.json (--compare)": (_metrics_json, _compare, _errors("ValueError"), True),
    "trainer_state.json": (_trainer_state, _state, _errors("CheckpointError"), True),
    "model config.json": (_model_config, _resolve, _errors("InputError"), True),
    "adapter_config.json": (_adapter_config, _resolve, _errors("InputError"), True),
    "metrics.jsonl (resume)": (_metrics_jsonl, _resume_log, _errors(), True),
}


@pytest.mark.parametrize("loader", list(OTHER_LOADERS))
def test_every_other_loader_answers_garbage_with_one_line_never_a_traceback(loader, tmp_path):
    """Prediction files, metrics files, checkpoint trainer state, model and adapter configs: seeded garbage."""
    write, read, errors, structured = OTHER_LOADERS[loader]
    file = write(tmp_path)
    original = file.read_bytes()
    read(file)  # (the good file reads)
    for garbage in mutations(original, seed=zlib.crc32(loader.encode()), count=24, structured=structured):
        file.write_bytes(garbage)
        skipped_or_one_line(lambda: read(file), errors() or ())


# ================================================================================== 7. dropout
def test_dropout_is_off_in_every_pass_so_the_first_update_has_ratio_one(saved_tiny, tmp_path, monkeypatch):
    """Dropout in training mode drew a new mask in the old-policy and the policy passes: with --num-iterations 2
    the ratio differed from 1 on the first update and tokens were clipped for no reason. The policy passes run in
    training mode here, on a model whose attention and adapters both have dropout 0.5."""
    import train
    from grpo_min import lora

    folder = damaged(saved_tiny[0], tmp_path, edit_json("config.json", lambda c: {
        **c, "text_config": {**c["text_config"], "attention_dropout": 0.5},
        "vision_config": {**c.get("vision_config", {}), "attention_dropout": 0.5}}))
    real_add_lora, real_loss, seen = lora.add_lora, train.grpo_loss, []
    monkeypatch.setattr(lora, "add_lora", lambda *a, **k: real_add_lora(*a, **{**k, "lora_dropout": 0.5}))

    def loss(logps, old, *args, **kw):
        seen.append((logps.detach().clone(), old.clone()))
        return real_loss(logps, old, *args, **kw)

    monkeypatch.setattr(train, "grpo_loss", loss)
    train.main(["--model", str(folder), "--lora-r", "4", "--max-steps", "1", "--num-iterations", "2",
                "--batch-size", "2", "--num-generations", "4", "--max-completion-length", "8", "--eval-steps", "0",
                "--eval-limit", "1", "--semantic-model", "none", "--output-dir", str(tmp_path / "run")])
    [(logps, old)] = seen
    assert torch.equal(logps, old)  # (logps - old).exp() == 1: nothing to clip on the first update
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["clip_fraction"] == 0.0


# ================================================================================== 8. evaluate.py's inputs
def test_evaluate_refuses_empty_or_inconsistent_inputs_in_one_line(tmp_path, capsys):
    """An empty predictions file wrote a table of zeros and exited 0; a ground-truth box given as a list was
    neither ordered nor checked; --plot-run failed on the cut-off last line a crash leaves; --compare and
    --image inputs were unguarded."""
    import evaluate

    out = ["--output-dir", str(tmp_path / "out")]
    (tmp_path / "empty.jsonl").write_text("\n")
    cases = [(["--predictions", str(tmp_path / "empty.jsonl")], "no prediction records")]
    (tmp_path / "flat.jsonl").write_text(json.dumps({"ground_truth": [10, 20, 10, 40], "box": [10, 20, 30, 40]}))
    cases.append((["--predictions", str(tmp_path / "flat.jsonl")],
                  "ground-truth box [10.0, 20.0, 10.0, 40.0] has zero area"))
    (tmp_path / "m.json").write_bytes(b'{"n": 3, "miou": "\xff"}')
    cases.append((["--compare", str(tmp_path / "m.json")], "not a readable JSON file"))
    (tmp_path / "list.json").write_text("[1, 2]")
    cases.append((["--compare", str(tmp_path / "list.json")], "expected an object of numbers"))
    (tmp_path / "x.png").write_bytes(b"\x89PNG not really")
    cases.append((["--image", str(tmp_path / "x.png"), "--phrase", "mass"], "not a readable image"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "rew')
    cases.append((["--plot-run", str(tmp_path / "run")], "no readable metrics line"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            evaluate.main(argv + out)
        assert message in one_line_error(stop), argv
    assert not (tmp_path / "out").exists()  # nothing written for a refused input
    # an inverted box is ordered, as the same box in text is; a crash's cut-off last line is skipped and counted
    inverted = tmp_path / "inverted.jsonl"
    inverted.write_text(json.dumps({"ground_truth": [30, 40, 10, 20], "box": [10, 20, 30, 40]}) + "\n" +
                        json.dumps({"ground_truth": "[30, 40, 10, 20]", "box": [10, 20, 30, 40]}) + "\n")
    rows, _ = evaluate.load_predictions(inverted)
    assert [r["iou"] for r in rows] == [1.0, 1.0]
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "rew')
    assert evaluate.main(["--plot-run", str(tmp_path / "run")]) == 0
    assert "skipped 1 unreadable line(s) (line 2" in capsys.readouterr().out
    assert (tmp_path / "run" / "curves.png").is_file()
