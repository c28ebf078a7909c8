"""Trainer checkpoints that are complete or absent, never half-written.

A checkpoint `output_dir/checkpoint-N/` is written into a hidden temporary directory beside it,
every file is flushed to disk, a `manifest.json` (each file's size) is written last, and only then
is the directory renamed to its final name: a rename within one filesystem is atomic, so a process
killed at any instant leaves either the complete checkpoint or a temporary directory that no
reader looks at (`clean_partial` removes it on the next start). Reading verifies the manifest and
every file's size and names what is wrong.

Layout (HF's names where HF has one; torch pickles replaced by safetensors / JSON):
`model.safetensors` + `config.json` (the model, HF layout), `optimizer.safetensors` (optimizer
state by `{slot}.{parameter key}`), `scheduler.json` (optimizer step count, fp16 loss scaler),
`rng_state.json`, `trainer_state.json` (HF's `TrainerState`), `training_args.json`, the tokenizer
files when the Trainer has one, `manifest.json`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

from msfx.errors import CorruptCheckpointError

PREFIX = "checkpoint"
MANIFEST = "manifest.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX}-(\d+)$")
_PARTIAL_PREFIXES = (".tmp-", ".trash-")


def _fsync_tree(path: Path) -> None:
    for file in sorted(path.rglob("*")):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}


def write_checkpoint(output_dir: str | os.PathLike, step: int, write: Callable[[Path], None]) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically: `write(tmp_dir)` fills a temporary directory,
    which gets its manifest and is renamed into place (replacing an older checkpoint of that step).
    Returns the checkpoint's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{PREFIX}-{step}"
    tmp = output_dir / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"files": _manifest(tmp)}, indent=2, sort_keys=True))
        _fsync_tree(tmp)
        if final.exists():
            remove_checkpoint(final)
        os.rename(tmp, final)
        _fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify_checkpoint(path: str | os.PathLike) -> Path:
    """`path` if it is a complete checkpoint directory.

    Raises:
        FileNotFoundError: no such directory.
        CorruptCheckpointError: no manifest (an interrupted or foreign directory), a file listed
            there missing or of another size (named), or an unreadable manifest.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {path}")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CorruptCheckpointError(f"{path} is not a complete msfx checkpoint: it has no {MANIFEST} (written last, "
                                     "so the save was interrupted or the directory was not written by msfx.Trainer)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{manifest} is unreadable: {e}") from e
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpointError(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != size:
            raise CorruptCheckpointError(f"checkpoint {path}: {name} has {file.stat().st_size} bytes, "
                                         f"the manifest says {size} (truncated or modified)")
    return path


def read_json(path: Path) -> dict:
    """A JSON file of a checkpoint; a damaged one raises CorruptCheckpointError naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"cannot read {path}: {e}") from e


def sorted_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete-looking `checkpoint-N` directories of `output_dir` (with a manifest), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of `output_dir`, or None."""
    found = sorted_checkpoints(output_dir)
    return found[-1] if found else None


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint: renamed to a hidden name first, so a kill while deleting never leaves
    a partly deleted `checkpoint-N` behind."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_partial(output_dir: str | os.PathLike) -> None:
    """Remove the temporary directories that interrupted saves or deletions left in `output_dir`."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.is_dir() and path.name.startswith(_PARTIAL_PREFIXES):
                shutil.rmtree(path, ignore_errors=True)


def rotate_checkpoints(output_dir: str | os.PathLike, save_total_limit: int | None, keep: Path | None = None) -> None:
    """Delete the oldest checkpoints beyond `save_total_limit` (None or <= 0: keep all), never
    `keep` (the best model's checkpoint), as HF's `Trainer._rotate_checkpoints`."""
    if not save_total_limit or save_total_limit <= 0:
        return
    found = sorted_checkpoints(output_dir)
    if keep is not None and Path(keep) in found[:-1]:
        # as HF: the best checkpoint moves next to the newest, and a limit of 1 keeps both (the newest
        # is the one to resume from)
        found.remove(Path(keep))
        found.insert(len(found) - 1, Path(keep))
        save_total_limit = max(save_total_limit, 2)
    for path in found[:max(0, len(found) - save_total_limit)]:
        remove_checkpoint(path)
