"""apply / remove / summary on every covered architecture, the config, and shared-input sampling."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import transformers as hf

import wtacrs
from models import CASES, CASES_BY_NAME, SMALL
from stats import unbiased_violations
from wtacrs.memory import SavedTensorBytes, parameter_tensors
from wtacrs.modeling import find_target_modules, sampled_modules


def step(model, batch, seed=0, ids=None):
    """One forward/backward with a fixed dropout seed; returns (output logits, grads by name).
    Models without a `logits` output (a QA head's are start/end) return None for them."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if ids is None:
        out = model(**batch)
        out.loss.backward()
    else:
        with wtacrs.batch(ids):
            out = model(**batch)
            out.loss.backward()
    logits = out.get("logits")
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return None if logits is None else logits.detach(), grads


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_identical_and_only_sampled_weight_grads_change(case):
    reference, model = case.model(), case.model()
    batch = case.batch()
    wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    sampled = {n + ".weight" for n, _ in sampled_modules(model)}
    assert sampled, "nothing sampled"
    logits0, grads0 = step(reference, batch)
    logits, grads = step(model, batch, ids=torch.arange(3))
    assert torch.equal(logits, logits0), "forward changed"
    assert grads.keys() == grads0.keys()
    changed = []
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        if name in sampled:
            changed.append(not torch.allclose(g, grads0[name], rtol=1e-4, atol=1e-6))
        else:  # dX and biases are exact, so every other gradient is too (up to summation order)
            torch.testing.assert_close(g, grads0[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(changed), "no sampled weight gradient differs: was anything sampled?"
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ratio_one_matches_exactly_and_remove_restores(case):
    reference, model = case.model(), case.model()
    batch = case.batch()
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=1.0))
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    logits0, grads0 = step(reference, batch)
    logits, grads = step(model, batch)
    assert torch.equal(logits, logits0)
    for name, g in grads0.items():
        assert torch.equal(grads[name], g), name
    assert wtacrs.remove(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    assert not hasattr(model, "wtacrs_state")


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_budget_all_covering_the_live_rows_is_exact(name):
    """Ratio 0.8 of all 30 rows (padding included) covers the 24 live rows: the paper's counting
    then keeps every real token and every gradient is the exact one; of the live rows it samples."""
    case = CASES_BY_NAME[name]
    reference, batch = case.model(), case.batch()
    _, exact = step(reference, batch)
    for budget, equal in (("all", True), ("live", False)):
        model = case.model()
        wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.8, budget=budget))
        _, grads = step(model, batch, ids=torch.arange(3))
        same = [torch.allclose(grads[n], g, rtol=1e-4, atol=1e-6) for n, g in exact.items()]
        assert all(same) if equal else not all(same), budget


def test_gradient_norm_cache_fills_and_is_used():
    case = CASES_BY_NAME["bert"]
    model = wtacrs.apply(case.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    batch = case.batch()
    state = wtacrs.sampling_state(model)
    step(model, batch, ids=torch.tensor([10, 11, 12]))
    assert state.cache is not None and state.cache.num_examples == 3
    site = 0
    norms = state.cache.lookup(site, torch.tensor([10, 11, 12]), batch["attention_mask"].bool())
    assert torch.isfinite(norms[batch["attention_mask"].bool()]).all()
    assert torch.isnan(norms[~batch["attention_mask"].bool()]).all()
    unseen = state.cache.lookup(site, torch.tensor([13]), torch.ones(1, 10, dtype=torch.bool))  # position prior
    longest = int(batch["attention_mask"].sum(1).max())
    assert torch.isfinite(unseen[0, :longest]).all() and unseen[0, longest:].isnan().all()


def test_query_key_value_share_one_sample():
    case = CASES_BY_NAME["bert"]
    model = wtacrs.apply(case.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    step(model, case.batch(), ids=torch.arange(3))
    leaders = wtacrs.sampling_state(model).draw_leaders()  # slot -> the slot whose draw it shares
    assert leaders == {0: 0, 1: 0, 2: 0, 6: 6, 7: 6, 8: 6}  # q, k, v of each of the two layers
    assert "shares input" in wtacrs.summary(model)


def test_same_seed_same_step_same_gradients():
    case = CASES_BY_NAME["bert"]
    a = wtacrs.apply(case.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, seed=4))
    b = wtacrs.apply(case.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, seed=4))
    c = wtacrs.apply(case.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, seed=5))
    ga, gb, gc = (step(m, case.batch(), ids=torch.arange(3))[1] for m in (a, b, c))
    name = "bert.encoder.layer.0.output.dense.weight"
    assert torch.equal(ga[name], gb[name]) and not torch.equal(ga[name], gc[name])


