"""`wtacrs finetune` and `wtacrs report` end to end on a tiny random BERT and tiny data files."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from wtacrs.cli import main
from wtacrs.recipes import BEST_EXACT

RESULT_FIELDS = {
    "task": str, "model": str, "method": str, "seed": int, "metrics": dict, "best_epoch": float,
    "peak_memory_bytes": int, "saved_activation_bytes": int, "train_samples_per_second": float,
    "wall_seconds": float, "versions": dict, "score": float, "history": list,
}
FAST = ["--max-train-samples", "16", "--max-eval-samples", "8", "--epochs", "1", "--max-length", "32",
        "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with the packaged MiniLM tokenizer, saved like a hub model."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from wtacrs.packaged import packaged_model_dir

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(packaged_model_dir()).save_pretrained(path)
    return str(path)


def results_of(root, method_dir):
    (path,) = root.glob(f"*/*/{method_dir}/seed0/results.json")
    return json.loads(path.read_text())


def check_schema(record):
    for field, kind in RESULT_FIELDS.items():
        assert isinstance(record[field], kind), (field, record[field])
    assert record["saved_activation_bytes"] > 0 and record["peak_memory_bytes"] > 0


# -- the main job's defaults ------------------------------------------------------------------
def test_the_main_job_trains_on_the_tweet_tasks_defaults_and_its_help_says_them(capsys):
    """`wtacrs finetune` with no arguments: the tweet task's defaults fill every option, and
    --help quotes those values (not numbers of an earlier default)."""
    import argparse

    from wtacrs.cli import finetune
    from wtacrs.finetuning.spec import DEFAULTS
    from wtacrs.tasks import get_task

    parser = argparse.ArgumentParser()
    finetune.add_arguments(parser)
    settings = finetune.settings_from(parser.parse_args([]))
    own = get_task("tweet_sentiment").defaults
    defaults = {**DEFAULTS, **own}
    assert settings.task == "tweet_sentiment" and settings.default_lr == own["lr"] != DEFAULTS["lr"]
    for name in ("epochs", "batch_size", "max_length", "max_train_samples", "max_eval_samples"):
        assert getattr(settings, name) == defaults[name], name
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{own['lr']} for the offline default task" in help_text
    for name in ("epochs", "max_length", "max_train_samples"):
        assert f"offline default task {own[name]}" in help_text, name


# -- argument errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratio", "0"], "--ratio must be in (0, 1]"),
        (["--ratio", "1.5"], "--ratio must be in (0, 1]"),
        (["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1)"),
        (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--max-train-samples", "0"], "--max-train-samples must be at least 1"),
        (["--resume"], "--resume needs --output-dir"),
        (["--resume", "--overwrite", "--output-dir", "x"], "--resume and --overwrite exclude each other"),
        (["--data-dir", "/nonexistent/glue"], "--data-dir /nonexistent/glue does not exist"),
        (["--task", "squad", "--doc-stride", "400"], "--doc-stride must be in [0, --max-length=384)"),
    ],
)
def test_bad_arguments_exit_2_with_a_specific_message(capsys, argv, message):
    assert main(["finetune", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--task", "nope"], ["--bf16", "--fp16"], ["--seed", "x"]])
def test_argparse_rejects_unknown_choices(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", *argv])
    assert exit_info.value.code == 2


def test_data_errors_exit_2_naming_the_file_and_line(tiny_model, tmp_path, capsys):
    from test_tasks import write_glue

    data = write_glue(tmp_path / "glue")
    (data / "RTE/train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tP\tH\tperhaps\n")
    argv = ["finetune", "--task", "rte", "--data-dir", str(data), "--model", tiny_model,
            "--output-dir", str(tmp_path / "out"), "--method", "full", *FAST]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "RTE/train.tsv, line 2: unknown label 'perhaps'" in capsys.readouterr().err


def test_next_token_task_on_a_tokenizer_without_end_of_sequence_exits_2_naming_it(tiny_model, tmp_path, capsys):
    """An encoder's tokenizer (BERT's has no EOS) on tweet_lm: a clear error, not a traceback."""
    argv = ["finetune", "--task", "tweet_lm", "--model", tiny_model, "--method", "full", "--max-train-samples", "8",
            "--max-eval-samples", "4", "--output-dir", str(tmp_path / "out"), "--in-process", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "has no end-of-sequence token" in capsys.readouterr().err


def test_unreachable_hub_says_to_use_data_dir(tiny_model, tmp_path, capsys, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit):
        main(["finetune", "--task", "sst2", "--model", tiny_model, "--output-dir", str(tmp_path), "--method", "full"])
    assert "could not load nyu-mll/glue/sst2 from the Hugging Face hub" in capsys.readouterr().err


# -- runs --------------------------------------------------------------------------------------
def test_default_run_compares_full_checkpointing_and_the_best_exact_recipe(tiny_model, tmp_path, capsys):
    """The no-argument default (tweet sentiment: full, checkpointing, the best exact WTA-CRS
    recipe), shrunk to seconds: a table, a verdict against checkpointing and a plot."""
    assert main(["finetune", "--model", tiny_model, "--output-dir", str(tmp_path), "--in-process", *FAST]) == 0
    out = capsys.readouterr().out
    assert "live peak MiB" in out and f"verdict: {BEST_EXACT} " in out and "x checkpointing's" in out
    assert (tmp_path / "memory_time.png").stat().st_size > 0
    full, checkpointing = results_of(tmp_path, "full"), results_of(tmp_path, "checkpointing")
    sampled = results_of(tmp_path, BEST_EXACT)
    for record in (full, checkpointing, sampled):
        check_schema(record)
        assert record["task"] == "tweet_sentiment" and record["eval_examples"] == {"validation": 8}
        assert set(record["metrics"]["validation"]) >= {"accuracy", "macro_f1", "score"}
        assert record["live_peak_bytes"] > record["saved_activation_bytes"] and record["step_seconds"] > 0
    assert (full["ratio"], sampled["ratio"], sampled["estimator"], sampled["method"]) == (
        None, 0.3, "wta-crs", BEST_EXACT)
    assert (full["draws_in_backward"], checkpointing["draws_in_backward"], sampled["draws_in_backward"]) == (
        False, False, True)
    assert sampled["saved_activation_bytes"] < full["saved_activation_bytes"]
    assert checkpointing["saved_activation_bytes"] < full["saved_activation_bytes"]
    # (no order of live peaks to assert: the tiny model's peak is its embedding gradient and AdamW state)
    # the base rate is the task's; each sampled layer trains at it times sqrt(1 + its v), v measured
    import statistics

    assert sampled["hyperparameters"]["lr"] == full["hyperparameters"]["lr"]
    assert sampled["hyperparameters"]["sampled_lr"] == "measured-per-layer"
    assert "sampled_lr" not in full["hyperparameters"]
    measured = json.loads(next(tmp_path.glob(f"*/*/{BEST_EXACT}/seed0/lr_scales.json")).read_text())
    assert measured["scales"].keys() == measured["first_visit_variance"].keys()
    for name, v in measured["first_visit_variance"].items():  # 0 where a backward draw keeps every row with a gradient
        assert v >= 0 and measured["scales"][name] == pytest.approx((1 + v) ** 0.5)
    spread = sampled["sampled_lr_scales"]
    assert 1 <= spread["min"] <= spread["median"] <= spread["max"] and spread["layers"] == len(measured["scales"])
    assert spread["max"] > 1
    median = statistics.median(measured["first_visit_variance"].values())
    assert sampled["sampled_lr_factor"] == measured["factor"] == pytest.approx((1 + median) ** 0.5)
    assert full["sampled_lr_scales"] is None and full["sampled_lr_factor"] is None
    assert 0 < sampled["sampled_lr_seconds"] == measured["seconds"] < sampled["wall_seconds"]
    assert full["sampled_lr_seconds"] is None
    peak_lr = {name: max(h["learning_rate"] for h in json.loads(next(tmp_path.glob(f"*/*/{name}/seed0/training.json"))
                                                               .read_text())["log_history"] if "learning_rate" in h)
               for name in ("full", BEST_EXACT)}
    assert peak_lr[BEST_EXACT] == pytest.approx(peak_lr["full"])  # the logged (first) group: unsampled parameters
    assert list(tmp_path.glob("*/*/full/seed0/runs/*"))  # TensorBoard logs


def test_a_quiet_run_leaves_stderr_empty(tiny_model, tmp_path, capfd):
    """--no-progress: no bar of the data or the weights either, and neither the profiler's lines
    of the live-peak step nor transformers' report of the new classifier reach stderr."""
    assert main(["finetune", "--model", tiny_model, "--output-dir", str(tmp_path), "--method", "full", *FAST]) == 0
    assert results_of(tmp_path, "full")["live_peak_bytes"] > 0  # the profiled step ran
    assert capfd.readouterr().err == ""


