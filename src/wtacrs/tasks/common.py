"""Shared pieces of the task loaders: the data-error type, line-numbered delimited-file reading,
and the description of a task that the fine-tuning CLI consumes."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np


class DataError(ValueError):
    """A data file is malformed, misses a column, holds an unknown label or an empty split.

    The message always names the file, and the line where there is one.
    """

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path, self.line = str(path), line


class MaxLengthError(ValueError):
    """--max-length leaves no room for the task's text, or the tokenizer did not truncate to it."""


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


TaskKind = Literal["classification", "regression", "qa", "causal_lm"]


@dataclass(frozen=True)
class Task:
    """A task as fine-tuning consumes it: its data, its metric, and the task-specific parts of a
    run (model head, LoRA head type, tokenisation, collation, defaults). This class is a sentence
    (pair) classification or regression task; `wtacrs.tasks.squad.QATask` overrides what
    extractive QA does differently.

    Attributes:
        name: CLI name (e.g. "sst2").
        kind: "classification", "regression" (STS-B), "qa" (SQuAD) or "causal_lm" (next-token).
        text_columns: one or two text columns fed to the tokenizer as a (pair of) sequence(s).
        label_names: class names in label-id order (empty for regression and QA).
        eval_splits: validation split names; the first one selects the best checkpoint.
        compute_metrics: (predictions, labels) -> {metric: value}, with a "score" entry, the
            number the report tables use.
        score_name: what "score" is, for tables (e.g. "accuracy", "Matthews corr.").
        defaults: fine-tuning settings this task changes from the general defaults (e.g. a
            longer max_length for QA windows).
    """

    name: str
    kind: TaskKind
    text_columns: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()
    eval_splits: tuple[str, ...] = ("validation",)
    compute_metrics: Callable[..., dict[str, float]] | None = field(default=None, compare=False)
    score_name: str = "accuracy"
    defaults: Mapping[str, Any] = field(default_factory=dict, compare=False)

    # Settings beyond the general ones that apply to this task (recorded with each run).
    extra_settings: ClassVar[tuple[str, ...]] = ()
    # PEFT TaskType: which head LoRA leaves fully trainable.
    peft_task_type: ClassVar[str] = "SEQ_CLS"
    # Whether the loss reads padded positions (then sampling must not skip them).
    loss_reads_padding: ClassVar[bool] = False

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.label_names)

    def auto_class(self):
        """The transformers Auto class of this task's model (its head is new, randomly initialised)."""
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self) -> dict[str, Any]:
        """Config overrides the head needs (labels, problem type)."""
        labels = dict(enumerate(self.label_names))
        names = {"id2label": labels, "label2id": {v: k for k, v in labels.items()}} if labels else {}
        return {"num_labels": self.num_labels, **names,
                "problem_type": "regression" if self.kind == "regression" else "single_label_classification"}

    def datasets(self, train_raw, evals_raw: dict, tokenizer, settings):
        """(train set, {split: eval set}, compute_metrics for the Trainer) from the raw splits;
        `settings` holds max_length (and the task's extra settings)."""
        from wtacrs.tasks import tokenize_sequences

        train = tokenize_sequences(train_raw, self, tokenizer, settings.max_length)
        evals = {s: tokenize_sequences(d, self, tokenizer, settings.max_length) for s, d in evals_raw.items()}
        return train, evals, self._trainer_metrics

    def check_max_length(self, tokenizer, max_length: int) -> None:
        """Raise MaxLengthError when `max_length` leaves no room for a token of each text column
        beside the tokenizer's special tokens (the tokenizer would then not truncate at all).
        Tasks without text columns check their windows themselves (SQuAD: `check_windows`)."""
        columns = len(self.text_columns)
        if not columns:
            return
        special = tokenizer.num_special_tokens_to_add(pair=columns == 2)
        if max_length < special + columns:
            raise MaxLengthError(
                f"--max-length {max_length} leaves no room for text: the tokenizer adds {special} special tokens to "
                f"{'a sentence pair' if columns == 2 else 'a sentence'}, so {self.name} needs at least "
                f"{special + columns}")

    def _trainer_metrics(self, prediction) -> dict[str, float]:
        logits = prediction.predictions
        predicted = logits.squeeze(-1) if self.kind == "regression" else np.argmax(logits, axis=-1)
        return self.compute_metrics(predicted, prediction.label_ids)

    def collator(self, tokenizer, settings):
        """Pads each batch to its longest sequence, or to max_length with pad_to_max_length."""
        from transformers import DataCollatorWithPadding

        if settings.pad_to_max_length:
            return DataCollatorWithPadding(tokenizer, padding="max_length", max_length=settings.max_length)
        return DataCollatorWithPadding(tokenizer)

    @staticmethod
    def logits_for_metrics(outputs, labels):
        """The classification head's logits: encoder-decoders (T5) also return the encoder's
        states, which evaluation would otherwise gather for every example."""
        return outputs[0] if isinstance(outputs, tuple) else outputs
