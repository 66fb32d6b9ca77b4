"""The recipe language: parsing, canonical specs, and one recipe building the same model everywhere."""

import pytest
import torch
import transformers as hf

import wtacrs
from wtacrs.layers import SampledLayerMixin
from wtacrs.recipes import BEST_EXACT, LoraSettings, RecipeError, SamplingSettings, parse_recipe

from models import CASES_BY_NAME, MODERNBERT


def tiny_bert():
    return CASES_BY_NAME["bert"].model()


def test_components_compose():
    r = parse_recipe("lora+wtacrs@0.1+companions+checkpointing")
    assert (r.lora, r.checkpointing, r.companions, r.estimator, r.ratio) == (True, True, True, "wta-crs", 0.1)
    assert parse_recipe("topk@0.3").estimator == "topk" and not parse_recipe("full").uses_wtacrs
    assert parse_recipe("full+fused-adamw").fused_adamw and not parse_recipe("full+fused-adamw").uses_wtacrs
    assert parse_recipe("recompute").uses_wtacrs and not parse_recipe("recompute").samples


@pytest.mark.parametrize("spec, canonical", [
    ("full", "full"), ("lora", "lora"), ("checkpointing", "checkpointing"), ("full+checkpointing", "checkpointing"),
    ("recompute-attention+wtacrs@0.30+recompute", BEST_EXACT),
    ("recompute-attention+wtacrs@0.3+companions+recompute", "wtacrs@0.3+companions+recompute+recompute-attention"),
    ("companions+lora+wtacrs@0.3", "lora+wtacrs@0.3+companions"), ("full+fused-adamw", "full+fused-adamw"),
    ("crs@0.1+attention+act=int8", "crs@0.1+attention+act=int8"), ("velora+checkpointing", "velora+checkpointing"),
    ("lora+velora", "velora"),
    ("keep-gate+lora+recompute+wtacrs@0.3", "lora+wtacrs@0.3+recompute+keep-gate"),
])
def test_canonical_spec_orders_components_and_round_trips(spec, canonical):
    assert parse_recipe(spec).spec == canonical
    assert parse_recipe(canonical) == parse_recipe(spec)


def test_a_bare_sampler_takes_the_default_ratio_only_when_one_is_given():
    assert parse_recipe("wtacrs", default_ratio=0.2).ratio == 0.2
    assert parse_recipe("wtacrs@0.5", default_ratio=0.2).ratio == 0.5
    with pytest.raises(RecipeError, match="wtacrs@0.3"):
        parse_recipe("wtacrs")


@pytest.mark.parametrize("spec, message", [
    ("wtacrs@1.5", "ratio must be in"), ("wtacrs@x", "bad ratio"), ("crs@0.3+topk@0.3", "two samplers"),
    ("full+lora", "both full"), ("lora+magic", "bad component 'magic'"), ("attention", "add one"),
    ("act=fp4", "act= takes"), ("", "empty recipe"), ("velora+wtacrs@0.3", "VeLoRA and a sampler"),
    ("lora+keep-gate", "add 'recompute'"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(spec)


def test_wtacrs_config_maps_every_component():
    config = parse_recipe(BEST_EXACT + "+companions+attention+keep-gate").wtacrs_config(
        seed=3, sampling=SamplingSettings(budget="all", target_modules=("output.dense",), skip_padding=False))
    assert (config.ratio, config.estimator, config.seed, config.budget, config.skip_padding) == (
        0.3, "wta-crs", 3, "all", False)
    assert config.target_modules == ["output.dense"] and config.attention
    assert config.lean_dropout and config.lean_layernorm and config.lean_attention
    assert config.recompute_activation and config.recompute_attention and config.chunked_lm_loss and config.keep_gate
    exact = parse_recipe("lora+companions").wtacrs_config()
    assert (exact.estimator, exact.ratio, exact.recompute_activation) == ("exact", 1.0, False)


def test_prepare_builds_lora_then_samples_its_layers():
    model = parse_recipe("lora+wtacrs@0.3").prepare(tiny_bert(), lora=LoraSettings(r=4))
    sampled = [name for name, m in model.named_modules() if isinstance(m, SampledLayerMixin)]
    assert any("lora_A" in name for name in sampled) and not any("lora_B" in name for name in sampled)
    lora_a = next(m for name, m in model.named_modules() if name.endswith("lora_A.default"))
    assert lora_a.out_features == 4
    # every linear of the blocks has an adapter (all-linear), not only query and value
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_modules() if "lora_A" in name}
    assert {"query", "key", "value", "dense"} <= adapted


def test_prepare_checkpointing_is_on_the_model():
    model = parse_recipe("checkpointing").prepare(tiny_bert())
    assert model.is_activation_checkpointing
    assert not any(isinstance(m, SampledLayerMixin) for m in model.modules())
    with pytest.raises(ValueError, match="already applied"):
        wtacrs.apply(parse_recipe("wtacrs@0.3").prepare(tiny_bert()))


def test_full_recipe_leaves_the_model_untouched():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert parse_recipe("full").prepare(model) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_velora_is_lora_with_peft_velora_adapters():
    model = parse_recipe("velora").prepare(tiny_bert())
    config = model.peft_config["default"]
    assert config.velora_config is not None and config.target_modules
    batch = CASES_BY_NAME["bert"].batch()
    model(**batch).loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_A" in name)


@pytest.mark.parametrize("config", [
    hf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99),
    hf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=64, vocab_size=99),
    MODERNBERT.build().config,
], ids=["bert", "llama", "modernbert"])
def test_lora_question_answering_trains_its_head_in_full_without_an_adapter(config):
    torch.manual_seed(0)
    model = hf.AutoModelForQuestionAnswering.from_config(config)
    head_name = "classifier" if config.model_type == "modernbert" else "qa_outputs"
    model = parse_recipe("lora+wtacrs@0.3").prepare(model, task_type="QUESTION_ANS", lora=LoraSettings(r=4))
    assert not any(head_name in name and "lora_" in name for name, _ in model.named_parameters())
    head = [p for name, p in model.named_parameters() if f"{head_name}.modules_to_save" in name and p.requires_grad]
    assert len(head) == 2, "the QA head's weight and bias are not trained in full"
    ids = torch.randint(3, 99, (2, 12))
    model(input_ids=ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4])).loss.backward()
    assert all(p.grad is not None for p in head)
