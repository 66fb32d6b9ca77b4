"""PEFT LoRA, the Trainer integration, and the config flags that reach companions and attention."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

import wtacrs
from models import CASES_BY_NAME
from test_modeling import step
from wtacrs.integrations import WTACRSTrainer, add_example_ids
from wtacrs.integrations.trainer import STATE_FILE
from wtacrs.memory import SavedTensorBytes, parameter_tensors
from wtacrs.modeling import sampled_modules

BERT = CASES_BY_NAME["bert"]
LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS")


def lora_model(seed=0):
    model = get_peft_model(BERT.model(seed), LoraConfig(**LORA))
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; make the LoRA path non-trivial
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("order", ["peft_then_wtacrs", "wtacrs_then_peft"])
def test_lora_matrices_are_sampled_in_either_order(order):
    if order == "peft_then_wtacrs":
        model = wtacrs.apply(lora_model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    else:
        base = wtacrs.apply(BERT.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
        model = get_peft_model(base, LoraConfig(**LORA))
    step(model, BERT.batch(), ids=torch.arange(3))  # PEFT-added layers are picked up at the next forward
    names = [n for n, _ in sampled_modules(model)]
    assert any("lora_A" in n for n in names) and not any("lora_B" in n for n in names)  # r-dim input: excluded
    grads = step(model, BERT.batch(), ids=torch.arange(3))[1]
    assert grads and all("lora" in n or "classifier" in n for n in grads)


def test_lora_with_wtacrs_at_ratio_one_matches_plain_lora():
    plain, sampled = lora_model(), wtacrs.apply(lora_model(), wtacrs.WTACRSConfig.preset("sampler", ratio=1.0))
    logits0, grads0 = step(plain, BERT.batch())
    logits, grads = step(sampled, BERT.batch())
    assert torch.equal(logits, logits0)
    assert grads.keys() == grads0.keys()
    for name, g in grads0.items():
        assert torch.equal(grads[name], g), name


def test_frozen_base_weights_store_no_activation():
    """With LoRA, the only linear inputs saved are the (sampled) inputs of the LoRA matrices."""
    batch = BERT.batch()
    plain, sampled = lora_model(), wtacrs.apply(lora_model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    for model in (plain, sampled):
        step(model, batch, ids=torch.arange(3))
    with SavedTensorBytes(parameter_tensors(plain)) as before:
        plain(**batch)
    with SavedTensorBytes(parameter_tensors(sampled)) as after:
        with wtacrs.batch(torch.arange(3)):
            sampled(**batch)
    assert after.total < before.total


def _dataset(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, 10, (1,), generator=g))
        rows.append({"input_ids": torch.randint(3, 99, (length,), generator=g).tolist(), "labels": i % 2})
    return add_example_ids(Dataset.from_list(rows))


def _collate(features):
    width = max(len(f["input_ids"]) for f in features)
    pad = [width - len(f["input_ids"]) for f in features]
    return {
        "input_ids": torch.tensor([f["input_ids"] + [0] * p for f, p in zip(features, pad)]),
        "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * p for f, p in zip(features, pad)]),
        "labels": torch.tensor([f["labels"] for f in features]),
        "example_id": torch.tensor([f["example_id"] for f in features]),
    }


def _trainer(output_dir, epochs=2, seed=0, model=None, **arguments):
    model = model or wtacrs.apply(BERT.model(seed), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, seed=seed))
    args = TrainingArguments(
        str(output_dir), per_device_train_batch_size=6, num_train_epochs=epochs, save_steps=4, seed=seed,
        report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1000, **arguments,
    )
    return WTACRSTrainer(model=model, args=args, train_dataset=_dataset(), data_collator=_collate)


def test_trainer_with_torch_compile_trains_like_eager(tmp_path):
    """`torch_compile=True` runs each step planned at `wtacrs.batch`'s enter: the compiled model
    (aot_eager here; dropout off, compiled dropout draws from another stream) trains to eager's
    weights and fills the same cache."""
    trainers = {}
    for compiled in (False, True):
        model = BERT.model(0)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model = wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, seed=0))
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainers[compiled] = _trainer(tmp_path / str(compiled), epochs=1, model=model, save_strategy="no", **extra)
        trainers[compiled].train()
    eager, compiled = (wtacrs.sampling_state(trainers[c].model) for c in (False, True))
    assert compiled.cache.num_examples == eager.cache.num_examples == 24
    torch.testing.assert_close(compiled.cache.state_dict()["data"], eager.cache.state_dict()["data"], rtol=0, atol=1)
    for (name, p), q in zip(trainers[False].model.named_parameters(), trainers[True].model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def test_trainer_fills_cache_and_resumes_exactly(tmp_path):
    full = _trainer(tmp_path / "full")
    full.train()
    state = wtacrs.sampling_state(full.model)
    assert state.cache.num_examples == 24 and state.step == 8
    assert os.path.isfile(tmp_path / "full" / "checkpoint-4" / STATE_FILE)

    resumed = _trainer(tmp_path / "full")  # same output dir: resume from checkpoint-4
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    resumed_state = wtacrs.sampling_state(resumed.model)
    assert resumed_state.step == state.step
    assert torch.equal(resumed_state.cache.state_dict()["data"], state.cache.state_dict()["data"])
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_trainer_without_ids_falls_back_and_warns_once(tmp_path, caplog):
    trainer = _trainer(tmp_path, epochs=1)
    trainer.train_dataset = trainer.train_dataset.remove_columns("example_id")
    trainer.data_collator = lambda f: {k: v for k, v in _collate([{**x, "example_id": 0} for x in f]).items()
                                       if k != "example_id"}
    with caplog.at_level("WARNING"):
        trainer.train()
    assert sum("no example ids" in r.message for r in caplog.records) == 1
    assert wtacrs.sampling_state(trainer.model).cache is None


def test_config_flags_reach_companions_and_attention():
    config = wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, attention=True, lean_dropout=True, lean_layernorm=True,
                                 activation_compression="bf16")
    reference, model = BERT.model(), BERT.model()
    classes = {n: type(m) for n, m in model.named_modules()}
    wtacrs.apply(model, config)
    state = wtacrs.sampling_state(model)
    assert any("LayerNorm" in n for n in state.companions) and any("dropout" in n for n in state.companions)
    assert model.config._attn_implementation == "wtacrs"
    _, grads = step(model, BERT.batch(), ids=torch.arange(3))
    assert all(torch.isfinite(g).all() for g in grads.values())
    model.eval(), reference.eval()
    with torch.no_grad():  # eval forward is exact (dropout off); train forward draws its own dropout masks
        torch.testing.assert_close(model(**BERT.batch()).logits, reference(**BERT.batch()).logits, rtol=1e-5, atol=1e-6)
    wtacrs.remove(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.config._attn_implementation != "wtacrs"


def test_activation_compression_must_be_known():
    with pytest.raises(wtacrs.WTACRSConfigError, match="activation_compression"):
        wtacrs.WTACRSConfig.preset("sampler", activation_compression="fp8")


def test_failed_apply_leaves_the_model_untouched():
    model = CASES_BY_NAME["mpnet"].model()  # MPNet's attention does not use the registry
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="AttentionInterface"):
        wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", attention=True, lean_dropout=True))
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not hasattr(model, "wtacrs_state")


def test_trainer_batches_carry_a_host_mask_the_step_hands_to_wtacrs_batch(monkeypatch, tmp_path):
    """The collated mask and example ids travel as numpy arrays (a GPU loader moves only tensors),
    and the training step passes them to `wtacrs.batch`, so counting live rows and reading the
    cache need no copy back."""
    import wtacrs.integrations.trainer as trainer_module

    seen, seen_ids = [], []
    real_batch = trainer_module.batch
    monkeypatch.setattr(trainer_module, "batch",
                        lambda ids, mask=None, **first_visit: seen.append(mask) or seen_ids.append(ids)
                        or real_batch(ids, mask, **first_visit))
    trainer = _trainer(tmp_path, epochs=1)
    collated = trainer.data_collator([trainer.train_dataset[i] for i in (0, 1)])
    assert collated[trainer_module.HOST_MASK_KEY].shape == tuple(collated["attention_mask"].shape)
    assert isinstance(collated["example_id"], np.ndarray)  # ids stay on the host too: no copy back per step
    trainer.train()
    assert seen and all(m is not None and m.device.type == "cpu" for m in seen)
    assert all(isinstance(i, torch.Tensor) and i.dtype == torch.int64 for i in seen_ids)


def test_a_padding_gradient_error_is_raised_before_a_checkpoint_is_written(tmp_path):
    """A step whose padding rows got gradient is found when its records are folded: the
    checkpoint save folds them first, so nothing of that checkpoint reaches the disk."""
    from wtacrs.sampling.recorder import PaddingGradientError
    from wtacrs.sampling.rows import ForwardRows

    trainer = _trainer(tmp_path, epochs=1)
    state = wtacrs.sampling_state(trainer.model)
    mask = torch.tensor([[True, False]])
    state.recorder.record(0, ForwardRows("main", mask, mask, None, 1), torch.tensor([[1.0, 0.5]]))  # padding got some
    state.recorder.ship()
    with pytest.raises(PaddingGradientError):
        trainer._save_checkpoint(trainer.model, None)
    assert not list(tmp_path.glob("checkpoint-*"))
