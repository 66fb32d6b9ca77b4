"""One sampling path: each training forward plans its own frame, and its backward (checkpoint
recomputes included) reads that frame's rows whatever else ran inside the `wtacrs.batch` block.

At ratio 0.99 on these tiny batches k covers every live row, so the sampled weight gradients must
equal the plain model's: any row read from another forward's layout breaks that.
"""

from __future__ import annotations

import pytest
import torch

import wtacrs
from models import CASES_BY_NAME
from wtacrs.sampling.state import MaskMismatchError

BERT = CASES_BY_NAME["bert"]


def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _other_mask(batch: dict) -> dict:
    """The same shape, other real-token counts."""
    mask = batch["attention_mask"].clone()
    mask[0, 5:] = 0
    mask[1, :] = 1
    return {**batch, "attention_mask": mask}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _plain_grads(batch: dict) -> dict[str, torch.Tensor]:
    model = _no_dropout(BERT.model())
    model(**batch).loss.backward()
    return _grads(model)


def _sampled(recipe: str) -> torch.nn.Module:
    model = _no_dropout(BERT.model())
    if recipe == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.99))
    return wtacrs.apply(model, wtacrs.WTACRSConfig(ratio=0.99))  # the recommended recipe: both recomputes


def _assert_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("recipe", ["recompute", "checkpointing"])
def test_an_eval_forward_inside_the_block_leaves_the_training_rows_alone(recipe):
    batch = BERT.batch()
    model = _sampled(recipe)
    with wtacrs.batch(torch.arange(3), batch["attention_mask"]):
        loss = model(**batch).loss
        with torch.no_grad():
            model(**_other_mask(batch))  # an eval forward of another batch of the same shape
        model.eval()
        model(**{k: v[:2] for k, v in batch.items()})  # eval mode, another shape
        model.train()
        loss.backward()
    _assert_close(_grads(model), _plain_grads(batch))


@pytest.mark.parametrize("recipe", ["recompute", "checkpointing"])
def test_two_training_forwards_in_one_block_each_backward_reads_its_own_rows(recipe):
    batch = BERT.batch()
    model = _sampled(recipe)
    state = wtacrs.sampling_state(model)
    with wtacrs.batch(torch.arange(3), batch["attention_mask"]):
        first = model(**batch).loss
        second = model(**batch).loss  # a second frame of its own
        (first + second).backward()
    assert state.step == 2
    expected = {name: 2 * grad for name, grad in _plain_grads(batch).items()}
    _assert_close(_grads(model), expected)


@pytest.mark.parametrize("recipe", ["recompute", "checkpointing"])
def test_forwards_outside_a_block_backward_later_read_their_own_rows(recipe):
    """Without `wtacrs.batch` each training forward plans itself from its own mask; a second
    forward on another mask before the first one's backward leaves the first one's rows alone."""
    batch, other = BERT.batch(), _other_mask(BERT.batch())
    model = _sampled(recipe)
    first = model(**batch).loss
    second = model(**other).loss
    (first + second).backward()
    reference = _no_dropout(BERT.model())
    (reference(**batch).loss + reference(**other).loss).backward()
    _assert_close(_grads(model), _grads(reference))


def test_a_mask_that_disagrees_with_the_blocks_is_an_error():
    batch = BERT.batch()
    model = _sampled("recompute")
    with pytest.raises(MaskMismatchError, match="differs"):
        with wtacrs.batch(torch.arange(3), _other_mask(batch)["attention_mask"]):
            model(**batch)
    with pytest.raises(MaskMismatchError, match="shape"):
        with wtacrs.batch(torch.arange(3), batch["attention_mask"]):
            model(**{k: v[:, :6] if v.dim() == 2 else v for k, v in batch.items()})
    with pytest.raises(MaskMismatchError, match="got none"):
        with wtacrs.batch(torch.arange(3), batch["attention_mask"]):
            model(**{k: v for k, v in batch.items() if k != "attention_mask"})


def test_ids_are_optional_and_checked_against_the_mask():
    batch = BERT.batch()
    model = _sampled("recompute")
    with wtacrs.batch(attention_mask=batch["attention_mask"]):
        model(**batch).loss.backward()
    assert wtacrs.sampling_state(model).step == 1
    with pytest.raises(ValueError, match="2 example ids for an attention_mask of 3 examples"):
        with wtacrs.batch(torch.arange(2), batch["attention_mask"]):
            pass


def test_the_default_config_is_the_recommended_recipe_and_a_preset_is_the_bare_sampler():
    default = wtacrs.WTACRSConfig()
    assert default.recompute_activation and default.recompute_attention and default.backward_draws
    assert default.ratio == 0.3
    sampler = wtacrs.WTACRSConfig.preset("sampler", ratio=0.5)
    assert not (sampler.recompute_activation or sampler.recompute_attention or sampler.lean_layernorm)
    assert sampler.ratio == 0.5
    with pytest.raises(wtacrs.WTACRSConfigError, match="unknown preset"):
        wtacrs.WTACRSConfig.preset("fastest")
    # the exact companions are decided per family: on for a decoder-only LM, off for an encoder
    llama = wtacrs.apply(CASES_BY_NAME["llama"].model())
    bert = wtacrs.apply(BERT.model())
    assert wtacrs.sampling_state(llama).config.lean_layernorm is True
    assert wtacrs.sampling_state(llama).config.chunked_lm_loss is True
    assert wtacrs.sampling_state(bert).config.lean_layernorm is False


