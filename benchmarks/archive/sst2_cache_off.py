"""WTA-CRS@0.3 in the study's SST-2 setting at lr 2.2e-4 with the gradient-norm cache off
(`WTACRSConfig.grad_norm="none"`: activation-norm scores in every epoch), for ACCURACY.md's
regression section. `wtacrs finetune` has no option for it, so this patches the recipe's config.

Archived on 2026-12-07: it patches `wtacrs.recipes.Recipe.wtacrs_config`, and the question it
answered (a suspected regression of 2026-12-01) was refuted by more seeds. The same runs now need
no patch: `wtacrs finetune ... --method wtacrs@0.3+no-cache` (the recipe component that sets
`WTACRSConfig.grad_norm="none"`). Runs on the code of 2026-12-01 (d8ab8e3), not kept working
against later APIs.

    OMP_NUM_THREADS=1 python benchmarks/archive/sst2_cache_off.py SEED [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import wtacrs.recipes
from wtacrs.cli import main


def cache_off() -> None:
    config_of = wtacrs.recipes.Recipe.wtacrs_config
    wtacrs.recipes.Recipe.wtacrs_config = lambda self, *a, **k: dataclasses.replace(config_of(self, *a, **k),
                                                                                    grad_norm="none")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("seed")
    p.add_argument("--output-dir", default="wtacrs-output/cache-off")
    p.add_argument("--glue", default="../shared/data/glue")
    args = p.parse_args()
    cache_off()
    sys.exit(main(["finetune", "--task", "sst2", "--data-dir", args.glue, "--max-train-samples", "2000",
                   "--max-length", "64", "--epochs", "2", "--method", "wtacrs", "--ratio", "0.3", "--lr", "2.2e-4",
                   "--sampled-lr", "1", "--seed", args.seed, "--output-dir", args.output_dir, "--no-progress",
                   "--overwrite", "--in-process"]))
