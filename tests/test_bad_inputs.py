"""Bad inputs across the library and the CLI: each gets a clear, specific error (or a documented
fallback), and nothing written earlier (results, checkpoints) is lost.

Test ids are numbered b01 … b74 (74 distinct bad inputs; b50 … from issue 34).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import wtacrs
from models import CASES_BY_NAME
from wtacrs.cache import GradNormCache
from wtacrs.functional import sampled_linear
from wtacrs.integrations.checkpoints import CheckpointError, last_complete_checkpoint, verify_checkpoint

BERT = CASES_BY_NAME["bert"]


# -- configuration and the op ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(ratio=0.0), r"ratio.*\(0, 1\]", id="b01-ratio-zero"),
        pytest.param(dict(ratio=1.5), r"ratio.*\(0, 1\]", id="b02-ratio-above-one"),
        pytest.param(dict(ratio=math.nan), r"ratio.*\(0, 1\]", id="b03-ratio-nan"),
        pytest.param(dict(ratio="0.3"), r"ratio must be a number", id="b04-ratio-string"),
        pytest.param(dict(estimator="wta_crs"), r"estimator must be one of.*'wta_crs'", id="b05-unknown-estimator"),
        pytest.param(dict(target_modules="query("), r"target_modules: invalid regex", id="b06-bad-regex"),
        pytest.param(dict(seed=1.5), r"seed must be an int", id="b07-float-seed"),
    ],
)
def test_config_rejects(kwargs, match):
    with pytest.raises(wtacrs.WTACRSConfigError, match=match):
        wtacrs.WTACRSConfig.preset("sampler", **kwargs)


def test_b08_op_rejects_negative_ratio_and_unknown_estimator():
    x, w = torch.randn(4, 3), torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        sampled_linear(x, w, ratio=-0.1)
    with pytest.raises(ValueError, match="unknown estimator 'best'"):
        sampled_linear(x, w, ratio=0.5, estimator="best")


def test_b09_target_patterns_matching_nothing_echo_the_patterns():
    with pytest.raises(wtacrs.NoMatchingModulesError, match="no_such_layer"):
        wtacrs.apply(BERT.model(), wtacrs.WTACRSConfig.preset("sampler", target_modules=["no_such_layer"]))


def test_b10_apply_twice_and_state_of_a_plain_model():
    model = wtacrs.apply(BERT.model(), wtacrs.WTACRSConfig.preset("sampler"))
    with pytest.raises(ValueError, match="already applied"):
        wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler"))
    with pytest.raises(ValueError, match="not applied"):
        wtacrs.sampling_state(BERT.model())


# -- example ids ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ids, match",
    [
        pytest.param([0.0, 1.0, 2.0], "1-D sequence of integers", id="b11-float-ids"),
        pytest.param([[0, 1, 2]], "1-D sequence of integers", id="b12-2d-ids"),
        pytest.param([0, -1, 2], "non-negative", id="b13-negative-ids"),
        pytest.param([True, False, True], "1-D sequence of integers", id="b14-bool-ids"),
    ],
)
def test_batch_rejects_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        with wtacrs.batch(ids):
            pass


def test_b15_ids_of_the_wrong_length_are_named_and_touch_no_cache():
    """Ids of another length than the forward's batch: a one-line error naming both counts, and
    nothing is written under the wrong examples' ids."""
    model = wtacrs.apply(BERT.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    with pytest.raises(ValueError, match="2 example ids, but the model's forward got a batch of 3"):
        with wtacrs.batch(torch.arange(2)):  # the batch has 3 examples
            model(**BERT.batch()).loss.backward()
    assert wtacrs.sampling_state(model).cache is None


# -- non-finite values, empty batches --------------------------------------------------------------
def test_b16_nan_activation_is_named():
    x, w = torch.randn(6, 3), torch.randn(2, 3, requires_grad=True)
    x[2, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite activations"):
        sampled_linear(x, w, ratio=0.5)


def test_b17_inf_activation_is_named():
    x, w = torch.randn(6, 3), torch.randn(2, 3, requires_grad=True)
    x[0, 0] = math.inf
    with pytest.raises(ValueError, match="non-finite activations"):
        sampled_linear(x, w, ratio=0.5)


def test_b18_non_finite_gradient_norms_are_stored_as_missing():
    """Documented fallback: an Inf/NaN gradient never enters the cache; lookups say 'unknown'."""
    cache = GradNormCache(1)
    mask = torch.ones(1, 3, dtype=torch.bool)
    cache.record(0, torch.tensor([4]), mask, torch.tensor([[1.0, math.inf, math.nan]]))
    cache.commit()
    norms = cache.lookup(0, torch.tensor([4]), mask)
    assert torch.isfinite(norms[0, 0]) and norms[0, 1:].isnan().all()


def test_b19_a_nan_loss_step_does_not_poison_the_next_draws():
    model = wtacrs.apply(BERT.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    ids = torch.arange(3)
    with wtacrs.batch(ids):
        (model(**BERT.batch()).loss * math.nan).backward()
    model.zero_grad()
    with wtacrs.batch(ids):  # cached norms are all "missing": sampling falls back to ‖X‖
        model(**BERT.batch()).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_b20_all_padding_rows_give_an_exact_zero_weight_gradient():
    x, w = torch.randn(2, 5, 3), torch.randn(4, 3, requires_grad=True)
    y = sampled_linear(x, w, ratio=0.3, row_mask=torch.zeros(2, 5, dtype=torch.bool))
    torch.testing.assert_close(y, x @ w.T)
    y.sum().backward()  # precondition violated on purpose: padding got gradient, and is not estimated
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_b21_sequence_longer_than_the_model_allows_fails_in_the_model_not_silently():
    model = wtacrs.apply(BERT.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))  # max_position_embeddings = 64
    too_long = {"input_ids": torch.randint(3, 99, (1, 80)), "attention_mask": torch.ones(1, 80, dtype=torch.long)}
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        model(**too_long)


def test_b22_record_with_mismatched_norms_shape():
    with pytest.raises(ValueError, match=r"norms shape \(1, 2\) does not match row_mask \(1, 3\)"):
        GradNormCache(1).record(0, torch.tensor([0]), torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2))


def test_b23_cache_slot_count_mismatch_on_load():
    state = GradNormCache(2).state_dict()
    with pytest.raises(ValueError, match="cache has 2 slots, this model samples 3 layers"):
        GradNormCache(3).load_state_dict(state)


# -- config files ----------------------------------------------------------------------------------
def test_b24_malformed_config_json(tmp_path):
    (tmp_path / "wtacrs_config.json").write_text('{"ratio": 0.3,')
    with pytest.raises(wtacrs.WTACRSConfigError, match="not valid JSON"):
        wtacrs.WTACRSConfig.from_pretrained(tmp_path)


def test_b25_unknown_config_field(tmp_path):
    (tmp_path / "wtacrs_config.json").write_text('{"ratio": 0.3, "rate": 0.1}')
    with pytest.raises(wtacrs.WTACRSConfigError, match="unknown WTACRSConfig field.*rate"):
        wtacrs.WTACRSConfig.from_pretrained(tmp_path)


# -- data files --------------------------------------------------------------------------------------
def test_b26_empty_tweet_file(tmp_path):
    from wtacrs.tasks import DataError, load_task

    (tmp_path / "t.csv").write_text("")
    with pytest.raises(DataError, match=r"t\.csv.*missing column"):
        load_task("tweet_sentiment", tmp_path / "t.csv")


def test_b27_tweet_line_with_a_wrong_field_count(tmp_path):
    from wtacrs.tasks import DataError, load_task

    (tmp_path / "t.csv").write_text("sentiment,confidence,text\npositive,1.0,good\nnegative,0.5\n")
    with pytest.raises(DataError, match=r"line 3: expected 3 comma-separated fields, found 2"):
        load_task("tweet_sentiment", tmp_path / "t.csv")


def test_b28_unknown_label(tmp_path):
    from wtacrs.tasks import DataError, load_task

    (tmp_path / "t.csv").write_text("sentiment,confidence,text\nangry,1.0,bad day\n")
    with pytest.raises(DataError, match=r"line 2: unknown label 'angry'; expected one of negative, neutral, positive"):
        load_task("tweet_sentiment", tmp_path / "t.csv")


def test_b29_glue_file_that_is_not_utf8(tmp_path):
    from wtacrs.tasks import DataError, load_task

    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_bytes(b"sentence\tlabel\ngood\t1\n\xff\xfe bad\t0\n")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(DataError, match=r"train\.tsv, line 3: not valid utf-8"):
        load_task("sst2", tmp_path)


def test_b30_glue_file_missing_a_column(tmp_path):
    from wtacrs.tasks import DataError, load_task

    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("text\tlabel\ngood\t1\n")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(DataError, match=r"train\.tsv.*sentence"):
        load_task("sst2", tmp_path)


# -- CLI options (rejected before any model or data is loaded) ---------------------------------------
def _cli_args(*argv: str) -> argparse.Namespace:
    from wtacrs.cli.finetune import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--ratio", "0"], "--ratio must be in (0, 1]", id="b31-cli-ratio-zero"),
        pytest.param(["--epochs", "-1"], "--epochs must be positive", id="b32-cli-negative-epochs"),
        pytest.param(["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1)", id="b33-cli-warmup"),
        pytest.param(["--data-dir", "/no/such/folder"], "--data-dir /no/such/folder does not exist",
                     id="b34-cli-data-dir"),
        pytest.param(["--resume", "--overwrite", "--output-dir", "x"], "exclude each other",
                     id="b35-cli-resume-overwrite"),
        pytest.param(["--resume"], "--resume needs --output-dir", id="b36-cli-resume-without-folder"),
        pytest.param(["--max-train-samples", "0"], "--max-train-samples must be at least 1", id="b37-cli-zero-samples"),
    ],
)
def test_cli_rejects(argv, message, capsys, tmp_path, monkeypatch):
    from wtacrs.cli.finetune import run

    monkeypatch.chdir(tmp_path)
    assert run(_cli_args(*argv)) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a rejected command wrote something"


