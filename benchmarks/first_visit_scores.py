"""First-visit sampling scores for WTA-CRS: which cheap ‖dY‖ estimate gets SQuAD near the cache?

(issue #19) The gradient-norm cache makes WTA-CRS almost exact once an example has been seen;
on its first visit the library scores rows by the position prior or by ‖X_i‖ alone. This script
measures, in closed form (`wtacrs.bench.variance.exact_variances`, no sampling noise), the
per-layer relative variance E‖dŴ − dW‖² / ‖dW‖² of WTA-CRS at one ratio on a measured batch
under candidate scorings whose learnt statistics come only from OTHER batches.

    # 1. a fine-tuned model state (plain full fine-tuning, on windows no measurement uses)
    python benchmarks/first_visit_scores.py finetune --task squad --steps 100 --save /tmp/fv19/squad100.pt
    python benchmarks/first_visit_scores.py finetune --task sst2 --steps 100 --save /tmp/fv19/sst2_100.pt
    # 2. the measurements (fresh head, then the fine-tuned state)
    python benchmarks/first_visit_scores.py measure --task squad [--state /tmp/fv19/squad100.pt]
    python benchmarks/first_visit_scores.py measure --task sst2 [--state /tmp/fv19/sst2_100.pt]
    # 3. the library's own first-visit scores (after the integration): its sampled steps on the
    #    prior batches fill its cache and prior, and its NormReader's multipliers score the measured batch
    python benchmarks/first_visit_scores.py library --task squad [--state /tmp/fv19/squad100.pt]

Model: all-MiniLM-L6-v2 (`wtacrs.packaged`), dropout off, fp32, CPU; a fresh task head seeded as
`benchmarks/model_unbiasedness.py` does. See benchmarks/FIRST_VISIT.md for the candidates and
the results.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import statistics
import time

import torch

SQUAD = "/work/shared/data/squad/dev-v1.1.json"
SST2_TRAIN = "/work/shared/data/glue/SST-2/train.tsv"
FINETUNE_START = {"squad": 4000, "sst2": 20000}  # training data no measurement or prior touches


# -- data ----------------------------------------------------------------------------------------
def squad_records() -> list[dict]:
    from wtacrs.tasks.squad import read_squad_json, split_articles

    return split_articles(read_squad_json(SQUAD))[0]  # the study's train side only


def squad_windows(records, tokenizer, count: int, start: int) -> dict:
    """As `wtacrs.tasks.squad.first_train_windows`: the first `count` windows (192 tokens, stride
    64, padded) of the questions from `start` on, collated."""
    from transformers import default_data_collator

    from wtacrs.tasks.squad import prepare_train_features

    rows = {key: [r[key] for r in records[start:start + count]] for key in ("question", "context", "answers")}
    features = prepare_train_features(rows, tokenizer, max_length=192, stride=64)
    return default_data_collator([{k: v[i] for k, v in features.items()} for i in range(count)])


def sst2_rows() -> list[list[str]]:
    with open(SST2_TRAIN) as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]


def sst2_batch(rows, tokenizer, count: int, start: int) -> dict:
    """`count` SST-2 training sentences from row `start`, padded to the longest (dynamic padding)."""
    chunk = rows[start:start + count]
    enc = tokenizer([r[0] for r in chunk], padding=True, return_tensors="pt")
    return dict(enc, labels=torch.tensor([int(r[1]) for r in chunk]))


# -- model ---------------------------------------------------------------------------------------
def build(task: str, state: str | None = None):
    """all-MiniLM-L6-v2, dropout off, train mode, fresh head (seed 1) or a saved state."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    from wtacrs.packaged import packaged_model_dir

    path = str(packaged_model_dir("all-minilm-l6-v2"))
    dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if task == "squad":
        model = AutoModelForQuestionAnswering.from_pretrained(path, **dropout)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **dropout)
    torch.manual_seed(1)
    (model.qa_outputs if task == "squad" else model.classifier).reset_parameters()
    if state:
        model.load_state_dict(torch.load(state))
    return model.train()