def test_recipes_are_recorded_by_their_canonical_spec(tiny_model, tmp_path, capsys):
    """A spec written in any order, and a bare sampler taking --ratio, run as the canonical spec;
    companions apply to LoRA and full runs too, and take effect."""
    argv = ["finetune", "--model", tiny_model, "--output-dir", str(tmp_path), "--in-process", "--method",
            "recompute-attention+companions+wtacrs+recompute", "lora+companions", "--ratio", "0.5", *FAST,
            "--lr", "1e-3", "--sampled-lr", "measured"]
    assert main(argv) == 0
    assert "wtacrs@0.5+companions+recompute+recompute-attention" in capsys.readouterr().out
    sampled = results_of(tmp_path, "wtacrs@0.5+companions+recompute+recompute-attention")
    lora = results_of(tmp_path, "lora+companions")
    check_schema(sampled)
    assert (sampled["method"], sampled["ratio"], lora["method"], lora["ratio"]) == (
        "wtacrs@0.5+companions+recompute+recompute-attention", 0.5, "lora+companions", None)
    assert sampled["hyperparameters"]["lr"] == lora["hyperparameters"]["lr"] == 1e-3
    # --sampled-lr measured: every parameter of the sampled run at 1e-3 times sqrt(1 + median v)
    history = json.loads(next(tmp_path.glob("*/*/wtacrs@0.5*/seed0/training.json")).read_text())["log_history"]
    peak = max(h["learning_rate"] for h in history if "learning_rate" in h)
    lora_history = json.loads(next(tmp_path.glob("*/*/lora+companions/seed0/training.json")).read_text())["log_history"]
    assert sampled["sampled_lr_factor"] > 1 and sampled["sampled_lr_scales"] is not None
    assert peak == pytest.approx(sampled["sampled_lr_factor"] * max(
        h["learning_rate"] for h in lora_history if "learning_rate" in h))
    assert sampled["companion_effects"]["recompute_attention"] == "took effect"
    assert set(lora["companion_effects"]) == {"lean_dropout", "lean_layernorm", "lean_attention", "chunked_lm_loss"}
    assert lora["companion_effects"]["chunked_lm_loss"] == "nothing to change"  # a classifier: no LM loss