def test_b49_cli_max_length_beyond_the_models_positions_fails_before_touching_the_run(capsys, tmp_path):
    """Not an IndexError in the first forward pass: an error naming both numbers, before
    --overwrite deletes the earlier run."""
    from transformers import BertConfig, GPT2Config, RobertaConfig

    from wtacrs.cli.finetune import run
    from wtacrs.finetuning.models import max_model_length

    BertConfig(max_position_embeddings=64).save_pretrained(tmp_path / "bert")
    args = _cli_args("--model", str(tmp_path / "bert"), "--max-length", "80", "--output-dir", str(tmp_path / "out"),
                     "--method", "full", "--overwrite")
    earlier = tmp_path / "out" / "tweet_sentiment" / "bert" / "full" / "seed0"
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text('{"score": 0.9}')
    assert run(args) == 2
    assert "--max-length 80 is longer than bert allows: at most 64 tokens" in capsys.readouterr().err
    assert (earlier / "results.json").read_text() == '{"score": 0.9}'
    # RoBERTa's positions start after the padding index; GPT-2 calls them n_positions
    assert max_model_length(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert max_model_length(GPT2Config(n_positions=256)) == 256


def test_b38_cli_unknown_recipe_component_is_named(capsys, tmp_path, monkeypatch):
    from wtacrs.cli.finetune import run

    monkeypatch.chdir(tmp_path)
    assert run(_cli_args("--method", "fast")) == 2
    assert "--method: bad component 'fast' in recipe 'fast'" in capsys.readouterr().err


# -- results and checkpoints -------------------------------------------------------------------------
def test_b39_unwritable_results_location_keeps_the_earlier_results(tmp_path):
    from wtacrs.atomic import write_json_atomic

    results = tmp_path / "results.json"
    write_json_atomic(results, {"score": 0.9})
    with pytest.raises(NotADirectoryError):
        write_json_atomic(results / "results.json", {"score": 0.1})  # "folder" is a file
    with pytest.raises(TypeError):
        write_json_atomic(results, {"score": object()})  # not serialisable
    assert json.loads(results.read_text()) == {"score": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"], "a temp file was left behind"


def test_b48_results_write_failing_half_way_leaves_no_temp_file(tmp_path, monkeypatch):
    from wtacrs import atomic

    results = tmp_path / "results.json"
    atomic.write_json_atomic(results, {"score": 0.9})

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)  # the temp file exists and holds the new text
    with pytest.raises(OSError, match="No space left"):
        atomic.write_json_atomic(results, {"score": 0.1})
    monkeypatch.undo()
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError):  # the rename itself fails
        atomic.write_json_atomic(tmp_path / "folder", {"score": 0.1})
    assert json.loads(results.read_text()) == {"score": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "results.json"], "a temp file was left behind"


