"""The units of the sampling state and the cache, each on its own contract."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from wtacrs.cache import PRIOR_DECAY, NormStore, PendingRecord, PositionPrior, encode_norms
from wtacrs.cache.records import on_host
from wtacrs.config import WTACRSConfig
from wtacrs.functional import RowSample
from wtacrs.sampling import PaddingGradientError
from wtacrs.sampling.draws import DrawRegistry, StepUniforms
from wtacrs.sampling.recorder import StepRecorder
from wtacrs.sampling.rows import ForwardRows


# -- cache units -----------------------------------------------------------------------------------
def test_pending_record_has_named_immutable_fields():
    mask = torch.ones(2, 3, dtype=torch.bool)
    codes = torch.zeros(2, 3, dtype=torch.uint8)
    record = PendingRecord(slot=4, example_ids=torch.tensor([1, 2]), row_mask=mask, codes=codes)
    assert record.slot == 4 and record.row_mask is mask
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.slot = 5
    with pytest.raises(TypeError):
        slot, ids, mask, codes = record  # not a tuple: fields are read by name


def test_on_host_moves_codes_and_shares_one_host_mask_per_mask():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.int64)  # any dtype: the host copy is bool
    records = [PendingRecord(s, torch.tensor([7]), mask, encode_norms(torch.rand(1, 3))) for s in range(3)]
    moved = on_host(records)
    assert [r.slot for r in moved] == [0, 1, 2] and all(r.codes.device.type == "cpu" for r in moved)
    assert moved[0].row_mask.dtype == torch.bool and all(r.row_mask is moved[0].row_mask for r in moved)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(records, moved))


def test_prior_alone_averages_per_slot_and_position():
    prior = PositionPrior(num_slots=2)
    assert prior.lookup([0, 1], torch.tensor([0, 1])).isnan().all()  # nothing recorded yet
    prior.update(torch.tensor([1]), torch.tensor([0, 0, 1]), torch.tensor([[2.0, 4.0, math.nan]]))
    got = prior.lookup([0, 1], torch.tensor([0, 1, 2]))
    assert got[0].isnan().all()  # slot 0 untouched
    assert got[1, 0] == 3.0 and got[1, 1] == 0.0 and got[1, 2].isnan()  # mean; NaN counts 0; unreached
    prior.update(torch.tensor([1]), torch.tensor([0]), torch.tensor([[13.0]]))
    assert prior.lookup([1], torch.tensor([0]))[0, 0] == pytest.approx(PRIOR_DECAY * 3.0 + (1 - PRIOR_DECAY) * 13.0)
    restored = PositionPrior(2)
    restored.load_state_dict(prior.state_dict())
    assert torch.equal(restored.means.nan_to_num(-1), prior.means.nan_to_num(-1))
    restored.load_state_dict({})  # a checkpoint from before the prior
    assert restored.means.shape == (2, 0)


def test_store_reads_what_it_wrote_by_real_token_ordinal():
    store = NormStore(num_slots=2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    codes = torch.tensor([[10, 11, 12]], dtype=torch.uint8)  # (R=1, U=3) real tokens in order
    store.write(torch.tensor([1]), torch.tensor([5, 0]), mask, codes)
    left = torch.tensor([[0, 1, 1], [0, 0, 1]], dtype=torch.bool)  # the same examples, left-padded
    read, found = store.read([1, 0], torch.tensor([5, 0]), left)
    assert torch.equal(found, left)
    assert read[0][left].tolist() == [10, 11, 12] and (read[1][left] == 0).all()  # slot 0: missing
    unseen, found = store.read([1], torch.tensor([3]), torch.ones(1, 2, dtype=torch.bool))
    assert not found.any() and (unseen == 0).all()
    assert store.num_examples == 2 and store.bytes_per_example(4) == 2 * 4 + 12


# -- sampling units --------------------------------------------------------------------------------
def test_draw_registry_shares_by_identity_and_restores_groups():
    registry = DrawRegistry()
    x, other = torch.randn(4, 3), torch.randn(4, 3)
    sample = RowSample(torch.tensor([0, 2]), torch.ones(2), x[[0, 2]], 4)
    registry.add(0, x, sample)
    assert registry.reuse(1, other) is None
    assert torch.equal(registry.reuse(1, x).indices, sample.indices)
    assert registry.groups == {0: {0, 1}} and registry.leaders(3).tolist() == [0, 0, 2]
    assert registry.members(3)[0].tolist() == [1.0, 1.0, 0.0]
    x.add_(1.0)  # an in-place change makes it another tensor's draw
    assert registry.reuse(2, x) is None
    restored = DrawRegistry()
    restored.load_leaders(registry.leaders(3))
    assert restored.groups == registry.groups


def test_step_uniforms_are_made_once_per_layout_and_depend_on_the_key():
    uniforms = StepUniforms()
    table = uniforms.table(torch.device("cpu"), "main", 5, num_slots=3, step_key=11)
    assert table.shape == (3, 5) and uniforms.table(torch.device("cpu"), "main", 5, 3, 11) is table
    uniforms.clear()
    assert torch.equal(uniforms.table(torch.device("cpu"), "main", 5, 3, 11), table)  # a pure function
    assert not torch.equal(uniforms.table(torch.device("cpu"), "other", 5, 3, 12), table)


def test_recorder_ships_one_step_per_layout_and_flags_padding_gradient():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    rows = ForwardRows("main", mask, mask, torch.tensor([0]), 2)
    recorder = StepRecorder(WTACRSConfig.preset("sampler", ratio=0.3))
    assert recorder.wants(rows)
    recorder.record(0, rows, torch.tensor([[2.0, 2.0, 0.0]]))  # padding: 0
    recorder.record(2, rows, torch.tensor([[1.0, 2.0, 3.0]]))  # padding got gradient
    recorder.ship()
    (step,) = recorder.take()
    assert step.slots == [0, 2] and step.codes.shape == (2, 1, 3) and step.leaks.tolist() == [False, True]
    with pytest.raises(PaddingGradientError, match="layer_c"):
        step.check_padding(["layer_a", "layer_b", "layer_c"])
    assert recorder.take() == []
