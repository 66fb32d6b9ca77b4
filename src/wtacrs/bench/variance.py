"""Variance of the weight-gradient estimate on real activations and output gradients.

For every linear layer, one forward/backward pass of a model on a batch captures the layer input
X (N, in) and output gradient dY (N, out); the exact weight gradient is dW = dYᵀX. Each estimator
then draws row samples with `wtacrs.functional.draw_row_sample` (the library's own sampling,
scored with the true ‖dY_i‖ as the gradient-norm cache would supply after one epoch), and
dŴ = Σ_m w_m dY_{i_m}ᵀ X_{i_m}. Reported per layer, relative to ‖dW‖²:
variance = Σ_r ‖dŴ_r − mean‖² / (R − 1), bias² = ‖mean − dW‖² (top-k is deterministic: bias only).
"""

from __future__ import annotations

import re
import statistics
import sys

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wtacrs.config import DEFAULT_EXCLUDES
from wtacrs.estimators import UNBIASED_ESTIMATORS, column_row_variance, sample_budget, winner_mask
from wtacrs.functional import draw_row_sample

UNBIASED = tuple(e for e in UNBIASED_ESTIMATORS if e != "exact")
MEASURED = (*UNBIASED, "topk")  # the columns of a summary row
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)


def capture_linear_io(model: nn.Module, inputs: dict[str, Tensor],
                      layers: str | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer name: (X (N, in), dY (N, out))} for every trainable nn.Linear outside the task head
    and pooler (`wtacrs.config.DEFAULT_EXCLUDES`, which WTA-CRS does not sample), from one backward.
    `layers`: a regex; only names it finds (re.search) are captured."""
    captured: dict[str, list[Tensor]] = {}

    def keep(name: str):
        def hook(module, args, output):
            captured[name] = [args[0].detach().reshape(-1, args[0].shape[-1])]
            output.register_hook(lambda grad: captured[name].append(grad.detach().reshape(-1, grad.shape[-1])))
        return hook

    selected = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and m.weight.requires_grad and not set(n.split(".")) & set(DEFAULT_EXCLUDES)
              and (layers is None or re.search(layers, n))]
    if not selected:
        raise ValueError(f"no trainable linear layer matches {layers!r}")
    handles = [m.register_forward_hook(keep(n)) for n, m in selected]
    try:
        model(**inputs).loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {n: (x, dy) for n, (x, dy) in captured.items()}


def _estimate(x: Tensor, dy: Tensor, ratio: float, estimator: str, generator: torch.Generator) -> Tensor:
    sample = draw_row_sample(x, ratio=ratio, estimator=estimator, grad_norm=dy.norm(dim=1), generator=generator)
    return dy.index_select(0, sample.indices).mT @ sample.rows  # the rows come weighted


def layer_variance(x: Tensor, dy: Tensor, ratio: float, draws: int, generator: torch.Generator) -> dict[str, dict]:
    """{estimator: {"variance", "bias2"}} relative to ‖dW‖², for one layer at one ratio."""
    exact = dy.mT @ x
    scale = float(exact.pow(2).sum()) or 1.0
    result = {}
    for estimator in UNBIASED:
        estimates = torch.stack([_estimate(x, dy, ratio, estimator, generator) for _ in range(draws)])
        mean = estimates.mean(0)
        variance = float((estimates - mean).pow(2).sum()) / (draws - 1)
        result[estimator] = {"variance": variance / scale, "bias2": float((mean - exact).pow(2).sum()) / scale}
    topk = _estimate(x, dy, ratio, "topk", generator)
    result["topk"] = {"variance": 0.0, "bias2": float((topk - exact).pow(2).sum()) / scale}
    return result


def exact_variances(x: Tensor, dy: Tensor, ratio: float, scores: Tensor | None = None) -> dict[str, float]:
    """Closed-form E‖dŴ − dW‖² / ‖dW‖² of CRS and WTA-CRS for these X (N, d_in), dY (N, d_out)
    (no sampling noise), drawing by `scores` (N,) (default: the optimal ‖X_i‖‖dY_i‖; pass
    e.g. scores from a stale cache or a prior to see what they cost).

    With g_i = dY_iᵀX_i, ‖g_i‖ = ‖X_i‖‖dY_i‖ and draw probabilities q_i = s_i / Σ s, one draw
    Z = g_j / q_j has E‖Z‖² = Σ ‖g_i‖² / q_i, so CRS with k draws has variance
    (E‖Z‖² − ‖dW‖²) / k. WTA-CRS keeps the set C (the largest scores) exactly and spends
    m = k − |C| draws on the rest, drawn by their renormalised scores: (E‖Z_rest‖² − ‖dW_rest‖²) / m.
    With optimal scores E‖Z‖² = (Σ‖g_i‖)², the paper's Eq. 4 bound. |C| is the library's choice
    (`estimators.num_winners`); k its `sample_budget`.
    """
    products = torch.linalg.vector_norm(x.float(), dim=1) * dy.float().norm(dim=1)  # a zero ‖dY_i‖ stays 0
    scores = products if scores is None else scores
    k = sample_budget(ratio, x.shape[0])
    exact2 = (dy.mT @ x).double().pow(2).sum()
    result = {}
    for estimator in ("crs", "wta-crs"):
        winners = winner_mask(scores, k, estimator)
        rest2 = (dy[~winners].mT @ x[~winners]).double().pow(2).sum()
        variance = column_row_variance(products, scores, winners, max(k - int(winners.sum()), 1), rest2)
        result[estimator] = float(variance / exact2)
    return {**result, "winners": int(winners.sum())}


def first_visit_variances(x: Tensor, dy: Tensor, ratio: float) -> dict[str, float]:
    """`exact_variances` when the scores know no ‖dY_i‖: an example's first visit with an empty
    cache and no position prior, scored by ‖X_i‖ alone (the paper's fallback). Against the
    cached (true ‖dY_i‖) variance it shows what the gradient-norm cache is worth on this layer,
    and what every example's first epoch costs."""
    return exact_variances(x, dy, ratio, scores=torch.linalg.vector_norm(x.float(), dim=1).clamp_min(1e-30))


def run_variance(captured: dict[str, tuple[Tensor, Tensor]], ratios, draws: int, seed: int) -> list[dict]:
    """One row per (layer, ratio, estimator) with relative variance, bias² and their sum (MSE)."""
    if draws < 2:
        raise ValueError(f"draws must be >= 2 to estimate a variance, got {draws}")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    jobs = [(name, ratio) for name in captured for ratio in ratios]
    for name, ratio in tqdm(jobs, desc="variance", unit="layer·ratio", file=sys.stderr):
        x, dy = captured[name]
        exact = exact_variances(x, dy, ratio)
        first_visit = first_visit_variances(x, dy, ratio)
        for estimator, stats in layer_variance(x, dy, ratio, draws, generator).items():
            rows.append({"layer": name, "ratio": ratio, "estimator": estimator, **stats,
                         "mse": stats["variance"] + stats["bias2"], "exact_variance": exact.get(estimator),
                         "first_visit_variance": first_visit.get(estimator), "winners": exact["winners"]})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (ratio, estimator): median relative MSE over layers; per ratio, the layers where
    WTA-CRS's variance is at most CRS's, measured and in closed form, and the largest closed-form
    ratio var(WTA-CRS) / var(CRS) over layers."""
    summary = []
    for ratio in sorted({r["ratio"] for r in rows}):
        at = [r for r in rows if r["ratio"] == ratio]
        entry = {"ratio": ratio}
        for estimator in MEASURED:
            entry[estimator] = _median([r["mse"] for r in at if r["estimator"] == estimator])
        wta = {r["layer"]: r["variance"] for r in at if r["estimator"] == "wta-crs"}
        crs = {r["layer"]: r["variance"] for r in at if r["estimator"] == "crs"}
        entry["wta_le_crs"] = sum(wta[k] <= crs[k] for k in wta)
        exact = {(r["layer"], r["estimator"]): r["exact_variance"] for r in at}
        # With no winners (|C| = 0) WTA-CRS is CRS: equal up to float rounding, counted as ≤.
        entry["exact_wta_le_crs"] = sum(exact[(k, "wta-crs")] <= exact[(k, "crs")] * (1 + 1e-9) for k in wta)
        entry["exact_wta_over_crs_max"] = max(  # a layer CRS samples exactly (no variance) counts as 1
            exact[(k, "wta-crs")] / exact[(k, "crs")] if exact[(k, "crs")] > 0 else 1.0 for k in wta)
        entry["wta_cached"] = _median([exact[(k, "wta-crs")] for k in wta])
        entry["wta_first_visit"] = _median([r["first_visit_variance"] for r in at if r["estimator"] == "wta-crs"])
        entry["layers"] = len(wta)
        summary.append(entry)
    return summary


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