def test_b40_cli_refuses_to_overwrite_an_earlier_run(tmp_path):
    from wtacrs.cli.finetune import settings_from
    from wtacrs.finetuning.run_folder import RunFolderError
    from wtacrs.finetuning.train import claim_folder, plan_folder

    run, = settings_from(_cli_args("--output-dir", str(tmp_path), "--method", "wtacrs")).runs()
    with claim_folder(run)[0] as first:
        (first.path / "results.json").write_text('{"score": 0.9}')
    with pytest.raises(RunFolderError, match="already holds a finished run; pass --overwrite"):
        plan_folder(run)
    with pytest.raises(RunFolderError, match="already holds a finished run; pass --overwrite"):
        claim_folder(run)
    assert (first.path / "results.json").read_text() == '{"score": 0.9}'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real WTACRSTrainer checkpoint (3 steps of the tiny BERT)."""
    from test_resume import SAVE_STEPS, trainer

    output_dir = tmp_path_factory.mktemp("ckpt")
    t = trainer(output_dir)
    t.args.max_steps = SAVE_STEPS
    t.train()
    return output_dir / f"checkpoint-{SAVE_STEPS}"


def _damaged_copy(checkpoint: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, copy)
    damage(copy)
    return copy


def _truncate(name: str, keep: float = 0.5):
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return damage


def _flip_byte(name: str):
    def damage(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 3] ^= 0xFF  # inside the first stored tensor
        (folder / name).write_bytes(bytes(data))

    return damage


@pytest.mark.parametrize(
    "damage, match",
    [
        pytest.param(_truncate("model.safetensors"), r"model\.safetensors is corrupt or truncated",
                     id="b41-truncated-model"),
        pytest.param(_truncate("wtacrs_state.safetensors"), r"wtacrs_state\.safetensors is corrupt",
                     id="b42-truncated-wtacrs-state"),
        pytest.param(_flip_byte("optimizer.pt"), r"optimizer\.pt is corrupt or truncated", id="b43-corrupt-optimizer"),
        pytest.param(lambda f: (f / "trainer_state.json").unlink(), "incomplete: no trainer_state.json",
                     id="b44-half-written-checkpoint"),
        pytest.param(_truncate("trainer_state.json", 0.7), r"trainer_state\.json is corrupt",
                     id="b45-truncated-trainer-state"),
    ],
)
def test_damaged_checkpoint_is_refused_before_anything_loads(checkpoint, tmp_path, damage, match):
    from test_resume import trainer

    damaged = _damaged_copy(checkpoint, tmp_path, damage)
    sizes = {p.name: p.stat().st_size for p in damaged.iterdir()}
    with pytest.raises(CheckpointError, match=match):
        verify_checkpoint(damaged)
    t = trainer(tmp_path / "fresh")
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    with pytest.raises(CheckpointError, match=match):
        t.train(resume_from_checkpoint=str(damaged))
    for name, value in before.items():  # nothing was loaded half-way
        assert torch.equal(t.model.get_parameter(name), value), name
    assert {p.name: p.stat().st_size for p in damaged.iterdir()} == sizes, "the checkpoint was modified"


def test_b46_resume_skips_a_half_written_newest_checkpoint(checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path / "checkpoint-3")
    newer = _damaged_copy(checkpoint, tmp_path / "x", _truncate("model.safetensors"))
    shutil.move(newer, tmp_path / "checkpoint-6")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    assert (tmp_path / "checkpoint-6").is_dir(), "the damaged folder must be kept, not deleted"


def test_b47_resume_with_no_checkpoint_at_all(tmp_path):
    from test_resume import trainer

    with pytest.raises(ValueError, match="no complete checkpoint"):
        trainer(tmp_path).train(resume_from_checkpoint=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        verify_checkpoint(tmp_path / "checkpoint-99")


# -- third round (issue 34): b50 … ----------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, 5, "0.3"])
def test_b50_config_field_assigned_after_apply_is_checked(value):
    config = wtacrs.WTACRSConfig(ratio=0.3, recompute_activation=False, recompute_attention=False)
    wtacrs.apply(BERT.model(), config)
    with pytest.raises(wtacrs.WTACRSConfigError, match=r"WTACRSConfig.ratio: ratio must be"):
        config.ratio = value
    assert config.ratio == 0.3, "a refused value must leave the config as it was"
    with pytest.raises(wtacrs.WTACRSConfigError, match="WTACRSConfig.estimator must be one of"):
        config.estimator = "best"
    config.ratio = 0.5  # a good value is taken
    assert config.ratio == 0.5


@pytest.mark.parametrize(
    "ids, match",
    [
        pytest.param([0, 1, 1], r"example id\(s\) 1 appear more than once in one batch", id="b51-duplicate-ids"),
        pytest.param([0, 1, 2**40], rf"example_ids must be at most {2**32 - 1} .*got {2**40}", id="b52-huge-ids"),
    ],
)
def test_cache_rejects_ids_where_they_enter_it(ids, match):
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 2:] = False  # a later duplicate with fewer real tokens ...
    with pytest.raises(ValueError, match=match):
        GradNormCache(2).lookup(0, torch.tensor(ids), mask)
    with pytest.raises(ValueError, match=match):
        GradNormCache(2).record(0, torch.tensor(ids), mask, torch.ones(3, 4))


def test_b51_duplicate_ids_in_a_training_batch_are_refused_naming_them():
    """The cache refuses them when the first step's records enter it (at the latest when the next
    step starts), before a later duplicate with more real tokens (the batch's third example) is
    written past its entry: an IndexError in the store, once."""
    sampler = wtacrs.WTACRSConfig(ratio=0.3, recompute_activation=False, recompute_attention=False)  # forward draws
    model = wtacrs.apply(BERT.model(), sampler)
    with pytest.raises(ValueError, match=r"example id\(s\) 1 appear more than once in one batch"):
        for _ in range(2):
            with wtacrs.batch(torch.tensor([0, 1, 1])):
                model(**BERT.batch()).loss.backward()


@pytest.mark.parametrize(
    "write, match",
    [
        pytest.param(lambda p: p.write_bytes(b'{"ratio": 0.3, "budget": "\xff\xfe"}'), "is not UTF-8 text",
                     id="b53-config-not-utf8"),
        pytest.param(lambda p: p.mkdir(), "is a folder, not a wtacrs_config.json file", id="b54-config-a-folder"),
        pytest.param(lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply",
                     id="b55-config-nested"),
    ],
)
def test_config_file_problems_are_config_errors(tmp_path, write, match):
    write(tmp_path / "wtacrs_config.json")
    with pytest.raises(wtacrs.WTACRSConfigError, match=match):
        wtacrs.WTACRSConfig.from_pretrained(tmp_path)


def test_b56_deeply_nested_squad_json_is_a_data_error(tmp_path):
    from wtacrs.tasks import DataError
    from wtacrs.tasks.squad import read_squad_json

    path = tmp_path / "dev.json"
    path.write_text('{"data": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DataError, match=r"dev\.json: not a SQuAD file: its JSON is nested too deeply"):
        read_squad_json(path)


def _report_record(**changes) -> dict:
    from test_finetune import fake_result

    return {**fake_result("sst2", "full", None, 0, 0.9), **changes}


@pytest.mark.parametrize(
    "changes, message",
    [
        pytest.param({"seed": "0"}, "field 'seed' must be an integer, got '0'", id="b57-report-seed-string"),
        pytest.param({"task": 3}, "field 'task' must be a string, got 3", id="b58-report-task-number"),
        pytest.param({"method": None}, "field 'method' must be a string, got None", id="b59-report-method-null"),
        pytest.param({"ratio": "0.3"}, "field 'ratio' must be a number in (0, 1] or null", id="b60-report-ratio"),
        pytest.param({"peak_memory_bytes": "1"}, "field 'peak_memory_bytes' must be a number or null",
                     id="b61-report-peak-string"),
        pytest.param({"saved_activation_bytes": None}, "field 'saved_activation_bytes' must be a number",
                     id="b62-report-saved-null"),
        pytest.param({"train_samples_per_second": [1]}, "field 'train_samples_per_second' must be a number or null",
                     id="b63-report-speed-list"),
        pytest.param({"variants": "pad-max"}, "field 'variants' must be a list of strings", id="b64-report-variants"),
        pytest.param({"hyperparameters": [1]}, "field 'hyperparameters' must be an object", id="b65-report-hparams"),
        pytest.param({"companion_effects": {"lean_dropout": 1}}, "field 'companion_effects' must be an object of "
                     "strings", id="b66-report-effects"),
        pytest.param({"model_name": 7}, "field 'model_name' must be a string or null", id="b67-report-model-name"),
        pytest.param({"seed": True}, "field 'seed' must be an integer, got True", id="b68-report-seed-bool"),
    ],
)
def test_report_names_a_results_field_of_the_wrong_type(tmp_path, capsys, changes, message):
    from wtacrs.cli import main

    path = tmp_path / "run0" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_report_record(**changes)))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"wtacrs report: error: {path}: {message}" in err and len(err.strip().splitlines()) == 1


def test_b69_report_on_deeply_nested_json(tmp_path, capsys):
    from wtacrs.cli import main

    path = tmp_path / "results.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["report", str(path)]) == 2
    assert f"{path}: not a wtacrs finetune results file (its JSON is nested too deeply)" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["a-file", "read-only"])
def test_b70_bench_out_that_cannot_hold_results_is_refused_before_measuring(tmp_path, capsys, monkeypatch, kind):
    """Read-only is simulated (root may write anywhere): os.access says so."""
    import os

    from wtacrs.cli import main

    out = tmp_path / kind
    if kind == "a-file":
        out.write_text("")
    else:
        out.mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == out else real_access(p, mode))
    assert main(["bench", "memory", "--model", "bert-tiny", "--out", str(out)]) == 2
    expected = f"--out {out} is not a folder" if kind == "a-file" else f"--out {out}: {out} is not writable"
    assert f"wtacrs bench: error: {expected}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "argument --batch: must be a positive integer, got 0"),
    (["--draws", "0"], "argument --draws: must be a positive integer, got 0"),
    (["--ratios", "nan"], "argument --ratios: ratio must be in (0, 1], got nan"),
], ids=["b71-demo-batch-zero", "b72-demo-draws-zero", "b73-demo-ratio-nan"])
def test_demo_options_are_checked(capsys, argv, message):
    from wtacrs.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["demo", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_b74_max_length_below_a_pairs_special_tokens_is_named():
    from datasets import Dataset
    from transformers import AutoTokenizer

    from wtacrs.packaged import packaged_model_dir
    from wtacrs.tasks import MaxLengthError, get_task, tokenize_sequences

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir())
    pairs = Dataset.from_dict({"sentence1": ["a b c"], "sentence2": ["d e f"], "label": [0]})
    with pytest.raises(MaxLengthError, match="--max-length 4 leaves no room for text: the tokenizer adds 3 special "
                                             "tokens to a sentence pair, so rte needs at least 5"):
        tokenize_sequences(pairs, get_task("rte"), tokenizer, 4)
    assert len(tokenize_sequences(pairs, get_task("rte"), tokenizer, 5)[0]["input_ids"]) == 5
