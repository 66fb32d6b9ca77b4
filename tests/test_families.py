"""Every supported family end to end, as a user with a pre-trained model folder runs it: a tiny
random model of each family in `models.FAMILIES` (the test table plus ModernBERT), saved with a
tokenizer, goes through `wtacrs finetune` (classification: full fine-tuning and WTA-CRS with the
exact companions; extractive QA), `wtacrs bench memory` and `wtacrs report`. Also: the README's
families table against what `wtacrs.summary` reports, and results finished after a failure."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as hf
from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

import families
import wtacrs
from models import CASES_BY_NAME, FAMILIES, MODERNBERT, Case
from test_tasks import squad_doc
from wtacrs.cli import main
from wtacrs.finetuning import models as finetune_models
from wtacrs.finetuning import train
from wtacrs.packaged import packaged_model_dir

FAST = ["--max-train-samples", "8", "--max-eval-samples", "4", "--epochs", "1", "--max-length", "16",
        "--batch-size", "4", "--no-progress"]
SAMPLED = "wtacrs@0.3+companions+recompute+recompute-attention"  # the recipe: its run folder and report row
REQUESTED = ("lean_dropout", "lean_layernorm", "lean_attention", "recompute_activation", "recompute_attention",
             "chunked_lm_loss")  # what the recipe's companions+recompute+recompute-attention ask for
KINDS = {"t5": "encoder-decoder", "gpt2": "decoder", "llama": "decoder"}  # every other family: "encoder"


@pytest.fixture(scope="module")
def tokenizer():
    return hf.AutoTokenizer.from_pretrained(packaged_model_dir())


@pytest.fixture(scope="module")
def readme_rows() -> dict[str, dict[str, bool]]:
    """{family: {feature: ✓?}} from README.md's families table."""
    head, _, *rows = [line.strip("|").split("|") for line in families.readme_table(families.README.read_text())
                      .splitlines()]
    names = [cell.strip() for cell in head]
    return {cells[0].strip(): {n: c.strip() == "✓" for n, c in zip(names, cells)} for cells in rows}


