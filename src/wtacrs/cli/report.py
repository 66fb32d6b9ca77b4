"""Collect `wtacrs finetune` results into the paper's Table 1 layout, with memory and speed.

Rows are model × method (with ratio), columns the tasks and their average, each cell the mean
± sample standard deviation over seeds (n = number of seeds); then mean activation bytes saved
for backward, the live peak of a training step (what an accelerator holds), the process's peak
memory and training throughput over the row's runs. Scores are percent (GLUE and tweet metrics
× 100; SQuAD F1 is already percent). A second table orders every row by live peak with its
architecture (bidirectional encoder or unidirectional decoder), the comparison at equal memory
budget. A third pairs each row with its reference (full fine-tuning, or LoRA for LoRA recipes)
seed by seed: the mean difference and its standard error. Plots: score vs. ratio, and score vs.
live peak. Rows whose runs asked for a memory companion that found nothing to change on their model (results'
`companion_effects`) are listed after the tables: their memory is not what the label promises.

Runs of one model, method and task that differ in a hyperparameter (a learning-rate sweep) get
that hyperparameter in their row label ("full+lr=0.00015"), so no row averages two settings.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from wtacrs.atomic import write_text_atomic
from wtacrs.bench.output import save_figure
from wtacrs.finetuning.results import failure, load_result, method_label, score_percent as percent

TASK_ORDER = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "stsb", "squad", "squad_v2", "tweet_sentiment")


def _task_rank(task: str) -> tuple[int, str]:
    """Sort key: TASK_ORDER's tasks in its order, then the others by name."""
    return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), task)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="results.json files, or folders searched for them")
    p.add_argument("--output-dir", help="write report.md and the PNG plots here (default: print only)")


