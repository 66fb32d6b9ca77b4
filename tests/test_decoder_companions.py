"""The decoder companions on tiny random LLaMA causal LMs: lean RMSNorm, the gated MLP's
recompute with the down projection's row recipe, the attention sub-block's recompute, and the
chunked LM loss. Each must give the plain model's gradients and lower the live peak."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wtacrs
from wtacrs.companions import apply_companions, chunked_lm_loss, remove_companions, rms_norm_from_output
from wtacrs.companions.layernorm import is_llama_rms_norm
from wtacrs.companions.lm_loss import has_chunkable_lm_loss
from wtacrs.companions.recompute import is_gated_mlp
from wtacrs.memory import AllocatorPeak, SavedTensorBytes, parameter_tensors

transformers = pytest.importorskip("transformers")
llama = transformers.models.llama.modeling_llama

B, T, H, I, V, LAYERS = 2, 48, 64, 256, 2048, 2
ALL = dict(lean_layernorm=True, lean_attention=True, recompute_activation=True, recompute_attention=True,
           chunked_lm_loss=True)


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, use_cache=False,
        tie_word_embeddings=True, **overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).train()
    with torch.no_grad():  # RMSNorm weights start at 1: make the tests see γ
        for module in model.modules():
            if isinstance(module, llama.LlamaRMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model


def lm_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[1, T - 10:] = 0  # right padding in the second row
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Gradients of one step (parameter order) and the live peak above weights and batch."""
    torch.manual_seed(1)  # the sampling draws, identical for every run
    with wtacrs.batch(torch.arange(B), batch["attention_mask"]) if hasattr(model, "wtacrs_state") else _nothing():
        with AllocatorPeak(baseline=[*parameter_tensors(model), *batch.values()]) as live:
            model(**batch).loss.backward()
    return [p.grad for p in model.parameters() if p.requires_grad], live.peak - live.baseline


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def with_wtacrs(model: nn.Module, ratio: float = 1.0, **flags) -> nn.Module:
    """`wtacrs.apply`; recomputed layers redo the forward's draws unless `backward_draws=True`
    (so a recompute's gradients are bitwise those without it)."""
    estimator = "wta-crs" if ratio < 1 else "exact"
    flags = {"backward_draws": False, **flags}
    return wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=ratio, estimator=estimator, seed=0, **flags))


