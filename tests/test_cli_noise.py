"""The CLI keeps third-party noise off stderr and lets meaningful warnings through."""

from __future__ import annotations

import logging

import pytest
from torch import nn
from transformers.utils import logging as hf_logging
from transformers.utils.loading_report import LoadStateDictInfo, log_state_dict_report

import wtacrs.cli  # noqa: F401  (installs the filters)


class BertForSequenceClassification(nn.Module):
    """Only its class name shows in the report."""


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _report(missing=(), unexpected=()) -> str:
    """What transformers logs (its library logger does not propagate to pytest's) for this load."""
    info = LoadStateDictInfo(missing_keys=set(missing), unexpected_keys=set(unexpected), mismatched_keys=set(),
                             error_msgs=[], conversion_errors={}, skipped_pp_keys=set())
    collect, library = Collect(), logging.getLogger("transformers")
    library.addHandler(collect)
    try:
        log_state_dict_report(BertForSequenceClassification(), "some/model", False, info,
                              logger=hf_logging.get_logger("transformers.modeling_utils"))
    finally:
        library.removeHandler(collect)
    return "\n".join(collect.messages)


@pytest.mark.parametrize("missing", [("classifier.weight", "classifier.bias"),
                                     ("pre_classifier.weight", "classifier.weight"), ("score.weight",)])
def test_a_new_task_head_is_not_reported(missing):
    assert _report(missing) == ""


@pytest.mark.parametrize("missing, unexpected", [
    (("classifier.weight", "bert.encoder.layer.0.output.dense.weight"), ()),  # a body weight not loaded
    (("classifier.weight",), ("cls.predictions.bias",)),
])
def test_a_report_of_anything_else_is_kept(missing, unexpected):
    report = _report(missing, unexpected)
    assert "LOAD REPORT" in report and "classifier.weight" in report
