"""The autograd op: exact where it must be, unbiased where it samples, and small in memory."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stats import max_z, unbiased_violations
from wtacrs.estimators import uniforms_needed
from wtacrs.functional import BackwardDraw, attach_row_recipe, draw_row_sample, linear_drawn_in_backward, sampled_linear
from wtacrs.memory import SavedTensorBytes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(shape=(4, 16, 24), out=12, dtype=torch.float32, device="cpu", seed=0, heavy=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if heavy:  # heavy-tailed row norms, as in real activations
        x = x * torch.exp(torch.randn(*shape[:-1], 1, generator=g, dtype=torch.float64))
    w = torch.randn(out, shape[-1], generator=g, dtype=torch.float64) / shape[-1] ** 0.5
    b = torch.randn(out, generator=g, dtype=torch.float64)
    dy = torch.randn(*shape[:-1], out, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_(t is not dy) for t in (x, w, b, dy)]


def grads(fn, x, w, b, dy):
    for t in (x, w, b):
        t.grad = None
    y = fn(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [dict(ratio=1.0), dict(ratio=0.3, estimator="exact")])
def test_ratio_one_and_exact_match_f_linear_bitwise(kwargs, device):
    x, w, b, dy = make(device=device)
    ref = grads(F.linear, x, w, b, dy)
    out = grads(lambda x, w, b: sampled_linear(x, w, b, **kwargs), x, w, b, dy)
    for r, o in zip(ref, out):
        assert torch.equal(r, o)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ["wta-crs", "crs", "priority", "topk", "uniform"])
def test_forward_input_and_bias_grads_are_exact_when_sampling(estimator, device):
    x, w, b, dy = make(device=device)
    y0, dx0, dw0, db0 = grads(F.linear, x, w, b, dy)
    y, dx, dw, db = grads(lambda x, w, b: sampled_linear(x, w, b, ratio=0.3, estimator=estimator), x, w, b, dy)
    assert torch.equal(y, y0) and torch.equal(dx, dx0)
    torch.testing.assert_close(db, db0)  # same sum, possibly another reduction order
    assert not torch.allclose(dw, dw0)  # it really sampled


def test_gradcheck_float64():
    x, w, b, _ = make(shape=(3, 5, 6), out=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b: sampled_linear(x, w, b, ratio=1.0), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: sampled_linear(x, w, b, ratio=0.4, estimator="exact"), (x, w, b))

    # Sampling: dX and db stay exact, whatever rows are drawn for dW (w requires grad, so it samples).
    def sampled(x, b):
        return sampled_linear(x, w, b, ratio=0.4, generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(sampled, (x, b))


def monte_carlo_weight_grads(x, w, b, dy, samples, **kwargs):
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(samples):
        w.grad = None
        sampled_linear(x, w, b, generator=g, **kwargs).backward(dy)
        out.append(w.grad.clone())
    return torch.stack(out)


@pytest.mark.parametrize("estimator", ["wta-crs", "crs", "priority", "uniform"])
@pytest.mark.parametrize("with_grad_norm", [False, True])
def test_weight_grad_is_unbiased(estimator, with_grad_norm):
    x, w, b, dy = make(dtype=torch.float64, shape=(2, 12, 8), out=6)
    truth = dy.reshape(-1, 6).T @ x.detach().reshape(-1, 8)
    grad_norm = dy.norm(dim=-1) if with_grad_norm else None
    est = monte_carlo_weight_grads(x, w, b, dy, 1500, ratio=0.25, estimator=estimator, grad_norm=grad_norm)
    assert not unbiased_violations(est, truth).any(), f"max z {max_z(est, truth):.1f}"


def backward_drawn_weight_grads(x, w, b, dy, samples, k, estimator):
    """dW of `linear_drawn_in_backward` over `samples` draws, each with fresh uniforms."""
    g = torch.Generator().manual_seed(1234)
    num_rows = x.numel() // x.shape[-1]
    out = []
    for _ in range(samples):
        u = 1.0 - torch.rand(uniforms_needed(estimator, k, num_rows), generator=g)
        w.grad = None
        linear_drawn_in_backward(x, w, b, BackwardDraw(k, estimator, None, u, False)).backward(dy)
        out.append(w.grad.clone())
    return torch.stack(out)


@pytest.mark.parametrize("estimator", ["wta-crs", "crs", "priority"])
def test_a_draw_in_backward_is_unbiased_with_less_variance_than_activation_norm_scores(estimator):
    """Scored with the true ‖dY_i‖ (output gradients whose row norms spread like real ones), the
    estimate stays unbiased and its variance falls well below that of the same draw scored by
    ‖X_i‖ alone (an example's first visit)."""
    x, w, b, dy = make(dtype=torch.float64, shape=(2, 12, 8), out=6)
    dy = dy * torch.exp(1.5 * torch.randn(2, 12, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    truth = dy.reshape(-1, 6).T @ x.detach().reshape(-1, 8)
    est = backward_drawn_weight_grads(x, w, b, dy, 1500, k=6, estimator=estimator)
    assert not unbiased_violations(est, truth).any(), f"max z {max_z(est, truth):.1f}"
    first_visit = monte_carlo_weight_grads(x, w, b, dy, 1500, ratio=0.25, estimator=estimator)  # k = 6 as well
    variance, first_visit_variance = ((e - truth).square().sum((1, 2)).mean() for e in (est, first_visit))
    assert variance < first_visit_variance / 2, (float(variance), float(first_visit_variance))


def test_a_draw_in_backward_covering_every_row_is_exact_and_input_grads_always_are():
    x, w, b, dy = make(dtype=torch.float64, shape=(2, 12, 8), out=6)
    y0, dx0, dw0, db0 = grads(F.linear, x, w, b, dy)
    every_row = BackwardDraw(24, "wta-crs", None, None, True)
    y, dx, dw, db = grads(lambda x, w, b: linear_drawn_in_backward(x, w, b, every_row), x, w, b, dy)
    assert torch.equal(y, y0) and torch.equal(dx, dx0)
    torch.testing.assert_close(dw, dw0)
    torch.testing.assert_close(db, db0)
    u = torch.rand(uniforms_needed("wta-crs", 6, 24), generator=torch.Generator().manual_seed(0))
    y, dx, dw, _ = grads(lambda x, w, b: linear_drawn_in_backward(x, w, b, BackwardDraw(6, "wta-crs", None, 1 - u, False)),
                         x, w, b, dy)
    assert torch.equal(dx, dx0) and not torch.allclose(dw, dw0)  # it sampled dW alone


def test_topk_weight_grad_is_biased():
    x, w, b, dy = make(dtype=torch.float64, shape=(2, 12, 8), out=6)
    truth = dy.reshape(-1, 6).T @ x.detach().reshape(-1, 8)
    est = monte_carlo_weight_grads(x, w, b, dy, 20, ratio=0.25, estimator="topk")
    assert unbiased_violations(est, truth).any()


def test_row_mask_padding_is_unbiased_and_never_sampled():
    x, w, b, dy = make(dtype=torch.float64, shape=(3, 10, 8), out=6)
    mask = torch.arange(10) < torch.tensor([[10], [4], [7]])
    dy = dy * mask.unsqueeze(-1)  # the precondition: padding receives no gradient
    truth = dy.reshape(-1, 6).T @ x.detach().reshape(-1, 8)
    est = monte_carlo_weight_grads(x, w, b, dy, 1500, ratio=0.3, row_mask=mask)
    assert not unbiased_violations(est, truth).any(), f"max z {max_z(est, truth):.1f}"
    sample = draw_row_sample(x, ratio=0.3, row_mask=mask)
    assert bool(mask.reshape(-1)[sample.indices].all())
    assert sample.indices.numel() <= math.ceil(0.3 * int(mask.sum()))


def test_budget_all_counts_padding_rows():
    """budget="all": k = ceil(ratio · every row), capped at the live rows. Here 0.3 · 60 = 18 rows
    cover sequences 2 and 3 (4 + 7 live rows) but not all 21 live rows of the batch; a batch of
    short sequences gets every live row, exactly (the paper's setting on SST-2)."""
    x, w, b, dy = make(dtype=torch.float64, shape=(3, 20, 8), out=6)
    mask = torch.arange(20) < torch.tensor([[10], [4], [7]])
    dy = dy * mask.unsqueeze(-1)
    truth = dy.reshape(-1, 6).T @ x.detach().reshape(-1, 8)
    live_only = draw_row_sample(x, ratio=0.3, row_mask=mask, generator=torch.Generator().manual_seed(0))
    all_rows = draw_row_sample(x, ratio=0.3, row_mask=mask, budget="all", generator=torch.Generator().manual_seed(0))
    assert live_only.indices.numel() <= 7 < all_rows.indices.numel() <= 18
    assert bool(mask.reshape(-1)[all_rows.indices].all())
    est = monte_carlo_weight_grads(x, w, b, dy, 1500, ratio=0.3, row_mask=mask, budget="all")
    assert not unbiased_violations(est, truth).any(), f"max z {max_z(est, truth):.1f}"

    short = torch.arange(20) < torch.tensor([[5], [4], [6]])  # 15 live rows <= 18: all kept
    w.grad = None
    sampled_linear(x, w, b, ratio=0.3, row_mask=short, budget="all").backward(dy * short.unsqueeze(-1))
    exact = (dy * short.unsqueeze(-1)).reshape(-1, 6).T @ x.detach().reshape(-1, 8)
    assert torch.allclose(w.grad, exact, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown budget 'padded'; choose one of live, all"):
        draw_row_sample(x, ratio=0.3, row_mask=mask, budget="padded")


def test_all_padding_batch_gives_zero_weight_grad():
    x, w, b, dy = make()
    mask = torch.zeros(x.shape[:-1], dtype=torch.bool)
    y = sampled_linear(x, w, b, ratio=0.3, row_mask=mask)
    y.backward(dy * 0)
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_saved_bytes_scale_with_ratio(ratio):
    x, w, b, _ = make(shape=(8, 128, 256), out=256, heavy=False)
    with SavedTensorBytes(exclude=(w, b)) as exact:
        F.linear(x, w, b)
    with SavedTensorBytes(exclude=(w, b)) as sampled:
        sampled_linear(x, w, b, ratio=ratio)
    n = 8 * 128
    k = math.ceil(ratio * n)
    overhead = k * (8 + 4)  # int64 index + float32 weight per kept row
    assert exact.total == x.numel() * 4
    assert sampled.total <= ratio * exact.total + overhead + 256 * 4
    assert sampled.total >= 0.5 * ratio * exact.total  # duplicates merge, but most rows are distinct


def test_frozen_weight_saves_no_activation():
    x, w, b, dy = make()
    w.requires_grad_(False)
    with SavedTensorBytes(exclude=(w, b)) as saved:
        y = sampled_linear(x, w, b, ratio=0.3)
    assert saved.total == 0
    y.backward(dy)
    assert x.grad is not None and w.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tensors(dtype):
    x, w, b, dy = make(dtype=dtype)
    y0, dx0, _, db0 = grads(F.linear, x, w, b, dy)
    y, dx, dw, db = grads(lambda x, w, b: sampled_linear(x, w, b, ratio=0.3), x, w, b, dy)
    assert torch.equal(y, y0) and torch.equal(dx, dx0)
    assert dw.dtype == dtype and bool(torch.isfinite(dw).all())
    torch.testing.assert_close(db, db0)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bf16(device):
    x, w, b, dy = make(device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y0 = F.linear(x, w, b)
        y = sampled_linear(x, w, b, ratio=0.3)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y0)
    y.backward(dy.to(torch.bfloat16))
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    with torch.autocast(device, dtype=torch.bfloat16):
        x2 = x.detach().clone().requires_grad_()
        F.linear(x2, w, b).backward(dy.to(torch.bfloat16))
    assert torch.equal(x.grad, x2.grad)


def test_checkpoint_recompute_samples_the_same_rows():
    x, w, b, dy = make()
    torch.manual_seed(3)
    ref = grads(lambda x, w, b: sampled_linear(x, w, b, ratio=0.3), x, w, b, dy)
    torch.manual_seed(3)
    out = grads(
        lambda x, w, b: checkpoint(lambda x: sampled_linear(x, w, b, ratio=0.3), x, use_reentrant=False), x, w, b, dy
    )
    for r, o in zip(ref, out):
        assert torch.equal(r, o)


def test_reproducible_with_generator_and_shapes():
    x, w, b, dy = make(shape=(2, 3, 5, 16))
    a = grads(lambda x, w, b: sampled_linear(x, w, b, ratio=0.3, generator=torch.Generator().manual_seed(9)),
              x, w, b, dy)
    c = grads(lambda x, w, b: sampled_linear(x, w, b, ratio=0.3, generator=torch.Generator().manual_seed(9)),
              x, w, b, dy)
    assert all(torch.equal(p, q) for p, q in zip(a, c))
    assert a[0].shape == (2, 3, 5, 12)


def test_bad_arguments():
    x, w, b, _ = make()
    with pytest.raises(ValueError, match="ratio"):
        sampled_linear(x, w, b, ratio=0.0)
    with pytest.raises(ValueError, match="ratio"):
        sampled_linear(x, w, b, ratio=1.5)
    with pytest.raises(ValueError, match="unknown estimator"):
        sampled_linear(x, w, b, ratio=0.3, estimator="wta")
    with pytest.raises(ValueError, match="row_mask must have shape"):
        sampled_linear(x, w, b, ratio=0.3, row_mask=torch.ones(4, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="grad_norm must have shape"):
        sampled_linear(x, w, b, ratio=0.3, grad_norm=torch.ones(16))
    bad = x.detach().clone()
    bad[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="finite"):
        sampled_linear(bad, w, b, ratio=0.3)


# ---------------------------------------------------------------- rows recomputed from a kept tensor


def recipe_case(seed=0):
    """x = tanh(s U) row by row, with s kept by the caller; the layer reads x."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(4, 16, 8, generator=g, dtype=torch.float64)
    u = torch.randn(8, 24, generator=g, dtype=torch.float64)
    w = torch.randn(12, 24, generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(4, 16, 12, generator=g, dtype=torch.float64)
    return s, u, w, dy


def two_source_recipe(s, u):
    """x = tanh(s U) ⊙ t row by row from two kept tensors, as a gated MLP keeping its gate:
    (sources, fn, x)."""
    t = torch.randn(*s.shape[:-1], u.shape[1], generator=torch.Generator().manual_seed(9), dtype=s.dtype)
    return (s, t), lambda s_rows, t_rows: torch.tanh(s_rows @ u) * t_rows, torch.tanh(s @ u) * t


@pytest.mark.parametrize("sources", [1, 2])
def test_row_recipe_gives_the_gathered_rows_weight_gradient_and_saves_no_rows(sources):
    s, u, w, dy = recipe_case()
    kept, fn, x0 = ((s,), lambda rows: torch.tanh(rows @ u), torch.tanh(s @ u)) if sources == 1 else (
        two_source_recipe(s, u))
    grads_and_saved = []
    for with_recipe in (False, True):
        x = x0.clone()
        if with_recipe:
            attach_row_recipe(x, kept if sources > 1 else s, fn)
        torch.manual_seed(5)
        with SavedTensorBytes(exclude=[w, *kept]) as saved:
            y = sampled_linear(x, w, None, ratio=0.3)
        (grad,) = torch.autograd.grad(y, w, dy)
        grads_and_saved.append((grad, saved.total))
    (gathered, gathered_bytes), (recomputed, recipe_bytes) = grads_and_saved
    torch.testing.assert_close(recomputed, gathered, rtol=1e-12, atol=1e-12)  # same draw, same rows
    drawn = recipe_bytes // (8 + 4)  # the sources are kept by the caller: only int64 indices and fp32 weights remain
    assert 0 < drawn <= math.ceil(0.3 * 64) and recipe_bytes == drawn * (8 + 4)
    assert gathered_bytes - recipe_bytes == drawn * 24 * 8  # the float64 rows


def test_a_draw_in_backward_from_a_two_source_recipe_is_unbiased_and_exact_over_every_row():
    """The down projection of a gated MLP that keeps its gate: x's rows rebuilt from two kept
    tensors, drawn in backward; covering every row gives dW exactly, and fewer slots an unbiased
    estimate."""
    s, u, w, dy = recipe_case()
    kept, fn, x0 = two_source_recipe(s, u)
    truth = dy.reshape(-1, 12).T @ x0.reshape(-1, 24)

    def weight_grad(draw):
        x = x0.clone()
        attach_row_recipe(x, kept, fn)
        with SavedTensorBytes(exclude=[w, *kept]) as saved:
            y = linear_drawn_in_backward(x, w, None, draw)
        uniforms = 0 if draw.u is None else draw.u.untyped_storage().nbytes()  # the step's, shared by the layers
        assert saved.total == 64 * 4 + uniforms  # x's row norms (float32) and the draw's uniforms, no rows
        return torch.autograd.grad(y, w, dy)[0]

    torch.testing.assert_close(weight_grad(BackwardDraw(64, "wta-crs", None, None, True)), truth)
    g = torch.Generator().manual_seed(0)
    est = torch.stack([weight_grad(BackwardDraw(16, "wta-crs", None, 1.0 - torch.rand(
        uniforms_needed("wta-crs", 16, 64), generator=g, dtype=torch.float64), False)) for _ in range(1000)])
    assert not unbiased_violations(est, truth).any(), f"max z {max_z(est, truth):.1f}"


def test_row_recipe_is_void_after_an_in_place_change():
    s, u, w, dy = recipe_case()
    x = torch.tanh(s @ u)
    attach_row_recipe(x, s, lambda rows: torch.tanh(rows @ u))
    x.mul_(2.0)  # x is no longer tanh(s U): the rows must be gathered
    torch.manual_seed(5)
    (grad,) = torch.autograd.grad(sampled_linear(x, w, None, ratio=0.3), w, dy)
    torch.manual_seed(5)
    (expected,) = torch.autograd.grad(sampled_linear(x.detach().clone(), w, None, ratio=0.3), w, dy)
    assert torch.equal(grad, expected)


def test_row_recipe_source_must_have_the_same_rows():
    s, u, _, _ = recipe_case()
    with pytest.raises(ValueError, match="source rows"):
        attach_row_recipe(torch.tanh(s @ u), s[:, :8], lambda rows: rows)


def test_output_row_norms_of_every_dtype_are_float32():
    """The cache stores float32 norms: low-precision gradients are summed in float32, float64
    ones in float64 (vector_norm refuses to narrow), so float64 models train with the cache."""
    from wtacrs.functional import output_row_norms

    g = torch.randn(3, 5, 7, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        norms = output_row_norms(g.to(dtype))
        assert norms.dtype == torch.float32 and norms.shape == (3, 5)
        torch.testing.assert_close(norms, g.to(dtype).double().norm(dim=-1).float())


def test_a_float64_model_trains_with_the_gradient_norm_cache():
    import wtacrs
    from models import CASES_BY_NAME

    case = CASES_BY_NAME["bert"]
    model = wtacrs.apply(case.model().double(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    batch = case.batch()
    for _ in range(2):  # the second step reads what the first cached
        with wtacrs.batch(torch.arange(3), batch["attention_mask"]):
            model(**batch).loss.backward()
    assert wtacrs.modeling.sampling_state(model).cache is not None
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in model.parameters() if p.requires_grad)


def test_a_backward_draw_frees_its_mask_and_uniforms_once_its_backward_has_run():
    """The graph outlives backward while its output is referenced (a training loop's `loss`), so
    the draw's tensors are saved tensors, freed per node, not attributes kept with the graph."""
    x, w = torch.randn(4, 8, 6), torch.randn(5, 6, requires_grad=True)
    mask, u = torch.ones(32, dtype=torch.bool), torch.rand(uniforms_needed("wta-crs", 8, 32), dtype=torch.float64)
    alive = [weakref.ref(mask), weakref.ref(u)]
    y = linear_drawn_in_backward(x, w, None, BackwardDraw(8, "wta-crs", mask, u, False))
    del mask, u
    y.backward(torch.randn_like(y))
    gc.collect()
    assert y.grad_fn is not None and all(ref() is None for ref in alive)
