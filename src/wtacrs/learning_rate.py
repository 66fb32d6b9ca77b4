"""Learning-rate scales that give each sampled layer back the Adam step its gradient noise takes.

Adam divides a weight's step by the root of the running mean of its squared gradients. A sampled
weight gradient dŴ is unbiased, dŴ = dW + noise, with relative variance v = E‖dŴ − dW‖² / ‖dW‖²,
so E‖dŴ‖² = (1 + v) ‖dW‖²: the noise enters Adam's second moment but mostly averages out of its
first, and the layer's steps shrink by about 1 / √(1 + v). (benchmarks/ACCURACY.md measured the
effect: on SST-2, WTA-CRS@0.3 at a learning rate lr trained like full fine-tuning at 0.67 lr,
with v ≈ 1.2.) Multiplying each sampled layer's learning rate by √(1 + v) gives the steps back;
the parameters nobody samples (embeddings, norms, biases, the task head) keep the base rate.

v is measured once, before training, on one batch (`first_visit_variances`), in closed form
(`wtacrs.estimators.column_row_variance`), with the scores of an example's first visit: its
activation norms, as the first epoch samples before the gradient-norm cache holds its norms.
That is the largest v of a run; the cache lowers it later, and the scale stays (Adam's second
moment averages the squared gradients of the whole run so far, noisy first visits included).
Layers that draw in backward (inside recomputed sub-blocks, `WTACRSConfig.backward_draws`) score
every visit with the true ‖dY_i‖: their v is measured with those scores.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from wtacrs.companions.recompute import Recomputed, RecomputedGate
from wtacrs.estimators import column_row_variance, winner_mask
from wtacrs.functional import can_draw_in_backward, row_norms, slot_budget
from wtacrs.modeling import asks_for_kv_cache, sampled_modules, sampling_state

MEASURED_ESTIMATORS = ("wta-crs", "crs")


@dataclass
class _Call:
    """One call of a sampled layer in the batch's forward: its draw, and what backward adds up."""

    scores: Tensor  # (N,) first-visit scores of its rows, 0 outside the attention mask
    k: int
    winners: Tensor  # (N,) bool
    products: Tensor  # (N,) ‖X_i‖‖dY_i‖, filled chunk by chunk
    rest_sum: Tensor | None = None  # (out, in) Σ_{i∉C} dY_iᵀ X_i

    @property
    def draws(self) -> int:
        """k − |C|, at least 1."""
        return max(self.k - int(self.winners.sum()), 1)


@dataclass
class _Layer:
    calls: list[_Call] = field(default_factory=list)
    total: Tensor | None = None  # (out, in) dW, every call
    draws_in_backward: bool = False  # its input is kept for backward or has a row recipe (`layers`)


# The exact backward of a quarter batch holds about what the sampled recipe's whole step does (its
# saved activations are 0.22–0.32x full fine-tuning's), in 4 + 4 passes whatever the batch size.
CHUNKS = 4


