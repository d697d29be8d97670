"""Checkpoint integrity: what train.py, sample.py and the checkpoint loaders trust.

A checkpoint folder's meta.json, written last, records the size and SHA-256 of every other file the
folder holds ("files") and a SHA-256 of its own content ("meta_sha256"). Damage after the save (a
bad copy, a truncated transfer, a failing disk) is then found before anything is loaded, and named:
the file and what is wrong with it. Checkpoints written before checksums existed record neither key
and are trusted as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

META_FILE = "meta.json"
FILES_KEY, SELF_KEY = "files", "meta_sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted; the message names the file and what is wrong."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _self_digest(meta: dict) -> str:
    """meta.json's own checksum: of its content without this key, in a canonical form."""
    content = {k: v for k, v in meta.items() if k != SELF_KEY}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def write_meta(folder: Path, meta: dict) -> None:
    """meta.json with the size and checksum of every file in the folder: the last file a save
    writes, so a folder whose meta.json verifies holds everything it lists."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != META_FILE)
    meta = {**meta, FILES_KEY: {p.relative_to(folder).as_posix(): {
        "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
    meta[SELF_KEY] = _self_digest(meta)
    tmp = folder / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / META_FILE)


def read_meta(folder: Path) -> dict:
    """A checkpoint folder's meta.json, refused (CheckpointError) when missing, unreadable or
    changed since it was written."""
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing (an incomplete checkpoint)") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is damaged: not readable JSON ({err})") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is damaged: not a JSON object")
    # Written before checksums existed: neither key. A damaged one may have lost one, not both.
    if (FILES_KEY in meta or SELF_KEY in meta) and meta.get(SELF_KEY) != _self_digest(meta):
        raise CheckpointError(f"{path} is damaged: its content does not match its checksum")
    return meta


def verify_checkpoint(folder: Path, names: list[str] | None = None) -> dict:
    """Check a checkpoint folder against its meta.json (only the listed files when `names` is
    given, meta.json always) and return its meta.json. CheckpointError names the first damaged
    file: missing, truncated or grown, or other bytes than it was saved with."""
    folder = Path(folder)
    meta = read_meta(folder)
    recorded = meta.get(FILES_KEY, {})  # none recorded: written before checksums existed
    for name in recorded if names is None else [n for n in names if n in recorded]:
        path, expected = folder / name, recorded[name]
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            how = "truncated" if size < expected["bytes"] else "grown"
            raise CheckpointError(f"{path} is damaged: {how} to {size:,} bytes, saved with "
                                  f"{expected['bytes']:,}")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} is damaged: its bytes differ from the ones saved "
                                  "(SHA-256 mismatch)")
    return meta


def newest_verified(folders: list[Path], warn: Callable[[str], None]) -> Path | None:
    """The newest of these checkpoints (oldest first) that verifies; each damaged one skipped on
    the way is named through `warn`."""
    for folder in reversed(folders):
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as err:
            warn(f"Skipping a damaged checkpoint: {err}")
    return None


def prune(folders: list[Path], keep: int, warn: Callable[[str], None]) -> list[Path]:
    """Delete all but the newest `keep` of these checkpoints (oldest first), except the newest one
    that verifies: with damaged checkpoints among the newest, it is the one to resume from.
    Returns what was deleted."""
    verified = newest_verified(folders, warn)
    doomed = [folder for folder in folders[:-keep] if folder != verified]
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


def folder_bytes(folder: Path) -> int:
    """What a checkpoint occupies: the sizes its meta.json records, else those of its files."""
    folder = Path(folder)
    try:
        recorded = read_meta(folder).get(FILES_KEY)
    except CheckpointError:
        recorded = None
    if recorded:
        return sum(f["bytes"] for f in recorded.values()) + (folder / META_FILE).stat().st_size
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def is_write_error(err: BaseException) -> bool:
    """An error of the disk rather than of the program: OSError (no space, read-only, quota), or
    what PyTorch's zip writer (a RuntimeError) and safetensors make of one."""
    message = str(err)
    return isinstance(err, OSError) or (
        isinstance(err, RuntimeError) and "inline_container" in message) or (
        isinstance(err, SafetensorError) and "I/O error" in message)


def abandon_save(err: BaseException, partial: Path, last: Path | None) -> str:
    """Remove a failed save's partial folder; return the one line that says what failed, how much
    room a checkpoint needs (the last complete one's size, else more than the partial's) and which
    checkpoint is left to resume from."""
    written = folder_bytes(partial) if partial.exists() else 0
    shutil.rmtree(partial, ignore_errors=True)
    if isinstance(err, OSError):
        reason = f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
    else:
        reason = f"a file could not be written ({str(err).splitlines()[0]})"
    need = folder_bytes(last) if last is not None else written
    needs = (f"a checkpoint needs about {_megabytes(need)}" if last is not None
             else f"a checkpoint needs more than the {_megabytes(need)} written")
    try:
        free = shutil.disk_usage(partial.parent).free
        needs += (f", only {_megabytes(free)} are free there (the disk is full)" if free < need
                  else f", {_megabytes(free)} are free there")
    except OSError:
        pass
    previous = (f"the last complete checkpoint is {last}: free some space and run the same "
                "command to resume from it" if last is not None
                else "there is no complete checkpoint yet")
    return (f"saving checkpoint {partial.name.removeprefix('.tmp-')} into {partial.parent} "
            f"failed: {reason}; {needs}; {previous}")


def _megabytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"
