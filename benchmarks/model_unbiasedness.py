"""Is WTA-CRS unbiased in a whole real model? Mean of N sampled weight gradients vs the exact one.

all-MiniLM-L6-v2 with a fresh 2-way head on one SST-2 training batch (32 sentences, data seed
0, dynamic padding), dropout off so that every draw differentiates the same function. For each
sampled layer it prints the relative variance E‖dŴ − dW‖²/‖dW‖² and the ratio
‖mean of N draws − dW‖ / sqrt(E‖dŴ − dW‖² / N): about 1 when the estimator is unbiased (the
error of the mean is then its standard error), growing like sqrt(N) with a bias. Where a layer
is sampled (almost) exactly the variance is float rounding and the ratio says nothing; read the
relative error of the mean there.

    python benchmarks/model_unbiasedness.py --ratio 0.3 --draws 40 --cache [--estimator priority]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import wtacrs
from wtacrs.cli.finetune import packaged_model_dir
from wtacrs.tasks import load_task


def build(path: str):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    model.classifier.reset_parameters()
    return model.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--glue", default="../shared/data/glue")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--draws", type=int, default=40)
    p.add_argument("--cache", action="store_true", help="warm the gradient-norm cache with one pass first")
    p.add_argument("--estimator", default="wta-crs", help="row estimator (default wta-crs)")
    args = p.parse_args()
    from transformers import AutoTokenizer

    path = str(packaged_model_dir())
    data = load_task("sst2", args.glue)["train"].shuffle(seed=0).select(range(32))
    batch = dict(AutoTokenizer.from_pretrained(path)(list(data["sentence"]), padding=True, return_tensors="pt"),
                 labels=torch.tensor(list(data["label"])))
    reference = build(path)
    reference(**batch).loss.backward()
    exact = {n: p.grad.clone() for n, p in reference.named_parameters() if p.dim() == 2 and ".encoder." in n}

    model = wtacrs.apply(build(path), wtacrs.WTACRSConfig(ratio=args.ratio, estimator=args.estimator))
    params, ids = dict(model.named_parameters()), torch.arange(32)

    def draw() -> dict[str, torch.Tensor]:
        model.zero_grad()
        if args.cache:
            with wtacrs.batch(ids):
                model(**batch).loss.backward()
        else:
            model(**batch).loss.backward()
        return {n: params[n].grad for n in exact}

    if args.cache:
        draw()  # fills the cache; the draws below use its norms
    total = {n: torch.zeros_like(g) for n, g in exact.items()}
    squared_error = {n: 0.0 for n in exact}
    for _ in range(args.draws):
        for n, g in draw().items():
            total[n] += g
            squared_error[n] += float(((g - exact[n]) ** 2).sum()) / args.draws
    print(f"{args.estimator}, ratio {args.ratio}, {args.draws} draws, "
          f"{'cached norms' if args.cache else 'activation norms only'}")
    print("| layer | relative variance | relative error of the mean | error of the mean / its standard error |")
    print("|---|---:|---:|---:|")
    for n, g in exact.items():
        error, norm = float((total[n] / args.draws - g).norm()), float(g.norm())
        print(f"| {n.removeprefix('bert.encoder.')} | {squared_error[n] / norm ** 2:.3g} | {error / norm:.2g} "
              f"| {error / (squared_error[n] / args.draws) ** 0.5:.2f} |")
    relative = [squared_error[n] / float(g.norm()) ** 2 for n, g in exact.items()]
    print(f"median relative variance over the {len(relative)} layers: {statistics.median(relative):.3g}")


if __name__ == "__main__":
    main()
