"""PNG figures of benchmark rows (matplotlib, drawn off-screen)."""

from __future__ import annotations

from pathlib import Path

from wtacrs.bench.output import GB, new_figure, save_figure
from wtacrs.bench.variance import MEASURED


def plot_memory(rows: list[dict], path: Path) -> None:
    """Horizontal bars per method: peak memory of a step and bytes saved for backward (GB)."""
    done = [r for r in rows if r.get("peak_bytes")]
    figure, ax = new_figure(7.0, 0.45 * len(done) + 1.5)
    y = range(len(done))
    ax.barh([i + 0.2 for i in y], [r["peak_bytes"] / GB for r in done], height=0.4, label="peak of a training step")
    ax.barh([i - 0.2 for i in y], [r["saved_bytes"] / GB for r in done], height=0.4, label="saved for backward")
    if any(r.get("peak_rss_bytes") for r in done):
        ax.scatter([r.get("peak_rss_bytes", 0) / GB for r in done], [i + 0.2 for i in y], marker="|", s=200,
                   color="black", label="peak RSS (fresh process)", zorder=3)
    ax.set_yticks(list(y), [r["method"] for r in done])
    ax.invert_yaxis()
    ax.set_xlabel("GB")
    ax.legend(loc="lower right", fontsize="small")
    save_figure(figure, path)


def plot_memory_time_plane(rows: list[dict], path: Path, time_label: str = "median step time (s)") -> None:
    """One point per method: peak memory of a step against its step time."""
    done = [r for r in rows if r.get("peak_bytes") and r.get("step_s")]
    figure, ax = new_figure()
    for r in done:
        ax.scatter(r["step_s"], r["peak_bytes"] / GB)
        ax.annotate(r["method"], (r["step_s"], r["peak_bytes"] / GB), fontsize="x-small",
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(time_label)
    ax.set_ylabel("peak memory of a training step (GB)")
    ax.set_title("memory/time plane (lower left is better)")
    ax.grid(alpha=0.3)
    save_figure(figure, path)


def plot_throughput_vs_batch(rows: list[dict], path: Path) -> None:
    """Samples/s against batch size, one line per method, over the probes that fit (Fig. 8)."""
    figure, ax = new_figure()
    for r in rows:
        fitted = sorted((p["batch"], p["samples_per_s"]) for p in r.get("probes", ()) if p.get("samples_per_s")
                        and p["peak_bytes"] is not None and p["peak_bytes"] <= r["budget_bytes"])
        if fitted:
            ax.plot(*zip(*fitted), marker="o", label=f"{r['method']} (max {r['max_batch']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("throughput (samples/s)")
    ax.legend(fontsize="x-small")
    ax.grid(alpha=0.3)
    save_figure(figure, path)


def plot_variance(summary: list[dict], path: Path) -> None:
    """Median relative MSE of dŴ over layers against the sampling ratio, one line per estimator."""
    figure, ax = new_figure()
    for estimator in MEASURED:
        label = "top-k (bias², deterministic)" if estimator == "topk" else estimator
        ax.plot([s["ratio"] for s in summary], [s[estimator] for s in summary], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("sampling ratio k/N")
    ax.set_ylabel("median over layers of E‖dŴ − dW‖² / ‖dW‖²")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(figure, path)
