"""Bad inputs across the library and the CLI: each gets a clear, specific error (or a documented
fallback), and nothing written earlier (results, checkpoints) is lost.

Test ids are numbered b01 … b49 (49 distinct bad inputs).
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
        wtacrs.WTACRSConfig(**kwargs)


def test_b08_op_rejects_negative_ratio_and_unknown_estimator():
    x, w = torch.randn(4, 3), torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        sampled_linear(x, w, ratio=-0.1)
    with pytest.raises(ValueError, match="unknown estimator 'best'"):
        sampled_linear(x, w, ratio=0.5, estimator="best")


def test_b09_target_patterns_matching_nothing_echo_the_patterns():
    with pytest.raises(wtacrs.NoMatchingModulesError, match="no_such_layer"):
        wtacrs.apply(BERT.model(), wtacrs.WTACRSConfig(target_modules=["no_such_layer"]))


def test_b10_apply_twice_and_state_of_a_plain_model():
    model = wtacrs.apply(BERT.model(), wtacrs.WTACRSConfig())
    with pytest.raises(ValueError, match="already applied"):
        wtacrs.apply(model, wtacrs.WTACRSConfig())
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


def test_b15_ids_of_the_wrong_length_fall_back_without_touching_the_cache():
    """Documented fallback: rows that are not (example, token) of the batch get no cached norms;
    the step is still unbiased and nothing is written under the wrong examples' ids."""
    model = wtacrs.apply(BERT.model(), wtacrs.WTACRSConfig(ratio=0.3))
    with wtacrs.batch(torch.arange(2)):  # the batch has 3 examples
        model(**BERT.batch()).loss.backward()
    assert wtacrs.sampling_state(model).cache is None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


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
    model = wtacrs.apply(BERT.model(), wtacrs.WTACRSConfig(ratio=0.3))
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
    model = wtacrs.apply(BERT.model(), wtacrs.WTACRSConfig(ratio=0.3))  # max_position_embeddings = 64
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