def assert_grads_close(grads, reference, rtol=1e-5, atol=1e-6):
    assert len(grads) == len(reference)
    for grad, expected in zip(grads, reference):
        torch.testing.assert_close(grad, expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_from_output_matches_llama_rms_norm(dtype, tolerance):
    norm = llama.LlamaRMSNorm(H, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, H, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(3, 7, H, dtype=dtype)
    expected_y = norm(x)
    expected = torch.autograd.grad(expected_y, (x, norm.weight), grad_out)
    y = rms_norm_from_output(x, norm.weight, norm.variance_epsilon)
    assert torch.equal(y, expected_y)  # the forward is LlamaRMSNorm's, op for op
    for grad, reference in zip(torch.autograd.grad(y, (x, norm.weight), grad_out), expected):
        scale = reference.abs().max()
        assert (grad - reference).abs().max() <= tolerance * scale


def test_rms_norm_keeps_input_columns_where_weight_is_zero():
    """x̂_j = y_j / γ_j is lost where γ_j = 0: those columns are kept from the input, and the
    input gradient (which depends on x̂_j through the mean) stays exact."""
    norm = llama.LlamaRMSNorm(H)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.weight[[3, 10]] = 0
    x = torch.randn(4, H, requires_grad=True)
    grad_out = torch.randn(4, H)
    expected = torch.autograd.grad(norm(x), (x, norm.weight), grad_out)
    got = torch.autograd.grad(rms_norm_from_output(x, norm.weight, norm.variance_epsilon), (x, norm.weight), grad_out)
    for grad, reference in zip(got, expected):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)
    # without the kept columns, the zero-γ columns read as x̂ = 0/0
    no_columns = torch.empty(0, dtype=torch.int64)
    broken = torch.autograd.grad(rms_norm_from_output(x, norm.weight, norm.variance_epsilon, no_columns), x, grad_out)
    assert not torch.isfinite(broken[0]).all()


@pytest.mark.parametrize("dtype, native_bytes_per_element", [(torch.float32, 8), (torch.bfloat16, 6)])
def test_lean_rms_norm_saves_its_output_only(dtype, native_bytes_per_element):
    """LlamaRMSNorm saves x (a float32 copy for bf16) and x̂ in the input dtype; the lean one saves
    y in the input dtype and one float32 rstd per row."""
    norm = llama.LlamaRMSNorm(H).to(dtype)
    x = torch.randn(8, 16, H, dtype=dtype, requires_grad=True)
    rows, elements = 8 * 16, 8 * 16 * H
    with SavedTensorBytes(exclude=[norm.weight, x]) as native:
        norm(x)
    with SavedTensorBytes(exclude=[norm.weight, x]) as lean:
        rms_norm_from_output(x, norm.weight, norm.variance_epsilon)
    assert native.total == native_bytes_per_element * elements - (4 * elements if dtype == torch.float32 else 0) \
        + 4 * rows
    assert lean.total == elements * x.element_size() + 4 * rows


def test_is_llama_rms_norm_compares_the_computation():
    assert is_llama_rms_norm(llama.LlamaRMSNorm(8))
    assert is_llama_rms_norm(transformers.models.mistral.modeling_mistral.MistralRMSNorm(8))  # a verbatim copy
    assert not is_llama_rms_norm(transformers.models.gemma.modeling_gemma.GemmaRMSNorm(8))  # scales by 1 + γ
    assert not is_llama_rms_norm(transformers.models.t5.modeling_t5.T5LayerNorm(8))
    assert not is_llama_rms_norm(nn.LayerNorm(8))


# ---------------------------------------------------------------- gated MLP


class _SwappedGate(llama.LlamaMLP):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_is_gated_mlp_compares_the_computation():
    config = tiny_llama().config
    assert is_gated_mlp(llama.LlamaMLP(config))
    assert is_gated_mlp(transformers.models.mistral.modeling_mistral.MistralMLP(config))
    assert not is_gated_mlp(_SwappedGate(config))
    gpt2 = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2)
    assert not is_gated_mlp(transformers.models.gpt2.modeling_gpt2.GPT2MLP(64, gpt2))


def test_companions_swap_the_decoder_modules_and_remove_restores_them():
    model = tiny_llama()
    names = apply_companions(model, lean_layernorm=True, recompute_activation=True,
                             recompute_attention=True, chunked_lm_loss=True)
    layer = model.model.layers[0]
    assert type(layer.input_layernorm).__name__ == "LeanRMSNormLlamaRMSNorm"
    assert type(layer.mlp).__name__ == "RecomputedGateLlamaMLP"
    assert type(layer.self_attn).__name__ == "RecomputedLlamaAttention"
    assert type(model).__name__ == "ChunkedLMLossLlamaForCausalLM"
    assert len(names) == 1 + LAYERS * 4 + 1  # the model, per layer 2 norms + MLP + attention, the final norm
    assert remove_companions(model) == names
    assert type(model) is llama.LlamaForCausalLM and type(layer.mlp) is llama.LlamaMLP


# ---------------------------------------------------------------- exactness and peaks, whole model


