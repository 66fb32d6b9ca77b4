"""Sampled attention matmuls: the batched op, and the transformers attention-registry integration."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers as hf
from torch.utils.checkpoint import checkpoint

from models import CASES_BY_NAME
from stats import max_z, unbiased_violations
from wtacrs.sampled_attention.ops import _sample_slices, sampled_matmul
from wtacrs.estimators import sample_rows, winner_counts
from wtacrs.estimators import num_winners
from wtacrs.sampled_attention.transformers import (
    ATTN_IMPLEMENTATION,
    AttentionSampling,
    _attended_keys,
    attention_module_names,
    disable_sampled_attention,
    enable_sampled_attention,
    register_sampled_attention,
    sampled_attention_forward,
)
from wtacrs.memory import SavedTensorBytes, parameter_tensors

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
REGISTRY_MODELS = ["bert", "roberta", "distilbert", "albert", "electra", "t5", "gpt2", "llama"]
OWN_ATTENTION_MODELS = ["mpnet", "deberta-v2"]


# ---------------------------------------------------------------------------------------------
# The op


def make(lead=(2, 3), m=6, k=5, n=7, dtype=torch.float64, device="cpu", seed=0):
    """a (..., m, k) with heavy-tailed row norms, b (..., k, n) with heavy-tailed column norms, dC."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*lead, m, k, generator=g, dtype=torch.float64)
    a = a * torch.exp(1.5 * torch.randn(*lead, m, 1, generator=g, dtype=torch.float64))
    b = torch.randn(*lead, k, n, generator=g, dtype=torch.float64)
    b = b * torch.exp(1.5 * torch.randn(*lead, 1, n, generator=g, dtype=torch.float64))
    dc = torch.randn(*lead, m, n, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_(t is not dc) for t in (a, b, dc)]


def grads(fn, a, b, dc):
    a.grad = b.grad = None
    c = fn(a, b)
    c.backward(dc)
    return c.detach(), a.grad.clone(), b.grad.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [dict(ratio=1.0), dict(ratio=0.3, estimator="exact")])
def test_ratio_one_and_exact_are_torch_matmul_bitwise(kwargs, device):
    a, b, dc = make(dtype=torch.float32, device=device)
    ref = grads(torch.matmul, a, b, dc)
    out = grads(lambda a, b: sampled_matmul(a, b, **kwargs), a, b, dc)
    assert all(torch.equal(r, o) for r, o in zip(ref, out))


@pytest.mark.parametrize("estimator", ["wta-crs", "crs", "uniform", "topk"])
def test_forward_is_exact_when_sampling(estimator):
    a, b, dc = make(dtype=torch.float32)
    c0, da0, db0 = grads(torch.matmul, a, b, dc)
    c, da, db = grads(lambda a, b: sampled_matmul(a, b, ratio=0.4, estimator=estimator), a, b, dc)
    assert torch.equal(c, c0)
    assert not torch.allclose(da, da0) and not torch.allclose(db, db0)  # both really sampled


def test_gradcheck_float64_exact_path():
    a, b, _ = make(lead=(2,), m=3, k=4, n=5)
    assert torch.autograd.gradcheck(lambda a, b: sampled_matmul(a, b, ratio=1.0), (a, b))
    assert torch.autograd.gradcheck(lambda a, b: sampled_matmul(a, b, ratio=0.3, estimator="exact"), (a, b))


def test_backward_is_the_weighted_sum_of_the_drawn_terms():
    """Given the draw, dA = Σ_j w_j dC[:, n_j] ⊗ B[:, n_j] and dB = Σ_j w_j A[m_j] ⊗ dC[m_j], per (batch, head)."""
    a, b, dc = make()
    _, da, db = grads(lambda a, b: sampled_matmul(a, b, ratio=0.5, generator=torch.Generator().manual_seed(5)),
                      a, b, dc)
    g = torch.Generator().manual_seed(5)  # the op draws rows of a first, then columns of b
    rows, row_w = sample_rows(a.detach().norm(dim=-1).double().view(-1, 6), 3, generator=g)
    cols, col_w = sample_rows(b.detach().norm(dim=-2).double().view(-1, 7), 4, generator=g)
    a2, b2, dc2 = a.detach().view(-1, 6, 5), b.detach().view(-1, 5, 7), dc.view(-1, 6, 7)
    for lead in range(6):
        ref_da = sum(w * torch.outer(dc2[lead, :, n], b2[lead, :, n]) for n, w in zip(cols[lead], col_w[lead].float()))
        ref_db = sum(w * torch.outer(a2[lead, m], dc2[lead, m]) for m, w in zip(rows[lead], row_w[lead].float()))
        torch.testing.assert_close(da.view(-1, 6, 5)[lead], ref_da)
        torch.testing.assert_close(db.view(-1, 5, 7)[lead], ref_db)