def save_family(case: Case, folder, tokenizer) -> str:
    """`case`'s tiny architecture with random weights and no task head, saved with `tokenizer`
    (the packaged MiniLM WordPiece one), its special token ids set to the tokenizer's."""
    config = case.build().config
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    for names, token in ((("bos_token_id", "cls_token_id"), tokenizer.cls_token_id),
                         (("eos_token_id", "sep_token_id"), tokenizer.sep_token_id)):  # T5 pools at its EOS
        for name in names:
            if getattr(config, name, None) is not None:
                setattr(config, name, token)
    hf.AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def results_of(root, task: str, run: str) -> dict:
    (path,) = root.glob(f"{task}/*/{run}/seed0/results.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("case", FAMILIES, ids=lambda case: case.name)
def test_family_end_to_end(case, tokenizer, readme_rows, tmp_path, capsys):
    model = save_family(case, tmp_path / case.name, tokenizer)
    family = hf.AutoConfig.from_pretrained(model).model_type
    out = tmp_path / "runs"
    assert main(["finetune", "--model", model, "--output-dir", str(out), "--in-process", "--method", "full",
                 SAMPLED, *FAST]) == 0
    full, sampled = results_of(out, "tweet_sentiment", "full"), results_of(out, "tweet_sentiment", SAMPLED)
    for record in (full, sampled):
        assert (record["model_family"], record["model_kind"]) == (family, KINDS.get(case.name, "encoder"))
    assert full["companion_effects"] == {}
    table_row = readme_rows[case.name]
    expected = {option: "took effect" if table_row[option] else "nothing to change" for option in REQUESTED}
    if torch.cuda.is_available():  # trained there: SDPA's fused kernels save no probabilities to recompute
        expected["lean_attention"] = "nothing to change"
    assert sampled["companion_effects"] == expected  # what the README's table says of this family (on the CPU)

    if family in MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES:
        squad = tmp_path / "squad.json"
        squad.write_text(json.dumps(squad_doc(10)))
        assert main(["finetune", "--task", "squad", "--data-dir", str(squad), "--model", model, "--output-dir",
                     str(out), "--method", "lora+wtacrs+companions", *FAST, "--max-length", "32", "--doc-stride",
                     "8"]) == 0  # LoRA: PEFT trains the QA head in full, with no adapter on it
        record = results_of(out, "squad", "lora+wtacrs@0.3+companions")
        assert set(record["metrics"]["validation"]) >= {"exact_match", "f1"}

    bench = tmp_path / "bench"
    assert main(["bench", "memory", "--model", model, "--batch", "2", "--seq", "16", "--methods", "full",
                 "wtacrs@0.3+companions", "--no-rss", "--device", "cpu", "--out", str(bench)]) == 0
    rows = json.loads((bench / "memory.json").read_text())["rows"]
    assert [row.get("error") for row in rows] == [None, None]
    assert rows[1]["saved_bytes"] < rows[0]["saved_bytes"]

    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"| {case.name} | full |" in text and f"| {case.name} | {SAMPLED} |" in text
    assert f"| {case.name} | {KINDS.get(case.name, 'encoder')} | full |" in text  # the by-memory table
    idle = sorted(option for option, status in sampled["companion_effects"].items() if status != "took effect")
    assert (f"{case.name} {SAMPLED}: {', '.join(idle)} found nothing to change" in text) == bool(idle)


def test_readme_families_table_is_what_summary_reports():
    assert families.readme_table(families.README.read_text()) == families.table(), \
        "README.md's families table is out of date: python tests/families.py --write"


def test_summary_says_which_companions_took_effect_and_which_found_nothing():
    lean = wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, lean_dropout=True, lean_layernorm=True, lean_attention=True)
    llama = CASES_BY_NAME["llama"]
    model = wtacrs.apply(llama.model(), lean)
    before = wtacrs.summary(model)
    assert "lean_attention         not run yet (0 of 2 modules acted)" in before
    assert "lean_layernorm         not run yet (0 of 5 modules acted)" in before  # LlamaRMSNorm
    model(**llama.batch()).loss.backward()
    after = wtacrs.summary(model)
    assert "lean_attention         nothing to change (0 of 2 modules acted)" in after  # flash kernel: no dropout
    assert "lean_layernorm         took effect (5 of 5 modules acted)" in after
    assert "lean_dropout           nothing to change (0 of 2 modules acted)" in after  # attention dropout p = 0
    assert "sampled attention: off" in after

    assert "eval mode" not in after
    model.eval()  # as from_pretrained returns a model: nothing is sampled until model.train()
    assert "call model.train() before training" in wtacrs.summary(model)
    model.train()

    t5 = CASES_BY_NAME["t5"]  # T5LayerNorm is neither an nn.LayerNorm nor LLaMA's RMSNorm
    assert "lean_layernorm         nothing to change (no such module)" in wtacrs.summary(wtacrs.apply(t5.model(), lean))

    deberta = CASES_BY_NAME["deberta-v2"]
    model = wtacrs.apply(deberta.model(), lean)
    model(**deberta.batch()).loss.backward()
    effects = wtacrs.modeling.companion_effects(model)
    assert effects["lean_attention"].status == "nothing to change" and effects["lean_attention"].applied
    assert effects["lean_dropout"].status == effects["lean_layernorm"].status == "took effect"
    wtacrs.remove(model)
    assert not any(hasattr(m, "wtacrs_companion_use") for m in model.modules())

    bert = CASES_BY_NAME["bert"]  # sampled attention is eager: no SDPA call is left to recompute
    model = wtacrs.apply(bert.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, attention=True, lean_attention=True))
    model(**bert.batch()).loss.backward()
    text = wtacrs.summary(model)
    assert "sampled attention: 2 modules" in text and "lean_attention         nothing to change" in text


def test_model_kind_reads_no_attribute_a_config_may_lack():
    for case in FAMILIES:
        config = case.build().config
        assert finetune_models.model_kind(config) == KINDS.get(case.name, "encoder"), case.name
    assert finetune_models.model_kind(hf.BertConfig(is_decoder=True)) == "decoder"
    assert not hasattr(MODERNBERT.build().config, "is_decoder")  # what lost the results (issue 20)
    assert finetune_models.model_kind(hf.CLIPVisionConfig()) == "unknown"


def test_results_that_failed_after_training_are_finished_by_resume(tokenizer, tmp_path, monkeypatch, capsys):
    """Training is on disk before results are written: a failure there says so, and --resume
    finishes the results from training.json and the checkpoints without training again."""
    model = save_family(CASES_BY_NAME["bert"], tmp_path / "bert", tokenizer)
    argv = ["finetune", "--model", model, "--output-dir", str(tmp_path / "out"), "--method", "wtacrs", *FAST]

    def broken(trainer):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(train, "probe_step_memory", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(argv)
    assert "is complete and saved (checkpoints and training.json) but writing its results failed" in \
        capsys.readouterr().err
    (run,) = (tmp_path / "out").glob("*/*/wtacrs@0.3/seed0")
    assert not (run / "results.json").exists()
    training = json.loads((run / "training.json").read_text())
    checkpoints = sorted(p.name for p in run.glob("checkpoint-*"))
    assert training["steps_timed"] == training["global_step"] == 2 and checkpoints

    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert "training was complete; finishing its results from training.json" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert results["train_samples_per_second"] == pytest.approx(8 / training["step_seconds"])
    assert results["peak_memory_bytes"] == training["peak_memory_bytes"]
    assert results["history"] and results["wall_seconds"] > training["wall_seconds"]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == checkpoints  # nothing trained again