def tokenizer_for():
    from transformers import AutoTokenizer

    from wtacrs.packaged import packaged_model_dir

    return AutoTokenizer.from_pretrained(str(packaged_model_dir("all-minilm-l6-v2")))


def finetune(task: str, steps: int, save: str, lr: float = 1e-4, batch: int = 16) -> None:
    """Plain full fine-tuning (AdamW, constant lr, no dropout) on data from FINETUNE_START on."""
    tokenizer = tokenizer_for()
    model = build(task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    if task == "squad":
        records = squad_records()
        order = list(range(FINETUNE_START[task], len(records)))
        random.Random(0).shuffle(order)
        records = [records[i] for i in order]
        load = lambda s: squad_windows(records, tokenizer, batch, s * batch)  # noqa: E731
    else:
        rows = sst2_rows()[FINETUNE_START[task]:]
        random.Random(0).shuffle(rows)
        load = lambda s: sst2_batch(rows, tokenizer, batch, s * batch)  # noqa: E731
    started = time.time()
    for step in range(steps):
        loss = model(**load(step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    torch.save(model.state_dict(), save)


# -- rows: what forward knows about each token -------------------------------------------------
PAD, CLS, QUESTION, SEP, CONTEXT, LAST_SEP, WORD = range(7)  # token types (SST-2: CLS, WORD, SEP)
WINDOW = 8  # label-anchored keys: signed offsets -W … W from the nearest label position


def token_types(inputs: dict) -> torch.Tensor:
    """(B, T) token type: padding, [CLS], question, first [SEP], context, last [SEP] (SQuAD) or
    [CLS], word, [SEP] (SST-2, no token_type 1)."""
    mask = inputs["attention_mask"].bool()
    segment = inputs["token_type_ids"]
    t = torch.arange(mask.shape[1]).expand_as(mask)
    last = mask.sum(1, keepdim=True) - 1
    types = torch.where(segment == 1, CONTEXT, QUESTION if bool((segment == 1).any()) else WORD)
    first_sep = (segment == 1).int().argmax(1, keepdim=True) - 1  # the [SEP] before segment B
    types = torch.where((t == first_sep) & (segment == 0) & (first_sep > 0), SEP, types)
    types = torch.where(t == last, LAST_SEP if bool((segment == 1).any()) else SEP, types)
    types = torch.where(t == 0, CLS, types)
    return torch.where(mask, types, PAD)


def anchor_keys(inputs: dict, window: int = WINDOW) -> torch.Tensor:
    """(B, T) key of each token's offset to the nearest label position (start or end): one key per
    (answer in window?, start/end anchor, offset in -W … W); -1 beyond W (no key)."""
    start, end = inputs["start_positions"][:, None], inputs["end_positions"][:, None]
    t = torch.arange(inputs["input_ids"].shape[1]).expand(start.shape[0], -1)
    to_start, to_end = t - start, t - end
    use_end = to_end.abs() < to_start.abs()
    offset = torch.where(use_end, to_end, to_start)
    answered = (start > 0).long()  # a window without the answer is labelled [CLS] (0, 0)
    width = 2 * window + 1
    key = (answered * 2 + use_end.long()) * width + offset + window
    return torch.where(offset.abs() <= window, key, -1)


# -- capture ---------------------------------------------------------------------------------------
def capture(model, inputs: dict, keep_io: bool) -> dict:
    """One forward/backward: per layer ‖dY_i‖ and ‖X_i‖ as (L, B, T), layer names, and (if
    `keep_io`) the (X, dY) rows themselves for the closed-form variance."""
    from wtacrs.bench.variance import capture_linear_io

    io = capture_linear_io(model, inputs)
    shape = inputs["attention_mask"].shape
    out = {"names": list(io),
           "dy": torch.stack([dy.norm(dim=1).reshape(shape) for _, dy in io.values()]),
           "x": torch.stack([x.norm(dim=1).reshape(shape) for x, _ in io.values()]),
           "mask": inputs["attention_mask"].bool(), "types": token_types(inputs)}
    if "start_positions" in inputs:
        out["anchor"] = anchor_keys(inputs)
    if keep_io:
        out["io"] = io
    return out


def draw_groups(names: list[str]) -> list[list[int]]:
    """Layers sharing one draw: query, key and value read one tensor (the library draws once)."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(re.sub(r"attention\.self\.(query|key|value)$", "attention.self.qkv", n), []).append(i)
    return list(groups.values())


# -- learnt statistics (other batches only) ---------------------------------------------------------
def key_table(batches: list[dict], key: str, values: str = "dy", size: int | None = None) -> torch.Tensor:
    """(L, K) mean of `values` (‖dY‖, or ‖X‖·‖dY‖ with "product") per layer and key over `batches`
    (NaN where a key never occurs); rows with key -1 are left out."""
    size = size or 1 + max(int(b[key].max()) for b in batches)
    layers = batches[0]["dy"].shape[0]
    total, count = torch.zeros(layers, size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
    for b in batches:
        keys = b[key].reshape(-1)
        use = keys >= 0
        v = b["dy"] * (b["x"] if values == "product" else 1.0)
        total.index_add_(1, keys[use], v.reshape(layers, -1)[:, use].double())
        count.index_add_(0, keys[use], torch.ones(int(use.sum()), dtype=torch.float64))
    # a mean of exact zeros (rows no loss reads) stays a tiny positive estimate, as the cache's
    # 1-byte codes store it: `fill_missing_norms` would take 0 for "missing" and fill in the mean
    return (total / count).clamp_min(2.0**-40).where(count > 0, torch.nan).float()


def lookup(table: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(L, B, T) table entries at keys (B, T); NaN at key -1 or beyond the table."""
    safe = keys.clamp(0, table.shape[1] - 1)
    found = table[:, safe]
    return found.where((keys >= 0) & (keys < table.shape[1]), torch.nan)


def library_prior(batches: list[dict], measured: dict, task: str) -> torch.Tensor:
    """(L, B, T) what today's `GradNormCache` position prior answers for unseen examples after
    recording `batches` (one commit per batch, EMA), through its own record/lookup."""
    from wtacrs.cache import GradNormCache

    layers = measured["dy"].shape[0]
    cache = GradNormCache(layers)
    for n, b in enumerate(batches):
        ids = torch.arange(len(b["mask"])) + 1000 * (n + 1)
        for slot in range(layers):
            cache.record(slot, ids, b["mask"], b["dy"][slot])
        cache.commit()
    unseen = torch.arange(len(measured["mask"]))
    return cache.lookup_slots(list(range(layers)), unseen, measured["mask"])


def candidates(priors: list[dict], m: dict, task: str) -> dict[str, torch.Tensor]:
    """{name: (L, B, T) ‖dY‖ estimates for the measured batch m, NaN = unknown} (the library fills
    unknowns with the batch mean, `estimators.fill_missing_norms`), or ("product", table) for
    scores that replace ‖X‖ altogether."""
    from wtacrs.cache import decode_norms, encode_norms

    for b in priors + [m]:  # absolute positions of the rows that are sampled
        t = torch.arange(b["mask"].shape[1]).expand_as(b["mask"])
        b["position"] = t if task == "squad" else t.where(b["mask"], -1)
    nan = torch.full_like(m["dy"], torch.nan)
    position = lookup(key_table(priors, "position"), m["position"])
    types = lookup(key_table(priors, "types", size=7), m["types"])
    library = library_prior(priors, m, task)
    cached = decode_norms(encode_norms(m["dy"])).where(m["mask"], torch.nan)  # cache: real tokens only
    out = {"(a) activation norms only": nan,
           "(b) position prior (library)": library,
           "(b') position mean, padding too": position,
           "(d) token type": types}
    if "anchor" in m:
        anchor = lookup(key_table(priors, "anchor", size=4 * (2 * WINDOW + 1)), m["anchor"])
        out["(c) label anchors, else (b)"] = anchor.where(anchor.isfinite(), library)
        out["(c+d) label anchors, else token type"] = anchor.where(anchor.isfinite(), types)
        product = lookup(key_table(priors, "anchor", "product", size=4 * (2 * WINDOW + 1)), m["anchor"])
        product_types = lookup(key_table(priors, "types", "product", size=7), m["types"])
        out["(e) (c+d) as ‖X‖·‖dY‖ means, instead of ‖X‖"] = (
            product.where(product.isfinite(), product_types) / m["x"].clamp_min(1e-30))
        anchored = out["(c+d) label anchors, else token type"]
        for eps in (0.2, 0.5):
            out[f"(e) (c+d) mixed with (b), {eps:.0%} (b)"] = mixed(anchored, library, eps)
    out["(f) oracle: own ‖dY‖, every row"] = m["dy"].clamp_min(2.0**-40)
    out["(f') cache as stored: own ‖dY‖ coded, padding filled"] = cached
    return out


def mixed(first: torch.Tensor, second: torch.Tensor, eps: float) -> torch.Tensor:
    """(1 − eps) · first + eps · second, each first scaled to mean 1 per layer over the batch: a
    defensive mixture that bounds the damage where `first` is confidently wrong."""
    def unit(g):
        return g / g.nan_to_num(0.0).flatten(1).sum(1).div(g.isfinite().flatten(1).sum(1)).view(-1, 1, 1)
    a, b = unit(first), unit(second)
    return ((1 - eps) * a.nan_to_num(1.0) + eps * b.nan_to_num(1.0))


# -- variance --------------------------------------------------------------------------------------
def multipliers(estimate: torch.Tensor, groups: list[list[int]], rows: torch.Tensor) -> torch.Tensor:
    """(L, N) per-layer score multipliers as `layers.NormReader` builds them: each draw group's
    (Σ_members ĝ²)^½ where any member is known, then `fill_missing_norms` over the sampled rows."""
    from wtacrs.estimators import fill_missing_norms

    flat = estimate.reshape(estimate.shape[0], -1)[:, rows]
    out = torch.empty_like(flat)
    for group in groups:
        g = flat[group]
        known = g.isfinite().any(0)
        combined = g.nan_to_num(0.0).square().sum(0).sqrt().where(known, torch.nan)
        out[group] = fill_missing_norms(combined)
    return out


def relative_variance(x: torch.Tensor, dy: torch.Tensor, exact: torch.Tensor, ratio: float,
                      scores: torch.Tensor) -> float:
    """Closed-form E‖dŴ − dW‖² / ‖dW‖² of WTA-CRS drawing by `scores` (N,) > 0, exact dW given.

    As `wtacrs.bench.variance.exact_variances`, except that the row products ‖g_i‖ = ‖X_i‖‖dY_i‖
    are taken as they are: that function builds them with `estimators.column_row_scores`, whose
    `fill_missing_norms` replaces an exactly-zero ‖dY_i‖ by the batch mean, so rows that carry
    no gradient (SST-2's last block beyond [CLS]; masked padding) count as if they did."""
    from wtacrs.estimators import num_winners, sample_budget

    products = (x.double().norm(dim=1) * dy.double().norm(dim=1))
    scores = scores.double()
    k = sample_budget(ratio, x.shape[0])
    order = torch.sort(scores, descending=True, stable=True).indices
    c = num_winners((scores[order] / scores.sum()).float(), k)
    winners, rest = order[:c], order[c:]
    exact2 = float(exact.pow(2).sum())
    rest2 = float((exact - dy[winners].double().mT @ x[winners].double()).pow(2).sum())
    q = scores[rest] / scores[rest].sum()
    second = float((products[rest] ** 2 / q).sum())
    return (second - rest2) / max(k - c, 1) / exact2


def layer_variances(m: dict, estimate: torch.Tensor, ratio: float, rows: torch.Tensor) -> list[float]:
    """Closed-form WTA-CRS relative variance per layer with scores ‖X_i‖ · multiplier_i."""
    mult = multipliers(estimate, draw_groups(m["names"]), rows)
    result = []
    for layer, (x, dy) in enumerate(m["io"].values()):
        x, dy = x[rows], dy[rows]
        scores = x.norm(dim=1) * mult[layer]
        result.append(relative_variance(x, dy, m["exact"][layer], ratio, scores))
    return result


def measure(args) -> None:
    """Per candidate: median / mean / max relative variance over layers on each measured batch."""
    tokenizer, model = tokenizer_for(), build(args.task, args.state)
    if args.task == "squad":
        records = squad_records()
        load = lambda s: squad_windows(records, tokenizer, 16, s)  # noqa: E731
        measured_starts, prior_starts = (0, 2000), [200 + 16 * j for j in range(args.priors)]
    else:
        sentences = sst2_rows()
        load = lambda s: sst2_batch(sentences, tokenizer, 32, s)  # noqa: E731
        measured_starts, prior_starts = (0, 500), [1000 + 32 * j for j in range(args.priors)]
    priors = [capture(model, load(s), keep_io=False) for s in prior_starts]
    state = args.state or "fresh head"
    print(f"## {args.task}, {state}, WTA-CRS@{args.ratio}\n")
    print(f"Command: `python benchmarks/first_visit_scores.py measure --task {args.task}"
          + (f" --state {args.state}" if args.state else "") + f" --ratio {args.ratio} --priors {args.priors}`; "
          f"measured batches start at {measured_starts}, statistics from {len(prior_starts)} other batches "
          f"starting at {prior_starts[0]}…{prior_starts[-1]}; torch {torch.__version__}, CPU.\n")
    tables = {}
    for start in measured_starts:
        m = capture(model, load(start), keep_io=True)
        # QA samples padding rows like real ones (skip_padding=False); classification skips them.
        sampled = torch.ones(m["mask"].numel(), dtype=torch.bool) if args.task == "squad" else m["mask"].reshape(-1)
        m["exact"] = [dy.double().mT @ x.double() for x, dy in m["io"].values()]
        tables[start] = {name: layer_variances(m, est, args.ratio, sampled)
                         for name, est in candidates(priors, m, args.task).items()}
        names = m["names"]
        del m
    print("| scores (first visit unless oracle) | " + " | ".join(
        f"batch@{s}: median / mean / max" for s in measured_starts) + " |")
    print("|---|" + "---:|" * len(measured_starts))
    for name in tables[measured_starts[0]]:
        cells = [tables[s][name] for s in measured_starts]
        print(f"| {name} | " + " | ".join(
            f"{statistics.median(v):.3f} / {statistics.mean(v):.3f} / {max(v):.2f}" for v in cells) + " |")
    print(f"\nPer layer, batch@{measured_starts[0]}:\n")
    cols = list(tables[measured_starts[0]])
    print("| layer | " + " | ".join(c.split(")")[0] + ")" for c in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for i, n in enumerate(names):
        short = n.removeprefix("bert.encoder.").removeprefix("layer.")
        print(f"| {short} | " + " | ".join(f"{tables[measured_starts[0]][c][i]:.3f}" for c in cols) + " |")
    print()


# -- the library's own scores ----------------------------------------------------------------------
def library_multipliers(model, priors: list[dict], measured: dict, anchored: bool) -> tuple[list[str], torch.Tensor]:
    """The sampled layers' names and (L, N) the score multipliers the library's draws would use on
    the measured batch's first visit (each layer's draw group leader's row: q/k/v share one).

    `model` (not sampled yet) gets `wtacrs.apply` as `wtacrs finetune` samples QA
    (skip_padding=False) or classification; one sampled forward/backward per prior batch, inside
    `wtacrs.batch` with fresh ids (and start/end anchors, token_type_ids, if `anchored`), fills its
    cache and prior; no optimizer step, so the weights, and the norms, stay the measured model's.
    The measured batch's multipliers are those `wtacrs.batch` builds at enter."""
    import wtacrs

    qa = "start_positions" in measured
    wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, skip_padding=not qa))
    state = wtacrs.sampling_state(model)

    def block(inputs: dict, ids: torch.Tensor):
        first_visit = {}
        if anchored and qa:
            first_visit = dict(anchors=torch.stack([inputs["start_positions"], inputs["end_positions"]], 1),
                               token_type_ids=inputs["token_type_ids"])
        return wtacrs.batch(ids, inputs["attention_mask"], **first_visit)

    for n, inputs in enumerate(priors):
        with block(inputs, torch.arange(len(inputs["input_ids"])) + 1000 * (n + 1)):
            model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
    with block(measured, torch.arange(len(measured["input_ids"]))):
        frame = state._frames[-1]  # planned at the block's enter, as a step reads it
        table = torch.stack(frame.reader.multipliers(frame.rows.of("main"), True, state.cache, state.draws.members,
                                                     state.num_layers, torch.device("cpu")))
    leaders = state.draws.leaders(state.num_layers)
    return state.layer_names, table[leaders]


def library(args) -> None:
    """Median / mean / max relative variance over layers of the library's own first-visit scores
    (anchored, and without anchors as before issue #19) on the SQuAD batches `measure` uses."""
    tokenizer, model = tokenizer_for(), build(args.task, args.state)
    records = squad_records()
    load = lambda s: squad_windows(records, tokenizer, 16, s)  # noqa: E731
    measured_starts, prior_starts = (0, 2000), [200 + 16 * j for j in range(args.priors)]
    priors = [load(s) for s in prior_starts]
    print(f"## library first-visit scores, squad, {args.state or 'fresh head'}, WTA-CRS@{args.ratio}\n")
    print(f"Command: `python benchmarks/first_visit_scores.py library --task squad"
          + (f" --state {args.state}" if args.state else "") + f" --ratio {args.ratio} --priors {args.priors}`; "
          f"torch {torch.__version__}, CPU.\n")
    print("| library scores | " + " | ".join(f"batch@{s}: median / mean / max" for s in measured_starts) + " |")
    print("|---|" + "---:|" * len(measured_starts))
    for anchored in (False, True):
        cells = []
        for start in measured_starts:
            inputs = load(start)
            m = capture(model, inputs, keep_io=True)
            names, mult = library_multipliers(build(args.task, args.state), priors, inputs, anchored)
            by_name = dict(zip(names, mult))
            variances = []
            for name, (x, dy) in m["io"].items():
                exact = dy.double().mT @ x.double()
                scores = x.norm(dim=1) * by_name[name]
                variances.append(relative_variance(x, dy, exact, args.ratio, scores))
            cells.append(variances)
        label = "anchors (start/end) + token types" if anchored else "no anchors (position prior, as before)"
        print(f"| {label} | " + " | ".join(
            f"{statistics.median(v):.3f} / {statistics.mean(v):.3f} / {max(v):.2f}" for v in cells) + " |", flush=True)
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("finetune", "measure", "library"))
    p.add_argument("--task", choices=("squad", "sst2"), default="squad")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--save")
    p.add_argument("--state")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--priors", type=int, default=12, help="batches the statistics come from")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.mode == "finetune":
        finetune(args.task, args.steps, args.save)
    elif args.mode == "library":
        library(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
