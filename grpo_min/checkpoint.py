"""Checkpoints, resume and preemption: what lets a run be interrupted anywhere and continue exactly.

``<output-dir>/checkpoint-<step>/`` holds:

* the policy as a ``save_pretrained`` folder (safetensors) with its processor: plain transformers
  loads it; for a LoRA run, the adapter instead (``adapter_config.json``, ``adapter_model.safetensors``:
  peft's layout, which ``peft.PeftModel.from_pretrained(base, folder)`` and ``load_model`` read);
* ``optimizer.pt`` and ``scheduler.pt``: tensors and plain Python values only, so they load with
  ``torch.load(..., weights_only=True)`` (no unpickling of arbitrary objects);
* ``rng_state_rank<r>.pt``: every rank's torch (and CUDA) generator state, likewise;
* ``trainer_state.json``: the step, the data position (the data order is a function of the step),
  the run's config and the metrics needed at the end;
* ``COMPLETE``: written last; it holds the SHA-256 of every other file. A checkpoint is first written
  under ``checkpoint-<step>.tmp`` and renamed once complete, so a crash mid-write never leaves a folder
  that looks finished, and a resume that finds a file changed since (flipped bytes, a truncated copy)
  names it and falls back to the previous complete checkpoint (``resume_checkpoint``).

Model and optimizer states go through ``torch.distributed.checkpoint.state_dict`` with full
(unsharded) state dicts, so the same code serves one process, DDP and FSDP2. A LoRA run gathers and
saves its adapters only: the frozen base is the --model folder, never written again.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import shutil
import signal
import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from grpo_min import dist, lora
from grpo_min.files import InputError, atomic_folder, brief, write_text
from grpo_min.metrics import Reporter
from grpo_min.models import load_model

MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(InputError):
    """A checkpoint or output folder the run refuses; the message says what to do."""


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, model, processor, optimizer, scheduler, trainer_state: dict,
                    save_total_limit: int | None = None, base_model: str | Path | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically (all ranks call this; rank 0 writes the shared files).

    ``base_model``: the folder a LoRA model's base came from (its adapter_config.json names it)."""
    final = Path(out_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state = gather_model_state(model)
    optim_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))
    torch.save(rng_state(), tmp / f"rng_state_rank{dist.rank()}.pt")
    if dist.is_main():
        write_model(tmp, model, model_state, base_model)
        processor.save_pretrained(tmp)
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step,
                                                            "world_size": dist.world_size()}, indent=1))
    dist.barrier()
    if dist.is_main():
        write_text(tmp / MARKER, json.dumps({"sha256": checksums(tmp)}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if save_total_limit:  # the newest others, up to the limit, stay; the one just written always does
            others = [p for p in complete_checkpoints(out_dir) if p != final]
            for old in others[:max(0, len(others) - (save_total_limit - 1))]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def save_model(folder: Path, model, processor, base_model: str | Path | None = None, merge: bool = False):
    """The final model, with its processor (all ranks call: FSDP gathers the shards).

    A plain ``save_pretrained`` folder; for a LoRA model its adapter (on ``base_model``), or with
    ``merge`` a plain folder of the base with the adapters folded in: rank 0 loads the base afresh in
    float32 and merges there, so the same code serves one process, DDP and FSDP2 (whose live weights
    are sharded), and a bfloat16 training base costs the merge no precision.
    """
    state = gather_model_state(model)
    if dist.is_main():
        with atomic_folder(folder) as tmp:  # whole or not at all: never a config.json without its weights
            if merge:
                with tempfile.TemporaryDirectory() as adapter:
                    write_model(adapter, model, state, base_model)
                    merged, _, _ = load_model(adapter, merge_adapter=True)  # float32, on the CPU
                merged.save_pretrained(tmp)
            else:
                write_model(tmp, model, state, base_model)
            processor.save_pretrained(tmp)
    dist.barrier()


def gather_model_state(model) -> dict:
    """The model's full (unsharded) state dict on the CPU, or a LoRA model's adapters alone (all ranks call:
    a collective under FSDP)."""
    if hasattr(model, "reshard"):  # FSDP2: after a forward-only pass (generate) the root stays unsharded,
        model.reshard()            # and the optimizer knows only the sharded parameters
    adapters_only = bool(lora.lora_layers(dist.unwrap(model)))  # the frozen base is --model's, unchanged
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=adapters_only))


