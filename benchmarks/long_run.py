"""Numerical health under load: 2,000 steps of WTA-CRS@0.1 with bf16 autocast vs full fine-tuning.

Fine-tunes a small pre-trained model (all-MiniLM-L6-v2 cut to its first --layers blocks; with
--hidden H instead a randomly initialised BERT of width H on MiniLM's vocabulary) on the
offline tweet-sentiment task, on a fixed subset small enough that examples come back every epoch
(so the gradient-norm cache is read as well as written), once with WTA-CRS and once with full
fine-tuning, each in its own process with the same seed, data order and schedule. Checks:

- no NaN/Inf in any loss or gradient (every step);
- the cache's host memory stays within its stated bound: the bytes in use equal
  Σ_examples GradNormCache.bytes_per_example(real tokens) exactly (one entry per example, no
  growth across epochs), and GradNormCache.nbytes (with the doubling buffers' spare capacity)
  stays below twice that; process RSS is sampled too;
- the loss curve matches full fine-tuning within noise: per window of steps, the difference of
  mean losses against its standard error, and the final validation accuracy of both.

    python benchmarks/long_run.py --out benchmarks/results/long_run.json   # ~1 h on 2 busy CPU cores

Writes the JSON record (per-step losses, memory samples, summary) atomically and prints a
Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time

import torch

from wtacrs.atomic import write_json_atomic

DEFAULTS = dict(steps=2000, ratio=0.1, layers=2, batch_size=16, max_length=64, train_examples=4000,
                eval_examples=1000, lr=1e-4, warmup=0.06, seed=0, window=250, threads=1,
                hidden=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, value in DEFAULTS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--out", default="benchmarks/results/long_run.json")
    return p.parse_args(argv)


# -- one run (in a child process) ----------------------------------------------------------------
def load_data(args):
    """(tokenized train subset with example ids, tokenized eval subset, tokenizer)."""
    from transformers import AutoTokenizer

    from wtacrs.packaged import packaged_model_dir
    from wtacrs.tasks import get_task, load_tweets, tokenize_sequences

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir())
    data, task = load_tweets(), get_task("tweet_sentiment")
    train = data["train"].shuffle(seed=0).select(range(args.train_examples))
    evaluation = data["validation"].shuffle(seed=0).select(range(args.eval_examples))
    train = tokenize_sequences(train, task, tokenizer, args.max_length)
    train = train.map(lambda _, i: {"example_id": i}, with_indices=True)
    return train, tokenize_sequences(evaluation, task, tokenizer, args.max_length), tokenizer


def build_model(args, method: str):
    from transformers import AutoModelForSequenceClassification

    import wtacrs
    from wtacrs.packaged import packaged_model_dir

    torch.manual_seed(args.seed)
    if args.hidden:  # a randomly initialised small BERT on MiniLM's vocabulary (fits a busy CPU)
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=2,
                            intermediate_size=4 * args.hidden, num_labels=3)
        model = BertForSequenceClassification(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(packaged_model_dir(), num_labels=3,
                                                                   num_hidden_layers=args.layers)
    # Frozen word embeddings (both methods): their dense 30522×384 gradient and AdamW update would
    # cost more than the rest of the step, and no sampled layer touches them.
    model.get_input_embeddings().weight.requires_grad_(False)
    if method == "wtacrs":
        wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=args.ratio, seed=args.seed))
    return model


def batches(train, tokenizer, args, generator):
    """Endless shuffled batches (a new permutation per epoch), padded to each batch's longest."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    rows = train.to_list()  # plain lists: selecting from the Arrow table per batch costs more than the step
    while True:
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            yield collate([rows[i] for i in order[start : start + args.batch_size]])


def evaluate(model, evaluation, tokenizer, args) -> float:
    from transformers import DataCollatorWithPadding

    collate, correct = DataCollatorWithPadding(tokenizer), 0
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, len(evaluation), 64):
            inputs = collate(evaluation.select(range(start, min(start + 64, len(evaluation)))).to_list())
            labels = inputs.pop("labels")
            correct += int((model(**inputs).logits.argmax(-1) == labels).sum())
    model.train()
    return correct / len(evaluation)


def cache_bound(state, train) -> dict:
    """The cache's bytes against its stated per-example bound (none for a recipe whose layers
    all draw in backward: they keep no cache)."""
    cache = state.cache
    if cache is None:
        return {"examples": 0, "nbytes": 0, "used_bytes": 0, "bound_bytes": 0}
    lengths = [len(ids) for ids in train["input_ids"]]
    used = sum(cache.bytes_per_example(n) for n in lengths)
    return {"examples": cache.num_examples, "nbytes": cache.nbytes, "used_bytes": cache.state_dict()["data"].numel()
            + 12 * cache.num_examples, "bound_bytes": used}