def replicated_estimates(a, b, dc, samples, **kwargs):
    """`samples` independent estimates of (dA, dB) in one call: each replica is its own leading
    index, hence its own draw."""
    a_rep = a.detach().expand(samples, *a.shape).clone().requires_grad_()
    b_rep = b.detach().expand(samples, *b.shape).clone().requires_grad_()
    sampled_matmul(a_rep, b_rep, generator=torch.Generator().manual_seed(1234), **kwargs).backward(
        dc.expand(samples, *dc.shape)
    )
    return a_rep.grad, b_rep.grad


@pytest.mark.parametrize("estimator", ["wta-crs", "crs", "priority", "uniform"])
def test_gradients_are_unbiased_per_batch_and_head(estimator):
    a, b, dc = make()
    da, db = replicated_estimates(a, b, dc, 4000, ratio=0.4, estimator=estimator)
    exact_da, exact_db = dc @ b.detach().mT, a.detach().mT @ dc
    assert not unbiased_violations(da, exact_da).any(), f"dA max z {max_z(da, exact_da):.1f}"
    assert not unbiased_violations(db, exact_db).any(), f"dB max z {max_z(db, exact_db):.1f}"


def replicated_keyed_estimates(a, b, dc, samples, **kwargs):
    """`samples` estimates of (dA, dB), one `key` each (counter-based draws)."""
    estimates = []
    for key in range(samples):
        a.grad = b.grad = None
        sampled_matmul(a, b, key=key, **kwargs).backward(dc)
        estimates.append((a.grad.clone(), b.grad.clone()))
    return torch.stack([e[0] for e in estimates]), torch.stack([e[1] for e in estimates])


def test_keyed_draws_are_unbiased_and_a_pure_function_of_the_key():
    a, b, dc = make()
    da, db = replicated_keyed_estimates(a, b, dc, 1500, ratio=0.4)
    exact_da, exact_db = dc @ b.detach().mT, a.detach().mT @ dc
    assert not unbiased_violations(da, exact_da).any(), f"dA max z {max_z(da, exact_da):.1f}"
    assert not unbiased_violations(db, exact_db).any(), f"dB max z {max_z(db, exact_db):.1f}"
    again, _ = replicated_keyed_estimates(a, b, dc, 3, ratio=0.4)
    assert torch.equal(again, da[:3]) and not torch.equal(da[0], da[1])


def test_wta_crs_keeps_winners_on_this_data():
    """The unbiasedness test above exercises the winner branch, not only plain CRS."""
    a, b, _ = make()
    probs = a.detach().norm(dim=-1).view(-1, 6).double()
    counts = winner_counts(probs.topk(3, dim=1).values, probs.sum(1, keepdim=True)).squeeze(1)
    assert bool((counts > 0).any()) and bool((counts == 0).any())


def test_topk_gradients_are_biased():
    a, b, dc = make()
    da, _ = replicated_estimates(a, b, dc, 50, ratio=0.4, estimator="topk")
    assert unbiased_violations(da, dc @ b.detach().mT).any()


def test_batched_sampler_matches_the_one_dimensional_estimator():
    g = torch.Generator().manual_seed(0)
    scores = torch.exp(2 * torch.randn(40, 20, generator=g, dtype=torch.float64))
    scores[3] = 0.0  # an all-zero row: every product is zero, so all weights must be zero
    scores[4, 5:] = 0.0  # zero scores are never drawn
    probs = scores / scores.sum(1, keepdim=True).clamp(min=1e-300)
    counts = winner_counts(probs.topk(6, dim=1).values, probs.sum(1, keepdim=True)).squeeze(1)
    assert counts.tolist() == [num_winners(p.sort(descending=True).values, 6) for p in probs]
    indices, weights = sample_rows(scores, 6, "wta-crs", g)
    assert indices.shape == weights.shape == (40, 6)
    assert bool((weights[3] == 0).all())
    assert bool((indices[4][weights[4] > 0] < 5).all())
    winners = torch.sort(probs, dim=1, descending=True, stable=True).indices
    for row in (0, 1, 2):  # winners come first, with weight 1
        c = int(counts[row])
        assert indices[row, :c].tolist() == winners[row, :c].tolist() and bool((weights[row, :c] == 1).all())


