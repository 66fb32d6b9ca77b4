"""Shared pieces of the task loaders: the data-error type, line-numbered delimited-file reading,
and the description of a task that the fine-tuning CLI consumes."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


class DataError(ValueError):
    """A data file is malformed, misses a column, holds an unknown label or an empty split.

    The message always names the file, and the line where there is one.
    """

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path, self.line = str(path), line


class DataUnavailableError(RuntimeError):
    """Data could not be obtained: the Hugging Face hub is unreachable, or a data package is missing."""


def read_text(path: str | Path, encoding: str = "utf-8-sig") -> str:
    """The whole file as text; a decoding error names the line of the bad byte."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(path, f"not valid {encoding} text ({e.reason})", raw[: e.start].count(b"\n") + 1) from None


def read_delimited(
    path: str | Path, *, delimiter: str = "\t", quoting: int = csv.QUOTE_NONE, encoding: str = "utf-8-sig"
) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) for every non-blank line of a delimited file.

    GLUE's TSV files are read with quoting off (as the GLUE scripts do): their sentences contain
    bare quote characters. Blank lines carry no data and are skipped.
    """
    text = read_text(path, encoding)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    try:
        for fields in reader:
            if fields and any(f.strip() for f in fields):
                yield reader.line_num, fields
    except csv.Error as e:
        raise DataError(path, f"malformed line ({e})", reader.line_num) from None


def require_nonempty(path: str | Path, rows: list, what: str = "examples") -> list:
    """Return `rows`, or raise DataError if there are none (an empty split trains or scores nothing)."""
    if not rows:
        raise DataError(path, f"no {what} found (empty split)")
    return rows


TaskKind = Literal["classification", "regression", "qa"]


@dataclass(frozen=True)
class Task:
    """What the fine-tuning CLI needs to know about one task.

    Attributes:
        name: CLI name (e.g. "sst2").
        kind: "classification", "regression" (STS-B) or "qa" (SQuAD).
        text_columns: one or two text columns fed to the tokenizer as a (pair of) sequence(s).
        label_names: class names in label-id order (empty for regression and QA).
        eval_splits: validation split names; the first one selects the best checkpoint.
        compute_metrics: (predictions, labels) -> {metric: value}, with a "score" entry, the
            number the report tables use.
        score_name: what "score" is, for tables (e.g. "accuracy", "Matthews corr.").
    """

    name: str
    kind: TaskKind
    text_columns: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()
    eval_splits: tuple[str, ...] = ("validation",)
    compute_metrics: Callable[..., dict[str, float]] | None = field(default=None, compare=False)
    score_name: str = "accuracy"

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.label_names)
