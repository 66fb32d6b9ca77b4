"""The causal-LM task (`wtacrs.tasks.causal_lm`) and the decoder sizes of `wtacrs bench`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wtacrs.tasks.causal_lm import (
    IGNORE_INDEX,
    TWEET_LM,
    CausalLMCollator,
    evaluate_lm,
    lm_metrics,
    load_tweet_texts,
    next_token_predictions,
    tokenize_texts,
)

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")


class CharTokenizer:
    """One token per character (ids 3..), BOS 1, EOS 2: enough to check the framing."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=True):
        assert not add_special_tokens  # tokenize_texts adds BOS and EOS itself
        return {"input_ids": [[3 + (ord(c) % 60) for c in text] for text in texts]}


def test_tweet_texts_keep_the_sentiment_split_without_labels(tmp_path):
    from wtacrs.tasks.tweets import load_tweets

    csv = tmp_path / "tweets.csv"
    rows = [f'positive,1.0,"tweet number {i}"' for i in range(40)]
    csv.write_text("sentiment,confidence,text\n" + "\n".join(rows) + "\n", encoding="latin-1")
    texts, labelled = load_tweet_texts(csv), load_tweets(csv)
    assert texts["train"].column_names == ["text"]
    for split in ("train", "validation"):
        assert texts[split]["text"] == labelled[split]["text"]


def test_tokenize_texts_frames_and_truncates():
    dataset = datasets.Dataset.from_dict({"text": ["abc", "a much longer text"], "other": [0, 1]})
    encoded = tokenize_texts(dataset, CharTokenizer(), max_length=6)
    assert encoded.column_names == ["input_ids", "attention_mask"]
    first, second = encoded["input_ids"]
    assert first[0] == 1 and first[-1] == 2 and len(first) == 5  # BOS a b c EOS
    assert len(second) == 6 and second[0] == 1 and second[-1] == 2  # truncated, EOS kept last
    assert encoded["attention_mask"][1] == [1] * 6
    with pytest.raises(ValueError, match="at least 2"):
        tokenize_texts(dataset, CharTokenizer(), max_length=1)


def test_collator_pads_right_and_masks_labels():
    collate = CausalLMCollator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [1, 5, 6, 2], "idx": 7}, {"input_ids": [1, 9, 2], "idx": 3}])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 9, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[1, 5, 6, 2], [1, 9, 2, IGNORE_INDEX]]
    assert batch["idx"].tolist() == [7, 3]
    assert CausalLMCollator(0, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3]}])["input_ids"].shape == (1, 8)


def test_lm_metrics_score_the_next_token():
    labels = np.array([[1, 5, 6, IGNORE_INDEX]])
    predictions = np.array([[5, 0, 9, 9]])  # position 0 predicts label 1 (5: right), 1 predicts 6 (0: wrong)
    metrics = lm_metrics(predictions, labels, loss=math.log(4.0))
    assert metrics["token_accuracy"] == metrics["score"] == 0.5
    assert metrics["perplexity"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="no labelled"):
        lm_metrics(predictions, np.full((1, 4), IGNORE_INDEX))
    assert next_token_predictions(torch.tensor([[[0.1, 0.9], [0.8, 0.2]]])).tolist() == [[1, 0]]
    assert TWEET_LM.kind == "causal_lm" and TWEET_LM.compute_metrics is lm_metrics


