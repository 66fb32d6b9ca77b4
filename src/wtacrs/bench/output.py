"""Run records: metadata, atomic JSON/Markdown/PNG writes and Markdown tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from wtacrs.atomic import atomic_path, write_text_atomic

GB = 1e9  # decimal gigabytes, as the targets are stated


def run_metadata(device: torch.device, dtype: torch.dtype, seed: int, **shapes) -> dict:
    """What a reader needs to reproduce a run: versions, device, dtype, shapes, seed, command line."""
    import transformers

    return {
        "command": _command_line(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        # glibc's allocator settings change peak RSS a lot on the CPU (freed blocks it keeps; RESULTS.md)
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
        **shapes,
    }


def _command_line() -> str:
    """The command as typed: `wtacrs ...` for the console script and `python -m wtacrs.cli`."""
    if Path(sys.argv[0]).name == "wtacrs" or sys.argv[0].endswith(("wtacrs/cli/__init__.py", "wtacrs/cli/__main__.py")):
        return " ".join(["wtacrs", *sys.argv[1:]])
    return " ".join(sys.argv)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return f"{model or 'CPU'} ({os.cpu_count()} cores)"


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def write_text(path: Path, text: str) -> None:
    """Atomically write `text` to `path` (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def write_json(path: Path, record: dict) -> None:
    """Atomically write `record` as indented JSON (its folder created)."""
    write_text(path, json.dumps(record, indent=2, default=str) + "\n")  # default=str: dtypes, devices


def save_figure(figure, path: Path) -> None:
    """Atomically save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def new_figure(width: float = 6.4, height: float = 4.4):
    """A (figure, axes) pair drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


Column = tuple[str, str, str]  # (record key, header, format spec)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A Markdown table of `rows`; missing values print as "—"."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for row in rows:
        cells = [_cell(row.get(key), spec) for key, _, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value, spec: str) -> str:
    if value is None:
        return "—"
    return format(value, spec) if spec and isinstance(value, (int, float)) else str(value)


def markdown_report(title: str, metadata: dict, table: str, notes: Sequence[str] = ()) -> str:
    """A Markdown page: title, the command and setup, the table, notes."""
    setup = (f"`{metadata['command']}`\n\n{metadata['device_name']}, torch {metadata['torch']}, "
             f"{metadata['dtype']}, {metadata['threads']} threads, seed {metadata['seed']}, {metadata['time_utc']}"
             + "".join(f", {k}={v}" for k, v in metadata.get("malloc_env", {}).items()) + "\n")
    return f"# {title}\n\n{setup}\n{table}\n" + "".join(f"- {note}\n" for note in notes)
