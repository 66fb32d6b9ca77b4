"""Checkpoint integrity: find the newest complete Trainer checkpoint, refuse a corrupt one up front.

The Trainer writes a checkpoint folder file by file (weights, optimizer, scheduler, RNG states,
wtacrs_state.safetensors) and trainer_state.json last, so a run killed while saving leaves a
folder without that file or with a truncated one. Loading such a folder would restore the
weights and then fail on the optimizer, or worse, succeed on a half-written tensor file. So every
file a resume reads is checked before anything is loaded, without executing code from them:
safetensors headers must cover the file exactly (safetensors' own check), torch zip archives
(optimizer.pt, scheduler.pt, rng_state*.pth) must pass their CRC check, JSON must parse.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or one of its files is corrupt; the message names it."""


def verify_checkpoint(folder: str | os.PathLike) -> None:
    """Raise CheckpointError unless every file of a Trainer checkpoint folder is complete.

    Checks trainer_state.json (written last: its absence means the save was interrupted), each
    *.safetensors header against the file size, each torch archive (*.pt, *.pth, *.bin) against
    its CRCs, and each *.json. Reads the files but never unpickles or executes anything.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist or is not a folder")
    if not (folder / TRAINER_STATE).is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: no {TRAINER_STATE} (the save was interrupted)")
    for path in sorted(folder.iterdir()):
        problem = _file_problem(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint file {path} is corrupt or truncated: {problem}")


def _file_problem(path: Path) -> str | None:
    """Why `path` cannot be loaded, or None when it is sound (or not a file a resume reads)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt"):
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"CRC mismatch in {bad}"
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except Exception as e:  # each library has its own error type; all mean "cannot load this"
        return f"{type(e).__name__}: {e}"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint-N folder in `output_dir` that passes `verify_checkpoint`, or None.

    An incomplete newer folder (a run killed while saving) is skipped with a warning, never
    deleted: what the user's run wrote stays on disk.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    for _, folder in sorted(found, reverse=True):
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            logger.warning("wtacrs: skipping %s", e)
            continue
        return str(folder)
    return None