def test_evaluate_lm_is_token_weighted():
    """Over two batches of different token counts, the loss is the mean over all tokens, equal to
    the model's own loss on the two rows batched together."""
    config = transformers.LlamaConfig(vocab_size=70, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    collate = CausalLMCollator(pad_token_id=0)
    rows = [{"input_ids": [1, 5, 6, 7, 8, 2]}, {"input_ids": [1, 9, 2]}]
    metrics = evaluate_lm(model, [collate(rows[:1]), collate(rows[1:])])
    with torch.no_grad():
        joint = model(**collate(rows)).loss.item()  # mean over the 5 + 2 labelled next tokens
    assert metrics["loss"] == pytest.approx(joint, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(joint), rel=1e-5)
    assert 0 <= metrics["token_accuracy"] <= 1


# -- the decoder sizes of `wtacrs bench` --------------------------------------------------------
def test_decoder_sizes_are_causal_lms_with_token_labels():
    from wtacrs.bench.models import DECODER_SIZES, MODEL_SIZES, build_model, is_causal_lm, make_batch

    assert {"smollm2-135m", "llama-1b"} <= set(DECODER_SIZES) <= set(MODEL_SIZES)
    model = build_model("llama-tiny")
    assert type(model).__name__ == "LlamaForCausalLM" and is_causal_lm(model) and not model.config.use_cache
    batch = make_batch(model, 2, 8)
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert not is_causal_lm(build_model("bert-tiny"))


def test_smollm2_size_has_the_published_shape():
    """134.5M parameters, as the packaged model, built on the meta device (no memory, no time)."""
    from wtacrs.bench.models import build_model

    model = build_model("smollm2-135m", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    model = build_model("llama-1b", device="meta")
    assert 1.23e9 < sum(p.numel() for p in model.parameters()) < 1.24e9


def test_bench_memory_on_a_decoder(tmp_path):
    from wtacrs.cli import main

    assert main(["bench", "memory", "--model", "llama-tiny", "--seq", "16", "--threads", "1", "--batch", "2",
                 "--methods", "full", "wtacrs@0.3+companions", "--no-rss", "--out", str(tmp_path)]) == 0
    import json

    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "wtacrs@0.3+companions"]
    assert all("error" not in r and r["peak_bytes"] > 0 for r in rows)


def _save_tiny_llama(folder, tie_word_embeddings: bool = False) -> None:
    """A tiny random LlamaForCausalLM with the packaged MiniLM's tokenizer, saved to `folder`."""
    import transformers as hf

    from wtacrs.packaged import packaged_model_dir

    tokenizer = hf.AutoTokenizer.from_pretrained(packaged_model_dir())
    tokenizer.eos_token, tokenizer.bos_token = tokenizer.sep_token, tokenizer.cls_token
    config = hf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                            eos_token_id=tokenizer.sep_token_id, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(0)
    hf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_finetune_tweet_lm_end_to_end_with_lora_and_wtacrs(tmp_path, capsys):
    """`wtacrs finetune --task tweet_lm` on a tiny random LLaMA: next-token accuracy as the score,
    the language-model head kept, LoRA as a CAUSAL_LM adapter, the chunked loss among the
    companions that take effect."""
    import json

    from wtacrs.cli import main

    _save_tiny_llama(tmp_path / "llama")
    argv = ["finetune", "--task", "tweet_lm", "--model", str(tmp_path / "llama"), "--output-dir", str(tmp_path / "out"),
            "--in-process", "--method", "lora", "lora+wtacrs@0.3+companions", "--max-train-samples", "16",
            "--max-eval-samples", "8", "--batch-size", "8", "--max-length", "24", "--no-progress"]
    assert main(argv) == 0
    assert "lora+wtacrs@0.3+companions" in capsys.readouterr().out
    records = {p.parent.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/*/*/seed0/results.json")}
    lora, sampled = records["lora"], records["lora+wtacrs@0.3+companions"]
    for record in (lora, sampled):
        assert record["task"] == "tweet_lm" and record["model_kind"] == "decoder"
        assert record["score_name"] == "next-token accuracy" and 0.0 <= record["score"] <= 1.0
    assert sampled["companion_effects"]["chunked_lm_loss"] == "took effect"
    assert sampled["companion_effects"]["lean_layernorm"] == "took effect"  # RMSNorm
    assert sampled["trainable_parameters"] == lora["trainable_parameters"]


def test_best_model_reload_of_a_tied_head_says_nothing_missing(tmp_path, capfd):
    """SmolLM2 ties its head to the embeddings, so a checkpoint holds that tensor once; the
    Trainer's best-model reload used to warn "missing keys: ['lm_head.weight']" (harmless, and
    alarming): the loaded model names the copy as not saved."""
    from wtacrs.cli import main
    from wtacrs.finetuning.models import load_model
    from wtacrs.tasks import get_task

    _save_tiny_llama(tmp_path / "llama", tie_word_embeddings=True)
    _, model = load_model(str(tmp_path / "llama"), get_task("tweet_lm"))
    assert model._keys_to_ignore_on_save == {"lm_head.weight"}
    argv = ["finetune", "--task", "tweet_lm", "--model", str(tmp_path / "llama"), "--output-dir", str(tmp_path / "out"),
            "--in-process", "--method", "full", "--max-train-samples", "16", "--max-eval-samples", "8",
            "--batch-size", "8", "--max-length", "24", "--no-progress"]
    assert main(argv) == 0
    assert "missing keys" not in capfd.readouterr().err