def test_the_recommended_recipe_needs_no_ids_and_grows_no_cache():
    """Every sampled BERT layer draws in backward with its true ‖dY‖: no cache to key, so a plain
    loop without `wtacrs.batch` loses nothing."""
    model = wtacrs.apply(_no_dropout(BERT.model()))
    for _ in range(2):
        model(**BERT.batch()).loss.backward()
    state = wtacrs.sampling_state(model)
    assert state.drawn_in_backward == set(range(state.num_layers)) and not state.drawn_in_forward
    assert state.cache is None and state.step == 2


def test_apply_says_what_share_of_a_mixture_of_experts_it_covers(caplog):
    """Transformers keeps Qwen3-MoE's experts as 3-D parameters, not nn.Linear: apply samples the
    attention projections only and says which share of the blocks' weight matrices that is."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2, head_dim=8, max_position_embeddings=64)
    with caplog.at_level("WARNING", logger="wtacrs.modeling"):
        wtacrs.apply(Qwen3MoeForCausalLM(config))
    message = next(r.getMessage() for r in caplog.records if "cover" in r.getMessage())
    assert "cover 33%" in message and "model.layers.0.mlp.experts" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="wtacrs.modeling"):
        wtacrs.apply(BERT.model())  # every block matrix is a linear layer: nothing to say
    assert not any("cover" in r.getMessage() for r in caplog.records)


def test_summary_counts_only_layers_whose_weight_is_trained():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(BERT.model(), LoraConfig(r=4, target_modules=["query", "value"]))
    wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    first = wtacrs.summary(model).splitlines()[0]
    trained = [n for n, m in wtacrs.modeling.sampled_modules(model) if m.weight.requires_grad]
    assert trained and all("lora_A" in n for n in trained)
    assert first.startswith(f"wtacrs: {len(trained)} sampled layers") and "frozen layers" in first


def test_remove_between_forward_and_backward_is_a_clear_error():
    """The recomputes run the sampled sub-blocks again in backward: removing wtacrs before it
    would make torch's checkpoint fail deep inside backward."""
    batch = BERT.batch()
    model = _sampled("recompute")
    loss = model(**batch).loss
    with pytest.raises(RuntimeError, match="has not run its backward yet"):
        wtacrs.remove(model)
    loss.backward()
    wtacrs.remove(model)
    assert not hasattr(model, "wtacrs_state")
    model = _sampled("recompute")
    model(**batch)  # outputs dropped: nothing awaits backward
    wtacrs.remove(model)


def test_ids_of_another_length_than_the_forwards_batch_are_an_error():
    batch = BERT.batch()
    model = _sampled("recompute")
    with pytest.raises(ValueError, match="4 example ids, but the model's forward got a batch of 3"):
        with wtacrs.batch(torch.arange(4)):
            model(**batch)


def test_the_default_recipe_recomputes_a_decoders_attention_even_with_use_cache_on():
    """A decoder's config asks for a key/value cache by default, which would stop the attention
    recompute (it would append to the cache twice): training forwards run without one."""
    model = CASES_BY_NAME["llama"].model()
    model.config.use_cache = True
    wtacrs.apply(model)
    model(**CASES_BY_NAME["llama"].batch()).loss.backward()
    effects = wtacrs.modeling.companion_effects(model)
    assert effects["recompute_attention"].status == "took effect"


def test_batch_refuses_tensors_on_a_device_rather_than_waiting_for_them():
    """Copying a device tensor back would make the host wait at every step: the mask and the
    ids must come from the host ("meta" stands for an accelerator here). Duplicate ids are named
    at the block's enter."""
    mask = torch.ones(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="attention_mask on the host"):
        with wtacrs.batch(attention_mask=mask.to("meta")):
            pass
    with pytest.raises(ValueError, match="example_ids must be on the host"):
        with wtacrs.batch(torch.arange(2, device="meta"), mask):
            pass
    with pytest.raises(ValueError, match="example id.s. 7 appear more than once"):
        with wtacrs.batch(torch.tensor([7, 7]), mask):
            pass


def _saved_bytes(model: torch.nn.Module, batch: dict) -> int:
    from wtacrs.memory import SavedTensorBytes

    with wtacrs.batch(torch.arange(len(batch["input_ids"])), batch["attention_mask"]):
        model(**batch).loss.backward()  # a step first: which layers share an input, where each draws
        with SavedTensorBytes(exclude=model.parameters()) as saved:
            loss = model(**batch).loss
        loss.backward()
    return saved.total


@pytest.mark.parametrize("recipe", ["sampler", "lora+sampler", "recommended"])
def test_summarys_predicted_saving_is_the_measured_one(recipe):
    """The bytes `summary` says the sampled layers' inputs save, against the bytes autograd keeps
    for backward with the same model and companions unsampled (ratio 1), within 10%."""
    from peft import LoraConfig, get_peft_model

    batch = {**BERT.batch(), "attention_mask": torch.ones_like(BERT.batch()["attention_mask"])}
    tokens = batch["input_ids"].numel()

    def sampled(ratio: float) -> torch.nn.Module:
        model = _no_dropout(BERT.model())
        if recipe.startswith("lora"):
            model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value", "dense"]))
        config = wtacrs.WTACRSConfig(ratio=ratio) if recipe == "recommended" else \
            wtacrs.WTACRSConfig.preset("sampler", ratio=ratio)
        return wtacrs.apply(model, config)

    model = sampled(0.3)
    measured = _saved_bytes(sampled(1.0), batch) - _saved_bytes(model, batch)
    unsampled, kept = wtacrs.modeling.saved_input_bytes_per_token(model)
    predicted = tokens * (unsampled - kept)
    assert measured > 0 and predicted == pytest.approx(measured, rel=0.1)
    assert f"{unsampled - kept:.0f} saved" in wtacrs.summary(model)