def write_model(folder, model, state: dict, base_model: str | Path | None):
    """Rank 0: a LoRA model's adapter in peft's layout, or else a plain ``save_pretrained`` folder."""
    if lora.lora_layers(dist.unwrap(model)):
        if base_model is None:
            raise ValueError("saving a LoRA model needs base_model, the folder its base was loaded from")
        lora.save_adapter(folder, dist.unwrap(model), base_model, state_dict=state)
    else:
        dist.unwrap(model).save_pretrained(folder, state_dict=state)


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoints in ``out_dir``, oldest first (half-written ``.tmp`` folders are ignored)."""
    found = [p for p in Path(out_dir).glob("checkpoint-*") if _NAME.match(p.name) and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


RUN_OUTPUTS = ("final", "summary.json", "metrics.jsonl", "completions", "tensorboard", "wandb")  # and checkpoint-*


def check_output_dir(out_dir: Path, resume_path: Path | None, resume_step: int | None = None,
                     overwrite: bool = False, resume_auto: bool = False, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Refuse to mix two runs in one folder, before anything loads; return what ``--overwrite`` deletes.

    A fresh run would replace an earlier run's results, and pruning and ``--resume auto`` go by step
    number: next to an earlier run's ``checkpoint-300``, a new ``checkpoint-50`` would be pruned at
    once and ``--resume auto`` would continue the other run. A run resumed from a checkpoint of
    another folder counts as new here. The caller deletes the returned paths (``delete_outputs``)
    only once every other input is checked; ``keep`` (the model and checkpoint to load) must not be
    among them. With ``resume_auto`` and no complete checkpoint, what a run interrupted before its
    first checkpoint leaves (``checkpoint-*.tmp``, ``metrics.jsonl``, ``completions``) is that run's
    own: it is deleted and the run starts over, as a job requeued with ``--resume auto`` expects. A
    finished run (``final``, ``summary.json``) is still refused.
    """
    out_dir = Path(out_dir)
    found = complete_checkpoints(out_dir)
    own = resume_path is not None and Path(resume_path).resolve().parent == out_dir.resolve()
    earlier = []
    if not own:
        earlier = [p for p in sorted(out_dir.glob("checkpoint-*")) if p.is_dir()]
        earlier += [out_dir / name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    unfinished = resume_auto and not found and not any((out_dir / n).exists() for n in ("final", "summary.json"))
    if earlier and not overwrite and not unfinished:
        hint = "Continue it with --resume auto, write" if found else "Write"
        raise CheckpointError(f"{out_dir} holds an earlier run ({', '.join(p.name for p in earlier)}). {hint} this "
                              "run to another --output-dir, or pass --overwrite to delete it and start over.")
    for p in earlier:
        for k in keep:
            if Path(k).resolve() == p.resolve() or p.resolve() in Path(k).resolve().parents:
                raise CheckpointError(f"--overwrite would delete {p}, which this run loads ({k}): copy it elsewhere first")
    if own:
        later = [p for p in found if int(_NAME.match(p.name).group(1)) > resume_step]
        if later:
            raise CheckpointError(
                f"{out_dir} holds {', '.join(p.name for p in later)}, later than the step-{resume_step} checkpoint "
                "this run resumes from: its new checkpoints would be pruned in their favour and --resume auto would pick "
                "them. Resume into another --output-dir, or move those folders away.")
    return earlier


def delete_outputs(paths: list[Path]):
    """Delete an earlier run's outputs (rank 0; every rank waits)."""
    if dist.is_main():
        for p in paths:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    dist.barrier()


def resume_checkpoint(resume: str, out_dir: Path) -> tuple[Path | None, dict | None]:
    """(checkpoint folder, its validated trainer state) to resume from; (None, None) for ``auto`` in a folder
    without a complete checkpoint.

    ``auto``: the latest complete checkpoint of ``out_dir`` whose files match their checksums; one that does not
    is named, set aside as ``checkpoint-<step>.corrupt`` (so that neither pruning nor a later ``auto`` picks it)
    and the previous one is tried. A folder given by path is used as it is, or refused (``check_checkpoint``).
    """
    if resume != "auto":
        return Path(resume), check_checkpoint(Path(resume))
    found, rejected = complete_checkpoints(out_dir)[::-1], []
    try:
        for path in found:
            try:
                return path, check_checkpoint(path)
            except CheckpointError as e:
                if path == found[-1]:
                    raise
                rejected.append(path)
                dist.print0(f"WARNING: {e}; falling back to the previous checkpoint")
        return None, None
    finally:
        dist.barrier()  # every rank has read the checkpoints before rank 0 renames any
        if dist.is_main():
            for path in rejected:
                path.rename(path.with_name(path.name + ".corrupt"))
        dist.barrier()


def checksums(folder: Path) -> dict[str, str]:
    """The SHA-256 of every file of a checkpoint folder (but the marker), by relative path."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): _sha256(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != MARKER}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore the optimizer's state, the schedule's position and this rank's RNG; return the trainer state.

    The optimizer and scheduler keep this run's hyperparameters (learning rate, weight decay, schedule,
    warm-up): only AdamW's moments and the step count come from the checkpoint, so an option changed on
    resume takes effect (metrics.jsonl's lr shows it). A checkpoint that trained another set of parameters
    (another --freeze-vision, other LoRA targets) is refused.

    The policy weights themselves are loaded earlier, by ``load_policy``: the checkpoint folder loaded as
    the model (``load_model(path)``, which lets transformers map its saved key names onto the live
    model), or with LoRA the base from --model and the checkpoint's adapter on it.
    """
    path = Path(path)
    state = check_checkpoint(path)
    try:
        optim_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        sched_state = torch.load(path / "scheduler.pt", weights_only=True)
        rng_file = path / f"rng_state_rank{dist.rank()}.pt"
        rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
        saved = {name for group in optim_state["param_groups"] for name in group["params"]}
        last_epoch = int(sched_state["last_epoch"])
    except Exception as e:  # corrupt or truncated files: say which checkpoint, never half-load
        raise CheckpointError(f"cannot read checkpoint {path}: {brief(e)}") from e
    trained = {name for name, p in dist.unwrap(model).named_parameters() if p.requires_grad}
    if saved != trained:
        raise CheckpointError(f"{path} trained {len(saved)} parameter tensors, this run trains {len(trained)} (e.g. "
                              f"{sorted(saved ^ trained)[0]}): resume with the options that run had (its "
                              "config.json), e.g. the same --freeze-vision and LoRA targets")
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    for group, own in zip(optimizer.param_groups, configured):
        group.update(own)
    # The schedule is this run's (LambdaLR saves no lambda): only its position comes from the checkpoint.
    scheduler.last_epoch = last_epoch
    scheduler._last_lr = [base * factor(last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, scheduler._last_lr):
        group["lr"] = lr
    if rng is not None and state.get("world_size") == dist.world_size():
        set_rng_state(rng)
    return state


def check_checkpoint(path: Path) -> dict:
    """Refuse, with a clear message, a folder that is not a complete, intact checkpoint; else return its
    validated trainer state (step, data position, config)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such checkpoint folder")
    if not (path / MARKER).exists() and not (path / "trainer_state.json").exists():
        raise CheckpointError(f"--resume {path}: not a checkpoint (train.py writes <output-dir>/checkpoint-<step>/; "
                              "--resume auto picks the latest complete one of --output-dir)")
    if not (path / MARKER).exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} file): it was probably cut off "
                              "while being written. Use an earlier checkpoint-<step> folder.")
    from safetensors import safe_open

    try:
        marker = (path / MARKER).read_text()
        expected = json.loads(marker)["sha256"] if marker.strip() != "ok" else {}  # "ok": written before checksums
        for name, digest in expected.items():
            if not (path / name).is_file():
                raise CheckpointError(f"checkpoint {path}: {name} is missing")
            if _sha256(path / name) != digest:
                raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum (changed or damaged "
                                      "since it was written)")
        files = sorted(path.glob("*.safetensors"))
        for f in files:
            with safe_open(f, "pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {brief(e)}") from e
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors model weights")
    return read_trainer_state(path)


def read_trainer_state(path: Path) -> dict:
    """Checkpoint ``path``'s trainer_state.json, validated, or a CheckpointError naming the file."""
    file = Path(path) / "trainer_state.json"
    try:
        state = json.loads(file.read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # missing, not UTF-8, not JSON, cut off, nested too deeply
        raise CheckpointError(f"{file}: not a readable JSON file ({brief(e)})") from None
    return validate_trainer_state(state, path)


def validate_trainer_state(state, path: Path) -> dict:
    """The trainer state of checkpoint ``path``, or a CheckpointError naming the field that is wrong."""
    where = f"{Path(path) / 'trainer_state.json'}"
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(state).__name__}")
    count = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    number = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    checks = {"step": (count, "a whole number of 0 or more", True),
              "data_position": (count, "a whole number of 0 or more", False),
              "world_size": (lambda v: count(v) and v >= 1, "a whole number of 1 or more", False),
              "config": (lambda v: isinstance(v, dict), "an object (the run's options)", True),
              "before": (lambda v: isinstance(v, dict) and all(number(v.get(k)) for k in ("acc@0.5", "miou")),
                         "an object with the numbers acc@0.5 and miou", True)}
    for key, (ok, expected, required) in checks.items():
        if key not in state:
            if required:
                raise CheckpointError(f"{where}: no '{key}' (expected {expected})")
            continue
        if not ok(state[key]) or (key in ("step", "data_position") and state[key] < 0):
            raise CheckpointError(f"{where}: '{key}' is {json.dumps(state[key])[:60]}, expected {expected}")
    named = _NAME.match(Path(path).name)
    if named and int(named.group(1)) != state["step"]:
        raise CheckpointError(f"{where}: 'step' is {state['step']}, but the folder is {Path(path).name}")
    return state


class Preemption:
    """Remember a SIGTERM / SIGINT (SLURM sends SIGTERM before killing a job) until the step ends.

    A context manager: the signals go back to their earlier handlers at exit (a caller of train.main()
    gets its Ctrl-C back). A second signal stops at once.
    """

    def __init__(self):
        self.requested, self.training, self.previous = False, True, {}

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        if not self.training:  # the final evaluation and save: nothing left to checkpoint
            print(f"[rank {dist.rank()}] got signal {signum}: training is done, finishing the final evaluation and "
                  "save (signal again to stop now)", flush=True)
            return
        print(f"[rank {dist.rank()}] got signal {signum}: saving a checkpoint at the end of this step", flush=True)

    def any_rank(self, device) -> bool:
        return dist.all_reduce_sum(torch.tensor([float(self.requested)], device=device)).item() > 0


class MetricsLog:
    """``<output-dir>/metrics.jsonl``, one JSON line per step, written by rank 0; with ``report_to``
    (tensorboard, wandb) every line also goes there (``metrics.Reporter``). ``close()`` at the end of the run.

    A resumed run first drops the lines logged after its checkpoint (the steps it is about to redo); a
    line cut off by a crash counts as after any checkpoint. That rewrite goes to a temporary file renamed
    over the old one: a failed write (full disk, kill) leaves the old file whole, never a shortened one.
    """

    def __init__(self, out_dir: Path, start_step: int, report_to: str = "none", config: dict | None = None):
        self.file, self.reporter = None, None
        if dist.is_main():
            path = Path(out_dir) / "metrics.jsonl"
            if path.exists():
                lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
                write_text(path, "".join(line + "\n" for line in lines if _logged_step(line) <= start_step))
            self.file = open(path, "a")
            if report_to != "none":
                self.reporter = Reporter(report_to, out_dir, start_step, config or {})

    def write(self, record: dict):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.reporter:
            self.reporter.log(record)

    def close(self):
        if self.file:
            self.file.close()
        if self.reporter:
            self.reporter.close()
        self.file, self.reporter = None, None


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut off by a crash counts as after any checkpoint."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return math.inf
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf


RESUME_MAY_CHANGE = {"resume", "overwrite", "output_dir", "max_steps", "num_train_epochs", "eval_steps", "eval_limit",
                     "save_steps", "save_total_limit"}
# Options that decide which parameters train: the checkpoint's optimizer state holds those of its run only.
TRAINED_SET = ("freeze_vision", "lora_r", "lora_alpha", "lora_target_modules", "lora_vision")


def check_resumable(saved: dict, config: dict, path: Path):
    """Refuse, before anything loads, a resume that would train another set of parameters than its checkpoint."""
    changed = [f"--{k.replace('_', '-')} was {saved.get(k)!r}, now {config[k]!r}" for k in TRAINED_SET
               if k in saved and saved[k] != config[k]]
    if changed:
        raise CheckpointError(f"{path} trained other parameters ({'; '.join(changed)}): resume with that run's "
                              "values (its config.json), or start a new run from its weights with --model")


def show_config_changes(saved: dict, config: dict, step: int):
    """Name every option a resumed run changed from its checkpoint's run (other than RESUME_MAY_CHANGE): each
    takes effect from the checkpoint's step on (those that cannot are refused by ``check_resumable``)."""
    changed = {k: (saved.get(k), v) for k, v in config.items() if k not in RESUME_MAY_CHANGE and saved.get(k) != v}
    if changed:
        dist.print0(f"WARNING: resuming with a different configuration, which applies from step {step} on: " +
                    "; ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in changed.items()))