@pytest.mark.parametrize("case", [CASES_BY_NAME["bert"], CASES_BY_NAME["llama"]], ids=lambda c: c.name)
def test_gradient_checkpointing_composes(case):
    plain = wtacrs.apply(case.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    ckpt = wtacrs.apply(case.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for _ in range(2):  # the second step uses the cache
        g0 = step(plain, case.batch(), ids=torch.arange(3))[1]
        g1 = step(ckpt, case.batch(), ids=torch.arange(3))[1]
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_target_modules_forms_and_errors():
    case = CASES_BY_NAME["bert"]
    model = case.model()
    suffix = find_target_modules(model, wtacrs.WTACRSConfig.preset("sampler", target_modules=["query", "value"]))
    regex = find_target_modules(model, wtacrs.WTACRSConfig.preset("sampler", target_modules=r".*\.(query|value)"))
    call = find_target_modules(model, wtacrs.WTACRSConfig.preset("sampler", target_modules=lambda m, n: n.endswith(("query", "value"))))
    assert [n for n, _ in suffix] == [n for n, _ in regex] == [n for n, _ in call]
    assert len(suffix) == 4
    default = [n for n, _ in find_target_modules(model, wtacrs.WTACRSConfig.preset("sampler"))]
    assert len(default) == 12 and not any("classifier" in n or "pooler" in n for n in default)
    with pytest.raises(wtacrs.NoMatchingModulesError, match="nonexistent"):
        wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", target_modules=["nonexistent"]))
    wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler"))
    with pytest.raises(ValueError, match="already applied"):
        wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler"))
    wtacrs.remove(model)
    with pytest.raises(ValueError, match="not applied"):
        wtacrs.remove(model)


def test_uncovered_weights_warning_names_only_modules_wtacrs_cannot_sample(caplog):
    """LoRA's rank-r lora_B is excluded on purpose, and a layer outside target_modules is a
    choice: neither warns. A block weight outside any nn.Linear (an MoE's expert tensor) does."""
    peft = pytest.importorskip("peft")
    case = CASES_BY_NAME["bert"]
    lora = peft.get_peft_model(case.model(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear"))
    with caplog.at_level("WARNING", logger="wtacrs.modeling"):
        wtacrs.apply(lora)
        wtacrs.apply(case.model(), wtacrs.WTACRSConfig.preset("sampler", target_modules=["query"]))
    assert "cover" not in caplog.text
    model = case.model()
    for layer in model.bert.encoder.layer:
        layer.experts = torch.nn.Module()
        layer.experts.weight = torch.nn.Parameter(torch.zeros(8, 32, 64))
    with caplog.at_level("WARNING", logger="wtacrs.modeling"):
        wtacrs.apply(model)
    assert "cannot sample (e.g. bert.encoder.layer.0.experts)" in caplog.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ratio=0), "ratio"),
        (dict(ratio=2.0), "ratio"),
        (dict(estimator="wtacrs"), "estimator"),
        (dict(grad_norm="yes"), "grad_norm"),
        (dict(attention="yes"), "attention"),
        (dict(seed=1.5), "seed"),
        (dict(target_modules="(unclosed"), "regex"),
        (dict(target_modules=[1, 2]), "target_modules"),
        (dict(exclude_modules=lambda m, n: True), "exclude_modules"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(wtacrs.WTACRSConfigError, match=match):
        wtacrs.WTACRSConfig.preset("sampler", **kwargs)


def test_config_json_round_trip(tmp_path):
    config = wtacrs.WTACRSConfig.preset("sampler", ratio=0.1, estimator="crs", target_modules=["query"], seed=3)
    path = config.save_pretrained(tmp_path)
    assert json.loads(path.read_text())["ratio"] == 0.1
    assert wtacrs.WTACRSConfig.from_pretrained(tmp_path) == config
    path.write_text(json.dumps({**config.to_dict(), "ratoi": 0.2}))
    with pytest.raises(wtacrs.WTACRSConfigError, match="unknown WTACRSConfig field.*ratoi"):
        wtacrs.WTACRSConfig.from_pretrained(tmp_path)
    path.write_text("{not json")
    with pytest.raises(wtacrs.WTACRSConfigError, match="not valid JSON"):
        wtacrs.WTACRSConfig.from_pretrained(tmp_path)
    with pytest.raises(wtacrs.WTACRSConfigError, match="callable"):
        wtacrs.WTACRSConfig.preset("sampler", target_modules=lambda m, n: True).save_pretrained(tmp_path)


def test_batch_rejects_bad_ids():
    with pytest.raises(ValueError, match="1-D"):
        with wtacrs.batch(torch.zeros(2, 2, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="integers"):
        with wtacrs.batch(torch.tensor([0.5, 1.0])):
            pass
    with pytest.raises(ValueError, match="non-negative"):
        with wtacrs.batch([-1, 2]):
            pass


def _linear_input_bytes(model, batch):
    """Bytes of the distinct inputs of the sampled layers in one forward (q/k/v share one)."""
    seen = {}  # id -> tensor: holding the tensors keeps ids from being reused

    def record(module, args):
        seen[id(args[0])] = args[0]

    hooks = [m.register_forward_pre_hook(record) for _, m in find_target_modules(model, wtacrs.WTACRSConfig.preset("sampler"))]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    return sum(t.numel() * t.element_size() for t in seen.values())


def _saved_bytes(model, batch):
    with SavedTensorBytes(exclude=parameter_tensors(model)) as saved:
        model(**batch)
    return saved.total


def bert_base_memory(batch_size, layers):
    """Saved-for-backward bytes of BERT-base (random weights, seq 128, fp32) with and without WTA-CRS@0.3."""
    config = __import__("transformers").BertConfig(num_hidden_layers=layers, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = __import__("transformers").BertForSequenceClassification(config).train()
    batch = {"input_ids": torch.randint(0, 30000, (batch_size, 128)),
             "labels": torch.zeros(batch_size, dtype=torch.long)}
    linear_inputs = _linear_input_bytes(model, batch)
    full = _saved_bytes(model, batch)
    wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    sampled = _saved_bytes(model, batch)
    return linear_inputs, full, sampled


@pytest.mark.parametrize("batch_size, layers", [(2, 2), pytest.param(32, 12, marks=pytest.mark.slow)])
def test_bert_base_sampling_removes_most_linear_input_bytes(batch_size, layers, capsys):
    """Issue acceptance: >= 0.66 of the linear-input bytes disappear (q/k/v share one sample and
    no sampled input is kept alive by another op). Per-layer ratios do not depend on depth or
    batch, so the default run uses 2 layers and batch 2; `-m slow` runs the full 12 x 32."""
    linear_inputs, full, sampled = bert_base_memory(batch_size, layers)
    removed = (full - sampled) / linear_inputs
    with capsys.disabled():
        print(f"\n  BERT-base width, {layers} layers, batch {batch_size}: "
              f"saved {full / 2**20:.0f} MiB -> {sampled / 2**20:.0f} MiB; "
              f"linear inputs {linear_inputs / 2**20:.0f} MiB, {removed:.3f} of them removed")
    assert removed >= 0.66


def test_checkpoint_recompute_on_another_thread_samples_the_same_rows():
    """CUDA autograd runs backward (and so checkpoint recomputation) on a device thread, where
    the `wtacrs.batch` context is not set; the recompute must still score rows as forward did."""
    case = CASES_BY_NAME["bert"]
    model = wtacrs.apply(case.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    errors = []
    for _ in range(2):  # the second step scores with cached norms
        with wtacrs.batch(torch.arange(3)):
            loss = model(**case.batch()).loss
            thread = threading.Thread(target=lambda: _backward_into(loss, errors))
            thread.start()
            thread.join(timeout=60)
    assert not errors, errors[0]


def _backward_into(loss, errors):
    try:
        loss.backward()
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_position_prior_can_be_switched_off():
    case = CASES_BY_NAME["bert"]
    batch = case.batch()
    for prior in (True, False):
        model = wtacrs.apply(case.model(), wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, position_prior=prior))
        step(model, batch, ids=torch.tensor([10, 11, 12]))
        unseen = wtacrs.sampling_state(model).cache.lookup(0, torch.tensor([13]), torch.ones(1, 2, dtype=torch.bool))
        assert bool(torch.isfinite(unseen).all()) is prior


def _qa_bert_and_batch():
    """A tiny extractive-QA BERT and a padded batch: its start/end softmax spans every position,
    padding included, so padding rows get a non-zero output gradient in most layers."""
    torch.manual_seed(0)
    model = hf.BertForQuestionAnswering(hf.BertConfig(**{**SMALL, "hidden_size": 32, "pad_token_id": 0})).train()
    batch = CASES_BY_NAME["bert"].batch()
    del batch["labels"]
    batch.update(start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([4, 5, 5]))
    return model, batch


def test_padding_rows_with_a_gradient_raise_when_the_step_is_folded():
    """The step ships its flags without waiting for the device; the next forward (or a look at
    the cache, or a checkpoint's state_dict) folds them in and raises."""
    model, batch = _qa_bert_and_batch()
    wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    with wtacrs.batch(torch.arange(3), batch["attention_mask"]):
        model(**batch).loss.backward()
    with pytest.raises(wtacrs.PaddingGradientError, match=r"skip_padding=False.*") as raised:
        model(**batch)
    assert "bert.encoder.layer." in str(raised.value)
    model(**batch).loss.backward()  # without wtacrs.batch: checked all the same
    with pytest.raises(wtacrs.PaddingGradientError):
        wtacrs.sampling_state(model).state_dict()


def test_sampling_padding_rows_keeps_a_padding_reading_loss_unbiased():
    """skip_padding=False: padded rows are drawn like real ones, so dW stays unbiased for a loss
    that reads padded positions (a QA head), where skipping them would raise."""
    reference, batch = _qa_bert_and_batch()
    _, exact = step(reference, batch)
    model, _ = _qa_bert_and_batch()
    wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, skip_padding=False, grad_norm="none"))
    names = [n + ".weight" for n, _ in sampled_modules(model)]
    draws = [step(model, batch)[1] for _ in range(300)]  # each step of the sampled model draws anew
    for name in names:
        samples = torch.stack([g[name] for g in draws])
        assert not samples.std(0).eq(0).all(), f"{name}: nothing sampled"
        assert not unbiased_violations(samples, exact[name]).any(), name


def test_layers_drawing_in_backward_keep_no_cached_norms_and_still_check_padding():
    """With both recomputes every sampled BERT layer draws in backward, scored with the true
    ‖dY‖: no slot reads cached norms, so none are kept (no host cache grows), while the padding
    check still sees every layer's norms."""
    config = wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, lean_attention=True, recompute_activation=True, recompute_attention=True)
    case = CASES_BY_NAME["bert"]
    model = wtacrs.apply(case.model(), config)
    state = wtacrs.sampling_state(model)
    for _ in range(2):
        step(model, case.batch(), ids=torch.tensor([10, 11, 12]))
    assert state.drawn_in_backward == set(range(state.num_layers)) and not state.drawn_in_forward
    assert state.cache is None
    model, batch = _qa_bert_and_batch()
    wtacrs.apply(model, config)
    with wtacrs.batch(torch.arange(3), batch["attention_mask"]):
        model(**batch).loss.backward()
    with pytest.raises(wtacrs.PaddingGradientError):
        wtacrs.sampling_state(model).state_dict()
