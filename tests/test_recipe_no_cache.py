"""The `no-cache` recipe component: a sampler without the gradient-norm cache, from the recipe
language alone (no script patching `Recipe.wtacrs_config`)."""

import pytest

import wtacrs
from wtacrs.bench.training import make_trial
from wtacrs.recipes import RecipeError, parse_recipe


def test_no_cache_turns_the_configs_cache_off_and_keeps_its_canonical_spec():
    recipe = parse_recipe("no-cache+wtacrs@0.3")
    assert recipe.spec == "wtacrs@0.3+no-cache"
    assert recipe.wtacrs_config().grad_norm == "none"
    assert parse_recipe("wtacrs@0.3").wtacrs_config().grad_norm == "cache"


@pytest.mark.parametrize("spec", ["no-cache", "lora+no-cache", "checkpointing+no-cache"])
def test_no_cache_without_a_sampler_is_refused(spec):
    with pytest.raises(RecipeError, match="no-cache"):
        parse_recipe(spec)


def test_a_no_cache_run_keeps_no_cache():
    cached, uncached = (make_trial("bert-tiny", spec, batch=2, seq=8) for spec in ("wtacrs@0.3", "wtacrs@0.3+no-cache"))
    for trial in (cached, uncached):
        trial.step()
        trial.step()
    assert wtacrs.sampling_state(cached.model).cache.num_examples == 2
    assert wtacrs.sampling_state(uncached.model).cache is None