@pytest.mark.parametrize("method, message", [
    ("wtacrs@2", "ratio must be in (0, 1]"), ("magic", "bad component 'magic'"),
    ("full+fused-adamw", "fused-adamw is a `wtacrs bench` component"),
])
def test_bad_recipes_exit_2_naming_the_problem(method, message, capsys, tmp_path):
    assert main(["finetune", "--method", method, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_paper_budget_and_max_padding_are_recorded_and_labelled(tiny_model, tmp_path, capsys, monkeypatch):
    """--budget all --pad-to-max-length: the paper's counting; every batch is padded to --max-length."""
    from transformers import DataCollatorWithPadding

    lengths = []
    collate = DataCollatorWithPadding.__call__
    monkeypatch.setattr(DataCollatorWithPadding, "__call__",
                        lambda self, features: lengths.append(
                            (out := collate(self, features))["input_ids"].shape[1]) or out)
    argv = ["finetune", "--model", tiny_model, "--output-dir", str(tmp_path), "--in-process", "--method", "wtacrs",
            "full", "--budget", "all", "--pad-to-max-length", *FAST]
    assert main(argv) == 0
    assert "wtacrs@0.3+budget-all+pad-max" in capsys.readouterr().out
    sampled, full = results_of(tmp_path, "wtacrs@0.3+budget-all+pad-max"), results_of(tmp_path, "full+pad-max")
    assert (sampled["variants"], full["variants"]) == (["budget-all", "pad-max"], ["pad-max"])
    assert lengths and set(lengths) == {32}  # FAST's --max-length


def test_compile_trains_the_model_under_torch_compile_and_records_the_backend(tiny_model, tmp_path, monkeypatch):
    """--compile BACKEND: the Trainer compiles the model with that backend (the sampled layers then
    run each step planned, without host code) and the run records it."""
    import torch

    backends = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: backends.append(kw.get("backend")) or compile_(model, **kw))
    argv = ["finetune", "--model", tiny_model, "--output-dir", str(tmp_path), "--in-process", "--method", "wtacrs",
            "--compile", "aot_eager", "--pad-to-max-length", *FAST]
    assert main(argv) == 0
    assert backends == ["aot_eager"]
    record = results_of(tmp_path, "wtacrs@0.3+pad-max")
    assert record["hyperparameters"]["compile"] == "aot_eager"
    assert 0.0 <= record["score"] <= 1.0


def test_target_modules_sample_only_the_named_layers(tiny_model, tmp_path, capsys):
    """The paper's GLUE choice (query/key/value exact) keeps more bytes than sampling every layer;
    a suffix that matches nothing stops the run with a message naming it."""
    base = ["finetune", "--model", tiny_model, "--in-process", "--method", "wtacrs", *FAST]
    assert main([*base, "--output-dir", str(tmp_path / "all")]) == 0
    assert main([*base, "--output-dir", str(tmp_path / "paper"), "--target-modules", "output.dense",
                 "intermediate.dense"]) == 0
    assert "wtacrs@0.3+targets=output.dense,intermediate.dense" in capsys.readouterr().out
    every = results_of(tmp_path / "all", "wtacrs@0.3")
    paper = results_of(tmp_path / "paper", "wtacrs@0.3+targets=output.dense,intermediate.dense")
    assert paper["variants"] == ["targets=output.dense,intermediate.dense"]
    assert paper["saved_activation_bytes"] > every["saved_activation_bytes"]
    with pytest.raises(SystemExit) as stop:
        main([*base, "--output-dir", str(tmp_path / "none"), "--target-modules", "qkv"])
    assert stop.value.code == 2
    assert "error: no nn.Linear/Conv1D layer matched target_modules=['qkv']" in capsys.readouterr().err


def test_sample_attention_samples_the_attention_matmuls_too(tiny_model, tmp_path, capsys):
    """The `attention` component switches the model to the sampled attention (other saved bytes)
    and is labelled; a model that computes attention itself (MPNet) stops with one error line."""
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    base = ["finetune", "--in-process", "--budget", "all", *FAST]
    assert main([*base, "--model", tiny_model, "--output-dir", str(tmp_path / "linear"), "--method", "wtacrs"]) == 0
    assert main([*base, "--model", tiny_model, "--output-dir", str(tmp_path / "both"), "--method",
                 "wtacrs+attention"]) == 0
    assert "wtacrs@0.3+attention+budget-all" in capsys.readouterr().out
    linear = results_of(tmp_path / "linear", "wtacrs@0.3+budget-all")
    both = results_of(tmp_path / "both", "wtacrs@0.3+attention+budget-all")
    assert both["variants"] == ["budget-all"] and both["method"] == "wtacrs@0.3+attention"
    assert both["saved_activation_bytes"] != linear["saved_activation_bytes"]

    mpnet = tmp_path / "mpnet"
    MPNetModel(MPNetConfig(vocab_size=30527, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64)).save_pretrained(mpnet)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(mpnet)
    with pytest.raises(SystemExit) as stop:
        main([*base, "--model", str(mpnet), "--output-dir", str(tmp_path / "mp"), "--method", "wtacrs+attention"])
    assert stop.value.code == 2
    assert "error: MPNetForSequenceClassification does not compute attention" in capsys.readouterr().err


def test_saved_bytes_are_measured_on_one_probe_batch_for_every_seed(tiny_model, tmp_path):
    """The probe batch is the first training rows in dataset order, so seeds (which shuffle the
    training batches differently) report the same bytes for a deterministic method."""
    argv = ["finetune", "--model", tiny_model, "--output-dir", str(tmp_path), "--in-process", "--method", "full",
            "--seed", "0", "1", *FAST, "--max-length", "128"]  # untruncated: batch lengths differ
    assert main(argv) == 0
    seed0, seed1 = (json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/*/full/seed*/results.json")))
    assert seed0["saved_activation_bytes"] == seed1["saved_activation_bytes"] > 0


@pytest.mark.slow
def test_existing_run_needs_resume_or_overwrite(tiny_model, tmp_path, capsys):
    argv = ["finetune", "--model", tiny_model, "--output-dir", str(tmp_path), "--method", "full", *FAST]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "already holds a finished run; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_glue_folder_lora_and_checkpointing(tiny_model, tmp_path):
    from test_tasks import write_glue

    data = write_glue(tmp_path / "glue")
    out = tmp_path / "out"
    argv = ["finetune", "--task", "stsb", "--data-dir", str(data), "--model", tiny_model, "--output-dir", str(out),
            "--method", "lora", "checkpointing", "--in-process", *FAST]
    assert main(argv) == 0
    lora, checkpointing = results_of(out, "lora"), results_of(out, "checkpointing")
    assert lora["hyperparameters"]["lora_dropout"] == 0.0  # the default: LoRA reads the very input the layer does
    assert set(lora["metrics"]["validation"]) >= {"pearson", "spearman", "score"}
    assert lora["trainable_parameters"] < checkpointing["trainable_parameters"]
    assert checkpointing["saved_activation_bytes"] < lora["saved_activation_bytes"]


def test_squad_single_file_split_by_article(tiny_model, tmp_path, monkeypatch):
    import wtacrs.integrations.trainer as trainer_module
    from test_tasks import squad_doc

    anchors = []  # the training steps' first-visit anchors: start and end positions, on the host
    real_batch = trainer_module.batch
    monkeypatch.setattr(trainer_module, "batch", lambda *a, **kw: anchors.append(kw["anchors"]) or real_batch(*a, **kw))

    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad_doc(10)))
    argv = ["finetune", "--task", "squad", "--data-dir", str(path), "--model", tiny_model,
            "--output-dir", str(tmp_path / "out"), "--method", "wtacrs", "lora", "--in-process", *FAST,
            "--max-length", "48", "--doc-stride", "16"]
    assert main(argv) == 0
    for method in ("wtacrs@0.3", "lora"):  # LoRA: PEFT trains the QA head in full, no adapter on it
        record = results_of(tmp_path / "out", method)
        check_schema(record)
        assert set(record["metrics"]["validation"]) >= {"exact_match", "f1", "score"}
        assert record["eval_examples"] == {"validation": 2}  # articles 4 and 9, one question each
    assert anchors and all(a.device.type == "cpu" and str(a.dtype) == "torch.int64" and a.shape[1] == 2 for a in anchors)


