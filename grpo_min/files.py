"""Writing files whole, and the checks every entry point makes on its output folder before it loads anything.

A run killed mid-write (a full disk, ``ulimit -f``, kill -9) must leave either the old file or the new one,
never half of one: ``atomic_path`` writes to a temporary name in the same folder and renames it over the
target once complete (``os.replace`` is atomic on one file system); ``atomic_folder`` does the same for a
folder (as checkpoints do). ``check_output`` refuses an output folder that is an input's folder (a run would
write its config.json over the model's) or that cannot be written, before any data or model loads.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


class InputError(ValueError):
    """An input or output the run refuses; the message is one line that names it and says what is wrong."""


def brief(e: BaseException) -> str:
    """An exception as one short line, for a message that names the file: "OSError: first line of its text"."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path`` (same suffix, so PIL picks the format); it becomes ``path`` only
    if the block completes. ``with atomic_path(p) as tmp: image.save(tmp)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """``path.write_text(text)``, whole or not at all."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_json(path: str | Path, value) -> Path:
    return write_text(path, json.dumps(value, indent=1))


@contextmanager
def atomic_folder(path: str | Path):
    """Yield ``<path>.tmp`` to fill; it replaces ``path`` (deleted only then) once the block completes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def read_json_object(file: Path) -> dict:
    """A model folder's JSON file (config.json, adapter_config.json) as a dict, or an InputError naming it."""
    try:
        value = json.loads(Path(file).read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON, cut off
        raise InputError(f"{file}: not a readable JSON file ({brief(e)})") from None
    if not isinstance(value, dict):
        raise InputError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def check_output(out: str | Path, inputs: dict[str, str | Path | None], option: str = "--output-dir"):
    """Refuse an output folder that cannot be created or written, or that is a folder the run reads (``inputs``:
    option -> path; None skipped) or lies inside a model folder it reads (one with config.json: a model, a
    scorer, a checkpoint). Raises InputError naming both paths.

    A folder beside the data, e.g. ``--data-root data --output-dir data/runs``, is allowed: the run adds a
    folder of its own there and writes no file among the inputs.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {out}: is a file, expected a folder")
    resolved = out.resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        source = Path(path).expanduser().resolve()
        inside_model = (source / "config.json").is_file() and source in resolved.parents
        if source.is_dir() and (resolved == source or inside_model):
            raise InputError(f"{option} {out} is {'inside ' if inside_model else ''}{name} {path}, which this run "
                             "reads: its outputs would be written among its inputs; choose another folder")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{option} {out}: {existing} is not a writable folder")