@pytest.mark.parametrize("flag", list(ALL))
def test_each_decoder_companion_is_exact(flag):
    """Without sampling, each companion alone gives the plain model's gradients (float32 rounding:
    LlamaRMSNorm computes in float32, and the chunked loss sums in another order)."""
    batch = lm_batch()
    expected, _ = train_step(tiny_llama(), batch)
    model = with_wtacrs(tiny_llama(), **{flag: True})
    grads, _ = train_step(model, batch)
    assert_grads_close(grads, expected)
    effect = wtacrs.modeling.companion_effects(model)[flag]
    # LLaMA's attention has no dropout: the CPU's SDPA takes its flash kernel, no probabilities kept
    assert effect.status == ("nothing to change" if flag == "lean_attention" else "took effect")


@pytest.mark.parametrize("keep_gate", [False, True])
def test_decoder_companions_keep_the_sampled_gradients(keep_gate):
    """Under WTA-CRS@0.3 all companions together draw the same rows: the same estimate as without
    them (the down projection's rows recomputed from the recipe agree up to rounding)."""
    batch = lm_batch()
    expected, _ = train_step(with_wtacrs(tiny_llama(), ratio=0.3), batch)
    exact, _ = train_step(tiny_llama(), batch)
    grads, _ = train_step(with_wtacrs(tiny_llama(), ratio=0.3, **ALL, keep_gate=keep_gate), batch)
    assert_grads_close(grads, expected, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(g, e, rtol=1e-3, atol=1e-5) for g, e in zip(grads, exact))  # it does sample


@pytest.mark.parametrize("keep_gate", [False, True])
def test_decoder_layers_draw_in_backward_with_every_companion(keep_gate):
    """Backward draws in a LLaMA decoder with every companion: q, k, v, o, gate and up inside the
    recomputed sub-blocks (or, with `keep_gate`, gate beside the checkpoint that keeps its input)
    and the down projection reading the gated part's row recipe draw with the true output
    gradient; every other gradient is bitwise that of forward draws, and the step's live peak
    grows by no more than one attention output (B, T, hidden), held while its block's backward
    runs."""
    batch = lm_batch()
    flags = {**ALL, "keep_gate": keep_gate}
    model = with_wtacrs(tiny_llama(), ratio=0.3, **flags)
    forward_drawn, peak = train_step(model, batch)
    backward_drawn, backward_peak = train_step(with_wtacrs(tiny_llama(), ratio=0.3, **flags, backward_draws=True), batch)
    sampled = {f"{name}.weight" for name, _ in wtacrs.modeling.sampled_modules(model)}
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(sampled) == 7 * LAYERS
    for name, grad, reference in zip(names, backward_drawn, forward_drawn, strict=True):
        assert torch.isfinite(grad).all()
        assert torch.equal(grad, reference) != (name in sampled), name
    assert backward_peak - peak <= B * T * H * 4


@pytest.mark.parametrize("flag, least_saving", [
    ("lean_layernorm", (2 * LAYERS) * B * T * H * 4),  # per norm: x no longer saved (fp32, full FT)
    ("recompute_activation", (LAYERS - 1) * 3 * B * T * I * 4),  # gate(x), act(gate(x)), up(x) of all but one
    ("recompute_attention", (LAYERS - 1) * 3 * B * T * H * 4),  # q, k (roped), attention output of all but one
    # the logits and their log-softmax, less the tied head's gradient, held from forward on
    ("chunked_lm_loss", 2 * B * T * V * 4 - V * H * 4),
])
def test_each_decoder_companion_lowers_the_live_peak(flag, least_saving, monkeypatch):
    monkeypatch.setattr(wtacrs.companions.lm_loss, "CHUNK_BYTES", 16 * V * 4)  # 16 tokens, as 170 of 49,152
    batch = lm_batch()
    _, plain_peak = train_step(with_wtacrs(tiny_llama()), batch)
    _, peak = train_step(with_wtacrs(tiny_llama(), **{flag: True}), batch)
    assert plain_peak - peak >= least_saving