@pytest.mark.slow
def test_decoder_model_gpt2_with_wtacrs(tmp_path):
    """A unidirectional decoder (GPT-2 layout, Conv1D layers) through the same path."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    from wtacrs.packaged import packaged_model_dir

    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(
        tmp_path / "gpt")
    AutoTokenizer.from_pretrained(packaged_model_dir()).save_pretrained(tmp_path / "gpt")
    argv = ["finetune", "--model", str(tmp_path / "gpt"), "--output-dir", str(tmp_path / "out"), "--method", "wtacrs",
            *FAST]
    assert main(argv) == 0
    record = results_of(tmp_path / "out", "wtacrs@0.3")
    assert record["model_kind"] == "decoder" and record["model_name"] == "gpt"


@pytest.mark.slow
def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tiny_model, tmp_path):
    argv = ["finetune", "--model", tiny_model, "--output-dir", str(tmp_path), "--method", "wtacrs",
            *FAST, "--epochs", "2"]
    assert main(argv) == 0
    run = next(tmp_path.glob("*/*/wtacrs@0.3/seed0"))
    first, last = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    digest = hashlib.sha256((last / "model.safetensors").read_bytes()).hexdigest()
    history = json.loads((run / "results.json").read_text())["history"]
    shutil.rmtree(last)  # as if the run had died during its second epoch
    (run / "results.json").unlink()
    assert main([*argv, "--resume"]) == 0
    assert hashlib.sha256((last / "model.safetensors").read_bytes()).hexdigest() == digest
    assert json.loads((run / "results.json").read_text())["history"] == history
    assert (first / "wtacrs_state.safetensors").is_file()


@pytest.mark.slow
def test_default_run_in_separate_processes(tiny_model, tmp_path, capsys):
    assert main(["finetune", "--model", tiny_model, "--output-dir", str(tmp_path), *FAST]) == 0
    assert "wtacrs@0.3" in capsys.readouterr().out
    check_schema(results_of(tmp_path, BEST_EXACT))


# -- report ------------------------------------------------------------------------------------
def fake_result(task, method, ratio, seed, score, peak=100 * 2**20):
    return {"task": task, "model": "/m/MiniLM", "model_name": "MiniLM", "model_kind": "encoder", "method": method,
            "ratio": ratio, "seed": seed, "score": score, "peak_memory_bytes": peak,
            "saved_activation_bytes": 2**20, "train_samples_per_second": 10.0}


def write_results(root, records):
    for i, record in enumerate(records):
        path = root / f"run{i}" / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))


def test_report_table_mean_std_over_seeds_and_plots(tmp_path, capsys):
    write_results(tmp_path / "results", [
        fake_result("sst2", "full", None, 0, 0.90), fake_result("sst2", "full", None, 1, 0.92),
        fake_result("rte", "full", None, 0, 0.60), fake_result("sst2", "wtacrs", 0.3, 0, 0.89, peak=50 * 2**20),
        fake_result("squad", "wtacrs", 0.3, 0, 71.5, peak=50 * 2**20),
    ])
    assert main(["report", str(tmp_path / "results"), "--output-dir", str(tmp_path / "report")]) == 0
    text = capsys.readouterr().out
    assert "| MiniLM | full | 91.0 ± 1.4 (2) | 60.0 (1) | – | 75.5* |" in text
    assert "| MiniLM | wtacrs@0.3 | 89.0 (1) | – | 71.5 (1) | 80.2* |" in text
    assert "| 50* |" in text  # its peak averages fewer tasks than a full row's: marked like its score
    assert "| 50 | MiniLM | encoder | wtacrs@0.3 | 80.2 |" in text
    for name in ("report.md", "score_vs_ratio.png", "score_vs_memory.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_report_pairs_each_row_with_its_reference_seed_by_seed(tmp_path, capsys):
    """Δ = row − reference on the seeds both ran (full; LoRA for LoRA recipes): mean ± std/√n."""
    records = [fake_result("sst2", "full", None, seed, score) for seed, score in ((0, 0.90), (1, 0.92), (2, 0.80))]
    records += [fake_result("sst2", "wtacrs", 0.3, seed, score) for seed, score in ((0, 0.89), (1, 0.90), (3, 0.5))]
    records += [fake_result("sst2", "lora", None, 0, 0.85), fake_result("sst2", "lora+wtacrs", 0.3, 0, 0.86)]
    write_results(tmp_path / "results", records)
    assert main(["report", str(tmp_path / "results")]) == 0
    text = capsys.readouterr().out
    assert "| MiniLM | wtacrs@0.3 | sst2 | -1.50 ± 0.50 | 2 |" in text  # seeds 0 and 1: -1 and -2
    assert "| MiniLM | lora+wtacrs@0.3 | sst2 | +1.00 ± – | 1 |" in text  # against LoRA, not full
    assert "| MiniLM | lora | sst2 | -5.00 ± – | 1 |" in text


def test_report_splits_rows_by_a_varying_hyperparameter_and_refuses_duplicate_runs(tmp_path, capsys):
    """An lr sweep: the lr joins the row label only where runs of one method and task differ in it;
    the max length differs between tasks only and splits nothing."""
    def run(task, method, seed, score, lr, max_length):
        record = fake_result(task, method, None if method == "full" else 0.3, seed, score)
        return record | {"hyperparameters": {"lr": lr, "max_length": max_length}}

    records = [run("sst2", "full", 0, 0.90, 1e-4, 64), run("sst2", "full", 1, 0.92, 1e-4, 64),
               run("sst2", "full", 0, 0.80, 1.5e-4, 64), run("rte", "full", 0, 0.60, 1e-4, 128),
               run("sst2", "wtacrs", 0, 0.88, 1e-4, 64), fake_result("sst2", "wtacrs", 0.3, 0, 0.70) | {
                   "variants": ["budget-all"], "hyperparameters": {"lr": 1e-4, "max_length": 64}}]
    write_results(tmp_path / "results", records)
    assert main(["report", str(tmp_path / "results"), "--output-dir", str(tmp_path / "report")]) == 0
    text = capsys.readouterr().out
    assert "| MiniLM | full+lr=0.0001 | 91.0 ± 1.4 (2) | 60.0 (1) | 75.5 |" in text
    assert "| MiniLM | full+lr=0.00015 | 80.0 (1) | – | 80.0* |" in text
    assert "| MiniLM | wtacrs@0.3+lr=0.0001 | 88.0 (1) |" in text
    assert "| MiniLM | wtacrs@0.3+budget-all+lr=0.0001 | 70.0 (1) |" in text
    write_results(tmp_path / "copy", records[:1])
    assert main(["report", str(tmp_path / "results"), str(tmp_path / "copy")]) == 2
    err = capsys.readouterr().err
    assert "are the same run (MiniLM full+lr=0.0001, sst2, seed 0): report one of them" in err
    assert str(tmp_path / "copy" / "run0" / "results.json") in err


def test_report_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text('{"task": "sst2",\n oops}')
    assert main(["report", str(bad)]) == 2
    assert f"{bad}, line 2: not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"task": "sst2"}))
    assert main(["report", str(tmp_path)]) == 2
    assert "missing model, method" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty")]) == 2