def find_results(paths: list[str]) -> list[Path]:
    """results.json files named directly or found under folders (sorted, deduplicated)."""
    found = set()
    for p in map(Path, paths):
        if p.is_dir():
            found.update(f for f in p.rglob("results.json") if f.is_file())
        elif p.is_file():
            found.add(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    return sorted(found)


def _varying(r: dict, varying: tuple[str, ...]) -> str:
    """The hyperparameters that set a run apart from others of its recipe: "+lr=0.00015"."""
    hyperparameters = r.get("hyperparameters", {})
    return "".join(f"+{k}={_format(hyperparameters.get(k))}" for k in varying)


def row_label(r: dict, varying: tuple[str, ...] = ()) -> tuple[str, str]:
    """(model, recipe with variants and varying hyperparameters)."""
    model = r.get("model_name") or Path(r["model"]).name
    return model, method_label(r) + _varying(r, varying)


def varying_hyperparameters(records: list[dict]) -> tuple[str, ...]:
    """Hyperparameters that differ between runs of one model, method and task. Settings that
    differ only between tasks (SST-2's max length against RTE's) do not split rows."""
    values = defaultdict(set)
    for r in records:
        for k, v in r.get("hyperparameters", {}).items():
            values[(row_label(r), r["task"], k)].add(json.dumps(v))
    return tuple(sorted({k for (_, _, k), seen in values.items() if len(seen) > 1}))


def _format(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_distinct_runs(paths: list[Path], records: list[dict], varying: tuple[str, ...]) -> None:
    """Raise ValueError naming both files when two results are the same run (row, task, seed),
    which a report would otherwise count as two seeds."""
    seen: dict = {}
    for path, r in zip(paths, records):
        key = (row_label(r, varying), r["task"], r["seed"])
        if key in seen:
            raise ValueError(f"{seen[key]} and {path} are the same run ({' '.join(key[0])}, {r['task']}, "
                             f"seed {r['seed']}): report one of them")
        seen[key] = path


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:  # one seed has no spread to measure
        return f"{values[0]:.1f} (1)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} ({len(values)})"


def group(records: list[dict], varying: tuple[str, ...] = ()) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """{(model, method label): {task: [records over seeds]}}."""
    rows: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        rows[row_label(r, varying)][r["task"]].append(r)
    return rows


def _row_stats(by_task: dict[str, list[dict]]) -> dict[str, float]:
    runs = [r for rs in by_task.values() for r in rs]
    return {
        "avg": statistics.mean(statistics.mean(map(percent, rs)) for rs in by_task.values()),
        "act": statistics.mean(r["saved_activation_bytes"] for r in runs) / 2**20,
        "peak": _mean_or_nan([r["peak_memory_bytes"] for r in runs if r["peak_memory_bytes"] is not None]) / 2**20,
        "live": _mean_or_nan([r["live_peak_bytes"] for r in runs if r.get("live_peak_bytes")]) / 2**20,
        "speed": _mean_or_nan([r["train_samples_per_second"] for r in runs if r["train_samples_per_second"]]),
        "kind": runs[0].get("model_kind", "?"),
    }


def _mean_or_nan(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def table1(records: list[dict], varying: tuple[str, ...] = ()) -> str:
    """Markdown: model × method rows, task columns (mean ± std (n)), average, memory, speed."""
    rows = group(records, varying)
    tasks = sorted({r["task"] for r in records}, key=_task_rank)
    head = ["model", "method", *tasks, "avg", "act. MiB", "live MiB", "peak MiB", "samples/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (model, method), by_task in sorted(rows.items()):
        stats = _row_stats(by_task)
        cells = [_mean_std([percent(r) for r in by_task[t]]) if t in by_task else "–" for t in tasks]
        partial = "" if len(by_task) == len(tasks) else "*"  # averaged over fewer tasks: not comparable
        averaged = [f"{stats['avg']:.1f}", f"{stats['act']:.1f}", f"{stats['live']:.0f}", f"{stats['peak']:.0f}",
                    f"{stats['speed']:.1f}"]
        lines.append("| " + " | ".join([model, method, *cells, *(v + partial for v in averaged)]) + " |")
    lines.append("\nCells: mean ± std over seeds (number of seeds; one seed: its score), percent. *: averaged over "
                 "the tasks this row has (score, memory and speed alike), so not comparable with rows that have "
                 "every task. act.: bytes saved for backward in one training step; live: the live peak of one "
                 "training step (weights, optimizer state, activations, gradients: what an accelerator must "
                 "hold); peak: see each run's peak_memory_kind (on the CPU the process's RSS, which adds the "
                 "Python runtime).")
    return "\n".join(lines)


def by_memory(records: list[dict], varying: tuple[str, ...] = ()) -> str:
    """Markdown: every row ordered by its training step's live peak (rows without one last, by
    peak memory), with its architecture (encoder vs decoder)."""
    rows = [(label, _row_stats(by_task)) for label, by_task in group(records, varying).items()]
    lines = ["| live MiB | peak MiB | model | kind | method | avg score |", "|---|---|---|---|---|---|"]
    for (model, method), s in sorted(rows, key=lambda item: (math.isnan(item[1]["live"]), item[1]["live"],
                                                              item[1]["peak"])):
        lines.append(f"| {s['live']:.0f} | {s['peak']:.0f} | {model} | {s['kind']} | {method} | {s['avg']:.1f} |")
    return "\n".join(lines)


def paired_differences(records: list[dict], varying: tuple[str, ...] = ()) -> str:
    """Markdown: each row's score minus its reference's (full fine-tuning; LoRA for LoRA recipes)
    on the seeds both ran, per task: mean ± standard error of the paired differences. A run's seed
    fixes the data order, initialisation and dropout of both rows, so pairing removes the part of
    the seed-to-seed spread they share. "" when no row has a reference with a common seed."""
    rows = group(records, varying)
    lines = []
    for (model, method), by_task in sorted(rows.items()):
        reference = rows.get((model, "lora" if method.startswith("lora+") else "full"))
        if reference is None or reference is by_task:
            continue
        for task in sorted(by_task, key=_task_rank):
            theirs = {r["seed"]: percent(r) for r in reference.get(task, [])}
            deltas = [percent(r) - theirs[r["seed"]] for r in by_task[task] if r["seed"] in theirs]
            if deltas:
                error = f"{statistics.stdev(deltas) / len(deltas) ** 0.5:.2f}" if len(deltas) > 1 else "–"
                lines.append(f"| {model} | {method} | {task} | {statistics.mean(deltas):+.2f} ± {error} "
                             f"| {len(deltas)} |")
    if not lines:
        return ""
    return "\n".join(["| model | method | task | Δ vs reference (mean ± SE) | seeds |", "|---|---|---|---|---|", *lines,
                      "\nΔ: the row's score minus its reference's (full fine-tuning; LoRA for LoRA recipes) on each "
                      "seed both ran, mean ± its standard error (std of the differences / √seeds; – with one "
                      "seed: one difference has no spread to measure). A Δ within about 2 SE of 0 is not told apart "
                      "from 0 by these seeds."])


def idle_companions(records: list[dict], varying: tuple[str, ...] = ()) -> str:
    """Markdown lines naming, per row, the companions that found nothing to change in its runs;
    "" when every companion asked for took effect."""
    idle = defaultdict(set)
    for r in records:
        idle[row_label(r, varying)].update(
            option for option, status in r.get("companion_effects", {}).items() if status == "nothing to change")
    return "\n".join(f"- {model} {method}: {', '.join(sorted(options))} found nothing to change"
                     for (model, method), options in sorted(idle.items()) if options)


def plot(records: list[dict], output_dir: Path, varying: tuple[str, ...] = ()) -> list[Path]:
    """score_vs_ratio.png and score_vs_memory.png, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in records}, key=_task_rank)
    paths = []
    for name, draw in (("score_vs_ratio.png", _draw_ratio), ("score_vs_memory.png", _draw_memory)):
        fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.5 * len(tasks), 8), 6), squeeze=False)  # room for the legend
        for ax, task in zip(axes[0], tasks):
            draw(ax, [r for r in records if r["task"] == task], varying)
            ax.set_title(task)
            ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)  # below: curves stay visible
        fig.tight_layout()
        paths.append(output_dir / name)
        save_figure(fig, paths[-1])
    return paths


def _mean_by(records: list[dict], key) -> dict:
    values = defaultdict(list)
    for r in records:
        values[key(r)].append(percent(r))
    return {k: statistics.mean(v) for k, v in values.items()}


def _draw_ratio(ax, records: list[dict], varying: tuple[str, ...]) -> None:
    """One curve per sampled method and setting; a dashed line per unsampled method and setting."""
    from matplotlib import colormaps

    curves = sorted({_curve(r, varying) for r in records})
    for i, curve in enumerate(curves):
        runs = [r for r in records if _curve(r, varying) == curve]
        color = colormaps["tab10" if len(curves) <= 10 else "tab20"](i % 20)
        if runs[0]["ratio"] is not None:  # a sampled method
            ax.plot(*zip(*sorted(_mean_by(runs, lambda r: r["ratio"]).items())), marker="o", label=curve, color=color)
        else:
            ax.axhline(statistics.mean(map(percent, runs)), linestyle="--", linewidth=1, label=curve, color=color)
    ax.set_xlabel("ratio (fraction of rows kept)")
    ax.set_ylabel("score (%)")


def _curve(r: dict, varying: tuple[str, ...]) -> str:
    """A run's label without its ratio: the runs of one recipe at several ratios make one curve."""
    label = method_label(r)
    if r.get("ratio") is not None:
        label = label.replace(f"@{r['ratio']:g}", "", 1)
    return label + _varying(r, varying)


def _draw_memory(ax, records: list[dict], varying: tuple[str, ...]) -> None:
    for (model, method), by_task in group(records, varying).items():
        stats = _row_stats(by_task)
        memory = stats["peak"] if math.isnan(stats["live"]) else stats["live"]
        ax.scatter([memory], [stats["avg"]], label=f"{model} {method}")
    ax.set_xlabel("live peak of a step (MiB)")
    ax.set_ylabel("score (%)")


def _usable(paths: list[Path]) -> tuple[list[Path], list[dict]]:
    """(paths, records) of the runs to report; a failed run is left out with a note naming it."""
    kept = []
    for path in paths:
        record = load_result(path)
        reason = failure(record)
        if reason is None:
            kept.append((path, record))
        else:
            print(f"wtacrs report: left out {path}: {reason}", file=sys.stderr)
    return [p for p, _ in kept], [r for _, r in kept]


def run(args: argparse.Namespace) -> int:
    try:
        if args.output_dir and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
            raise ValueError(f"--output-dir {args.output_dir} is a file, not a folder")
        paths, records = _usable(find_results(args.paths))
        varying = varying_hyperparameters(records)
        check_distinct_runs(paths, records, varying)
    except ValueError as e:
        print(f"wtacrs report: error: {e}", file=sys.stderr)
        return 2
    if not records:
        print(f"wtacrs report: error: no results of a finished run under {', '.join(args.paths)}", file=sys.stderr)
        return 2
    text = f"{table1(records, varying)}\n\n### By live peak\n\n{by_memory(records, varying)}\n"
    paired = paired_differences(records, varying)
    if paired:
        text += f"\n### Paired by seed\n\n{paired}\n"
    idle = idle_companions(records, varying)
    if idle:
        text += f"\n### Companions that found nothing to change\n\n{idle}\n"
    print(text)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "report.md", text)
        for path in [out / "report.md", *plot(records, out, varying)]:
            print(f"wrote {path}")
    return 0
