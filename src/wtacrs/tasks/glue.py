"""The eight GLUE tasks of Liu et al. (2023), Table 1: loaders and official metrics.

Data come from a local folder in the original GLUE layout (what `download_glue_data.py`
writes: `SST-2/train.tsv`, `RTE/dev.tsv`, `MNLI/dev_matched.tsv`, MRPC's `train.tsv` or
`msr_paraphrase_*.txt`, STS-B's 10-column TSV, CoLA's header-less TSV) or, without a folder,
from the Hugging Face hub (`nyu-mll/glue`) through `datasets`. Both give the hub's column names
and label ids, so everything downstream is the same.

Metrics are GLUE's: Matthews correlation (CoLA), accuracy (SST-2, QNLI, RTE, MNLI matched and
mismatched), F1 and accuracy (MRPC, QQP), Pearson and Spearman correlation (STS-B), computed
with scikit-learn and scipy. "score" is the GLUE-leaderboard number of a task: the mean of its
metrics (MNLI: of matched and mismatched accuracy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from wtacrs.tasks.common import DataError, DataUnavailableError, Task, read_delimited, require_nonempty

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class _Layout:
    """Where a GLUE task lives in the original folder layout.

    columns maps output column -> header name, or -> field index for header-less files (CoLA).
    labels maps the label string of the files -> label id; None = a float score (STS-B).
    """

    folder: str
    files: dict[str, str]
    columns: dict[str, str | int]
    labels: dict[str, int] | None
    has_header: bool = True
    width: int = 0  # fields per line of a header-less file


_BINARY = {"0": 0, "1": 1}
_NLI2 = {"entailment": 0, "not_entailment": 1}
_NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2}
_TRAIN_DEV = {"train": "train.tsv", "validation": "dev.tsv"}

LAYOUTS: dict[str, _Layout] = {
    "cola": _Layout("CoLA", _TRAIN_DEV, {"sentence": 3, "label": 1}, _BINARY, has_header=False, width=4),
    "sst2": _Layout("SST-2", _TRAIN_DEV, {"sentence": "sentence", "label": "label"}, _BINARY),
    "mrpc": _Layout(
        "MRPC", _TRAIN_DEV, {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}, _BINARY
    ),
    "qqp": _Layout(
        "QQP", _TRAIN_DEV, {"question1": "question1", "question2": "question2", "label": "is_duplicate"}, _BINARY
    ),
    "mnli": _Layout(
        "MNLI",
        {"train": "train.tsv", "validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"},
        {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
        _NLI3,
    ),
    "qnli": _Layout("QNLI", _TRAIN_DEV, {"question": "question", "sentence": "sentence", "label": "label"}, _NLI2),
    "rte": _Layout("RTE", _TRAIN_DEV, {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, _NLI2),
    "stsb": _Layout("STS-B", _TRAIN_DEV, {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}, None),
}

# MRPC as Microsoft ships it: the GLUE dev set is the part of msr_paraphrase_train.txt listed in
# dev_ids.tsv; without that file the official MSRP test split serves as validation.
_MSR_FILES = {"train": "msr_paraphrase_train.txt", "test": "msr_paraphrase_test.txt", "dev_ids": "dev_ids.tsv"}


def _column_index(path: Path, header: list[str] | None, column: str | int, line: int) -> int:
    if isinstance(column, int):
        return column
    if column not in header:
        raise DataError(path, f"missing column {column!r}; the header has {', '.join(header)}", line)
    return header.index(column)


def _parse_label(path: Path, line: int, text: str, labels: dict[str, int] | None) -> int | float:
    if labels is not None:
        if text not in labels:
            raise DataError(path, f"unknown label {text!r}; expected one of {', '.join(labels)}", line)
        return labels[text]
    try:
        score = float(text)
    except ValueError:
        score = math.nan
    if not 0.0 <= score <= 5.0:  # NaN fails too
        raise DataError(path, f"similarity score {text!r} is not a number in [0, 5]", line)
    return score


def read_glue_file(path: str | Path, layout: _Layout) -> dict[str, list]:
    """One split file of a GLUE layout as columns {name: values}; every line must parse."""
    path = Path(path)
    lines = read_delimited(path)
    header = None
    if layout.has_header:
        first = next(lines, None)
        if first is None:
            raise DataError(path, "empty file (no header line)")
        header = [h.strip() for h in first[1]]
    indices = {name: _column_index(path, header, col, 1) for name, col in layout.columns.items()}
    width = len(header) if header else layout.width
    columns: dict[str, list] = {name: [] for name in layout.columns}
    for line, fields in lines:
        if len(fields) != width:
            raise DataError(path, f"expected {width} tab-separated fields, found {len(fields)}", line)
        for name, i in indices.items():
            value = fields[i]
            columns[name].append(_parse_label(path, line, value.strip(), layout.labels) if name == "label" else value)
    require_nonempty(path, columns["label"])
    return columns


def _mrpc_msr_splits(folder: Path, layout: _Layout) -> dict[str, dict[str, list]]:
    """MRPC from Microsoft's msr_paraphrase_*.txt, split as GLUE does when dev_ids.tsv is there."""
    id_columns = {"id1": "#1 ID", "id2": "#2 ID"}
    train = read_glue_file(folder / _MSR_FILES["train"], replace(layout, columns={**layout.columns, **id_columns}))
    pairs = list(zip(train.pop("id1"), train.pop("id2")))
    ids_path = folder / _MSR_FILES["dev_ids"]
    if not ids_path.is_file():
        return {"train": train, "validation": read_glue_file(folder / _MSR_FILES["test"], layout)}
    dev_pairs = {tuple(fields[:2]) for _, fields in read_delimited(ids_path)}
    in_dev = [pair in dev_pairs for pair in pairs]
    split = {
        name: {k: [v for v, d in zip(values, in_dev) if d == dev] for k, values in train.items()}
        for name, dev in (("train", False), ("validation", True))
    }
    require_nonempty(ids_path, split["validation"]["label"], f"pairs of {_MSR_FILES['train']}")
    return split


