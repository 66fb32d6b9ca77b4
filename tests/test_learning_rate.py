"""`wtacrs.learning_rate`: the closed-form first-visit variance against the sampled path's own
draws, and the learning-rate scales reaching the optimizer."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

import wtacrs
from models import CASES_BY_NAME
from wtacrs.integrations import WTACRSTrainer
from wtacrs.learning_rate import first_visit_variances, lr_scales, scale_param_groups

BERT = CASES_BY_NAME["bert"]


def _model(config: wtacrs.WTACRSConfig | None = None, seed: int = 0, case: str = "bert"):
    """The tiny model of `case` (BERT by default) with dropout off (every draw then
    differentiates the same function)."""
    model = CASES_BY_NAME[case].model(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model if config is None else wtacrs.apply(model, config)


def _weight_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(".weight") and p.grad is not None}


@pytest.mark.parametrize("case, recompute, keep_gate", [("bert", False, False), ("bert", True, False),
                                                        ("llama", True, True)])
@pytest.mark.parametrize("estimator", ["wta-crs", "crs"])
def test_measured_variance_is_the_sampled_paths_own(estimator, case, recompute, keep_gate):
    """Mean of ‖dŴ − dW‖²/‖dW‖² over 200 draws of the real sampled step (activation-norm scores,
    padding never drawn, q/k/v sharing one draw; with both recomputes, every layer drawing in
    backward with its true ‖dY_i‖, LLaMA's gate projection beside the checkpoint with
    `keep_gate`; the tiny LLaMA passes its attention a key/value cache, so its attention is not
    recomputed and q/k/v/o draw in forward) against the closed form, per layer, within 4.5
    standard errors of the mean (from the draws' own spread)."""
    batch = CASES_BY_NAME[case].batch()
    exact = _weight_grads(_model(case=case), batch)
    model = _model(wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, estimator=estimator, grad_norm="none", keep_gate=keep_gate,
                                       recompute_activation=recompute, recompute_attention=recompute), case=case)
    predicted = first_visit_variances(model, batch)
    draws = 200
    errors = {name: [] for name in predicted}
    for _ in range(draws):  # each step draws anew (the step counter keys the draws)
        with wtacrs.batch(torch.arange(3), batch["attention_mask"]):
            grads = _weight_grads(model, batch)
        for name in predicted:
            reference = exact[name + ".weight"]
            errors[name].append(float((grads[name + ".weight"] - reference).square().sum() / reference.square().sum()))
    assert len(predicted) == {"bert": 12, "llama": 14}[case]
    for name, v in predicted.items():
        observed = torch.tensor(errors[name])
        standard_error = float(observed.std() / draws**0.5)
        rounding = 1e-9  # a layer whose draws keep every row with a gradient is exact up to float32 sums
        assert abs(float(observed.mean()) - v) < 4.5 * standard_error + rounding, (name, v, float(observed.mean()))


def test_chunks_change_nothing_and_the_model_is_left_as_found():
    model = _model(wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    batch = BERT.batch()
    rng = torch.get_rng_state()
    one, whole = first_visit_variances(model, batch, chunk_examples=1), first_visit_variances(model, batch, 100)
    assert one.keys() == whole.keys()
    for name in one:
        assert one[name] == pytest.approx(whole[name], rel=1e-5)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout, no draw: the run's randomness is untouched
    assert wtacrs.sampling_state(model).step == 0


def test_a_larger_ratio_has_less_noise_and_ratio_one_none():
    batch = BERT.batch()
    low, high = (first_visit_variances(_model(wtacrs.WTACRSConfig.preset("sampler", ratio=r)), batch) for r in (0.2, 0.6))
    assert all(high[name] < low[name] for name in low)
    assert set(first_visit_variances(_model(wtacrs.WTACRSConfig.preset("sampler", ratio=1.0)), batch).values()) == {0.0}


def test_unmeasured_estimators_are_refused():
    with pytest.raises(ValueError, match="wta-crs and crs estimators, not 'topk'"):
        first_visit_variances(_model(wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, estimator="topk")), BERT.batch())


def test_scaled_groups_reach_the_trainers_optimizer_and_scheduler(tmp_path):
    model = _model(wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    scales = lr_scales({"bert.encoder.layer.0.intermediate.dense": 3.0, "bert.encoder.layer.1.output.dense": 0.0})
    assert scales == {"bert.encoder.layer.0.intermediate.dense": 2.0, "bert.encoder.layer.1.output.dense": 1.0}
    args = TrainingArguments(str(tmp_path), learning_rate=1e-3, weight_decay=0.01, report_to=[], use_cpu=True)
    trainer = WTACRSTrainer(model=model, args=args, lr_scales=scales)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    rate = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    weights = dict(model.named_parameters())
    assert rate[id(weights["bert.encoder.layer.0.intermediate.dense.weight"])] == pytest.approx(2e-3)
    assert rate[id(weights["bert.encoder.layer.1.output.dense.weight"])] == pytest.approx(1e-3)
    assert rate[id(weights["bert.encoder.layer.0.intermediate.dense.bias"])] == pytest.approx(1e-3)
    assert len(rate) == len(weights)  # every parameter in exactly one group
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [g["lr"] for g in trainer.optimizer.param_groups]


def test_scales_naming_a_missing_module_are_refused():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="modules the model does not have: nope"):
        scale_param_groups(optimizer, model, {"nope": 2.0})


def test_lora_a_takes_the_noise_of_its_base_product():
    """PEFT starts B at zero (A has no gradient yet): A's v is that of the frozen product it adapts,
    drawn with the same rows and first-visit scores, so equal to the plain layer's."""
    from peft import LoraConfig, get_peft_model

    batch = BERT.batch()
    plain = first_visit_variances(_model(wtacrs.WTACRSConfig.preset("sampler", ratio=0.3)), batch)
    lora = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                               lora_dropout=0.0, task_type="SEQ_CLS"))
    measured = first_visit_variances(wtacrs.apply(lora, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3)), batch)
    a_matrices = {name: v for name, v in measured.items() if ".lora_A." in name}
    assert len(a_matrices) == 4
    for name, v in a_matrices.items():
        base = name.removeprefix("base_model.model.").split(".lora_A.")[0]
        assert v == pytest.approx(plain[base], rel=1e-5), name


def test_a_layer_without_gradient_keeps_the_base_rate():
    """No gradient on the measured batch: v is unknown (NaN) and the scale 1; the optimizer never
    sees a NaN rate."""
    import math

    model = _model(wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    batch = {**BERT.batch(), "labels": torch.zeros(3, dtype=torch.long)}
    for p in model.classifier.parameters():
        torch.nn.init.zeros_(p)  # no gradient reaches the encoder
    variances = first_visit_variances(model, batch)
    assert all(math.isnan(v) for v in variances.values())
    assert set(lr_scales(variances).values()) == {1.0}
    with pytest.raises(ValueError, match="positive and finite: bert.encoder.layer.0.output.dense has nan"):
        scale_param_groups(torch.optim.AdamW(model.parameters()), model,
                           {"bert.encoder.layer.0.output.dense": float("nan")})
