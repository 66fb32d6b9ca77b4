"""The sampled path a GPU sees: counter-based randomness and no device-to-host syncs in a step."""

from __future__ import annotations

import pytest
import torch

import wtacrs
from models import CASES_BY_NAME
from wtacrs import counter_rng
from wtacrs.bench.dispatch import AtenCounter, is_host_site


def test_hash_is_the_same_on_python_ints_and_tensors():
    values = [0, 1, 7, 2**31, 2**32 - 1, 123456789]
    assert counter_rng.hash32(torch.tensor(values)).tolist() == [counter_rng.hash32(v) for v in values]
    assert all(0 <= counter_rng.hash32(v) < 2**32 for v in values)


def test_uniforms_are_in_the_half_open_unit_interval_and_look_uniform():
    keys = counter_rng.hash32(torch.arange(8) ^ counter_rng.stream_key(3, 0, 11))
    u = counter_rng.uniforms(keys, 20_000)  # (8, 20000)
    assert u.dtype == torch.float32 and bool((u > 0).all()) and bool((u <= 1).all())
    # mean 1/2 and variance 1/12 within 6 standard errors of their Monte Carlo estimates
    n = u.shape[1]
    assert (u.mean(1) - 0.5).abs().max() < 6 * (1 / 12 / n) ** 0.5
    assert (u.var(1) - 1 / 12).abs().max() < 6 * (1 / 180 / n) ** 0.5
    counts = torch.stack([torch.histc(row, bins=10, min=0, max=1) for row in u])  # chi-square, 9 dof
    chi2 = ((counts - n / 10) ** 2 / (n / 10)).sum(1)
    assert bool((chi2 < 40).all()), chi2  # P(chi2_9 > 40) ≈ 7e-6
    correlations = torch.corrcoef(u)  # streams of different keys are uncorrelated
    assert (correlations - torch.eye(8)).abs().max() < 6 / n**0.5


def test_uniforms_are_a_pure_function_of_keys_and_counter():
    keys = torch.tensor([5, 6])
    assert torch.equal(counter_rng.uniforms(keys, 100), counter_rng.uniforms(keys, 100))
    assert torch.equal(counter_rng.uniforms(keys, 300)[:, :100], counter_rng.uniforms(keys, 100))
    assert not torch.equal(counter_rng.uniforms(keys[:1], 100), counter_rng.uniforms(keys[1:], 100))


def _counted_step(model, batch, ids, host_mask) -> AtenCounter:
    with AtenCounter() as counter:
        context = wtacrs.batch(ids, host_mask) if ids is not None else torch.enable_grad()
        with context:
            model(**batch).loss.backward()
    model.zero_grad()
    return counter


def _device_syncs(counter: AtenCounter) -> int:
    return sum(n for site, n in counter.sync_sites.items() if not is_host_site(site))


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_a_warm_sampled_step_forces_no_more_device_syncs_than_the_plain_step(name):
    """Draws, cache reads and writes, and the padding check never read a device value on the
    host once the batch's attention mask is given on the host (host-only bookkeeping aside)."""
    case = CASES_BY_NAME[name]
    batch = case.batch()
    plain = _counted_step(case.model(), batch, None, None)
    model = wtacrs.apply(case.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    ids, host_mask = torch.arange(3), batch["attention_mask"]
    for _ in range(2):  # fill the cache: the counted step reads and writes it
        _counted_step(model, batch, ids, host_mask)
    sampled = _counted_step(model, batch, ids, host_mask)
    assert wtacrs.sampling_state(model).cache.num_examples == 3
    assert _device_syncs(sampled) <= _device_syncs(plain), dict(sampled.sync_sites)


def test_the_same_step_draws_the_same_rows_after_a_resume():
    """The draw is a function of (seed, step, slot): a state restored at step t samples step t + 1
    exactly as the uninterrupted run (no generator state travels)."""
    case = CASES_BY_NAME["bert"]
    batch, ids = case.batch(), torch.arange(3)

    def run(steps: int, first: int = 0, state=None):
        model = wtacrs.apply(case.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, seed=4))
        if state is not None:
            wtacrs.sampling_state(model).load_state_dict(state)
        for step in range(first, first + steps):
            torch.manual_seed(step)  # dropout's masks, as a resumed Trainer restores them
            model.zero_grad()
            with wtacrs.batch(ids, batch["attention_mask"]):
                model(**batch).loss.backward()
        return model

    uninterrupted = run(3)
    resumed = run(1, 2, wtacrs.sampling_state(run(2)).state_dict())
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(a.grad, b.grad), name
