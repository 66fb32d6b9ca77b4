"""Task loaders (every GLUE layout, SQuAD JSON, the tweet corpus), metrics and SQuAD post-processing,
all on tiny files written here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from wtacrs.tasks import DataError, get_task, load_task
from wtacrs.tasks.glue import glue_metrics
from wtacrs.tasks.squad import (
    exact_match,
    normalize_answer,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    read_squad_json,
    split_articles,
    squad_metrics,
    token_f1,
)
from wtacrs.tasks.tweets import load_tweets, read_corpus


def write(path, lines, newline="\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(newline.join(lines) + newline, encoding="utf-8")
    return path


def tsv(*rows):
    return ["\t".join(map(str, r)) for r in rows]


# -- GLUE layouts ------------------------------------------------------------------------------
MNLI_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
               "sentence2_parse sentence1 sentence2 label1 gold_label").split()


def mnli_row(i, label):
    return (i, 1, 2, "fiction", "(a)", "(b)", "(A)", "(B)", f"premise {i}", f"hypothesis {i}", label, label)


def write_glue(root):
    """A GLUE folder with two train and two dev examples for each task."""
    write(root / "CoLA/train.tsv", tsv(("gj04", 1, "", "Bill laughed."), ("gj04", 0, "*", "Laughed Bill the.")))
    write(root / "CoLA/dev.tsv", tsv(("gj04", 1, "", "She ran."), ("gj04", 0, "*", "Ran she the.")))
    for split in ("train", "dev"):
        write(root / f"SST-2/{split}.tsv", tsv(("sentence", "label"), ("a fine film ", 1), ("dull ", 0)))
        write(root / f"MRPC/{split}.tsv", tsv(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                                               (1, 1, 2, 'He said "yes".', "He agreed."), (0, 3, 4, "A", "B")))
        write(root / f"QQP/{split}.tsv", tsv(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                                              (0, 1, 2, "Why?", "How?", 0), (1, 3, 4, "What?", "What?", 1)))
        write(root / f"QNLI/{split}.tsv", tsv(("index", "question", "sentence", "label"),
                                               (0, "Q?", "S.", "entailment"), (1, "Q2?", "S2.", "not_entailment")))
        write(root / f"RTE/{split}.tsv", tsv(("index", "sentence1", "sentence2", "label"),
                                              (0, "P.", "H.", "not_entailment"), (1, "P2.", "H2.", "entailment")))
        write(root / f"STS-B/{split}.tsv", tsv(
            ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
             "score"),
            (0, "main-captions", "MSRvid", "2012test", 1, "none", "none", "A man.", "A man.", "5.000"),
            (1, "main-captions", "MSRvid", "2012test", 4, "none", "none", "A cat.", "A dog.", "0.5")))
    for name in ("train", "dev_matched", "dev_mismatched"):
        write(root / f"MNLI/{name}.tsv", tsv(MNLI_HEADER, mnli_row(0, "neutral"), mnli_row(1, "contradiction")))
    return root


EXPECTED = {
    "cola": ({"sentence": "Bill laughed.", "label": 1}, ["train", "validation"]),
    "sst2": ({"sentence": "a fine film ", "label": 1}, ["train", "validation"]),
    "mrpc": ({"sentence1": 'He said "yes".', "sentence2": "He agreed.", "label": 1}, ["train", "validation"]),
    "qqp": ({"question1": "Why?", "question2": "How?", "label": 0}, ["train", "validation"]),
    "mnli": ({"premise": "premise 0", "hypothesis": "hypothesis 0", "label": 1},
             ["train", "validation_matched", "validation_mismatched"]),
    "qnli": ({"question": "Q?", "sentence": "S.", "label": 0}, ["train", "validation"]),
    "rte": ({"sentence1": "P.", "sentence2": "H.", "label": 1}, ["train", "validation"]),
    "stsb": ({"sentence1": "A man.", "sentence2": "A man.", "label": 5.0}, ["train", "validation"]),
}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_every_glue_layout_loads_with_hub_columns_and_label_ids(tmp_path, task):
    data = load_task(task, write_glue(tmp_path))
    first, splits = EXPECTED[task]
    assert list(data) == splits
    assert data["train"][0] == first
    assert [*get_task(task).eval_splits] == splits[1:]
    assert all(len(data[s]) == 2 for s in splits)


def test_glue_task_folder_itself_is_accepted(tmp_path):
    assert load_task("rte", write_glue(tmp_path) / "RTE")["validation"][1]["label"] == 0


def msr(path, rows):
    return write(path, tsv(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), *rows))


def test_mrpc_from_microsoft_files_split_by_dev_ids(tmp_path):
    msr(tmp_path / "MRPC/msr_paraphrase_train.txt",
        [(1, 10, 11, "a", "b"), (0, 12, 13, "c", "d"), (1, 14, 15, "e", "f")])
    msr(tmp_path / "MRPC/msr_paraphrase_test.txt", [(0, 20, 21, "g", "h")])
    write(tmp_path / "MRPC/dev_ids.tsv", tsv((12, 13)))
    data = load_task("mrpc", tmp_path)
    assert data["train"]["sentence1"] == ["a", "e"] and data["validation"]["sentence1"] == ["c"]
    (tmp_path / "MRPC/dev_ids.tsv").unlink()  # without it the MSR test split validates
    data = load_task("mrpc", tmp_path)
    assert len(data["train"]) == 3 and data["validation"]["sentence1"] == ["g"]


@pytest.mark.parametrize(
    "file, lines, message",
    [
        ("RTE/train.tsv", tsv(("index", "sentence1", "sentence2", "label"), (0, "P", "H", "entailment"), (1, "P", "H")),
         "RTE/train.tsv, line 3: expected 4 tab-separated fields, found 3"),
        ("RTE/train.tsv", tsv(("index", "sentence1", "sentence2", "label"), (0, "P", "H", "maybe")),
         "RTE/train.tsv, line 2: unknown label 'maybe'"),
        ("RTE/train.tsv", tsv(("index", "premise", "sentence2", "label"), (0, "P", "H", "entailment")),
         "RTE/train.tsv, line 1: missing column 'sentence1'"),
        ("RTE/train.tsv", tsv(("index", "sentence1", "sentence2", "label")), "RTE/train.tsv: no examples found"),
        ("RTE/dev.tsv", [], "RTE/dev.tsv: empty file"),
    ],
)
def test_glue_file_errors_name_file_and_line(tmp_path, file, lines, message):
    write_glue(tmp_path)
    write(tmp_path / file, lines) if lines else (tmp_path / file).write_text("")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_task("rte", tmp_path)


def test_stsb_score_out_of_range_and_bad_utf8_are_reported(tmp_path):
    write_glue(tmp_path)
    path = tmp_path / "STS-B/dev.tsv"
    path.write_text(path.read_text().replace("0.5", "7.5"))
    with pytest.raises(DataError, match=r"STS-B/dev.tsv, line 3: similarity score '7.5'"):
        load_task("stsb", tmp_path)
    (tmp_path / "SST-2/train.tsv").write_bytes(b"sentence\tlabel\nok\t1\nbad \xff\t0\n")
    with pytest.raises(DataError, match=r"SST-2/train.tsv, line 3: not valid utf-8-sig"):
        load_task("sst2", tmp_path)


def test_missing_glue_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=r"no SST-2/ folder and no train.tsv"):
        load_task("sst2", tmp_path)
    write_glue(tmp_path)
    (tmp_path / "SST-2/dev.tsv").unlink()
    with pytest.raises(DataError, match=r"SST-2/dev.tsv: file not found"):
        load_task("sst2", tmp_path)


# -- metrics -----------------------------------------------------------------------------------
def test_glue_metrics_known_values():
    cola = glue_metrics("cola", [1, 0, 0, 0], [1, 1, 0, 0])
    assert cola["matthews_correlation"] == pytest.approx(2 / math.sqrt(12))
    assert cola["score"] == cola["matthews_correlation"]
    mrpc = glue_metrics("mrpc", [1, 0, 1, 0, 1], [1, 1, 0, 0, 1])
    assert mrpc["accuracy"] == pytest.approx(0.6) and mrpc["f1"] == pytest.approx(2 / 3)
    assert mrpc["score"] == pytest.approx((0.6 + 2 / 3) / 2)
    stsb = glue_metrics("stsb", np.array([[1.0], [2.0], [3.0], [10.0]]), [0.0, 1.0, 2.0, 3.0])
    assert stsb["spearman"] == pytest.approx(1.0) and stsb["pearson"] < 0.95
    assert glue_metrics("sst2", [0, 1, 1], [0, 1, 0])["score"] == pytest.approx(2 / 3)


def test_squad_normalisation_and_scores_match_the_official_script():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert exact_match("the Denver Broncos", "Denver Broncos") == 1.0
    assert token_f1("Denver Broncos won", "the Denver Broncos") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    v1 = squad_metrics({"a": "Broncos", "b": "wrong"}, {"a": ["Denver Broncos", "Broncos"], "b": ["right"]})
    assert v1 == {"exact_match": 50.0, "f1": 50.0, "score": 50.0}
    v2 = squad_metrics({"a": "Broncos", "n": ""}, {"a": ["Broncos"], "n": []})
    assert v2["exact_match"] == 100.0 and v2["HasAns_f1"] == 100.0 and v2["NoAns_exact_match"] == 100.0
    with pytest.raises(ValueError, match="no prediction for 1 question"):
        squad_metrics({}, {"a": ["x"]})


# -- SQuAD -------------------------------------------------------------------------------------
def squad_doc(n_articles=5):
    return {"version": "1.1", "data": [
        {"title": f"T{i}", "paragraphs": [{"context": f"Alpha beta {i} gamma.", "qas": [
            {"id": f"q{i}", "question": "Which?", "answers": [{"text": f"beta {i}", "answer_start": 6}]}]}]}
        for i in range(n_articles)]}


def test_squad_json_single_file_splits_by_article(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(squad_doc(10)))
    train, evaluation = split_articles(read_squad_json(path))
    assert [r["id"] for r in evaluation] == ["q4", "q9"] and len(train) == 8
    data = load_task("squad", path)
    assert data["validation"]["id"] == ["q4", "q9"]
    assert data["train"][0]["answers"] == {"text": ["beta 0"], "answer_start": [6]}


def test_squad_json_errors_name_file_and_location(tmp_path):
    path = tmp_path / "bad.json"
    doc = squad_doc()
    del doc["data"][2]["paragraphs"][0]["qas"][0]["question"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError,
                       match=r"bad.json: data\[2\].paragraphs\[0\].qas\[0\] \(question id 'q2'\): missing 'question'"):
        read_squad_json(path)
    doc = squad_doc()
    doc["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 999
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"answer_start 999 lies outside the context"):
        read_squad_json(path)
    path.write_text('{"data": [\n  {"title": }\n]}')
    with pytest.raises(DataError, match=r"bad.json, line 2: not valid JSON"):
        read_squad_json(path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"train-v1.1.json: file not found"):
        load_task("squad", tmp_path / "folder")


def window_features():
    """Two hand-made windows of one question: context tokens at positions 1..3 of each."""
    return [
        {"squad_id": "q", "offset_mapping": [None, (0, 5), (6, 11), (12, 17), None]},
        {"squad_id": "q", "offset_mapping": [None, (12, 17), (18, 23), (24, 29), None]},
    ]


def test_postprocess_takes_the_best_valid_span_over_windows_and_null_answers_for_v2():
    examples = [{"id": "q", "context": "Alpha bravo delta gamma omega"}]
    start, end = np.full((2, 5), -5.0), np.full((2, 5), -5.0)
    start[0, 2], end[0, 3] = 2.0, 2.0  # window 0: "bravo delta", 4
    start[1, 2], end[1, 3] = 3.0, 3.0  # window 1: "gamma omega", 6
    end[1, 2] = -4.0  # window 1: "gamma", -1
    features = window_features()
    assert postprocess_predictions(examples, features, start, end) == {"q": "gamma omega"}
    assert postprocess_predictions(examples, features, start, end, max_answer_length=1) == {"q": "gamma"}
    start[:, 0], end[:, 0] = 4.0, 4.0  # null score 8 beats 6
    assert postprocess_predictions(examples, features, start, end, version_2=True) == {"q": ""}
    assert postprocess_predictions(examples, features, start, end) == {"q": "gamma omega"}
    start[1, 3], end[1, 1] = 20.0, 20.0  # end before start (40) is never a span; "omega" (20 + 3) is
    assert postprocess_predictions(examples, features, start, end, version_2=True) == {"q": "omega"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from wtacrs.packaged import packaged_model_dir

    return AutoTokenizer.from_pretrained(packaged_model_dir())


def test_train_windows_label_the_answer_or_cls(tokenizer):
    context = " ".join(f"word{i}" for i in range(60)) + " the golden answer here."
    rows = {"id": ["x"], "question": ["  where?"], "context": [context],
            "answers": [{"text": ["golden answer"], "answer_start": [context.index("golden")]}]}
    features = prepare_train_features(rows, tokenizer, max_length=48, stride=16)
    spans = list(zip(features["start_positions"], features["end_positions"]))
    assert len(spans) > 1 and spans[0] == (0, 0)  # the first window does not reach the answer
    s, e = spans[-1]
    assert tokenizer.decode(features["input_ids"][-1][s : e + 1]) == "golden answer"
    evaluation = prepare_eval_features(rows, tokenizer, max_length=48, stride=16)
    assert evaluation["squad_id"] == ["x"] * len(spans)
    assert evaluation["offset_mapping"][0][0] is None  # [CLS] and the question are not answers


# -- tweets ------------------------------------------------------------------------------------
def test_tweet_corpus_dedups_drops_conflicts_and_splits_by_text(tmp_path):
    rows = ["sentiment,confidence,text", "negative,1,bad", "negative,0.5,bad", "positive,1,good",
            "neutral,,meh", "positive,1,torn", "negative,1,torn", 'positive,1,"multi\nline, quoted"']
    path = write(tmp_path / "c.csv", rows)
    labels, conflicting = read_corpus(path)
    assert labels == {"bad": 0, "good": 2, "meh": 1, "multi\nline, quoted": 2} and conflicting == 1
    write(tmp_path / "u.csv", ["sentiment,confidence,text", "angry,1,grr"])
    with pytest.raises(DataError, match=r"u.csv, line 2: unknown label 'angry'"):
        read_corpus(tmp_path / "u.csv")


def test_packaged_tweet_corpus_split_is_deterministic():
    first, second = load_tweets(), load_tweets()
    assert first["validation"]["text"][:50] == second["validation"]["text"][:50]
    assert set(first["train"]["text"]).isdisjoint(first["validation"]["text"])
    assert 0.08 < len(first["validation"]) / (len(first["train"]) + len(first["validation"])) < 0.12
