"""What the paper's "ratio 0.3" keeps of the real tokens on the study's GLUE data.

The official WTA-CRS code pads every batch to max_source_length = 128 (`pad_to_max_length: true`
in all its GLUE configs) and sets k = int(ratio · batch · 128), padding rows included. Once the
gradient-norm cache holds ‖dY‖ = 0 for padding, k is spent on real tokens only, so a batch of
short sentences keeps all of them: the weight gradient is exact. `wtacrs` counts k on the real
tokens (`WTACRSConfig.budget="live"`); `budget="all"` with `finetune --pad-to-max-length`
reproduces the paper's counting.

For random batches of 32 (the study's batch size) this prints, per task, the mean real length,
the share of real-token rows the paper's k covers (pooled over batches) and the share of batches
where k covers every real token (exact gradient). Tokenizer: the packaged all-MiniLM-L6-v2.

    python benchmarks/paper_budget.py --glue ../shared/data/glue
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from wtacrs.packaged import packaged_model_dir
from wtacrs.tasks import fixed_subset, get_task, load_task, tokenize_sequences


def live_lengths(task_name: str, split: str, glue: str, tokenizer, max_length: int, limit: int | None) -> np.ndarray:
    """Token counts (after truncation to max_length) of a split, optionally the study's subset."""
    data = fixed_subset(load_task(task_name, glue)[split], limit)  # finetune's fixed subset
    encoded = tokenize_sequences(data, get_task(task_name), tokenizer, max_length)
    return np.array([len(ids) for ids in encoded["input_ids"]])


def budget_coverage(lengths: np.ndarray, ratio: float, padded_to: int, batch: int,
                    seed: int = 0) -> tuple[float, float]:
    """(share of real rows kept, share of batches kept whole) with k = int(ratio · batch · padded_to)."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    kept = live = whole = batches = 0
    for start in range(0, len(order), batch):
        rows = int(lengths[order[start:start + batch]].sum())
        k = math.floor(ratio * len(order[start:start + batch]) * padded_to)
        kept, live, whole, batches = kept + min(k, rows), live + rows, whole + (k >= rows), batches + 1
    return kept / live, whole / batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--glue", default="../shared/data/glue")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(packaged_model_dir()))
    print("| data | examples | mean real tokens | paper's k / real tokens | real tokens kept | batches exact |")
    print("|---|---:|---:|---:|---:|---:|")
    for task, split, limit in (("sst2", "train", 2000), ("sst2", "train", None), ("rte", "train", None)):
        lengths = live_lengths(task, split, args.glue, tokenizer, 128, limit)
        kept, whole = budget_coverage(lengths, args.ratio, 128, args.batch_size)
        k_over_live = args.ratio * 128 / lengths.mean()
        name = f"{task} {split}" + (f" (study subset of {limit})" if limit else "")
        print(f"| {name} | {len(lengths)} | {lengths.mean():.1f} | {k_over_live:.2f} | {kept:.3f} | {whole:.3f} |")


if __name__ == "__main__":
    main()
