"""SQuAD v1.1 / v2.0 extractive question answering: loading, windowed features, span
post-processing and the official exact-match / F1 evaluation.

Preprocessing and post-processing follow the Transformers `run_qa.py` example: each
(question, context) pair becomes one or more windows of `max_length` tokens overlapping by
`stride`; training labels are the answer's token span, or the [CLS] position when the window
does not contain it (and for unanswerable v2 questions); evaluation takes, per question, the
best of the n-best (start, end) pairs over all its windows, and for v2 answers "" when the
null score beats the best span by more than `null_score_diff_threshold`.

The scores are those of the official `evaluate-v1.1.py` / `evaluate-v2.0.py` scripts:
answers are lower-cased and stripped of punctuation, articles and extra whitespace; exact match
and token F1 take the maximum over the gold answers; an unanswerable question's gold answer is
"" (v2). Both are reported in percent, as the official scripts do.
"""

from __future__ import annotations

import collections
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from wtacrs.tasks.common import DataError, DataUnavailableError, Task, read_text, require_nonempty

SQUAD_TASKS: tuple[str, ...] = ("squad", "squad_v2")
HUB_DATASETS = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}
OFFICIAL_FILES = {
    "squad": ("train-v1.1.json", "dev-v1.1.json"),
    "squad_v2": ("train-v2.0.json", "dev-v2.0.json"),
}
ARTICLE_HOLDOUT_EVERY = 5  # one file: articles 4, 9, 14, ... (0-based) are the evaluation part


# -- loading -----------------------------------------------------------------------------------
def _require(path: Path, where: str, obj, key: str, kind: type):
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(path, f"{where}: missing {key!r}")
    if not isinstance(obj[key], kind):
        raise DataError(path, f"{where}.{key}: expected {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _answers(path: Path, where: str, qa: dict, context: str, version_2: bool | None) -> dict[str, list]:
    """The question's gold answers, each checked to be a non-empty text found at its answer_start
    in the context; unanswerable (is_impossible) questions have none, and only in SQuAD v2.0."""
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise DataError(path, f"{where}.is_impossible: expected bool, got {type(impossible).__name__}")
    if impossible and version_2 is False:
        raise DataError(path, f"{where}: is_impossible (unanswerable questions are SQuAD v2.0's; use squad_v2)")
    texts, starts = [], []
    for a, answer in enumerate(_require(path, where, qa, "answers", list)):
        text = _require(path, f"{where}.answers[{a}]", answer, "text", str)
        start = _require(path, f"{where}.answers[{a}]", answer, "answer_start", int)
        _check_answer(path, f"{where}.answers[{a}]", context, text, start)
        texts.append(text)
        starts.append(start)
    if texts and impossible:
        raise DataError(path, f"{where}: marked is_impossible but has {len(texts)} answer(s)")
    if not texts and not impossible:
        raise DataError(path, f"{where}: no answers and not marked is_impossible")
    return {"text": texts, "answer_start": starts}


def _check_answer(path: Path, where: str, context: str, text: str, start: int) -> None:
    """The answer must be where answer_start says: training labels and evaluation rely on it."""
    if not text.strip():
        raise DataError(path, f"{where}: empty answer text")
    if not 0 <= start <= len(context) - len(text):
        raise DataError(path, f"{where}: answer_start {start} lies outside the context")
    found = context[start : start + len(text)]
    if found != text:
        raise DataError(path, f"{where}: answer_start {start} points at {found!r}, not at the answer {text!r}")


def _question(path: Path, at: str, qa: dict, title: str, context: str, version_2: bool | None) -> dict:
    qid = _require(path, at, qa, "id", str)
    at = f"{at} (question id {qid!r})"
    question = _require(path, at, qa, "question", str)
    if not question.strip():
        raise DataError(path, f"{at}: empty question")
    return {"id": qid, "title": title, "context": context, "question": question,
            "answers": _answers(path, at, qa, context, version_2)}


def read_squad_json(path: str | Path, version_2: bool | None = None) -> list[list[dict]]:
    """Articles of an official SQuAD JSON file, each a list of question records
    {id, title, context, question, answers: {text: [...], answer_start: [...]}}.

    The file is checked as the official evaluation assumes it well-formed: every answer is a
    non-empty text at its answer_start in the context, question ids are unique, a question has
    answers unless it is unanswerable (is_impossible, SQuAD v2.0: refused when `version_2` is
    False). Errors name the file, the JSON location (e.g. data[3].paragraphs[0].qas[2]) and the
    question id.
    """
    path = Path(path)
    try:
        document = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg}, column {e.colno})", e.lineno) from None
    except RecursionError:
        raise DataError(path, "not a SQuAD file: its JSON is nested too deeply") from None
    articles, seen = [], {}
    for i, article in enumerate(_require(path, "top level", document, "data", list)):
        records = []
        title = article.get("title", "") if isinstance(article, dict) else ""
        for j, paragraph in enumerate(_require(path, f"data[{i}]", article, "paragraphs", list)):
            where = f"data[{i}].paragraphs[{j}]"
            context = _require(path, where, paragraph, "context", str)
            for k, qa in enumerate(_require(path, where, paragraph, "qas", list)):
                record = _question(path, f"{where}.qas[{k}]", qa, title, context, version_2)
                if record["id"] in seen:
                    raise DataError(path, f"{where}.qas[{k}]: question id {record['id']!r} is already used at "
                                          f"{seen[record['id']]}")
                seen[record["id"]] = f"{where}.qas[{k}]"
                records.append(record)
        articles.append(records)
    require_nonempty(path, [r for a in articles for r in a], "questions")
    return articles


