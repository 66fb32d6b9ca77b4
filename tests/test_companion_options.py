"""Each companion option is defined once, as a `WTACRSConfig` field with `CompanionOption`
metadata; validation, `AUTO_COMPANIONS`, `apply_companions`, the usage report and the recipes all
read that one list (`wtacrs.config.COMPANIONS`). These tests fail when one of them falls out of step."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest
from torch import nn

import wtacrs.companions
from wtacrs.companions import COMPANION_OPTIONS, apply_companions, remove_companions
from wtacrs.config import ACTIVATION_MODES, AUTO_COMPANIONS, COMPANIONS, PRESETS, WTACRSConfig, WTACRSConfigError
from wtacrs.recipes import COMPANION_FIELDS, Recipe, RecipeError, parse_recipe

NAMES = [option.name for option in COMPANIONS]
COMPANION_SOURCES = sorted(Path(wtacrs.companions.__file__).parent.glob("*.py"))


def test_the_table_is_the_config_fields_that_carry_it():
    fields = {f.name: f for f in dataclasses.fields(WTACRSConfig)}
    assert NAMES == ["lean_dropout", "lean_layernorm", "lean_attention", "activation_compression",
                     "recompute_activation", "keep_gate", "recompute_attention", "chunked_lm_loss"]
    for option in COMPANIONS:
        assert fields[option.name].metadata["help"]  # users' help text kept on the field
        assert option.doc and option.name in inspect.getdoc(WTACRSConfig)
        default = fields[option.name].default
        assert option.problem(default) is None
        assert (default is None) == (option.auto or bool(option.modes))
        assert option.requires is None or (option.requires in NAMES and option.reason)


def test_derived_lists_read_the_table():
    assert AUTO_COMPANIONS == ("lean_dropout", "lean_layernorm", "lean_attention", "chunked_lm_loss")
    assert COMPANION_OPTIONS == tuple(name for name in NAMES if name != "keep_gate")
    assert list(WTACRSConfig().companion_options()) == NAMES
    assert {name: False for name in AUTO_COMPANIONS}.items() <= PRESETS["sampler"].items()
    assert next(o for o in COMPANIONS if o.name == "activation_compression").modes == ACTIVATION_MODES


@pytest.mark.parametrize(("values", "message"), [
    ({"lean_dropout": 1}, "WTACRSConfig.lean_dropout must be True, False or None (auto), got 1"),
    ({"chunked_lm_loss": "yes"}, "WTACRSConfig.chunked_lm_loss must be True, False or None (auto), got 'yes'"),
    ({"recompute_activation": None}, "WTACRSConfig.recompute_activation must be True or False, got None"),
    ({"keep_gate": 1}, "WTACRSConfig.keep_gate must be True or False, got 1"),
    ({"activation_compression": "fp4"},
     "WTACRSConfig.activation_compression must be None or one of 'bf16', 'int8', got 'fp4'"),
    ({"keep_gate": True, "recompute_activation": False},
     "WTACRSConfig.keep_gate keeps the gate of the gated MLP's recompute: set recompute_activation=True too"),
])
def test_config_errors(values, message):
    with pytest.raises(WTACRSConfigError) as error:
        WTACRSConfig(**values)
    assert str(error.value) == message


def test_apply_companions_takes_exactly_the_options():
    for option in COMPANIONS:
        on = {option.name: option.modes[0] if option.modes else True}
        if option.requires:
            on[option.requires] = True
        model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Dropout(0.1), nn.LayerNorm(4))
        apply_companions(model, **on)
        remove_companions(model)
    with pytest.raises(TypeError, match="dropout"):
        apply_companions(nn.Linear(2, 2), dropout=True)  # the short names of old are gone
    with pytest.raises(ValueError, match="keep_gate keeps the gate of the gated MLP's recompute: "
                                         "set recompute_activation too"):
        apply_companions(nn.Linear(2, 2), keep_gate=True)
    model = nn.Sequential(nn.Dropout(0.1), nn.LayerNorm(4))
    assert apply_companions(model, **WTACRSConfig(lean_dropout=True, lean_layernorm=True).companion_options()) == [
        "0", "1"]


def _usage_names() -> set[str]:
    """The option names the companions mark modules with (`expect`, `acted`) in their source."""
    names = set()
    for path in COMPANION_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("expect", "acted"):
                names.update(arg.value for arg in node.args if isinstance(arg, ast.Constant))
            if isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):  # for option in ("a", "b")
                names.update(e.value for e in node.iter.elts if isinstance(e, ast.Constant))
    return names


def test_every_reported_option_is_marked_by_its_companion_and_no_other_name():
    assert _usage_names() == set(COMPANION_OPTIONS)


def test_every_companion_module_entry_is_applied_and_turned_on_by_options():
    """Each companion module exports its `ENTRIES`; `apply_companions` asks every one, and each is
    turned on by reported options only (keep_gate is read by the gated MLP's set-up)."""
    exported = [entry for path in COMPANION_SOURCES
                for entry in getattr(importlib.import_module(f"wtacrs.companions.{path.stem}"), "ENTRIES", ())
                if path.stem != "__init__"]
    assert sorted(map(id, exported)) == sorted(map(id, wtacrs.companions.ENTRIES))
    assert {option for entry in exported for option in entry.options} == set(COMPANION_OPTIONS)


def test_recipes_set_every_option():
    assert set(COMPANION_FIELDS) == set(NAMES)
    recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
    assert set(COMPANION_FIELDS.values()) <= recipe_fields
    config = parse_recipe("wtacrs@0.3+companions+recompute+keep-gate+recompute-attention+act=bf16").wtacrs_config()
    assert all(config.companion_options().values())
    assert not any(Recipe(estimator="crs", ratio=0.5).wtacrs_config().companion_options().values())
    with pytest.raises(RecipeError, match="'keep-gate' keeps the gate of the gated MLP's recompute; add 'recompute'"):
        parse_recipe("wtacrs@0.3+keep-gate")
