"""First-visit scores from label anchors (issue #19): keys, prior tables, `wtacrs.batch(anchors=)`,
the trainer's host copies, and that the estimator stays unbiased and sync-free."""

from __future__ import annotations

import pytest
import torch

import wtacrs
from models import CASES_BY_NAME
from stats import unbiased_violations
from test_modeling import _qa_bert_and_batch, sampled_modules, step
from wtacrs.bench.dispatch import AtenCounter, is_host_site
from wtacrs.cache import GradNormCache
from wtacrs.cache.first_visit import (END_A, FIRST, LAST, PAD, SEGMENT_A, SEGMENT_B, anchor_keys,
                                      first_visit_keys, token_types)
from wtacrs.estimators import column_row_variance, fill_missing_norms, winner_mask
from wtacrs.sampling.norms import NormReader
from wtacrs.sampling.rows import ForwardRows

ANCHORS = torch.tensor([[1, 4], [2, 5], [3, 5]])  # `_qa_bert_and_batch`'s start and end positions


# -- keys ------------------------------------------------------------------------------------------
def test_token_types_follow_the_segments_and_the_mask():
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0]])
    assert token_types(mask, segments).tolist() == [
        [FIRST, SEGMENT_A, END_A, SEGMENT_B, SEGMENT_B, SEGMENT_B, SEGMENT_B, LAST],
        [FIRST, SEGMENT_A, SEGMENT_A, END_A, SEGMENT_B, LAST, PAD, PAD]]
    assert token_types(mask).tolist()[1] == [FIRST, SEGMENT_A, SEGMENT_A, SEGMENT_A, SEGMENT_A, LAST, PAD, PAD]


def test_anchor_keys_are_offsets_from_the_nearest_anchor_within_the_window():
    mask = torch.ones(2, 10, dtype=torch.bool)
    keys = anchor_keys(mask, torch.tensor([[5, 7], [0, 0]]), window=2)  # width 5
    # start anchor (k=0) at 5: offsets -2..1 (6 is a tie: the first anchor); end (k=1) at 7: 0..2
    assert keys[0].tolist() == [-1, -1, -1, 0, 1, 2, 3, 12, 13, 14]
    # both at the first token (a window without the answer): their own columns, 5 + offset + 2
    assert keys[1].tolist() == [7, 8, 9, -1, -1, -1, -1, -1, -1, -1]


def test_examples_without_anchors_get_no_keys():
    mask = torch.ones(2, 6, dtype=torch.bool)
    keys = first_visit_keys(mask, torch.tensor([[1, 2], [-1, -1]]))
    assert (keys.anchor[1] == -1).all() and (keys.token_type[1] == -1).all()
    assert (keys.token_type[0] >= 0).all()