def split_articles(articles: list[list[dict]]) -> tuple[list[dict], list[dict]]:
    """(train, evaluation) question records of one file, split by article so that no context is
    seen in training: every ARTICLE_HOLDOUT_EVERY-th article (file order) is evaluation."""
    held_out = lambda i: i % ARTICLE_HOLDOUT_EVERY == ARTICLE_HOLDOUT_EVERY - 1  # noqa: E731
    train = [r for i, a in enumerate(articles) if not held_out(i) for r in a]
    evaluation = [r for i, a in enumerate(articles) if held_out(i) for r in a]
    return train, evaluation


def _records_to_columns(records: list[dict]) -> dict[str, list]:
    return {key: [r[key] for r in records] for key in ("id", "title", "context", "question", "answers")}


def load_squad(task: str, data_dir: str | Path | None = None):
    """A `datasets.DatasetDict` (train, validation) for squad / squad_v2.

    Args:
        data_dir: a folder with the official train and dev files (train-v1.1.json and
            dev-v1.1.json, or the v2.0 pair); a single JSON file, split by article into train
            and validation (`split_articles`); or None for the hub (rajpurkar/squad[_v2]).
    """
    import datasets

    if task not in SQUAD_TASKS:
        raise ValueError(f"unknown SQuAD task {task!r}; choose one of {', '.join(SQUAD_TASKS)}")
    if data_dir is None:
        return _load_squad_hub(task)
    data_dir, version_2 = Path(data_dir), task == "squad_v2"
    if data_dir.is_file():
        train, validation = split_articles(read_squad_json(data_dir, version_2))
        require_nonempty(data_dir, validation, f"held-out articles (needs >= {ARTICLE_HOLDOUT_EVERY} articles)")
    else:
        train_name, dev_name = OFFICIAL_FILES[task]
        if not (data_dir / train_name).is_file():
            raise DataError(data_dir / train_name, "file not found; or pass one JSON file to split it by article")
        train = [r for a in read_squad_json(data_dir / train_name, version_2) for r in a]
        validation = [r for a in read_squad_json(data_dir / dev_name, version_2) for r in a]
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(_records_to_columns(train)),
        "validation": datasets.Dataset.from_dict(_records_to_columns(validation)),
    })


def _load_squad_hub(task: str):
    import datasets

    try:
        return datasets.load_dataset(HUB_DATASETS[task])
    except Exception as e:  # offline, or the hub is unreachable: say what to do instead
        raise DataUnavailableError(
            f"could not load {HUB_DATASETS[task]} from the Hugging Face hub ({type(e).__name__}: {e}); "
            f"pass --data-dir with {' and '.join(OFFICIAL_FILES[task])}, or one SQuAD JSON file"
        ) from e


# -- features ----------------------------------------------------------------------------------
def _encode(rows: dict, tokenizer, max_length: int, stride: int) -> dict:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("SQuAD preprocessing needs a fast tokenizer (offset mappings)")
    pad_on_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in rows["question"]]  # leading spaces waste window tokens
    first, second = (questions, rows["context"]) if pad_on_right else (rows["context"], questions)
    return tokenizer(
        first, second,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_length, stride=stride, padding="max_length",
        return_overflowing_tokens=True, return_offsets_mapping=True,
    )


def _context_index(tokenizer) -> int:
    return 1 if tokenizer.padding_side == "right" else 0


def _answer_tokens(offsets, context_tokens: list[int], answers: dict) -> tuple[int, int] | None:
    """Token span of the first gold answer inside one window, or None if it is not inside."""
    if not answers["text"] or not context_tokens:
        return None
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    if offsets[context_tokens[0]][0] > start_char or offsets[context_tokens[-1]][1] < end_char:
        return None
    start = next(t for t in context_tokens if offsets[t][1] > start_char)
    end = next(t for t in reversed(context_tokens) if offsets[t][0] < end_char)
    return start, end


