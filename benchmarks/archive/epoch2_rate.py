"""Is the measured learning-rate rule too fast in epoch 2, where the cache makes WTA-CRS almost exact?

WTA-CRS@0.3 in the study's SST-2 setting (2,000 sentences, 2 epochs, base rate 1e-4, the default
measured per-layer rates), with every sampled layer's rate changed from epoch 2 on: times FACTOR,
or back to the base rate ("base": the scale sqrt(1 + v) with v ~ 0, the cached v at the end of
training). `wtacrs finetune` has no option for it, so this adds a Trainer callback that edits the
scheduler's base rates of the scaled parameter groups at the second epoch's start.

    OMP_NUM_THREADS=1 python benchmarks/archive/epoch2_rate.py SEED FACTOR|base OUTPUT_DIR [--glue DIR]

Archived on 2026-12-07: it patches `WTACRSTrainer.__init__` to add its callback, and its question
is answered (ACCURACY.md, "Is the second epoch's rate too high?": lowering the rate costs
accuracy, so the rule stays and `finetune` needs no option for it). Runs on the code of
2026-12-01 (e37d494), not kept working against later APIs.
"""

from __future__ import annotations

import argparse
import sys

from transformers import TrainerCallback

import wtacrs.integrations.trainer as trainer_module
from wtacrs.cli import main


class SecondEpochRates(TrainerCallback):
    """At the second epoch's start, the groups above the base rate (the scaled sampled layers)
    go to `factor` times their rate, or to the base rate."""

    def __init__(self, trainer, factor: str):
        self.trainer, self.factor, self.done = trainer, factor, False

    def on_epoch_begin(self, args, state, control, **kwargs):
        if state.epoch < 0.999 or self.done:
            return
        scheduler, base = self.trainer.lr_scheduler, args.learning_rate
        scaled = [i for i, lr in enumerate(scheduler.base_lrs) if lr > base * 1.0001]
        for i in scaled:
            scheduler.base_lrs[i] = base if self.factor == "base" else scheduler.base_lrs[i] * float(self.factor)
        print(f"epoch 2: {len(scaled)} sampled groups' rates -> {self.factor}", flush=True)
        self.done = True


def with_callback(factor: str) -> None:
    init = trainer_module.WTACRSTrainer.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(SecondEpochRates(self, factor))

    trainer_module.WTACRSTrainer.__init__ = patched


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("seed")
    p.add_argument("factor")
    p.add_argument("output_dir")
    p.add_argument("--glue", default="../shared/data/glue")
    args = p.parse_args()
    with_callback(args.factor)
    sys.exit(main(["finetune", "--task", "sst2", "--data-dir", args.glue, "--max-train-samples", "2000",
                   "--max-length", "64", "--epochs", "2", "--method", "wtacrs", "--ratio", "0.3", "--lr", "1e-4",
                   "--seed", args.seed, "--output-dir", args.output_dir, "--no-progress", "--overwrite",
                   "--in-process"]))
