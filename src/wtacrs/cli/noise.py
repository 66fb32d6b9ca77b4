"""Third-party messages that tell a user of `wtacrs` commands nothing, kept off stderr.

Each filter is narrow (one logger, one message shape), so the same library's other warnings
still reach the user. The torch profiler's own lines are dropped where the profile runs
(`wtacrs.memory.AllocatorPeak`).
"""

from __future__ import annotations

import logging
import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Task heads that `from_pretrained` creates new on a pre-trained body: sequence classification
# (BERT, RoBERTa, DistilBERT, decoders' `score`) and extractive QA.
NEW_HEAD_PREFIXES = ("classifier.", "pre_classifier.", "score.", "qa_outputs.")


class NewHeadLoadReport(logging.Filter):
    """Drops transformers' "LOAD REPORT" when all it lists is a task head missing from the
    checkpoint: every fine-tuning run starts a new head, so the report reads as an error where
    nothing is wrong. A report with any other key or status (unexpected, mismatched, a missing
    body weight) is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = _ANSI.sub("", record.getMessage())
        if " LOAD REPORT" not in text:
            return True
        # the prelude line, the table's header and rule, then one "key | status | ..." row per key
        rows = [line.split("|") for line in text.split("\n\nNotes:")[0].splitlines()[3:]]
        only_new_heads = rows and all(
            len(row) >= 2 and row[1].strip() == "MISSING" and row[0].strip().startswith(NEW_HEAD_PREFIXES)
            for row in rows
        )
        return not only_new_heads


def quiet_third_party() -> None:
    """Install the filters (once per process, however often called)."""
    logging.getLogger("transformers.modeling_utils").addFilter(_NEW_HEAD_LOAD_REPORT)


def library_progress_bars_off() -> None:
    """Turn off the bars datasets and transformers draw themselves (tokenizing, loading and
    writing weights), which `--no-progress` turns off besides the Trainer's."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()


_NEW_HEAD_LOAD_REPORT = NewHeadLoadReport()