def test_priority_draws_k_distinct_live_rows():
    scores = torch.exp(2 * torch.randn(50, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    scores[7, 2:] = 0.0  # two live rows of 10: both kept exactly, the zero-score slot weighs 0
    indices, weights = sample_rows(scores, 3, "priority", torch.Generator().manual_seed(0))
    assert all(len(set(row.tolist())) == 3 for row in indices) and bool((weights[weights > 0] >= 1).all())
    assert sorted(indices[7][weights[7] > 0].tolist()) == [0, 1] and weights[7].tolist().count(1.0) == 2


def test_uniform_draws_k_distinct_rows():
    indices, weights = sample_rows(torch.ones(50, 10), 3, "uniform", torch.Generator().manual_seed(0))
    assert all(len(set(row.tolist())) == 3 for row in indices)
    assert bool((weights == 10 / 3).all())


def sampled_bytes(lead, m, k, n, ratio):
    """What the op saves: k_m rows of a and k_n columns of b (float32), an int64 index and a
    float32 weight per kept slice, for every leading index."""
    slots_m, slots_n = math.ceil(ratio * m), math.ceil(ratio * n)
    return math.prod(lead) * ((slots_m + slots_n) * k * 4 + (slots_m + slots_n) * 12)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_saved_bytes_scale_with_ratio(ratio):
    a, b, _ = make(lead=(4, 6), m=64, k=32, n=64, dtype=torch.float32)
    with SavedTensorBytes() as exact:
        torch.matmul(a, b)
    with SavedTensorBytes() as sampled:
        sampled_matmul(a, b, ratio=ratio)
    assert exact.total == (a.numel() + b.numel()) * 4
    assert sampled.total == sampled_bytes((4, 6), 64, 32, 64, ratio)
    assert sampled.total <= (ratio + 12 / (32 * 4) + 0.01) * exact.total


def test_live_columns_cut_the_budget_and_stay_unbiased():
    """Columns outside `live_columns` (where dC is zero: keys masked out of every query) are never drawn."""
    a, b, dc = make(lead=(2, 3), m=6, k=5, n=10)
    live = torch.arange(10) < torch.tensor([[10, 10, 10], [4, 4, 4]]).unsqueeze(-1)  # (2, 3, 10)
    dc = dc * live.unsqueeze(-2)
    da, _ = replicated_estimates(a, b, dc, 4000, ratio=0.3, live_columns=live.expand(4000, 2, 3, 10))
    exact_da = dc @ b.detach().mT
    assert not unbiased_violations(da, exact_da).any(), f"dA max z {max_z(da, exact_da):.1f}"
    _, indices, weights = _sample_slices(b, -1, live, 0.3, "wta-crs", None)
    assert bool(live.gather(-1, indices)[weights > 0].all())
    b.requires_grad_(False)
    with SavedTensorBytes(exclude=(b,)) as saved:
        sampled_matmul(a, b, ratio=0.3, live_columns=live & (torch.arange(10) < 7))
    assert saved.total == 6 * (3 * 5 * b.element_size() + 3 * 12)  # k = ceil(0.3 · 7) columns per (batch, head)


def test_budget_all_counts_padded_columns_capped_at_the_live_ones():
    """budget="all" (the paper's counting): k = ceil(0.3 · 20) = 6 columns, not ceil(0.3 · 10) = 3;
    still drawn among live columns only and unbiased. When k covers every live column, WTA-CRS
    keeps them all and dA is exact; k never exceeds the largest live count."""
    a, b, dc = make(lead=(2, 3), m=6, k=5, n=20)
    live = torch.arange(20) < torch.tensor([[10, 10, 10], [4, 4, 4]]).unsqueeze(-1)  # (2, 3, 20)
    dc = dc * live.unsqueeze(-2)
    exact_da = dc @ b.detach().mT
    for budget, k in (("live", 3), ("all", 6)):
        kept, indices, weights = _sample_slices(b, -1, live, 0.3, "wta-crs", None, budget)
        assert kept.shape[-1] == indices.shape[-1] == k
        assert bool(live.gather(-1, indices)[weights > 0].all())
    da, _ = replicated_estimates(a, b, dc, 4000, ratio=0.3, live_columns=live.expand(4000, 2, 3, 20), budget="all")
    assert not unbiased_violations(da, exact_da).any(), f"dA max z {max_z(da, exact_da):.1f}"

    short = torch.arange(20) < torch.tensor([[5, 5, 5], [4, 4, 4]]).unsqueeze(-1)  # 5 <= 6: all kept
    kept, indices, _ = _sample_slices(b, -1, short, 0.3, "wta-crs", None, "all")
    assert indices.shape[-1] == 5
    a.grad = None
    sampled_matmul(a, b, ratio=0.3, live_columns=short, budget="all").backward(dc * short.unsqueeze(-2))
    assert torch.allclose(a.grad, (dc * short.unsqueeze(-2)) @ b.detach().mT, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown budget 'padded'"):
        sampled_matmul(a, b, ratio=0.3, budget="padded")


def test_only_what_a_wanted_gradient_needs_is_saved():
    a, b, dc = make(lead=(4,), m=64, k=32, n=64, dtype=torch.float32)
    b.requires_grad_(False)  # dB not wanted: no rows of a
    with SavedTensorBytes(exclude=(b,)) as saved:
        c = sampled_matmul(a, b, ratio=0.25)
    assert saved.total == 4 * (16 * 32 * 4 + 16 * 12)  # the columns of b for dA only
    c.backward(dc)
    assert a.grad is not None and b.grad is None


def test_keep_a_saves_a_whole_and_its_gradient_is_exact():
    a, b, dc = make(dtype=torch.float32)
    _, da0, db0 = grads(torch.matmul, a, b, dc)
    a.grad = b.grad = None
    with SavedTensorBytes(exclude=(a,)) as saved:
        c = sampled_matmul(a, b, ratio=0.5, keep_a=True)
    c.backward(dc)
    assert torch.equal(b.grad, db0)
    assert not torch.allclose(a.grad, da0)
    assert saved.total == sampled_bytes((2, 3), 0, 5, 7, 0.5)  # only b's columns


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bf16(device):
    a, b, dc = make(dtype=torch.float32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        c0 = torch.matmul(a, b)
        c = sampled_matmul(a, b, ratio=0.4)
    assert c.dtype == torch.bfloat16 and torch.equal(c, c0)
    c.backward(dc.to(torch.bfloat16))
    assert a.grad.dtype == b.grad.dtype == torch.float32
    assert bool(torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tensors(dtype):
    a, b, dc = make(dtype=dtype)
    c, da, db = grads(lambda a, b: sampled_matmul(a, b, ratio=0.4), a, b, dc)
    assert torch.equal(c, torch.matmul(a.detach(), b.detach()))
    assert da.dtype == db.dtype == dtype and bool(torch.isfinite(da).all() and torch.isfinite(db).all())


def test_checkpoint_recompute_samples_the_same_entries():
    a, b, dc = make(dtype=torch.float32)
    torch.manual_seed(3)
    ref = grads(lambda a, b: sampled_matmul(a, b, ratio=0.4), a, b, dc)
    torch.manual_seed(3)
    out = grads(lambda a, b: checkpoint(lambda a, b: sampled_matmul(a, b, ratio=0.4), a, b, use_reentrant=False),
                a, b, dc)
    assert all(torch.equal(r, o) for r, o in zip(ref, out))


def test_checkpoint_with_own_generator_recomputes_without_shape_errors():
    """A generator is not rewound by checkpoint, so the recompute draws anew; saved shapes do not
    depend on the draw, so non-reentrant checkpointing's metadata check still passes."""
    a, b, dc = make(dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    checkpoint(lambda a, b: sampled_matmul(a, b, ratio=0.4, generator=g), a, b, use_reentrant=False).backward(dc)
    assert bool(torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all())


def test_bad_arguments():
    a, b, _ = make()
    with pytest.raises(ValueError, match="ratio"):
        sampled_matmul(a, b, ratio=0.0)
    with pytest.raises(ValueError, match="unknown estimator"):
        sampled_matmul(a, b, ratio=0.3, estimator="wta")
    with pytest.raises(ValueError, match="leading dims and K"):
        sampled_matmul(a, b[:1], ratio=0.3)  # broadcasting is not per-(batch, head) sampling
    with pytest.raises(ValueError, match="leading dims and K"):
        sampled_matmul(a, b.mT, ratio=0.3)
    with pytest.raises(ValueError, match="at least 2 dims"):
        sampled_matmul(a[0, 0, 0], b, ratio=0.3)
    bad = a.detach().clone().requires_grad_()
    with torch.no_grad():
        bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="finite"):
        sampled_matmul(bad, b, ratio=0.3)
    with pytest.raises(ValueError, match="live_columns must have shape"):
        sampled_matmul(a, b, ratio=0.3, live_columns=torch.ones(2, 3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="k must be a positive int"):
        sample_rows(torch.ones(2, 4), 0)


# ---------------------------------------------------------------------------------------------
# The attention-registry integration


def eager_copy(model):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref


def step(model, batch, seed=0):
    """One forward/backward in train mode: (logits, {parameter name: grad})."""
    torch.manual_seed(seed)  # same dropout masks for both models
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_registry_models_are_found_and_the_others_refused():
    for name in REGISTRY_MODELS:
        assert attention_module_names(CASES_BY_NAME[name].model()), name
    for name in OWN_ATTENTION_MODELS:
        model = CASES_BY_NAME[name].model()
        with pytest.raises(ValueError, match="does not compute attention through transformers' AttentionInterface"):
            enable_sampled_attention(model, ratio=0.3)
        assert model.config._attn_implementation != ATTN_IMPLEMENTATION


def test_t5_samples_encoder_decoder_and_cross_attention():
    names = enable_sampled_attention(CASES_BY_NAME["t5"].model(), ratio=0.3)
    assert len(names) == 6 and sum("EncDecAttention" in n for n in names) == 2


@pytest.mark.parametrize("name", REGISTRY_MODELS)
def test_ratio_one_matches_eager_attention(name):
    case = CASES_BY_NAME[name]
    model, batch = case.model(), case.batch()
    ref = eager_copy(model)
    enable_sampled_attention(model, ratio=1.0)
    ref_logits, ref_grads = step(ref, batch)
    logits, grads_ = step(model, batch)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    assert grads_.keys() == ref_grads.keys()
    for key in ref_grads:
        torch.testing.assert_close(grads_[key], ref_grads[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", REGISTRY_MODELS)
def test_sampling_keeps_forward_exact_and_trains(name):
    case = CASES_BY_NAME[name]
    model, batch = case.model(), case.batch()
    ref = eager_copy(model)
    enable_sampled_attention(model, ratio=0.3, seed=0)  # own generators: dropout draws stay as in eager
    ref_logits, ref_grads = step(ref, batch)
    logits, grads_ = step(model, batch)
    assert torch.equal(logits, ref_logits)
    assert all(bool(torch.isfinite(g).all()) for g in grads_.values())
    assert any(not torch.allclose(grads_[k], ref_grads[k]) for k in ref_grads)  # it sampled
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_attended_keys_are_the_unpadded_ones():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None, None, :].expand(2, 1, 4, 4)
    assert torch.equal(_attended_keys(additive, torch.Size((2, 3, 4))), mask[:, None, :].expand(2, 3, 4))
    blocked_row = additive.clone()
    blocked_row[1, 0, 0, :] = torch.finfo(torch.float32).min  # softmax spreads over blocked keys
    assert _attended_keys(blocked_row, torch.Size((2, 3, 4))) is None


def test_head_mask_and_unsupported_arguments():
    module = torch.nn.Module()
    module.wtacrs_attention = AttentionSampling(ratio=0.5, estimator="wta-crs", seed=0)
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)  # (batch, heads, seq, head_dim) each
    head_mask = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    output, weights = sampled_attention_forward(module, q, k, v, None, head_mask=head_mask)
    reference = torch.softmax(q @ k.mT / 8**0.5, dim=-1) * head_mask
    torch.testing.assert_close(weights, reference)
    torch.testing.assert_close(output, (reference @ v).transpose(1, 2))
    with pytest.raises(NotImplementedError, match="softcap"):
        sampled_attention_forward(module, q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match="not a multiple"):
        sampled_attention_forward(module, torch.randn(2, 3, 5, 8), k, v, None)


def test_eval_mode_does_not_sample():
    case = CASES_BY_NAME["bert"]
    model, batch = case.model(), case.batch()
    model.eval()
    ref = eager_copy(model)
    enable_sampled_attention(model, ratio=0.3)
    assert all(torch.equal(p, q) for p, q in zip(step(model, batch)[1].values(), step(ref, batch)[1].values()))


@pytest.mark.parametrize("original", ["sdpa", "eager"])
def test_disable_restores_the_previous_implementation(original):
    model = CASES_BY_NAME["llama"].model()
    model.set_attn_implementation(original)
    names = enable_sampled_attention(model, ratio=0.5)
    enable_sampled_attention(model, ratio=0.3)  # again: disable must still restore the original
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert disable_sampled_attention(model) == names
    assert model.config._attn_implementation == original
    modules = dict(model.named_modules())
    assert not any(hasattr(modules[n], "wtacrs_attention") for n in names)
    with pytest.raises(ValueError, match="not enabled"):
        disable_sampled_attention(model)


def test_bad_enable_arguments_and_missing_settings():
    case = CASES_BY_NAME["bert"]
    with pytest.raises(ValueError, match="ratio"):
        enable_sampled_attention(case.model(), ratio=1.5)
    with pytest.raises(ValueError, match="unknown estimator"):
        enable_sampled_attention(case.model(), ratio=0.3, estimator="wta")
    register_sampled_attention()
    model = case.model()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)  # by hand, without enable: no settings
    with pytest.raises(RuntimeError, match="enable_sampled_attention"):
        model(**case.batch())


def test_hf_gradient_checkpointing_samples_the_same_entries():
    case = CASES_BY_NAME["bert"]
    model, batch = case.model(), case.batch()
    enable_sampled_attention(model, ratio=0.3)  # global RNG: checkpoint restores it for the recompute
    _, ref = step(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, out = step(model, batch)
    assert all(torch.equal(ref[k], out[k]) for k in ref)


def test_apply_keys_attention_draws_by_its_seed_and_step():
    """Under `wtacrs.apply` the attention draws follow the config's seed and the step counter,
    not the global RNG (with dropout off, the only other user of it): the same seed gives the
    same gradients whatever the global RNG did, and HF checkpointing's recompute redraws the
    same slices."""
    import wtacrs

    case = CASES_BY_NAME["bert"]
    batch = case.batch()

    def grads_of(seed, checkpointing=False, rng=0):
        model = case.model()
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, attention=True, seed=seed))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return step(model, batch, seed=rng)[1]

    ref = grads_of(0)
    for other in (grads_of(0, rng=7), grads_of(0, checkpointing=True)):
        assert all(torch.equal(ref[k], other[k]) for k in ref)
    changed = grads_of(1)
    assert any(not torch.equal(ref[k], changed[k]) for k in ref)


def attention_layer_saved_bytes(config, batch, seq, ratio):
    """Saved-for-backward bytes of one BertLayer in train mode, eager vs sampled attention."""
    torch.manual_seed(0)
    model = hf.BertModel(config, add_pooling_layer=False)
    layer = model.encoder.layer[0].train()
    hidden = torch.randn(batch, seq, config.hidden_size)
    totals = {}
    for implementation in ("eager", ATTN_IMPLEMENTATION):
        if implementation == ATTN_IMPLEMENTATION:
            enable_sampled_attention(model, ratio=ratio)
        else:
            model.set_attn_implementation("eager")
        with SavedTensorBytes(exclude=parameter_tensors(model)) as saved:
            layer(hidden)[0].sum().backward()
        totals[implementation] = saved.total
    return totals


def expected_attention_saving(config, batch, seq, ratio):
    """Eager's QKᵀ and PV save Q, K, V and the dropped probabilities whole (float32); sampled, a
    ratio of each per (batch, head) plus 12 bytes of index and weight per kept slice."""
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    eager = 4 * batch * heads * seq * (3 * head_dim + seq)
    lead = (batch, heads)
    sampled = sampled_bytes(lead, seq, head_dim, seq, ratio) + sampled_bytes(lead, seq, seq, head_dim, ratio)
    return eager - sampled


def test_attention_saved_bytes_drop_as_computed():
    config = hf.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1)
    totals = attention_layer_saved_bytes(config, batch=2, seq=16, ratio=0.25)
    assert totals["eager"] - totals[ATTN_IMPLEMENTATION] == expected_attention_saving(config, 2, 16, 0.25)


@pytest.mark.slow
def test_bert_base_layer_saved_bytes():
    """One BERT-base-size layer, batch 4, sequence 128, fp32, ratio 0.3 (numbers in the report)."""
    config = hf.BertConfig()  # hidden 768, 12 heads, intermediate 3072
    totals = attention_layer_saved_bytes(config, batch=4, seq=128, ratio=0.3)
    print({k: f"{v / 2**20:.2f} MiB" for k, v in totals.items()})
    assert totals["eager"] - totals[ATTN_IMPLEMENTATION] == expected_attention_saving(config, 4, 128, 0.3)