def _label_windows(enc, rows: dict, tokenizer, mapping: list[int]) -> dict[str, list[int]]:
    """start/end token positions of each window's first gold answer ([CLS] if not inside)."""
    context = _context_index(tokenizer)
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ids = enc["input_ids"][i]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        context_tokens = [t for t, s in enumerate(enc.sequence_ids(i)) if s == context]
        start, end = _answer_tokens(offsets, context_tokens, rows["answers"][mapping[i]]) or (cls, cls)
        starts.append(start)
        ends.append(end)
    return {"start_positions": starts, "end_positions": ends}


def prepare_train_features(rows: dict, tokenizer, max_length: int = 384, stride: int = 128) -> dict:
    """Windows with start/end token positions of the first gold answer ([CLS] if not inside)."""
    enc = _encode(rows, tokenizer, max_length, stride)
    labels = _label_windows(enc, rows, tokenizer, enc.pop("overflow_to_sample_mapping"))
    enc.pop("offset_mapping")
    return {**enc, **labels}


def prepare_eval_features(rows: dict, tokenizer, max_length: int = 384, stride: int = 128) -> dict:
    """Labelled windows (so the Trainer reports an eval loss and calls compute_metrics) plus, for
    post-processing, the question id and the context offsets (None outside the context)."""
    enc = _encode(rows, tokenizer, max_length, stride)
    mapping = enc.pop("overflow_to_sample_mapping")
    labels = _label_windows(enc, rows, tokenizer, mapping)
    enc["squad_id"] = [rows["id"][m] for m in mapping]
    context = _context_index(tokenizer)
    enc["offset_mapping"] = [
        [o if s == context else None for o, s in zip(offsets, enc.sequence_ids(i))]
        for i, offsets in enumerate(enc["offset_mapping"])
    ]
    return {**enc, **labels}


class WindowTooShortError(ValueError):
    """A question leaves no room for `stride` context tokens in a `max_length` window."""


def check_windows(rows, tokenizer, max_length: int, stride: int) -> None:
    """Raise WindowTooShortError naming the first question whose tokens (with the special
    tokens) leave no more than `stride` context tokens per window: the tokenizer would fail
    there, or windows could not advance through the context."""
    special = tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [len(ids) for ids in tokenizer([q.lstrip() for q in rows["question"]], add_special_tokens=False)
               ["input_ids"]]
    for qid, length in zip(rows["id"], lengths):
        room = max_length - special - length
        if room <= stride:
            raise WindowTooShortError(
                f"question id {qid!r} takes {length} tokens: a --max-length {max_length} window leaves {room} "
                f"context tokens, and --doc-stride {stride} needs more; raise --max-length or lower --doc-stride")


# -- post-processing ---------------------------------------------------------------------------
def _best_spans(start, end, offsets, n_best: int, max_answer_length: int):
    """(score, start char, end char) of the n-best valid spans of one window."""
    starts = np.argsort(start)[-1 : -n_best - 1 : -1]
    ends = np.argsort(end)[-1 : -n_best - 1 : -1]
    for s in starts:
        for e in ends:
            if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                continue
            if e < s or e - s + 1 > max_answer_length:
                continue
            yield float(start[s] + end[e]), offsets[s][0], offsets[e][1]


def postprocess_predictions(
    examples,
    features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    version_2: bool = False,
    n_best: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, str]:
    """{question id: answer text} from per-window logits.

    Args:
        examples: rows with "id" and "context" (a Dataset or a list of dicts).
        features: rows with "squad_id" and "offset_mapping" from `prepare_eval_features`, in
            the order of the logits.
        start_logits, end_logits: (num_features, seq_len).
        version_2: allow the null answer "" (SQuAD v2.0).
    """
    by_example = collections.defaultdict(list)
    for i, feature in enumerate(features):
        by_example[feature["squad_id"]].append(i)
    predictions = {}
    for example in examples:
        best, null_score = (-np.inf, 0, 0), np.inf
        for i in by_example[example["id"]]:
            offsets = features[i]["offset_mapping"]
            null_score = min(null_score, float(start_logits[i][0] + end_logits[i][0]))
            for span in _best_spans(start_logits[i], end_logits[i], offsets, n_best, max_answer_length):
                best = max(best, span, key=lambda s: s[0])
        text = example["context"][best[1] : best[2]] if np.isfinite(best[0]) else ""
        if version_2 and null_score - best[0] > null_score_diff_threshold:
            text = ""
        predictions[example["id"]] = text
    return predictions


