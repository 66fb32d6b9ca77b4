"""Is WTA-CRS unbiased in a whole real model? Mean of N sampled weight gradients vs the exact one.

all-MiniLM-L6-v2 with a fresh 2-way head on one SST-2 training batch (32 sentences, data seed
0, dynamic padding), dropout off so that every draw differentiates the same function. For each
sampled layer it prints the relative variance E‖dŴ − dW‖²/‖dW‖² and the ratio
‖mean of N draws − dW‖ / sqrt(E‖dŴ − dW‖² / N): about 1 when the estimator is unbiased (the
error of the mean is then its standard error), growing like sqrt(N) with a bias. Where a layer
is sampled (almost) exactly the variance is float rounding and the ratio says nothing; read the
relative error of the mean there.

    python benchmarks/model_unbiasedness.py --ratio 0.3 --draws 40 --cache [--estimator priority] [--recompute]

With --squad FILE: all-MiniLM-L6-v2 with a fresh QA head on the first 16 training windows of the
study's SQuAD setting (192 tokens, stride 64, padded; `wtacrs.tasks.squad.first_train_windows`), padding
rows sampled like real ones as `wtacrs finetune` does for QA.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import wtacrs
from wtacrs.packaged import packaged_model_dir
from wtacrs.tasks import load_task
from wtacrs.tasks.squad import first_train_windows


def build(path: str, qa: bool, fresh_head: bool):
    """The model with dropout off, in training mode; `fresh_head` re-initialises its head (seeded)."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if qa:
        model = AutoModelForQuestionAnswering.from_pretrained(path, **dropout)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **dropout)
    if fresh_head:
        torch.manual_seed(1)
        (model.qa_outputs if qa else model.classifier).reset_parameters()
    return model.train()


def sst2_batch(glue: str, tokenizer, start: int = 0) -> dict[str, torch.Tensor]:
    """32 SST-2 training sentences (data seed 0) from `start`, padded to the longest."""
    data = load_task("sst2", glue)["train"].shuffle(seed=0).select(range(start, start + 32))
    return dict(tokenizer(list(data["sentence"]), padding=True, return_tensors="pt"),
                labels=torch.tensor(list(data["label"])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--glue", default="../shared/data/glue")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--draws", type=int, default=40)
    p.add_argument("--cache", action="store_true", help="warm the gradient-norm cache with one pass first")
    p.add_argument("--cache-from", metavar="CHECKPOINT",
                   help="warm the cache with a pass of this earlier checkpoint (same batch and ids), then measure "
                        "--model: the norms are as stale as one visit earlier in training")
    p.add_argument("--prior", action="store_true",
                   help="warm the cache with the next batch instead, and restore it before every draw: this "
                        "batch's examples stay unseen and are scored by the position prior alone")
    p.add_argument("--estimator", default="wta-crs", help="row estimator (default wta-crs)")
    p.add_argument("--recompute", action="store_true",
                   help="both recompute companions (the best exact recipe's): every sampled layer draws in backward "
                        "with its true output-gradient norms (WTACRSConfig.backward_draws)")
    p.add_argument("--squad", help="a SQuAD v1.1 JSON file: measure on QA windows instead of SST-2")
    p.add_argument("--model", help="a fine-tuned checkpoint, head kept (default: all-MiniLM-L6-v2, fresh head)")
    args = p.parse_args()
    from transformers import AutoTokenizer

    path = args.model or str(packaged_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    qa = args.squad is not None
    def load(start: int) -> dict[str, torch.Tensor]:
        return first_train_windows(args.squad, tokenizer, 16, start) if qa else sst2_batch(args.glue, tokenizer, start)

    batch = load(0)
    reference = build(path, qa, fresh_head=args.model is None)
    reference(**batch).loss.backward()
    exact = {n: p.grad.clone() for n, p in reference.named_parameters() if p.dim() == 2 and ".encoder." in n}

    config = wtacrs.WTACRSConfig.preset("sampler", ratio=args.ratio, estimator=args.estimator, skip_padding=not qa,
                                 recompute_activation=args.recompute, recompute_attention=args.recompute)
    model = wtacrs.apply(build(path, qa, fresh_head=args.model is None), config)
    params, size = dict(model.named_parameters()), len(batch["input_ids"])
    ids = torch.arange(size)
    state = wtacrs.sampling_state(model)
    use_ids = bool(args.cache or args.prior or args.cache_from)

    def draw(inputs=batch, example_ids=ids) -> dict[str, torch.Tensor]:
        model.zero_grad()
        if use_ids:
            with wtacrs.batch(example_ids):
                model(**inputs).loss.backward()
        else:
            model(**inputs).loss.backward()
        return {n: params[n].grad for n in exact}

    if args.cache:
        draw()  # fills the cache; the draws below use its norms
    if args.cache_from:
        measured = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(build(args.cache_from, qa, fresh_head=False).state_dict())
        draw()  # the earlier checkpoint's norms fill the cache
        model.load_state_dict(measured)
    prior = None
    if args.prior:
        draw(load(size), ids)  # the next batch under these ids: the prior learns its positions
        # with --recompute every layer draws in backward and keeps no cache (nothing to forget)
        prior = None if state.cache is None else {k: v.clone() for k, v in state.cache.state_dict().items()}
        ids = ids + size  # this batch's examples: never seen

    def measured_draw() -> dict[str, torch.Tensor]:
        if prior is not None:
            state.cache.load_state_dict(prior)  # forget this batch's norms recorded by the last draw
        return draw(batch, ids)

    total = {n: torch.zeros_like(g) for n, g in exact.items()}
    squared_error = {n: 0.0 for n in exact}
    for _ in range(args.draws):
        for n, g in measured_draw().items():
            total[n] += g
            squared_error[n] += float(((g - exact[n]) ** 2).sum()) / args.draws
    scores = ("position prior only" if args.prior else f"norms cached by {args.cache_from}" if args.cache_from
              else "cached norms" if args.cache else "activation norms only")
    scores += "; with both recomputes: every layer drawn in backward with its true norms" if args.recompute else ""
    print(f"{path}: {'SQuAD' if qa else 'SST-2'}, {args.estimator}, ratio {args.ratio}, {args.draws} draws, "
          f"{scores}")
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
