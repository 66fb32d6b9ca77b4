"""GradNormCache: round trips, padding, stale entries, bounded size, state dicts."""

from __future__ import annotations

import math

import pytest
import torch

from wtacrs.cache import GradNormCache, decode_norms, encode_norms


def test_codes_round_trip_within_stated_error():
    norms = torch.logspace(-30, 20, 500, base=2.0)
    decoded = decode_norms(encode_norms(norms))
    assert ((decoded / norms - 1).abs() <= 2 ** (1 / 8) - 1 + 1e-6).all()  # half a code step: 9%
    assert decode_norms(encode_norms(torch.tensor([math.nan, math.inf]))).isnan().all()
    assert decode_norms(encode_norms(torch.tensor([0.0]))).item() > 0  # zero: smallest code, not missing


def test_lookup_returns_what_was_recorded_by_real_token_ordinal():
    cache = GradNormCache(num_slots=2)
    ids = torch.tensor([7, 3])
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    norms = torch.tensor([[1.0, 2.0, 4.0, 99.0], [8.0, 16.0, 99.0, 99.0]])
    cache.record(1, ids, right, norms)
    assert cache.lookup(1, ids, right).isnan().all(), "records are visible only after commit"
    cache.commit()
    got = cache.lookup(1, ids, right)
    torch.testing.assert_close(got[right], norms[right], rtol=0.1, atol=0)
    assert got[~right].isnan().all()
    assert cache.lookup(0, ids, right).isnan().all(), "other slot untouched"
    # The same examples left-padded (decoder style) find the same tokens.
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(cache.lookup(1, ids, left)[left], norms[right], rtol=0.1, atol=0)


def test_changed_length_is_missing_and_reallocated():
    cache = GradNormCache(1, position_prior=False)
    cache.record(0, torch.tensor([0]), torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3))
    cache.commit()
    longer = torch.ones(1, 5, dtype=torch.bool)
    assert cache.lookup(0, torch.tensor([0]), longer).isnan().all()
    cache.record(0, torch.tensor([0]), longer, torch.full((1, 5), 2.0))
    cache.commit()
    torch.testing.assert_close(cache.lookup(0, torch.tensor([0]), longer), torch.full((1, 5), 2.0), rtol=0.1, atol=0)


def test_size_is_one_byte_per_real_token_per_slot():
    cache = GradNormCache(num_slots=72)
    g = torch.Generator().manual_seed(0)
    total_tokens = 0
    for start in range(0, 256, 32):
        ids = torch.arange(start, start + 32)
        lengths = torch.randint(5, 128, (32,), generator=g)
        mask = torch.arange(128) < lengths[:, None]
        total_tokens += int(lengths.sum())
        for slot in range(72):
            cache.record(slot, ids, mask, torch.rand(32, 128, generator=g))
        cache.commit()
    compact = cache.state_dict()
    stored = sum(t.numel() * t.element_size() for t in compact.values())
    assert compact["data"].numel() == 72 * total_tokens
    prior = 72 * 128 * 4  # float32 per slot and position, independent of the number of examples
    assert stored <= 72 * total_tokens + 12 * 256 + prior + 64
    assert cache.nbytes <= 2 * stored + 64  # growable buffers at most double
    assert cache.bytes_per_example(128) == 72 * 128 + 12


def test_state_dict_round_trip_and_discard():
    cache = GradNormCache(2)
    mask = torch.ones(2, 3, dtype=torch.bool)
    cache.record(0, torch.tensor([1, 2]), mask, torch.rand(2, 3))
    cache.commit()
    restored = GradNormCache(2)
    restored.load_state_dict(cache.state_dict())
    assert torch.equal(restored.lookup(0, torch.tensor([1, 2]), mask), cache.lookup(0, torch.tensor([1, 2]), mask))
    restored.record(1, torch.tensor([1, 2]), mask, torch.rand(2, 3))
    restored.discard_pending()
    restored.commit()
    assert restored.lookup(1, torch.tensor([1, 2]), mask).isnan().all()
    with pytest.raises(ValueError, match="slots"):
        GradNormCache(3).load_state_dict(cache.state_dict())


def test_bad_arguments():
    cache = GradNormCache(1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="slot"):
        cache.lookup(1, torch.tensor([0, 1]), mask)
    with pytest.raises(ValueError, match="integer"):
        cache.lookup(0, torch.tensor([0.0, 1.0]), mask)
    with pytest.raises(ValueError, match="batch"):
        cache.lookup(0, torch.tensor([0, 1, 2]), mask)
    with pytest.raises(ValueError, match="non-negative"):
        cache.lookup(0, torch.tensor([0, -1]), mask)
    with pytest.raises(ValueError, match="shape"):
        cache.record(0, torch.tensor([0, 1]), mask, torch.ones(2, 4))
    with pytest.raises(ValueError, match="num_slots"):
        GradNormCache(0)


def test_unseen_examples_get_the_per_position_prior():
    cache = GradNormCache(2)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    cache.record(0, torch.tensor([0, 1]), mask, torch.tensor([[4.0, 1.0, 2.0], [8.0, 3.0, 99.0]]))
    cache.commit()
    unseen = torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.bool)  # left padding, one position never seen
    got = cache.lookup(0, torch.tensor([5]), unseen)[0]
    torch.testing.assert_close(got[1:4], torch.tensor([6.0, 2.0, 2.0]), rtol=0.1, atol=0)  # mean per ordinal
    assert got[0].isnan() and got[4].isnan()  # padding; an ordinal no record reached
    assert cache.lookup(1, torch.tensor([5]), unseen).isnan().all()  # slot 1 has recorded nothing
    cache.record(0, torch.tensor([2]), mask[:1], torch.tensor([[16.0, 1.0, 2.0]]))
    cache.commit()
    first = cache.lookup(0, torch.tensor([5]), unseen)[0, 1]
    torch.testing.assert_close(first, torch.tensor(0.9 * 6.0 + 0.1 * 16.0), rtol=0.1, atol=0)  # moving average
    seen = cache.lookup(0, torch.tensor([2]), mask[:1])[0]
    torch.testing.assert_close(seen, torch.tensor([16.0, 1.0, 2.0]), rtol=0.1, atol=0)  # own record wins


def test_prior_off_and_old_checkpoints():
    cache = GradNormCache(1, position_prior=False)
    mask = torch.ones(1, 2, dtype=torch.bool)
    cache.record(0, torch.tensor([0]), mask, torch.ones(1, 2))
    cache.commit()
    assert cache.lookup(0, torch.tensor([1]), mask).isnan().all()
    state = {k: v for k, v in GradNormCache(1).state_dict().items() if k != "prior"}  # saved before the prior
    restored = GradNormCache(1)
    restored.load_state_dict(state)
    assert restored.lookup(0, torch.tensor([1]), mask).isnan().all()
    with_prior = GradNormCache(1)
    with_prior.load_state_dict(_with_prior_state())
    assert not with_prior.lookup(0, torch.tensor([9]), mask).isnan().any()


def _with_prior_state() -> dict:
    cache = GradNormCache(1)
    cache.record(0, torch.tensor([0]), torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2))
    cache.commit()
    return cache.state_dict()


@pytest.mark.parametrize("num_slots", [0, 2.5, True, "3"])
def test_num_slots_must_be_a_positive_int(num_slots):
    with pytest.raises(ValueError, match=f"num_slots must be an int >= 1, got {num_slots!r}"):
        GradNormCache(num_slots)
