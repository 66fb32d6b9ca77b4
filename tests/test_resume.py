"""Exact resume: a run stopped mid-epoch (from a checkpoint, or SIGKILLed) and resumed ends exactly
where an uninterrupted run with the same seed ends: weights, optimizer, scheduler, sampling step,
gradient-norm cache and the logged losses.

Also runnable as a script (the SIGKILL test starts it as a subprocess):
    python tests/test_resume.py OUTPUT_DIR [--pause-at STEP]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

import wtacrs
from models import CASES_BY_NAME
from test_integrations import _collate as collate
from test_integrations import _dataset as dataset
from wtacrs.integrations import WTACRSTrainer
from wtacrs.integrations.checkpoints import last_complete_checkpoint

EXAMPLES, BATCH, EPOCHS, SAVE_STEPS = 24, 6, 3, 3  # 4 steps per epoch: checkpoints 3, 6, 9 are mid-epoch
TOTAL_STEPS = EXAMPLES // BATCH * EPOCHS


class PauseAt(TrainerCallback):
    """Signal that step `step` is done (a file), then wait to be killed."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)


def trainer(output_dir: Path, callbacks=()) -> WTACRSTrainer:
    """Tiny BERT (dropout on: its RNG must be restored too) with WTA-CRS@0.3 and a warmup+decay schedule."""
    model = wtacrs.apply(CASES_BY_NAME["bert"].model(0), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, seed=0))
    args = TrainingArguments(
        str(output_dir), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, save_steps=SAVE_STEPS,
        learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="linear", seed=0, report_to=[], use_cpu=True,
        disable_tqdm=True, logging_steps=1,
    )
    return WTACRSTrainer(model=model, args=args, train_dataset=dataset(EXAMPLES), data_collator=collate,
                         callbacks=list(callbacks))


def final_state(t: WTACRSTrainer) -> dict:
    state = wtacrs.sampling_state(t.model)
    return {
        "weights": {n: p.detach().clone() for n, p in t.model.named_parameters()},
        "optimizer": t.optimizer.state_dict()["state"],
        "lr": t.lr_scheduler.get_last_lr(),
        "step": state.step,
        "cache": state.cache.state_dict(),
        "losses": [h["loss"] for h in t.state.log_history if "loss" in h],
        "global_step": t.state.global_step,
    }


def assert_same_run(resumed: dict, full: dict, from_step: int) -> None:
    assert resumed["global_step"] == full["global_step"] == TOTAL_STEPS
    assert resumed["step"] == full["step"]
    for name, value in full["weights"].items():
        assert torch.equal(resumed["weights"][name], value), name
    for index, moments in full["optimizer"].items():
        for key, value in moments.items():
            assert torch.equal(resumed["optimizer"][index][key], value), (index, key)
    assert resumed["lr"] == full["lr"]
    for key, value in full["cache"].items():
        torch.testing.assert_close(resumed["cache"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert resumed["losses"][-(TOTAL_STEPS - from_step):] == full["losses"][from_step:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, Path]:
    """The final state of an uninterrupted run, and its folder (checkpoints 3, 6, 9, 12)."""
    output_dir = tmp_path_factory.mktemp("full")
    t = trainer(output_dir)
    t.train()
    return final_state(t), output_dir


def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path, uninterrupted):
    full, full_dir = uninterrupted
    shutil.copytree(full_dir / "checkpoint-6", tmp_path / "checkpoint-6")  # as if stopped after step 6, mid-epoch 2
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    resumed = trainer(tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(final_state(resumed), full, from_step=6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, uninterrupted):
    marker = tmp_path / "paused"
    # The same thread count as this process (conftest sets 1): other reduction orders change the bits.
    child = subprocess.Popen([sys.executable, __file__, str(tmp_path / "run"), "--pause-at", "7",
                              "--marker", str(marker), "--threads", str(torch.get_num_threads())],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, f"training child exited early: {child.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "training child never reached step 7"
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    run = tmp_path / "run"
    # A kill during the next save would leave a half-written folder: it must be skipped, not loaded.
    shutil.copytree(run / "checkpoint-6", run / "checkpoint-9")
    (run / "checkpoint-9" / "trainer_state.json").unlink()
    assert last_complete_checkpoint(run) == str(run / "checkpoint-6")
    resumed = trainer(run)
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(final_state(resumed), uninterrupted[0], from_step=6)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("output_dir", type=Path)
    p.add_argument("--pause-at", type=int)
    p.add_argument("--marker", type=Path)
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    callbacks = [PauseAt(args.pause_at, args.marker)] if args.pause_at else []
    trainer(args.output_dir, callbacks).train()


if __name__ == "__main__":
    main()