# -- the API -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anchors, message", [
    (torch.zeros(3, dtype=torch.int64), "anchors must be \\(batch, K\\)"),
    (torch.zeros(2, 2, dtype=torch.int64), "anchors must be \\(batch, K\\)"),
    (torch.zeros(3, 2, dtype=torch.int32), "int64 tensor on the host"),
    (torch.zeros(3, 2, dtype=torch.int64, device="meta"), "int64 tensor on the host"),
    ([[0, 1]] * 3, "int64 tensor on the host"),
    (torch.full((3, 2), 10), "positions in \\[0, 10\\)"),
    (torch.full((3, 2), -2), "positions in \\[0, 10\\)"),
])
def test_bad_anchors_raise(anchors, message):
    mask = torch.ones(3, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        with wtacrs.batch(torch.arange(3), mask, anchors=anchors):
            pass


def test_anchors_need_the_mask_and_token_types_need_anchors():
    with pytest.raises(ValueError, match="need the attention_mask"):
        with wtacrs.batch(torch.arange(3), anchors=ANCHORS):
            pass
    with pytest.raises(ValueError, match="only used with anchors"):
        with wtacrs.batch(torch.arange(3), torch.ones(3, 10), token_type_ids=torch.zeros(3, 10, dtype=torch.int64)):
            pass
    with pytest.raises(ValueError, match="attention_mask's shape"):
        with wtacrs.batch(torch.arange(3), torch.ones(3, 10), anchors=ANCHORS,
                          token_type_ids=torch.zeros(3, 9, dtype=torch.int64)):
            pass


# -- the prior -------------------------------------------------------------------------------------------
def _anchored_cache(steps: int = 2) -> tuple[GradNormCache, torch.Tensor, torch.Tensor]:
    """A 2-slot cache whose steps had anchors; returns it, the mask and the anchors."""
    cache = GradNormCache(2)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    anchors = torch.tensor([[2, 3], [1, 1]])
    keys = first_visit_keys(mask, anchors)
    for s in range(steps):
        ids = torch.tensor([2 * s, 2 * s + 1])
        for slot in range(2):
            norms = torch.rand(2, 6) + 0.5 + 3 * (keys.anchor >= 0)  # padding rows carry gradient (QA)
            cache.record(slot, ids, mask, norms, keys)
        cache.commit()
    return cache, mask, anchors


def test_unseen_rows_read_anchor_then_type_then_position():
    cache, mask, anchors = _anchored_cache()
    keys = first_visit_keys(mask, anchors)
    unseen = torch.tensor([100, 101])
    got = cache.lookup_slots([0, 1], unseen, mask, keys)
    assert got.isfinite().all(), "padding of anchored examples is read from the type table"
    expected = cache.prior.anchor.lookup([0, 1], keys.anchor.flatten()).view_as(got)
    near = keys.anchor >= 0
    assert torch.equal(got[:, near], expected[:, near])
    by_type = cache.prior.token_type.lookup([0, 1], keys.token_type.flatten()).view_as(got)
    assert torch.equal(got[:, ~near], by_type[:, ~near])
    # an unanchored example is looked up as without anchors: real tokens by position, padding NaN
    plain = first_visit_keys(mask, torch.full((2, 2), -1))
    assert torch.equal(cache.lookup_slots([0], unseen, mask, plain).nan_to_num(-1),
                       cache.lookup_slots([0], unseen, mask).nan_to_num(-1))


def test_a_learnt_zero_still_gives_every_drawable_row_a_positive_probability():
    cache, mask, anchors = _anchored_cache()
    cache.prior.anchor.means.zero_()
    cache.prior.token_type.means.zero_()
    rows = ForwardRows("main", None, mask, torch.tensor([100, 101]), int(mask.sum()), first_visit_keys(mask, anchors))
    multipliers = NormReader._build(rows, False, cache, lambda n: torch.eye(n), 2, torch.device("cpu"))
    assert (multipliers > 0).all()
    scores = torch.rand(2, 12) + 0.1 * multipliers
    assert (scores / scores.sum(1, keepdim=True) > 0).all()


def test_state_dict_round_trip_and_an_old_checkpoint_without_the_tables():
    cache, mask, anchors = _anchored_cache()
    keys = first_visit_keys(mask, anchors)
    state = cache.state_dict()
    assert {"prior", "prior_anchor", "prior_type"} <= state.keys()
    restored = GradNormCache(2)
    restored.load_state_dict(state)
    unseen = torch.tensor([100, 101])
    assert torch.equal(restored.lookup_slots([0, 1], unseen, mask, keys), cache.lookup_slots([0, 1], unseen, mask, keys))
    old = GradNormCache(2)
    old.load_state_dict({k: v for k, v in state.items() if k not in ("prior_anchor", "prior_type")})
    assert old.prior.anchor.means.shape == old.prior.token_type.means.shape == (2, 0)
    real = old.lookup_slots([0], unseen, mask, keys)[0]
    assert torch.equal(real[mask], cache.prior.lookup([0], torch.where(mask, mask.cumsum(1) - 1, 0)[mask])[0])


# -- variance ----------------------------------------------------------------------------------------------
def _concentrated(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic (B, T) ‖X‖ and ‖dY‖ with the gradient at random label positions, and the anchors."""
    length = 24
    start = torch.randint(1, length - 4, (batch,), generator=generator)
    anchors = torch.stack([start, start + torch.randint(0, 3, (batch,), generator=generator)], 1)
    t = torch.arange(length)
    near = (t.view(1, 1, -1) - anchors.unsqueeze(2)).abs().amin(1) <= 1
    dy = torch.where(near, 1.0, 0.01) * (0.5 + torch.rand(batch, length, generator=generator))
    x = 0.5 + torch.rand(batch, length, generator=generator)
    return x, dy, anchors


def test_anchor_scores_lower_the_closed_form_variance_on_a_concentrated_gradient():
    """Gradient only near the labels, which move from example to example: a table keyed by
    position cannot follow them, one keyed by the offset from the labels can."""
    g = torch.Generator().manual_seed(0)
    cache = GradNormCache(1)
    for s in range(4):  # other batches teach the prior
        x, dy, anchors = _concentrated(8, g)
        mask = torch.ones_like(x, dtype=torch.bool)
        cache.record(0, torch.arange(8) + 8 * s, mask, dy, first_visit_keys(mask, anchors))
        cache.commit()
    x, dy, anchors = _concentrated(8, g)
    mask = torch.ones_like(x, dtype=torch.bool)
    unseen = torch.arange(8) + 1000

    def variance(keys) -> float:
        scores = x.flatten() * fill_missing_norms(cache.lookup_slots([0], unseen, mask, keys)[0].flatten())
        products = (x * dy).flatten()
        k = int(0.3 * products.numel())
        winners = winner_mask(scores, k, "wta-crs")
        # rows' gradients are orthogonal here: ‖Σ rest‖² = Σ products² over the rest
        rest = products[~winners].square().sum()
        return float(column_row_variance(products, scores, winners, k - int(winners.sum()), rest)) / float(
            products.square().sum())

    by_anchor, by_position = variance(first_visit_keys(mask, anchors)), variance(None)
    assert by_anchor < 0.5 * by_position, (by_anchor, by_position)


# -- the sampled model ---------------------------------------------------------------------------------------
def _anchored_step(model, batch, ids, anchors=ANCHORS):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with wtacrs.batch(ids, batch["attention_mask"], anchors=anchors):
        model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_anchor_scored_first_visits_keep_dw_unbiased():
    """Every draw a first visit (fresh ids), scored by the anchor and type tables learnt so far:
    the mean of the sampled dW is the exact dW within the Monte Carlo error."""
    reference, batch = _qa_bert_and_batch()
    _, exact = step(reference, batch)
    model, _ = _qa_bert_and_batch()
    wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, skip_padding=False))
    names = [n + ".weight" for n, _ in sampled_modules(model)]
    draws = [_anchored_step(model, batch, torch.arange(3) + 3 * i) for i in range(300)]
    prior = wtacrs.sampling_state(model).cache.prior
    assert prior.anchor.means.isfinite().any() and prior.token_type.means[:, PAD].isfinite().all()
    for name in names:
        samples = torch.stack([g[name] for g in draws])
        assert not samples.std(0).eq(0).all(), f"{name}: nothing sampled"
        assert not unbiased_violations(samples, exact[name]).any(), name


@pytest.mark.parametrize("anchors", [torch.zeros(3, 0, dtype=torch.int64), torch.full((3, 2), -1)])
def test_no_anchors_sample_exactly_as_without_them(anchors):
    batch = CASES_BY_NAME["bert"].batch()
    plain = wtacrs.apply(CASES_BY_NAME["bert"].model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    given = wtacrs.apply(CASES_BY_NAME["bert"].model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    for s in range(3):
        ids = torch.arange(3) + 3 * (s % 2)  # first visits, then a revisit
        expected = _anchored_step(plain, batch, ids, anchors=None)
        got = _anchored_step(given, batch, ids, anchors=anchors)
        for name in expected:
            assert torch.equal(expected[name], got[name]), (s, name)
    expected, got = (wtacrs.sampling_state(m).state_dict() for m in (plain, given))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key].nan_to_num(-1), got[key].nan_to_num(-1)), key


def test_an_anchored_step_forces_no_more_device_syncs_than_the_plain_step():
    model, batch = _qa_bert_and_batch()

    def counted(sampled: bool) -> int:
        with AtenCounter() as counter:
            if sampled:
                _anchored_step(model, batch, torch.arange(3))
            else:
                model(**batch).loss.backward()
        model.zero_grad()
        return sum(n for site, n in counter.sync_sites.items() if not is_host_site(site))

    plain = counted(False)
    wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, skip_padding=False))
    for _ in range(2):  # fill the cache and the tables: the counted step reads and writes them
        counted(True)
    assert counted(True) <= plain


def test_a_planned_anchored_step_equals_the_plain_one_and_resumes_exactly():
    def run(planned: bool, steps: range, state=None):
        model, batch = _qa_bert_and_batch()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, skip_padding=False, seed=2))
        if state is not None:
            wtacrs.sampling_state(model).load_state_dict(state)
        grads = []
        for s in steps:
            model.zero_grad()
            with wtacrs.batch(torch.arange(3) + 3 * s, batch["attention_mask"], anchors=ANCHORS,
                              token_type_ids=torch.zeros_like(batch["input_ids"])):
                if not planned:  # the same frame, planned again at the forward from its own mask
                    wtacrs.sampling_state(model).end_step()
                model(**batch).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return model, grads

    plain, expected = run(False, range(3))
    planned, got = run(True, range(3))
    for e, g in zip(expected, got):
        assert all(torch.equal(e[n], g[n]) for n in e)
    first, _ = run(False, range(2))
    _, resumed = run(False, range(2, 3), wtacrs.sampling_state(first).state_dict())
    assert all(torch.equal(expected[2][n], resumed[0][n]) for n in expected[2])
    state = wtacrs.sampling_state(planned).state_dict()
    assert state["cache.prior_anchor"].isfinite().any()
    for key, value in wtacrs.sampling_state(plain).state_dict().items():
        assert torch.equal(value.nan_to_num(-1), state[key].nan_to_num(-1)), key


# -- the trainer ----------------------------------------------------------------------------------------------
def test_the_trainer_collator_keeps_host_anchors_and_token_types():
    from wtacrs.integrations.trainer import (HOST_ANCHORS_KEY, HOST_MASK_KEY, HOST_TOKEN_TYPES_KEY,
                                             _WithHostMask)

    _, batch = _qa_bert_and_batch()
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    collated = _WithHostMask(lambda features: dict(batch))([])
    assert collated[HOST_ANCHORS_KEY].tolist() == ANCHORS.tolist()
    assert collated[HOST_TOKEN_TYPES_KEY].shape == collated[HOST_MASK_KEY].shape == (3, 10)
    without = _WithHostMask(lambda features: {"attention_mask": batch["attention_mask"]})([])
    assert HOST_ANCHORS_KEY not in without and HOST_TOKEN_TYPES_KEY not in without