def first_visit_variances(model: nn.Module, inputs: dict[str, Tensor], chunk_examples: int | None = None,
                          progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Relative variance E‖dŴ − dW‖² / ‖dW‖² of each trainable sampled layer's weight gradient on
    this batch, at the examples' first visit (scores ‖X_i‖, rows outside the attention mask
    never drawn unless the config samples padding; layers that draw in backward with their
    scores ‖X_i‖‖dY_i‖, measured by a second pass over the chunks).

    Runs one forward without gradients on the whole batch (the draws: scores, k and winners of
    every layer), then forward and backward in chunks of `chunk_examples` examples, in eval mode
    (no dropout, no sampling: the exact gradients the estimate is measured against). The memory
    is one chunk's activations plus two gradient-sized sums per sampled layer, before any
    optimizer state exists. Parameter gradients are dropped at the end and the training mode
    restored; no random number is drawn.

    Args:
        model: a model prepared with `wtacrs.apply` (estimator "wta-crs" or "crs").
        inputs: the batch, with labels (the model's output must carry `.loss`, a mean over
            examples: each chunk's loss is weighted by its share of them).
        chunk_examples: examples per forward/backward (default: a `CHUNKS`th of the batch).
        progress: called as progress(passes done, passes in all) after each forward/backward.
    Returns:
        {sampled module name: v}.
    """
    config = sampling_state(model).config
    if config.estimator not in MEASURED_ESTIMATORS:
        raise ValueError(f"first-visit variances are measured for the {' and '.join(MEASURED_ESTIMATORS)} "
                         f"estimators, not {config.estimator!r}")
    layers = {name: _measured_module(model, name, m) for name, m in sampled_modules(model) if m.weight.requires_grad}
    mask = inputs.get("attention_mask")
    live = None if mask is None or not config.skip_padding else mask.bool()
    examples = next(v.shape[0] for v in inputs.values() if isinstance(v, Tensor) and v.dim())
    chunk_examples = chunk_examples or math.ceil(examples / CHUNKS)
    chunks = math.ceil(examples / chunk_examples)
    recomputes = config.recompute_activation or config.recompute_attention
    passes = chunks * (2 if config.backward_draws and recomputes else 1)  # the second for backward draws
    done = [0]

    def advance() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], passes)

    state = {name: _Layer() for name in layers}
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), _hooks(layers, lambda name, index, x, out: _plan(state[name], x, live, config)):
            model(**inputs)
        with _recomputing(model):
            _backward_chunks(model, inputs, examples, chunk_examples, layers, state, totals=True, advance=advance)
        in_backward = {name for name, layer in state.items() if layer.draws_in_backward and config.backward_draws}
        if in_backward:  # their winners from the products just measured; Σ_{i∉C} once more
            for name in in_backward:
                for call in state[name].calls:
                    _rescore(call, call.products * (call.scores > 0), config)
            _backward_chunks(model, inputs, examples, chunk_examples, {n: layers[n] for n in in_backward}, state,
                             totals=False, advance=advance)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(training)
    return {name: _relative_variance(layer) for name, layer in state.items()}


@contextmanager
def _recomputing(model: nn.Module) -> Iterator[None]:
    """The recomputing companions themselves in training mode, their children left in eval (no
    dropout, no sampling): the layers inside run under `inputs_kept_for_backward` and the outputs
    carry the row recipes of training, so `_measure` sees which layers draw in backward."""
    modes = {m: m.training for m in model.modules() if isinstance(m, (Recomputed, RecomputedGate))}
    for module in modes:
        module.training = True
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _backward_chunks(model: nn.Module, inputs: dict[str, Tensor], examples: int, chunk_examples: int,
                     layers: dict[str, nn.Module], state: dict[str, _Layer], totals: bool,
                     advance: Callable[[], None]) -> None:
    """Forward and backward of the batch in chunks of examples, adding each call's rows to its
    sums (`_measure`)."""
    for start in range(0, examples, chunk_examples):
        rows = slice(start, min(start + chunk_examples, examples))
        chunk = {k: v[rows] if isinstance(v, Tensor) and v.dim() and v.shape[0] == examples else v
                 for k, v in inputs.items()}
        if asks_for_kv_cache(model, chunk):
            chunk["use_cache"] = False

        forward = [True]  # a recomputed sub-block runs its layers again in backward: not new calls

        def measure(name: str, index: int, x: Tensor, output: Tensor, start: int = start) -> None:
            if forward[0]:
                call = state[name].calls[index]  # the chunk's rows start at its first example's
                _measure(state[name], call, x, output, first=start * (call.scores.numel() // examples), totals=totals)

        with torch.enable_grad(), _hooks(layers, measure):
            loss = model(**chunk).loss * ((rows.stop - rows.start) / examples)
            forward[0] = False
            loss.backward()
        advance()


def global_scale(variances: dict[str, float]) -> float:
    """√(1 + median v) over the layers whose v is known (1 when none is): one factor for every
    parameter (on SST-2 no better than the per-layer scales, worse at ratio 0.1:
    benchmarks/ACCURACY.md, "A measured learning rate")."""
    known = sorted(v for v in variances.values() if not math.isnan(v))
    return math.sqrt(1.0 + statistics.median(known)) if known else 1.0


def lr_scales(variances: dict[str, float]) -> dict[str, float]:
    """{module name: √(1 + v)}, the factor that gives Adam's steps back (module docstring); 1 for
    a layer whose v is unknown (NaN: no gradient on the measured batch)."""
    return {name: 1.0 if math.isnan(v) else math.sqrt(1.0 + v) for name, v in variances.items()}


def scale_param_groups(optimizer: torch.optim.Optimizer, model: nn.Module, scales: dict[str, float]) -> None:
    """Give the weight of each module named in `scales` a parameter group of its own, at its
    group's learning rate times its scale; every other parameter stays in its group. The groups
    depend on the names alone (a checkpoint's optimizer state loads back whatever the values).
    Call before a learning-rate scheduler is built on the optimizer (it records each group's
    initial rate)."""
    modules = dict(model.named_modules())
    unknown = sorted(set(scales) - set(modules))
    if unknown:
        raise ValueError(f"learning-rate scales name modules the model does not have: {', '.join(unknown[:3])}")
    bad = sorted(name for name, scale in scales.items() if not (math.isfinite(scale) and scale > 0))
    if bad:
        raise ValueError(f"learning-rate scales must be positive and finite: {bad[0]} has {scales[bad[0]]}")
    scaled = {id(modules[name].weight): name for name in scales}
    groups = []
    for group in optimizer.param_groups:
        own = [p for p in group["params"] if id(p) in scaled]
        rest = [p for p in group["params"] if id(p) not in scaled]
        groups += [{**group, "params": rest}] if rest else []
        groups += [{**group, "params": [p], "lr": group["lr"] * scales[scaled[id(p)]]} for p in own]
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)


@contextmanager
def _hooks(layers: dict[str, nn.Module], on_call) -> Iterator[None]:
    """Calls `on_call(name, call index in this block, input, output)` on every forward of `layers`."""
    counts = dict.fromkeys(layers, 0)

    def hook(module, args, output, name):
        on_call(name, counts[name], args[0], output)
        counts[name] += 1

    handles = [m.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)) for name, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _plan(layer: _Layer, x: Tensor, live: Tensor | None, config) -> None:
    """The draw of one call on the whole batch: first-visit scores, k and the winners."""
    flat = x.detach().reshape(-1, x.shape[-1])
    scores = row_norms(flat)
    rows_live = None
    if live is not None and live.numel() == scores.numel():  # rows laid out as the mask (not a decoder's)
        scores = scores * live.reshape(-1)
        rows_live = int(live.sum())
    k = slot_budget(config.ratio, config.budget, scores.numel(), rows_live)
    layer.calls.append(_Call(scores, k, winner_mask(scores, k, config.estimator), torch.zeros_like(scores)))


def _rescore(call: _Call, scores: Tensor, config) -> None:
    """The call drawn with other scores (same k, same rows drawable): its winners, and Σ_{i∉C} to
    add up again. Where fewer than k rows score above 0, WTA-CRS keeps them all (its winners
    hold all the mass); CRS still draws k times unless k covers every drawable row."""
    winners = winner_mask(scores, call.k, config.estimator)
    if config.estimator == "crs" and call.k < int((call.scores > 0).sum()):
        winners = torch.zeros_like(winners)
    call.scores, call.winners, call.rest_sum = scores, winners, None


def _measure(layer: _Layer, call: _Call, x: Tensor, output: Tensor, first: int, totals: bool) -> None:
    """One chunk's call, its rows from `first` on: its output's gradient adds them to Σ_{i∉C}
    and, with `totals`, to the products and dW."""
    flat = x.detach().reshape(-1, x.shape[-1])
    rows = slice(first, first + flat.shape[0])

    layer.draws_in_backward = layer.draws_in_backward or can_draw_in_backward(x)

    def on_grad(grad: Tensor) -> None:
        dy = grad.detach().reshape(-1, grad.shape[-1]).to(flat.dtype)
        rest = ~call.winners[rows]
        part = dy[rest].mT @ flat[rest]  # (out, in)
        call.rest_sum = part if call.rest_sum is None else call.rest_sum + part
        if totals:
            call.products[rows] = row_norms(flat) * row_norms(dy)
            whole = dy.mT @ flat
            layer.total = whole if layer.total is None else layer.total + whole

    output.register_hook(on_grad)


def _measured_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """The module whose input X and output gradient dY stand for `name`'s. A LoRA A matrix's is
    the LoRA layer around it (input X, output gradient that of its frozen base product): PEFT
    starts B at zero, so A has no gradient before training, and once it has one,
    dA = Bᵀ dYᵀX is drawn with the same rows and the same first-visit scores ‖X_i‖, so its
    relative variance is dYᵀX's for a B that mixes its rows evenly."""
    owner, separator, _ = name.partition(".lora_A.")
    return model.get_submodule(owner) if separator else module


def _relative_variance(layer: _Layer) -> float:
    """Σ over the layer's calls of their variance (independent draws), over ‖dW‖²; NaN when the
    batch gives the layer no gradient at all."""
    variance = sum(column_row_variance(c.products, c.scores, c.winners, c.draws, c.rest_sum.double().square().sum())
                   for c in layer.calls)
    exact = layer.total.double().square().sum()
    return float(variance / exact) if exact > 0 else math.nan