def test_keep_gate_is_exact_and_keeps_gate_outputs_only():
    """Keeping gate(x) and recomputing act(gate(x)) ⊙ up(x): the plain gradients; the peak sits
    between the full recompute's and none, at most one (B·T, intermediate) tensor per block
    above the full recompute."""
    batch = lm_batch()
    expected, plain_peak = train_step(with_wtacrs(tiny_llama()), batch)
    _, recompute_peak = train_step(with_wtacrs(tiny_llama(), recompute_activation=True), batch)
    model = with_wtacrs(tiny_llama(), recompute_activation=True, keep_gate=True)
    grads, peak = train_step(model, batch)
    assert_grads_close(grads, expected)
    assert all(layer.mlp.keep_gate for layer in model.model.layers)
    intermediate = B * T * I * 4
    assert plain_peak - peak >= (LAYERS - 1) * 2 * intermediate  # act(gate(x)) and up(x) no longer saved
    assert recompute_peak < peak <= recompute_peak + LAYERS * intermediate


def test_keep_gate_needs_the_recompute():
    with pytest.raises(wtacrs.WTACRSConfigError, match="recompute_activation"):
        wtacrs.WTACRSConfig.preset("sampler", keep_gate=True)
    with pytest.raises(ValueError, match="recompute_activation"):
        apply_companions(tiny_llama(), keep_gate=True)