def train_run(args, method: str, queue) -> None:
    import psutil

    import wtacrs

    torch.set_num_threads(args.threads)
    train, evaluation, tokenizer = load_data(args)
    model = build_model(args, method).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    warmup = int(args.warmup * args.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (args.steps - s) / max(args.steps - warmup, 1))))
    stream = batches(train, tokenizer, args, torch.Generator().manual_seed(args.seed))
    process = psutil.Process()
    losses, non_finite, memory, start = [], 0, [], time.perf_counter()
    for step in range(args.steps):
        inputs = next(stream)
        ids = inputs.pop("example_id")
        with wtacrs.batch(ids) if method == "wtacrs" else _nothing():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**inputs).loss
            loss.backward()
        finite = math.isfinite(loss.item()) and all(
            torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        non_finite += not finite
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.window == 0:
            sample = {"step": step + 1, "rss_bytes": process.memory_info().rss, "seconds": time.perf_counter() - start}
            if method == "wtacrs":
                sample["cache"] = cache_bound(wtacrs.sampling_state(model), train)
            memory.append(sample)
            print(f"[{method}] step {step + 1}: loss {sum(losses[-args.window:]) / args.window:.4f} "
                  f"rss {sample['rss_bytes'] / 2**20:.0f} MiB {sample.get('cache', '')}", flush=True)
    queue.put({"method": method, "losses": losses, "non_finite_steps": non_finite, "memory": memory,
               "eval_accuracy": evaluate(model, evaluation, tokenizer, args), "seconds": time.perf_counter() - start})


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- comparison ----------------------------------------------------------------------------------
def compare(runs: dict[str, dict], window: int) -> list[dict]:
    """Per window: mean loss of each run and their difference in standard errors."""
    rows = []
    full, sampled = runs["full"]["losses"], runs["wtacrs"]["losses"]
    for start in range(0, len(full), window):
        a, b = torch.tensor(full[start : start + window]), torch.tensor(sampled[start : start + window])
        stderr = math.sqrt(float(a.var()) / a.numel() + float(b.var()) / b.numel())
        rows.append({"steps": f"{start + 1}-{start + a.numel()}", "full": float(a.mean()), "wtacrs": float(b.mean()),
                     "z": (float(b.mean()) - float(a.mean())) / stderr})
    return rows


def markdown(record: dict) -> str:
    a = record["args"]
    model = (f"random BERT hidden {a['hidden']}, {a['layers']} layers" if a["hidden"]
             else f"MiniLM-L6 first {a['layers']} layers")
    lines = [f"WTA-CRS@{a['ratio']} vs full, {a['steps']} steps, bf16 autocast, {model}, "
             f"batch {a['batch_size']}, {a['train_examples']} train examples", "",
             "| steps | full loss | WTA-CRS loss | diff / s.e. |", "|---|---|---|---|"]
    lines += [f"| {r['steps']} | {r['full']:.4f} | {r['wtacrs']:.4f} | {r['z']:+.2f} |" for r in record["windows"]]
    for method, run in record["runs"].items():
        rss = [m["rss_bytes"] / 2**20 for m in run["memory"]]
        lines.append(f"\n{method}: non-finite steps {run['non_finite_steps']}, "
                     f"eval accuracy {run['eval_accuracy']:.4f}, "
                     f"RSS {rss[0]:.0f} → {rss[-1]:.0f} MiB, {run['seconds']:.0f} s")
    caches = [m["cache"] for m in record["runs"]["wtacrs"]["memory"]]
    lines.append(f"cache: {caches[0]} after {a['window']} steps → {caches[-1]} at the end")
    return "\n".join(lines)


def _result_of(child, queue) -> dict:
    """The child's record; exits if the child died without one (its traceback is on stderr)."""
    import queue as queues

    while True:
        try:
            return queue.get(timeout=5)
        except queues.Empty:
            if not child.is_alive():
                raise SystemExit(f"long_run: the training process died (exit code {child.exitcode})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    runs = {}
    children = {}
    for method in ("wtacrs", "full"):  # one process each (RSS of one run only), side by side
        queue = ctx.Queue()
        children[method] = (ctx.Process(target=train_run, args=(args, method, queue)), queue)
        children[method][0].start()
    for method, (child, queue) in children.items():
        runs[method] = _result_of(child, queue)
        child.join()
    record = {"args": vars(args), "command": " ".join(sys.argv), "runs": runs, "windows": compare(runs, args.window)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_json_atomic(args.out, record)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
