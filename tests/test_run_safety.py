"""Run safety (issue 17): no silent wrong labels, no overwritten results, no NaN recorded as a
score, one owner per run folder, signals reach a run's child process, and user mistakes end in
one clear error line with nothing lost.

Tests d1 … d7 reproduce the issue's numbered defects; n01 … are bad inputs found afterwards.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_finetune import FAST, fake_result, tiny_model, write_results  # noqa: F401 (a fixture)
from test_tasks import squad_doc
from wtacrs.cli import main


def finetune(model: str, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", model, "--output-dir", str(out), "--method", "full", "--in-process", *FAST,
            *extra]


def run_folder(out: Path, method: str = "full") -> Path:
    (folder,) = out.glob(f"*/*/{method}/seed0")
    return folder


def exit_code(argv: list[str]) -> int:
    """main's return value, or the code of the SystemExit it raised (a run's errors exit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory) -> Path:  # noqa: F811
    """The output folder of one finished tiny run (2 optimizer steps, a checkpoint at step 2)."""
    out = tmp_path_factory.mktemp("finished")
    assert main(finetune(tiny_model, out)) == 0
    return out


def copy_of(out: Path, tmp_path: Path) -> Path:
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "out"


# -- the defects -----------------------------------------------------------------------
def test_d1_squad_offsets_off_the_answer_stop_the_run_naming_the_question(tiny_model, tmp_path, capsys):  # noqa: F811
    doc = squad_doc(10)
    for article in doc["data"]:
        article["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 7  # still inside the context
    assert _finetune_squad(doc, tiny_model, tmp_path, max_length=48, doc_stride=16) == 2
    assert ("data[0].paragraphs[0].qas[0] (question id 'q0').answers[0]: answer_start 13 points at 'gamma.', "
            "not at the answer 'beta 0'") in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "a run that never started left a folder behind"


def test_d2_resume_leaves_a_finished_run_as_it_is(tiny_model, finished, tmp_path, capsys):  # noqa: F811
    out = copy_of(finished, tmp_path)
    folder = run_folder(out)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert main([*finetune(tiny_model, out), "--resume"]) == 0
    assert "holds a finished run: left as it is (--overwrite runs it again)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert exit_code(finetune(tiny_model, out)) == 2  # without a flag: refused, naming --overwrite
    assert "already holds a finished run; pass --overwrite to replace it" in capsys.readouterr().err


def test_d3_a_diverged_run_fails_naming_the_step_is_recorded_failed_and_left_out_of_the_report(
        tiny_model, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert exit_code([*finetune(tiny_model, out), "--lr", "1e30"]) == 1
    err = capsys.readouterr().err
    assert "error: run full seed 0: training diverged at step 2: eval_validation_loss is nan" in err
    record = json.loads((run_folder(out) / "results.json").read_text())
    assert record["status"] == "failed" and record["failed_step"] == 2 and "score" not in record
    write_results(tmp_path / "good", [fake_result("tweet_sentiment", "full", None, 1, 0.5)])
    assert main(["report", str(out), str(tmp_path / "good")]) == 0
    captured = capsys.readouterr()
    assert "| MiniLM | full | 50.0 (1) |" in captured.out and "tiny" not in captured.out
    assert f"left out {run_folder(out) / 'results.json'}: training diverged at step 2" in captured.err


def test_d3_parameters_are_checked_before_a_checkpoint_is_written():
    import torch
    from transformers import TrainerControl, TrainerState

    from wtacrs.finetuning.guards import NonFiniteError, non_finite_guard

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    guard, state = non_finite_guard(), TrainerState(global_step=7)
    with torch.no_grad():
        model[1].bias.fill_(float("inf"))
    guard.on_step_end(None, state, TrainerControl(should_save=False), model=model)  # no checkpoint: no pass
    with pytest.raises(NonFiniteError, match=r"step 7: parameter 1.bias holds NaN or infinite values"):
        guard.on_epoch_end(None, state, TrainerControl(should_save=True), model=model)
    with pytest.raises(NonFiniteError, match="step 7: loss is nan"):
        guard.on_log(None, state, TrainerControl(), logs={"loss": float("nan"), "learning_rate": 0.1})


def test_d4_resume_with_other_settings_is_refused_naming_each(tiny_model, finished, tmp_path, capsys):  # noqa: F811
    out = copy_of(finished, tmp_path)
    (run_folder(out) / "results.json").unlink()  # as if it had been killed after its checkpoint
    argv = [*finetune(tiny_model, out), "--resume", "--lr", "0.001", "--max-train-samples", "12"]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "--resume with other settings than" in err
    from wtacrs.tasks import get_task

    started_at = get_task("tweet_sentiment").defaults["lr"]
    assert f"--lr 0.001 (the run has {started_at}), --max-train-samples 12 (the run has 16)" in err
    assert not (run_folder(out) / "results.json").exists()


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process owning `folder` (as a training run does), until it is killed."""
    code = ("import sys; from wtacrs.finetuning.run_folder import RunFolder; f = RunFolder(sys.argv[1]); "
            "f.claim(f.settings(), resume=True, overwrite=False); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_d5_one_owner_per_run_folder_and_no_stuck_lock(tiny_model, finished, tmp_path, capsys):  # noqa: F811
    out = copy_of(finished, tmp_path)
    folder = run_folder(out)
    (folder / "results.json").unlink()  # a run in its second epoch, say
    before = sorted(p.name for p in folder.iterdir())
    holder = _hold_lock(folder)
    try:
        for flags in ([], ["--overwrite"], ["--resume"]):
            assert exit_code([*finetune(tiny_model, out), *flags]) == 2
            assert f"is in use by another wtacrs finetune (pid {holder.pid})" in capsys.readouterr().err
        assert sorted(p.name for p in folder.iterdir()) == before, "a refused command changed the folder"
    finally:
        holder.kill()
        holder.wait()
    from wtacrs.finetuning.run_folder import RunFolder

    assert RunFolder(folder).state() == "interrupted"  # the dead owner's lock is gone with it


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _several_method_run_training(tiny_model: str, out, stderr) -> tuple[subprocess.Popen, int]:
    """`finetune` of two recipes (minutes of training) started, once its first run's child trains:
    (the parent process, the child's pid)."""
    argv = [sys.executable, "-m", "wtacrs.cli", "finetune", "--model", tiny_model, "--output-dir", str(out),
            "--method", "full", "wtacrs", *FAST, "--max-train-samples", "64", "--epochs", "100"]
    parent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    child = None
    deadline = time.monotonic() + 180
    try:
        while child is None or not list(out.glob("*/*/full/seed0/runs")):  # the child is training
            assert parent.poll() is None and time.monotonic() < deadline, "the run never started training"
            child = next((pid for pid, cmd in _children(parent.pid) if "spawn_main" in cmd), None)
            time.sleep(0.2)
    except BaseException:
        for pid in (parent.pid, child):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        raise
    return parent, child


def _wait_gone(pid: int, seconds: float = 30.0) -> None:
    """Wait up to `seconds` for `pid` to exit."""
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_d6_signals_are_forwarded_to_the_child_instead_of_stopping_the_parent():
    from wtacrs.finetuning.guards import forward_signals

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with forward_signals(child.pid) as received:
            os.kill(os.getpid(), signal.SIGTERM)  # would end this test process without the handler
            assert child.wait(timeout=30) == -signal.SIGTERM
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(240)
def test_d6_sigterm_to_a_several_method_run_stops_its_child_and_says_which_run(tiny_model, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    parent, child = _several_method_run_training(tiny_model, out, stderr=subprocess.PIPE)
    try:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        _wait_gone(child)
        assert not _alive(child), "the child run kept training after its parent was stopped"
        assert "stopped by SIGTERM during run full seed 0" in parent.stderr.read()
    finally:
        for pid in (parent.pid, child):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait()


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--epochs", "inf"], "--epochs must be a finite number, got inf", id="d7-epochs-inf"),
        pytest.param(["--lr", "inf"], "--lr must be a finite number, got inf", id="d7-lr-inf"),
        pytest.param(["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan",
                     id="d7-weight-decay-nan"),
        pytest.param(["--seed", "-1"], "--seed must be in [0, 2**32), got -1", id="d7-seed-negative"),
        pytest.param(["--output-dir", "a-file/runs"], "--output-dir a-file/runs is not a folder (a-file is a file)",
                     id="d7-output-dir-under-a-file"),
        pytest.param(["--output-dir", "a-file"], "--output-dir a-file is not a folder", id="d7-output-dir-a-file"),
        pytest.param(["--weight-decay", "-0.1"], "--weight-decay must be at least 0, got -0.1", id="n01-weight-decay"),
        pytest.param(["--seed", "0", "1", "0"], "--seed names 0 more than once", id="n02-seed-twice"),
        pytest.param(["--method", "full", "wtacrs", "full"], "--method names full more than once",
                     id="n03-method-twice"),
        pytest.param(["--lora-alpha", "0"], "--lora-alpha must be positive, got 0", id="n04-lora-alpha-zero"),
        pytest.param(["--seed", str(2**32)], f"--seed must be in [0, 2**32), got {2**32}", id="n05-seed-too-big"),
        pytest.param(["--resume", "--output-dir", "typo"], "--resume: --output-dir typo does not exist",
                     id="n14-resume-of-a-folder-that-is-not-there"),
        pytest.param(["--method", "wtacrs", "--target-modules", ""],
                     "--target-modules takes layer name suffixes, got an empty one in ['']", id="n15-empty-target"),
    ],
)
def test_d7_options_are_checked_before_anything_is_written(tiny_model, argv, message, tmp_path,  # noqa: F811
                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("a-file").write_text("not a folder")
    assert exit_code(["finetune", "--model", tiny_model, "--in-process", *FAST, *argv]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"], "a rejected command wrote something"


def test_d7_unwritable_output_dir(tiny_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Simulated (root may write anywhere): os.access says the folder is read-only."""
    locked = tmp_path / "read-only"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert exit_code(finetune(tiny_model, locked / "runs")) == 2
    assert f"--output-dir {locked / 'runs'}: {locked} is not writable" in capsys.readouterr().err


def _damaged_model(tiny_model: str, tmp_path: Path, damage) -> Path:  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    damage(model / "model.safetensors")
    return model


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_weights(path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name][0] = torch.nan  # what flipped exponent bits give
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage, message",
    [
        pytest.param(_truncate, "cannot load it (SafetensorError: Error while deserializing header",
                     id="d7-truncated-model"),
        pytest.param(_nan_weights, "weight bert.embeddings.LayerNorm.bias holds NaN or infinite values; its files are "
                     "corrupt", id="d7-corrupt-model"),
        pytest.param(lambda p: (p.parent / "config.json").write_text('{"model_type": "bert",'),
                     "cannot load it (OSError", id="n06-model-config-not-json"),
    ],
)
def test_d7_a_corrupt_model_is_one_error_line_and_leaves_no_folder(tiny_model, tmp_path, capsys,  # noqa: F811
                                                                    damage, message):
    model = _damaged_model(tiny_model, tmp_path, damage)
    assert exit_code(finetune(str(model), tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"wtacrs finetune: error: --model {model}: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_d7_a_full_disk_is_named_and_the_last_checkpoint_stays_usable(tiny_model, tmp_path, capsys,  # noqa: F811
                                                                      monkeypatch):
    from transformers import Trainer

    from wtacrs.finetuning.run_folder import RunFolder
    from wtacrs.integrations.checkpoints import verify_checkpoint

    save = Trainer._save_checkpoint

    def save_once(self, *args, **kwargs):
        if self.state.global_step > 2:
            raise OSError(errno.ENOSPC, "No space left on device", "optimizer.pt")
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_once)
    out = tmp_path / "out"
    assert exit_code([*finetune(tiny_model, out), "--epochs", "2"]) == 2
    checkpoint = run_folder(out) / "checkpoint-2"
    assert (f"run full seed 0 stopped: the disk is full (No space left on device: optimizer.pt); the last "
            f"complete checkpoint {checkpoint} is kept: free space, then pass --resume") in capsys.readouterr().err
    verify_checkpoint(checkpoint)
    assert RunFolder(run_folder(out)).state() == "interrupted"


def test_d7_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tiny_model, tmp_path, capsys,  # noqa: F811
                                                                          monkeypatch):
    from transformers import Trainer

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "train", full_disk)
    (tmp_path / "out").mkdir()  # the user's folder stays; what this command created goes
    assert exit_code(finetune(tiny_model, tmp_path / "out")) == 2
    assert "the disk is full (No space left on device: " in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


# -- the run-folder state machine ----------------------------------------------------------------
def test_run_folder_states_and_what_each_flag_may_do(tmp_path):
    from wtacrs.finetuning.run_folder import KEEP, RESUME, START, RunFolder, RunFolderError

    folder = RunFolder(tmp_path / "run")
    assert folder.state() == "new"
    assert folder.plan({}, resume=True, overwrite=False) == START  # nothing to resume: a fresh start
    with folder:
        assert folder.claim({"lr": 1}, resume=False, overwrite=False) == START
        assert folder.state() == "interrupted"  # its own lock does not make it "running"
        assert RunFolder(folder.path).state() == "running"
        with pytest.raises(RunFolderError, match=f"in use by another wtacrs finetune \\(pid {os.getpid()}\\)"):
            RunFolder(folder.path).claim({"lr": 1}, resume=True, overwrite=False)
        (folder.path / "checkpoint-1").mkdir()
    assert folder.state() == "interrupted"
    with pytest.raises(RunFolderError, match="holds an interrupted run; pass --resume to continue it or --overwrite"):
        folder.plan({"lr": 1}, resume=False, overwrite=False)
    assert folder.plan({"lr": 1}, resume=True, overwrite=False) == RESUME
    (folder.path / "results.json").write_text('{"status": "failed"}')
    assert folder.state() == "failed"
    assert folder.claim({"lr": 2}, resume=True, overwrite=False) == KEEP  # a record: settings do not matter
    assert folder.owner() is None, "KEEP must not hold the lock"
    assert folder.claim({"lr": 2}, resume=False, overwrite=True) == START
    folder.release()
    assert sorted(p.name for p in folder.path.iterdir()) == [".lock", "run.json"]
    assert folder.settings() == {"lr": 2}


def test_run_folder_of_a_run_that_failed_early_is_removed_with_the_parents_it_created(tmp_path):
    from wtacrs.finetuning.run_folder import RunFolder

    output_dir = tmp_path / "out"
    folder = RunFolder(output_dir / "task" / "model" / "full" / "seed0")
    folder.claim({}, resume=False, overwrite=False)
    (output_dir / "task" / "other").mkdir()
    folder.discard_if_unused()
    assert sorted(p.name for p in output_dir.rglob("*")) == ["other", "task"]
    (output_dir / "task" / "other").rmdir()
    RunFolder(output_dir / "task" / "model").claim({}, resume=False, overwrite=False)
    again = RunFolder(output_dir / "task" / "model" / "full")
    again.claim({}, resume=False, overwrite=False)
    again.discard_if_unused()  # "model" was there before this claim: it stays
    assert sorted(p.name for p in output_dir.rglob("*")) == [".lock", "model", "run.json", "task"]
    kept = RunFolder(tmp_path / "kept")
    kept.claim({}, resume=False, overwrite=False)
    (kept.path / "checkpoint-1").mkdir()
    kept.discard_if_unused()
    assert (kept.path / "checkpoint-1").is_dir()


def test_a_corrupt_results_file_is_named(tmp_path):
    from wtacrs.finetuning.run_folder import RunFolder, RunFolderError

    (tmp_path / "results.json").write_text('{"score": ')
    with pytest.raises(RunFolderError, match="results.json is not valid JSON .*; move it away or pass --overwrite"):
        RunFolder(tmp_path).state()


# -- SQuAD file invariants (new bad inputs) --------------------------------------------------------
def _squad_with(change) -> dict:
    doc = squad_doc()
    change(doc["data"][1]["paragraphs"][0]["qas"][0], doc)
    return doc


@pytest.mark.parametrize(
    "change, version_2, message",
    [
        pytest.param(lambda qa, doc: qa["answers"][0].update(text="   ", answer_start=0),
                     None, r"qas\[0\] \(question id 'q1'\).answers\[0\]: empty answer text", id="n07-empty-answer"),
        pytest.param(lambda qa, doc: qa.update(id="q0"), None,
                     r"data\[1\].paragraphs\[0\].qas\[0\]: question id 'q0' is already used at "
                     r"data\[0\].paragraphs\[0\].qas\[0\]", id="n08-duplicate-id"),
        pytest.param(lambda qa, doc: qa.update(is_impossible=True), True,
                     r"\(question id 'q1'\): marked is_impossible but has 1 answer", id="n09-impossible-with-answer"),
        pytest.param(lambda qa, doc: qa.update(is_impossible=True, answers=[]), False,
                     r"\(question id 'q1'\): is_impossible \(unanswerable questions are SQuAD v2.0's; use squad_v2\)",
                     id="n10-v2-question-in-v1"),
        pytest.param(lambda qa, doc: qa.update(question=" "), None, r"\(question id 'q1'\): empty question",
                     id="n11-empty-question"),
        pytest.param(lambda qa, doc: qa.update(is_impossible="no"), None,
                     r"is_impossible: expected bool, got str", id="n12-is-impossible-string"),
    ],
)
def test_squad_file_invariants_are_checked_naming_the_question(tmp_path, change, version_2, message):
    from wtacrs.tasks import DataError
    from wtacrs.tasks.squad import read_squad_json

    path = tmp_path / "dev.json"
    path.write_text(json.dumps(_squad_with(change)))
    with pytest.raises(DataError, match=message):
        read_squad_json(path) if version_2 is None else read_squad_json(path, version_2)


def test_n13_report_leaves_out_a_result_whose_score_is_not_a_number(tmp_path, capsys):
    write_results(tmp_path, [fake_result("sst2", "full", None, 0, float("nan")),
                             fake_result("sst2", "full", None, 1, 0.9)])
    assert main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "90.0 (1)" in captured.out and "its score is nan" in captured.err
    assert main(["report", str(tmp_path / "run0")]) == 2
    assert "no results of a finished run under" in capsys.readouterr().err


def test_n16_squad_question_longer_than_the_window_is_named(tiny_model, tmp_path, capsys):  # noqa: F811
    doc = squad_doc(10)
    doc["data"][3]["paragraphs"][0]["qas"][0]["question"] = "Which word " * 10 + "?"
    assert _finetune_squad(doc, tiny_model, tmp_path, max_length=24, doc_stride=4) == 2
    assert ("error: question id 'q3' takes 21 tokens: a --max-length 24 window leaves 0 context tokens, and "
            "--doc-stride 4 needs more") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_n17_report_names_a_folder_called_results_json_and_an_output_dir_that_is_a_file(tmp_path, capsys):
    write_results(tmp_path, [fake_result("sst2", "full", None, 0, 0.9)])
    (tmp_path / "run9" / "results.json").mkdir(parents=True)
    (tmp_path / "a-file").write_text("")
    assert main(["report", str(tmp_path)]) == 0  # the folder is no results file
    assert main(["report", str(tmp_path / "run9" / "results.json")]) == 2
    assert "no results of a finished run under" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--output-dir", str(tmp_path / "a-file")]) == 2
    assert f"--output-dir {tmp_path / 'a-file'} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("limit", [0, -3, 2.5, True, "10"])
def test_n18_fixed_subset_says_what_limit_it_expects(limit):
    from datasets import Dataset

    from wtacrs.tasks import fixed_subset

    with pytest.raises(ValueError, match=f"limit must be a positive int or None, got {limit!r}"):
        fixed_subset(Dataset.from_dict({"x": [1, 2, 3]}), limit)


def test_n19_results_are_readable_like_any_new_file_not_owner_only(tmp_path):
    from wtacrs.atomic import write_json_atomic

    umask = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "results.json", {"score": 0.5})
    finally:
        os.umask(umask)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o640


def _finetune_squad(doc: dict, tiny_model: str, tmp_path, max_length: int, doc_stride: int) -> int:
    """Exit code of `wtacrs finetune` on SQuAD file `doc` (written to tmp_path), into tmp_path/out."""
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(doc))
    return exit_code(["finetune", "--task", "squad", "--data-dir", str(path), "--model", tiny_model, "--output-dir",
                      str(tmp_path / "out"), "--method", "full", *FAST, "--max-length", str(max_length),
                      "--doc-stride", str(doc_stride)])


# -- third round (issue 34): r01 … reproduce its numbered cases ------------------------------------
def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_r01_target_modules_cannot_lead_outside_the_output_dir(tiny_model, tmp_path, monkeypatch,  # noqa: F811
                                                               capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "victim" / "seed0").mkdir(parents=True)
    (tmp_path / "victim" / "seed0" / "precious.txt").write_text("x")
    argv = [*finetune(tiny_model, Path("out/x")), "--method", "wtacrs@0.3", "--target-modules", "query",
            "../../../../../../victim", "--overwrite"]
    assert exit_code(argv) == 2
    assert ("--target-modules takes layer name suffixes (names joined by '.', e.g. output.dense), got "
            "'../../../../../../victim'") in capsys.readouterr().err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "victim", "victim/seed0", "victim/seed0/precious.txt"]


def test_r01_run_folder_names_are_single_safe_components(tmp_path):
    import dataclasses

    from wtacrs.cli.finetune import add_arguments, settings_from
    from wtacrs.finetuning.spec import folder_name

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from(parser.parse_args(["--method", "wtacrs", "--output-dir", str(tmp_path / "out")]))
    settings = dataclasses.replace(settings, model="..", target_modules=("../../victim", "a/b"))
    (run,) = settings.runs()
    assert run.folder.parent.parent.parent.parent == tmp_path / "out"
    assert run.folder.relative_to(tmp_path / "out").parts == (
        "tweet_sentiment", "_", "wtacrs@0.3+targets=.._.._victim,a_b", "seed0")
    assert [folder_name(t) for t in ("", ".", "..", "...", "a b/c", "ok-1.0@x")] == [
        "_", "_", "_", "_", "a_b_c", "ok-1.0@x"]


def test_r01_overwrite_deletes_only_what_wtacrs_wrote(tiny_model, finished, tmp_path, capsys):  # noqa: F811
    out = copy_of(finished, tmp_path)
    folder = run_folder(out)
    (folder / "precious.txt").write_text("x")
    before = _tree(out)
    assert exit_code([*finetune(tiny_model, out), "--overwrite"]) == 2
    assert (f"{folder} holds files wtacrs finetune did not write (precious.txt): no run starts there and "
            "--overwrite deletes nothing of them") in capsys.readouterr().err
    assert _tree(out) == before


def test_r01_run_folder_empties_only_its_own_entries(tmp_path):
    from wtacrs.finetuning.run_folder import START, RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.claim({"lr": 1}, resume=False, overwrite=False)
    for name in ("checkpoint-3", "runs", "tmp-checkpoint-4"):
        (folder.path / name).mkdir()
    (folder.path / "training.json").write_text("{}")
    (folder.path / ".results.json.x1y2.json").write_text("{")  # a temporary copy a kill left
    folder.release()
    assert folder.claim({"lr": 2}, resume=False, overwrite=True) == START
    folder.release()
    assert sorted(p.name for p in folder.path.iterdir()) == [".lock", "run.json"]


def test_r02_a_bad_compile_backend_is_refused_before_overwrite_deletes_anything(tiny_model, finished,  # noqa: F811
                                                                                tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = _tree(out)
    assert exit_code([*finetune(tiny_model, out), "--overwrite", "--compile", "bogus_backend"]) == 2
    err = capsys.readouterr().err
    assert "--compile bogus_backend: not a torch.compile backend; known: " in err and "Traceback" not in err
    assert _tree(out) == before


def test_r03_a_resume_after_the_last_checkpoint_records_what_it_did_not_measure(tiny_model, finished,  # noqa: F811
                                                                                 tmp_path):
    out = copy_of(finished, tmp_path)
    folder = run_folder(out)
    for name in ("results.json", "training.json"):  # killed after the last checkpoint, before training.json
        (folder / name).unlink()
    assert main([*finetune(tiny_model, out), "--resume"]) == 0
    record = json.loads((folder / "results.json").read_text())
    assert record["wall_seconds"] is None and record["peak_memory_bytes"] is None
    assert record["not_measured"] == ["wall_seconds", "peak_memory_bytes"] and record["resumed_at_step"] == 2
    assert record["step_seconds"] is None  # no step ran in the resuming process


def test_r03_a_resume_keeps_the_original_figures_where_training_ran_to_its_end(tiny_model, finished,  # noqa: F811
                                                                               tmp_path):
    out = copy_of(finished, tmp_path)
    folder = run_folder(out)
    training = json.loads((folder / "training.json").read_text())
    (folder / "results.json").unlink()  # killed after training.json, before the results
    assert main([*finetune(tiny_model, out), "--resume"]) == 0
    record = json.loads((folder / "results.json").read_text())
    assert record["peak_memory_bytes"] == training["peak_memory_bytes"] and "not_measured" not in record
    assert training["wall_seconds"] <= record["wall_seconds"] < training["wall_seconds"] + 60  # plus finishing


def test_r03_table_and_verdict_show_unmeasured_figures_as_such():
    from wtacrs.cli.finetune import comparison_table, verdict

    def record(method, ratio, **figures):
        return {"task": "sst2", "method": method, "ratio": ratio, "seed": 0, "score": 0.9, "score_name": "accuracy",
                "eval_examples": {"validation": 8}, "peak_memory_kind": "cpu_peak_rss", "live_peak_bytes": 2**20,
                "peak_memory_bytes": 2**21, "step_seconds": 0.5, "saved_activation_bytes": 2**20,
                "wall_seconds": 10.0, **figures}

    resumed = record("wtacrs@0.3", 0.3, peak_memory_bytes=None, wall_seconds=None, step_seconds=None)
    table = comparison_table([record("checkpointing", None), resumed])
    assert table.splitlines()[3].split() == ["wtacrs@0.3", "0", "0.9000", "1", "–", "nan", "1.0", "–"]
    assert verdict([record("checkpointing", None), resumed]).startswith("verdict: needs a checkpointing run")


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_r04_resume_without_a_readable_run_json_stops_unless_forced(tiny_model, finished, tmp_path,  # noqa: F811
                                                                    capsys, damage):
    out = copy_of(finished, tmp_path)
    folder = run_folder(out)
    (folder / "results.json").unlink()
    if damage == "missing":
        (folder / "run.json").unlink()
    else:
        (folder / "run.json").write_text('{"settings": ')
    argv = [*finetune(tiny_model, out), "--resume", "--lr", "1e-3", "--batch-size", "4"]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    expected = ("is missing, so nothing says which settings the run was started with; pass --force" if damage ==
                "missing" else "run.json is not valid JSON")
    assert expected in err and "--force" in err and "Traceback" not in err
    assert not (folder / "results.json").exists()
    assert main([*argv, "--force"]) == 0
    assert (folder / "results.json").is_file()
    assert json.loads((folder / "run.json").read_text())["settings"]["lr"] == 1e-3  # what the run went on with


def test_r04_force_needs_resume(tiny_model, tmp_path, capsys):  # noqa: F811
    assert exit_code([*finetune(tiny_model, tmp_path / "out"), "--force"]) == 2
    assert "--force only applies to --resume" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("max_length, message", [
    ("1", "--max-length 1 leaves no room for text: the tokenizer adds 2 special tokens to a sentence, so "
          "tweet_sentiment needs at least 3"),
    ("2", "--max-length 2 leaves no room for text"),
])
def test_r05_max_length_too_short_for_the_task_is_named(tiny_model, tmp_path, capsys, max_length,  # noqa: F811
                                                        message):
    assert exit_code([*finetune(tiny_model, tmp_path / "out"), "--max-length", max_length]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--method", "full", "checkpointing"], "--max-length 1 leaves no room for text"),  # children: checked before
    (["--task", "tweet_lm", "--method", "full"], "--max-length must be at least 2 (a token and the end of sequence)"),
], ids=["several-recipes", "tweet-lm"])
def test_r05_max_length_is_checked_with_the_options(tiny_model, tmp_path, capsys, argv, message):  # noqa: F811
    argv = ["finetune", "--model", tiny_model, "--output-dir", str(tmp_path / "out"), *FAST, *argv, "--max-length", "1"]
    assert exit_code(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_r05_the_tokenizer_truncates_to_max_length(tiny_model):  # noqa: F811
    from datasets import Dataset
    from transformers import AutoTokenizer

    from wtacrs.tasks import get_task, tokenize_sequences

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = Dataset.from_dict({"text": ["a rather long sentence of several words"], "label": [0]})
    encoded = tokenize_sequences(data, get_task("tweet_sentiment"), tokenizer, 3)
    assert len(encoded[0]["input_ids"]) == 3


@pytest.fixture(scope="module")
def interrupted_sampling(tiny_model, tmp_path_factory) -> Path:  # noqa: F811
    """The output folder of a finished wtacrs@0.3 tiny run whose results.json is gone, as if it had
    been killed after its last checkpoint: a run --resume continues, with its lr_scales.json."""
    out = tmp_path_factory.mktemp("sampling")
    assert main([*finetune(tiny_model, out), "--method", "wtacrs@0.3"]) == 0
    (run_folder(out, "wtacrs@0.3") / "results.json").unlink()
    return out


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "lr_scales.json is missing, so the learning rates the run trained at are unknown"),
    (lambda p: p.write_text('{"scales": {'), "lr_scales.json is not valid JSON"),
    (lambda p: p.write_text('{"scales": {"a": -1}, "factor": 1.0}'),
     "lr_scales.json is not a record of measured learning-rate scales"),
], ids=["missing", "corrupt", "negative-scale"])
def test_r11_resume_with_a_damaged_lr_scales_json_stops_unless_forced(tiny_model, interrupted_sampling,  # noqa: F811
                                                                      tmp_path, capsys, damage, message):
    out = copy_of(interrupted_sampling, tmp_path)
    folder = run_folder(out, "wtacrs@0.3")
    damage(folder / "lr_scales.json")
    argv = [*finetune(tiny_model, out), "--method", "wtacrs@0.3", "--resume"]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "pass --force to measure the rates again" in err and "Traceback" not in err
    assert main([*argv, "--force"]) == 0
    assert "--force: measuring them again" in capsys.readouterr().err
    assert json.loads((folder / "lr_scales.json").read_text())["factor"] > 0


def test_r08_a_checkpoint_write_that_torch_reports_as_runtime_error_is_one_line(tiny_model, tmp_path,  # noqa: F811
                                                                                capsys, monkeypatch):
    from transformers import Trainer

    save = Trainer._save_checkpoint

    def short_write(self, *args, **kwargs):
        if self.state.global_step > 2:  # what torch.save says on a full disk or under `ulimit -f`
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_save_checkpoint", short_write)
    out = tmp_path / "out"
    assert exit_code([*finetune(tiny_model, out), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert (f"run full seed 0 stopped: writing under {run_folder(out)} failed (RuntimeError: [enforce fail at "
            "inline_container.cc:672] . unexpected pos 704 vs 598): the disk is full or a file reached the file size "
            f"limit (ulimit -f); the last complete checkpoint {run_folder(out) / 'checkpoint-2'} is kept") in err


def test_r08_write_failures_are_told_from_other_errors(tmp_path):
    from wtacrs.finetuning.guards import write_failure

    assert write_failure(OSError(errno.EFBIG, "File too large", "optimizer.pt"), tmp_path) == (
        "a file reached the file size limit (ulimit -f) (File too large: optimizer.pt)")
    assert write_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == (
        f"the disk is full (No space left on device: {tmp_path})")
    assert write_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), tmp_path) is None
    assert write_failure(OSError(errno.ENOENT, "No such file"), tmp_path) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_r17_a_child_dies_with_its_parent():
    child_code = ("import sys, time; from wtacrs.finetuning.guards import die_with_parent; "
                  "die_with_parent(int(sys.argv[1])); print('ready', flush=True); time.sleep(120)")
    parent_code = ("import os, subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', sys.argv[1], "
                   "str(os.getpid())], stdout=subprocess.PIPE, text=True); assert c.stdout.readline() == 'ready\\n'; "
                   "print(c.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code, child_code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        parent.kill()  # kill -9: no handler runs in the parent
        parent.wait()
        for _ in range(100):
            if not _alive(child):
                break
            time.sleep(0.1)
        assert not _alive(child), "the child kept running after its parent was killed"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(240)
def test_r17_kill_9_of_a_several_method_run_takes_its_child_and_frees_the_folder(tiny_model, tmp_path):  # noqa: F811
    from wtacrs.finetuning.run_folder import RunFolder

    out = tmp_path / "out"
    parent, child = _several_method_run_training(tiny_model, out, stderr=subprocess.DEVNULL)
    try:
        parent.kill()
        parent.wait()
        _wait_gone(child)
        assert not _alive(child), "the child run kept training after its parent was killed"
        assert RunFolder(run_folder(out)).owner() is None, "the dead child's lock is still held"
    finally:
        for pid in (parent.pid, child):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