# -- official evaluation -----------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, the articles a/an/the and extra whitespace (official script)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised answers; for an empty answer, 1 iff both are empty."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Official SQuAD scores in percent: exact_match, f1 (max over gold answers), "score" = f1;
    with unanswerable questions (gold []) also HasAns_/NoAns_ breakdowns as evaluate-v2.0.py."""
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[0]!r}")
    em, f1 = {}, {}
    for qid, golds in references.items():
        golds = golds or [""]
        em[qid] = max(exact_match(predictions[qid], g) for g in golds)
        f1[qid] = max(token_f1(predictions[qid], g) for g in golds)
    out = _percent(em, f1, references)
    has_answer = {q for q, g in references.items() if g}
    if len(has_answer) < len(references):
        for prefix, keep in (("HasAns_", has_answer), ("NoAns_", set(references) - has_answer)):
            if keep:
                part = _percent({q: em[q] for q in keep}, {q: f1[q] for q in keep}, keep)
                out.update({prefix + k: v for k, v in part.items() if k != "score"})
    return out


def _percent(em: dict, f1: dict, ids) -> dict[str, float]:
    n = len(ids)
    scores = {"exact_match": 100.0 * sum(em.values()) / n, "f1": 100.0 * sum(f1.values()) / n}
    return {**scores, "score": scores["f1"]}


def first_train_windows(path: str | Path, tokenizer, count: int, start: int = 0, max_length: int = 192,
                        stride: int = 64) -> dict:
    """A collated batch of `count` training windows (padded to `max_length`) of the questions
    from `start` on, in the training half of `split_articles` of the SQuAD file at `path`: the
    studies' fixed probe batch (benchmarks/padding_gradient.py, model_unbiasedness.py)."""
    from transformers import default_data_collator

    train, _ = split_articles(read_squad_json(path))
    rows = {key: [r[key] for r in train[start:start + count]] for key in ("question", "context", "answers")}
    features = prepare_train_features(rows, tokenizer, max_length=max_length, stride=stride)
    return default_data_collator([{k: v[i] for k, v in features.items()} for i in range(count)])


@dataclass(frozen=True)
class QATask(Task):
    """Extractive QA: windows of question + context, a start/end head, answers scored by F1."""

    extra_settings: ClassVar[tuple[str, ...]] = ("doc_stride", "n_best", "max_answer_length")
    peft_task_type: ClassVar[str] = "QUESTION_ANS"
    loss_reads_padding: ClassVar[bool] = True  # the start/end softmax spans padded positions too

    def auto_class(self):
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def datasets(self, train_raw, evals_raw: dict, tokenizer, settings):
        (split, eval_raw), = evals_raw.items()  # SQuAD has one validation split
        train, evaluation, metrics = squad_datasets(
            train_raw, eval_raw, tokenizer, max_length=settings.max_length, stride=settings.doc_stride,
            n_best=settings.n_best, max_answer_length=settings.max_answer_length, version_2=self.name == "squad_v2",
        )
        return train, {split: evaluation}, metrics

    def collator(self, tokenizer, settings):
        from transformers import default_data_collator

        return default_data_collator  # windows are padded to max_length when they are made

    logits_for_metrics = None  # start and end logits both go to the metric


def squad_task(task: str) -> QATask:
    """The `QATask` of squad / squad_v2 (metrics take predictions and references)."""
    if task not in SQUAD_TASKS:
        raise ValueError(f"unknown SQuAD task {task!r}; choose one of {', '.join(SQUAD_TASKS)}")
    return QATask(name=task, kind="qa", compute_metrics=squad_metrics, score_name="F1",
                  defaults={"epochs": 2.0, "batch_size": 16, "max_length": 384})


def squad_datasets(
    train_raw, eval_raw, tokenizer, *, max_length: int, stride: int, n_best: int,
    max_answer_length: int, version_2: bool,
):
    """(train features, eval features, compute_metrics) for the Transformers Trainer.

    Eval features keep only model inputs; compute_metrics post-processes the (start, end)
    logits of the eval features back to answers and scores them with `squad_metrics`.
    """
    for split in (train_raw, eval_raw):
        check_windows(split, tokenizer, max_length, stride)
    window = {"tokenizer": tokenizer, "max_length": max_length, "stride": stride}
    train = train_raw.map(
        prepare_train_features, batched=True, remove_columns=train_raw.column_names, desc="windows", fn_kwargs=window
    )
    features = eval_raw.map(
        prepare_eval_features, batched=True, remove_columns=eval_raw.column_names, desc="windows", fn_kwargs=window
    )
    references = {r["id"]: r["answers"]["text"] for r in eval_raw}

    def compute_metrics(prediction) -> dict[str, float]:
        start_logits, end_logits = prediction.predictions[:2]
        answers = postprocess_predictions(
            eval_raw, features, start_logits, end_logits,
            version_2=version_2, n_best=n_best, max_answer_length=max_answer_length,
        )
        return squad_metrics(answers, references)

    return train, features.remove_columns(["squad_id", "offset_mapping"]), compute_metrics