def test_gated_mlp_row_recipe_leaves_the_peak():
    """With the recipe, a sampled down projection keeps indices, not its k rows of the
    intermediate activation; the rows recomputed from the MLP input agree up to rounding."""
    batch = lm_batch()
    runs = []
    for recipe in (False, True):
        model = with_wtacrs(tiny_llama(), ratio=0.3, recompute_activation=True)
        for layer in model.model.layers:
            layer.mlp.row_recipe = recipe
        runs.append(train_step(model, batch))
    (gathered, peak), (recomputed, lean_peak) = runs
    assert_grads_close(recomputed, gathered, rtol=1e-4, atol=1e-6)
    live_rows = B * T - 10
    sampled_rows = -(-3 * live_rows // 10) * I * 4  # k = ceil(0.3 · live) rows of (B·T, I) fp32 per layer
    assert peak - lean_peak >= (LAYERS - 1) * sampled_rows // 2  # repeated draws merge: at least half distinct


@pytest.mark.parametrize("keep_gate", [False, True])
def test_decoder_companions_under_peft_lora(keep_gate):
    """LoRA on every block linear, WTA-CRS@0.3: the companions change no gradient and act on the
    model PEFT wraps (not on the PEFT wrapper, which forwards `lm_head` to it)."""
    peft = pytest.importorskip("peft")

    def lora(seed=0):
        model = peft.get_peft_model(tiny_llama(seed), peft.LoraConfig(
            task_type=peft.TaskType.CAUSAL_LM, r=4, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        torch.manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1)  # non-zero, so lora_A gets gradients
        return model

    batch = lm_batch()
    expected, peak = train_step(with_wtacrs(lora(), ratio=0.3), batch)
    model = with_wtacrs(lora(), ratio=0.3, **ALL, keep_gate=keep_gate)
    grads, lean_peak = train_step(model, batch)
    assert_grads_close(grads, expected, rtol=1e-4, atol=1e-6)
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert type(model.get_base_model()).__name__ == "ChunkedLMLossLlamaForCausalLM"
    effects = {option: e.status for option, e in wtacrs.modeling.companion_effects(model).items()}
    assert effects.pop("lean_attention") == "nothing to change"  # no attention dropout: the CPU's flash kernel
    assert set(effects.values()) == {"took effect"}
    assert lean_peak < peak


# ---------------------------------------------------------------- chunked LM loss


class _TwoLayerHead(nn.Sequential):
    """A head that is not an nn.Linear: `chunked_lm_loss` takes its gradients through autograd."""

    def __init__(self):
        super().__init__(nn.Linear(H, H), nn.Linear(H, V, bias=False))

    @property
    def weight(self):
        return self[1].weight


@pytest.mark.parametrize("head_class", [lambda: nn.Linear(H, V, bias=False), _TwoLayerHead])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_lm_loss_equals_the_causal_lm_loss(dtype, head_class):
    """Against cross-entropy on the full logits: float64 to rounding, float32 (where
    transformers' ForCausalLMLoss is the reference) to float32 rounding; with the mean over
    labelled tokens and with the Trainer's num_items_in_batch; gradients scaled by the caller's;
    for an nn.Linear head (gradients by hand) and any other module (through autograd)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    head = head_class().to(dtype)
    hidden = torch.randn(B, T, H, dtype=dtype, requires_grad=True)
    labels = lm_batch()["labels"]
    labels[0, :5] = -100
    for num_items in (None, torch.tensor(100)):
        if dtype == torch.float64:  # ForCausalLMLoss computes in float32 whatever the logits
            shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
            total = F.cross_entropy(head(hidden).reshape(-1, V), shifted, reduction="sum")
            expected_loss = total / (num_items if num_items is not None else (shifted != -100).sum())
        else:
            expected_loss = ForCausalLMLoss(head(hidden), labels, V, num_items_in_batch=num_items)
        expected = torch.autograd.grad(expected_loss, (hidden, head.weight))
        loss = chunked_lm_loss(hidden, labels, head, num_items_in_batch=num_items, chunk_bytes=7 * V * 4)  # 7 rows
        tolerance = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loss, expected_loss, **tolerance)
        for grad, reference in zip(torch.autograd.grad(3 * loss, (hidden, head.weight)), expected):
            torch.testing.assert_close(grad, 3 * reference, **tolerance)


def test_chunked_lm_loss_model_returns_no_logits_in_training_only():
    batch = lm_batch()
    model = tiny_llama()
    apply_companions(model, chunked_lm_loss=True)
    plain = tiny_llama()
    trained = model(**batch)
    assert trained.logits is None
    torch.testing.assert_close(trained.loss, plain(**batch).loss)
    model.eval()
    plain.eval()
    with torch.no_grad():
        evaluated, reference = model(**batch), plain(**batch)
    assert torch.equal(evaluated.logits, reference.logits) and torch.equal(evaluated.loss, reference.loss)
    assert model.lm_head is plain.lm_head or type(model.lm_head) is nn.Linear  # the head is back in place


def test_chunked_lm_loss_only_for_plain_causal_lm_losses():
    assert has_chunkable_lm_loss(tiny_llama())
    classifier = transformers.LlamaForSequenceClassification(tiny_llama().config)
    assert not has_chunkable_lm_loss(classifier)
    gemma2 = transformers.Gemma2Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       final_logit_softcapping=30.0)
    assert not has_chunkable_lm_loss(transformers.Gemma2ForCausalLM(gemma2))  # soft-capping follows the head


def test_companions_compose_with_gradient_checkpointing():
    batch = lm_batch()
    expected, _ = train_step(with_wtacrs(tiny_llama(), ratio=0.3), batch)
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    grads, _ = train_step(with_wtacrs(model, ratio=0.3, **ALL), batch)
    assert_grads_close(grads, expected, rtol=1e-4, atol=1e-6)



def test_chunked_lm_loss_makes_no_device_sync():
    """Fixed chunks over every row, the divisor and the incoming gradient kept on the device:
    nothing in the loss's forward or backward waits for a GPU (counted on the CPU by op)."""
    from wtacrs.bench.dispatch import AtenCounter
    from wtacrs.companions.lm_loss import chunked_lm_loss

    h = torch.randn(2, 10, 8, requires_grad=True)
    head = torch.nn.Linear(8, 50)
    labels = torch.randint(0, 50, (2, 10))
    labels[1, 6:] = -100
    with AtenCounter() as counted:
        chunked_lm_loss(h, labels, head, chunk_bytes=4 * 50 * 6).backward()
    assert not counted.syncs, dict(counted.sync_sites)
