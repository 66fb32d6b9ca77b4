"""The life of one `wtacrs finetune` run folder: one owner at a time, and what --resume and
--overwrite may do in each state.

States (`RunFolder.state`), derived from what is on disk and from the lock, never stored:

    new          absent, or nothing in it but a released lock file: a run starts here.
    running      a live process holds the folder's lock: every command is refused, --overwrite too.
    interrupted  a run started here and its owner is gone (killed, crashed, disk full) before
                 writing results: --resume continues it from its last complete checkpoint (only
                 with the settings it was started with), --overwrite starts it again.
    finished     results.json holds a result: a record. --resume leaves it as it is (and says
                 so), --overwrite replaces it.
    failed       results.json says "status": "failed" (the run diverged): a record too, treated
                 like a finished one.

Without --resume or --overwrite only a new folder is used. The lock is `fcntl.flock` on
<run>/.lock, which the kernel releases when its owner exits however it exits, so a crashed run
never leaves the folder stuck; the lock file holds the owner's pid for the error message.

Only what wtacrs writes counts (`OWN_ENTRY`: its records, the Trainer's checkpoints and logs):
--overwrite deletes nothing else, and no run starts in a folder holding anything else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from wtacrs.atomic import write_json_atomic

LOCK_FILE = ".lock"
SETTINGS_FILE = "run.json"
RESULTS_FILE = "results.json"
TRAINING_FILE = "training.json"  # written when training ends, before results.json
LR_SCALES_FILE = "lr_scales.json"  # the measured learning-rate scales of a sampling run
# What a run writes in its folder: the records above (and atomic_path's temporary copies of
# them), the Trainer's checkpoints and its TensorBoard logs.
_RECORDS = "|".join(re.escape(name[: -len(".json")]) for name in (SETTINGS_FILE, RESULTS_FILE, TRAINING_FILE,
                                                                   LR_SCALES_FILE))
OWN_ENTRY = re.compile(rf"(?:{_RECORDS})\.json|\.(?:{_RECORDS})\.json\..+\.json|(?:tmp-)?checkpoint-\d+|runs")

START, RESUME, KEEP = "start", "resume", "keep"


class RunFolderError(Exception):
    """This command may not use this run folder; the message says why and what to pass instead."""


class RunFolder:
    """One run folder. `plan` decides without writing anything; `claim` takes the lock, decides
    again (another process may have come first) and prepares the folder; `release` unlocks."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._created: Path | None = None  # the outermost folder `claim` created

    # -- reading -----------------------------------------------------------------------------
    def state(self) -> str:
        """"new", "running", "interrupted", "finished" or "failed" (see the module docstring)."""
        if self._lock_fd is None and self.owner() is not None:
            return "running"
        results = self.results()
        if results is not None:
            return "failed" if results.get("status") == "failed" else "finished"
        return "interrupted" if self._contents() else "new"

    def owner(self) -> int | None:
        """The pid holding this folder's lock (0 when unreadable), or None when nobody holds it."""
        fd = self._open_lock(create=False)
        if fd is None:
            return None
        try:
            if _try_lock(fd):
                return None
            return int(os.pread(fd, 32, 0).decode().strip() or 0)
        finally:
            os.close(fd)

    def results(self) -> dict | None:
        """The results record, or None when there is none."""
        return self._read_json(RESULTS_FILE)

    def settings(self) -> dict | None:
        """The settings the run here was started with, or None when run.json is missing; raises
        RunFolderError when it is not a settings record."""
        remedy = "pass --force to resume with this command's settings anyway, or --overwrite to start it again"
        recorded = self._read_json(SETTINGS_FILE, remedy)
        if recorded is not None and not isinstance(recorded.get("settings"), dict):
            raise RunFolderError(f"{self.path / SETTINGS_FILE} holds no settings record; {remedy}")
        return None if recorded is None else recorded["settings"]

    def _read_json(self, name: str, remedy: str = "move it away or pass --overwrite") -> dict | None:
        return read_json_record(self.path / name, remedy)

    # -- deciding ----------------------------------------------------------------------------
    def plan(self, settings: dict, *, resume: bool, overwrite: bool, force: bool = False) -> str:
        """START, RESUME or KEEP for a command with these flags and settings; raises
        RunFolderError where the command may not use the folder. Writes nothing. `force`
        resumes a run whose run.json is missing or unreadable with these settings."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path} is a file, not a run folder; move it away or choose another "
                                 "--output-dir")
        state = self.state()
        if state == "running":
            raise self._busy()
        if state == "new" or overwrite:
            foreign = sorted(self._entries() - self._contents())
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise RunFolderError(f"{self.path} holds files wtacrs finetune did not write ({shown}): no run starts "
                                     "there and --overwrite deletes nothing of them; move them away or choose another "
                                     "--output-dir")
            return START
        if not resume:
            raise RunFolderError(f"{self.path} already holds {'an' if state == 'interrupted' else 'a'} {state} run; "
                                 f"pass {'--resume to continue it or ' if state == 'interrupted' else ''}"
                                 "--overwrite to replace it")
        if state == "interrupted":
            self._check_same_settings(settings, force)
            return RESUME
        return KEEP

    def _check_same_settings(self, settings: dict, force: bool) -> None:
        try:
            recorded = self.settings()
        except RunFolderError:
            if force:
                return
            raise
        if recorded is None:
            if force:
                return
            raise RunFolderError(f"--resume: {self.path / SETTINGS_FILE} is missing, so nothing says which settings "
                                 "the run was started with; pass --force to resume it with this command's settings, "
                                 "or --overwrite to start it again")
        now = json.loads(json.dumps(settings))
        differences = [f"--{k.replace('_', '-')} {now.get(k)} (the run has {recorded.get(k)})"
                       for k in sorted(set(now) | set(recorded)) if now.get(k) != recorded.get(k)]
        if differences:
            raise RunFolderError(f"--resume with other settings than {self.path} was started with: "
                                 f"{', '.join(differences)}; resume with the run's settings, or pass --overwrite "
                                 "to start it again")

    # -- owning ------------------------------------------------------------------------------
    def claim(self, settings: dict, *, resume: bool, overwrite: bool, force: bool = False) -> str:
        """Lock the folder, then `plan` under the lock and prepare: START empties the folder
        (keeping the lock) and records `settings`; RESUME keeps everything (with `force`, records
        `settings` where run.json is missing or unreadable); KEEP releases the lock at once.
        Raises RunFolderError when another process owns the folder."""
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        self._created = missing[-1] if missing else None
        fd = self._open_lock(create=True)
        if not _try_lock(fd):
            os.close(fd)
            raise self._busy()
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            action = self.plan(settings, resume=resume, overwrite=overwrite, force=force)
            if action == START:
                self._empty()
            if action == START or (action == RESUME and force and not self._settings_readable()):
                write_json_atomic(self.path / SETTINGS_FILE, {"settings": settings})  # --force: the next resume checks
        except BaseException:
            self.release()
            raise
        if action == KEEP:
            self.release()
        return action

    def release(self) -> None:
        """Unlock (a no-op when this object holds no lock)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def discard_if_unused(self) -> None:
        """Remove what `claim` created when the folder holds nothing but this command's
        bookkeeping (a run that failed before writing a checkpoint, results or logs): the run
        folder, and the parents `claim` created that are left empty."""
        if self._created is None or self._entries() - {SETTINGS_FILE}:
            return
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)
        for parent in self.path.parents:
            if parent == self._created.parent or any(parent.iterdir()):
                break
            parent.rmdir()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- helpers -----------------------------------------------------------------------------
    def _settings_readable(self) -> bool:
        try:
            return self.settings() is not None
        except RunFolderError:
            return False

    def _busy(self) -> RunFolderError:
        return RunFolderError(f"{self.path} is in use by another wtacrs finetune (pid {self.owner()}); wait for it "
                              "to end or stop it first")

    def _entries(self) -> set[str]:
        """Every name in the folder but the lock file."""
        return {p.name for p in self.path.iterdir()} - {LOCK_FILE} if self.path.is_dir() else set()

    def _contents(self) -> set[str]:
        """What wtacrs wrote here (`OWN_ENTRY`)."""
        return {name for name in self._entries() if OWN_ENTRY.fullmatch(name)}

    def _empty(self) -> None:
        """Delete what wtacrs wrote here, and nothing else."""
        for name in self._contents():
            path = self.path / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    def _open_lock(self, create: bool) -> int | None:
        try:
            return os.open(self.path / LOCK_FILE, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return None


def read_json_record(path: Path, remedy: str) -> dict | None:
    """The JSON object in `path`, or None when there is no file; RunFolderError naming the file,
    what is wrong and `remedy` when it is unreadable or not an object."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path} is not valid JSON ({e}); {remedy}") from None
    except RecursionError:
        raise RunFolderError(f"{path} is not valid JSON (nested too deeply); {remedy}") from None
    except OSError as e:
        raise RunFolderError(f"{path} cannot be read ({e.strerror}); {remedy}") from None
    if not isinstance(record, dict):
        raise RunFolderError(f"{path} is not a JSON object; {remedy}")
    return record


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