def load_glue_local(task: str, data_dir: str | Path) -> dict[str, dict[str, list]]:
    """{split: {column: values}} for `task` from a folder in the original GLUE layout.

    `data_dir` may be the GLUE root (holding `SST-2/`, `RTE/`, ...) or the task folder itself.
    """
    layout = LAYOUTS[task]
    root = Path(data_dir)
    folder = root / layout.folder if (root / layout.folder).is_dir() else root
    if not (folder / "train.tsv").is_file() and not (folder / _MSR_FILES["train"]).is_file():
        raise DataError(root, f"no {layout.folder}/ folder and no train.tsv here (expected the GLUE layout)")
    if task == "mrpc" and not (folder / "train.tsv").is_file() and (folder / _MSR_FILES["train"]).is_file():
        return _mrpc_msr_splits(folder, layout)
    return {split: read_glue_file(folder / name, layout) for split, name in layout.files.items()}


def load_glue(task: str, data_dir: str | Path | None = None):
    """A `datasets.DatasetDict` for a GLUE task, with the hub's column names and label ids.

    Args:
        task: one of cola, sst2, mrpc, qqp, mnli, qnli, rte, stsb.
        data_dir: a folder in the original GLUE layout; None loads `nyu-mll/glue` from the hub.
    """
    import datasets

    if task not in LAYOUTS:
        raise ValueError(f"unknown GLUE task {task!r}; choose one of {', '.join(LAYOUTS)}")
    if data_dir is not None:
        splits = load_glue_local(task, data_dir)
        return datasets.DatasetDict({name: datasets.Dataset.from_dict(cols) for name, cols in splits.items()})
    try:
        hub = datasets.load_dataset(HUB_DATASET, task)
    except Exception as e:  # offline, or the hub is unreachable: say what to do instead
        raise DataUnavailableError(
            f"could not load {HUB_DATASET}/{task} from the Hugging Face hub ({type(e).__name__}: {e}); "
            f"pass --data-dir with a folder in the GLUE layout (e.g. {LAYOUTS[task].folder}/train.tsv)"
        ) from e
    keep = [*LAYOUTS[task].columns]
    return datasets.DatasetDict(
        {s: hub[s].select_columns(keep) for s in ("train", *glue_task(task).eval_splits)}
    )


# -- metrics ------------------------------------------------------------------------------------
# scikit-learn and scipy are imported where used: importing them costs seconds, and every
# `wtacrs` command imports this module to list the task names.
def _classification_metrics(predictions, labels, *, with_f1: bool = False, with_mcc: bool = False) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if with_mcc:
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    out = {"accuracy": float(accuracy_score(labels, predictions))}
    if with_f1:
        out["f1"] = float(f1_score(labels, predictions))
    return out


def _regression_metrics(predictions, labels) -> dict:
    from scipy.stats import pearsonr, spearmanr

    predictions, labels = np.asarray(predictions, dtype=float).ravel(), np.asarray(labels, dtype=float)
    return {"pearson": float(pearsonr(predictions, labels)[0]), "spearman": float(spearmanr(predictions, labels)[0])}


def _with_score(metric_fn, predictions, labels) -> dict:
    metrics = metric_fn(predictions, labels)
    return {**metrics, "score": float(np.mean(list(metrics.values())))}


_METRICS = {
    "cola": partial(_classification_metrics, with_mcc=True),
    "mrpc": partial(_classification_metrics, with_f1=True),
    "qqp": partial(_classification_metrics, with_f1=True),
    "stsb": _regression_metrics,
}

_LABEL_NAMES = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "stsb": (),
}


_SCORE_NAMES = {
    "cola": "Matthews corr.",
    "mrpc": "mean(F1, accuracy)",
    "qqp": "mean(F1, accuracy)",
    "stsb": "mean(Pearson, Spearman)",
}


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
    """GLUE metrics of one validation split plus their mean as "score".

    Args:
        predictions: (N,) class ids, or (N,) scores for STS-B.
        labels: (N,) gold label ids (STS-B: gold scores).
    """
    return _with_score(_METRICS.get(task, _classification_metrics), predictions, labels)


def glue_task(task: str) -> Task:
    """The `Task` description of a GLUE task (columns, labels, validation splits, metrics)."""
    if task not in LAYOUTS:
        raise ValueError(f"unknown GLUE task {task!r}; choose one of {', '.join(LAYOUTS)}")
    layout = LAYOUTS[task]
    return Task(
        name=task,
        kind="regression" if task == "stsb" else "classification",
        text_columns=tuple(c for c in layout.columns if c != "label"),
        label_names=_LABEL_NAMES[task],
        eval_splits=tuple(s for s in layout.files if s != "train"),
        compute_metrics=partial(glue_metrics, task),
        score_name=_SCORE_NAMES.get(task, "accuracy"),
    )
