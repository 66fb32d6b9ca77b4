"""Atomic file writes, the one way wtacrs writes anything a user keeps (configs, checkpoint
state, results, reports, plots): a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in `path`'s folder to write to; on leaving, the file is flushed to disk
    and renamed over `path`. On any failure (disk full, Ctrl-C, `path` a folder) the temporary
    file is removed and the old file is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _new_file_mode())  # mkstemp's 0o600 would hide the file from other users
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, record) -> None:
    """Write `record` as indented JSON, serialised first: a record that cannot be serialised
    writes nothing."""
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process umask (read by setting it back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask
