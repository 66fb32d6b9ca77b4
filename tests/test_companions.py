"""Memory-lean companions: exactness, mask regeneration, checkpointing, saved bytes, swap/remove."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import wtacrs
from stats import Z

from wtacrs.companions import (
    ACTIVATION_MODES,
    LeanLayerNorm,
    RegeneratedDropout,
    apply_companions,
    compressed_activation,
    ill_conditioned_columns,
    layer_norm_from_output,
    regenerated_dropout,
    remove_companions,
)
from wtacrs.companions.activation import elementwise_activation_types
from wtacrs.memory import AllocatorPeak, SavedTensorBytes, parameter_tensors
from wtacrs.modeling import sampled_modules

transformers = pytest.importorskip("transformers")


def tiny_bert(attn_implementation: str = "eager", dropout: float = 0.1) -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).train()


def saved_bytes(fn, *tensors, exclude=()) -> SavedTensorBytes:
    with SavedTensorBytes(exclude=exclude) as saved:
        fn(*tensors)
    return saved


def input_grad(fn, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(fn(x), x, grad_out)
    return grad


# ---------------------------------------------------------------- dropout


def reference_dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """What CPU nn.Dropout computes from its Bernoulli draw (see test_reference_dropout_is_nn_dropout)."""
    return x * keep.to(x.dtype).div_(1 - p)


def test_reference_dropout_is_nn_dropout():
    x, p = torch.randn(64, 33), 0.3
    torch.manual_seed(5)
    expected = nn.Dropout(p).train()(x)
    torch.manual_seed(5)
    keep = torch.empty_like(x).bernoulli_(1 - p)
    assert torch.equal(reference_dropout(x, keep, p), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dropout_forward_and_backward_use_one_mask(dtype):
    x = torch.randn(64, 33, dtype=dtype).requires_grad_()
    grad_out = torch.randn(64, 33, dtype=dtype)
    p = 0.3
    out = regenerated_dropout(x, p)
    keep = out != 0  # x has no zeros
    assert torch.equal(out, reference_dropout(x.detach(), keep, p))
    out.backward(grad_out)
    assert torch.equal(x.grad, reference_dropout(grad_out, keep, p))


def test_dropout_keep_rate_and_fresh_masks():
    x, p = torch.ones(200_000), 0.1
    first, second = regenerated_dropout(x, p) != 0, regenerated_dropout(x, p) != 0
    stderr = math.sqrt(p * (1 - p) / x.numel())
    assert abs(first.double().mean().item() - (1 - p)) < Z * stderr
    assert not torch.equal(first, second)


def test_dropout_saves_nothing():
    x = torch.randn(8, 16, 32, requires_grad=True)
    assert saved_bytes(lambda t: regenerated_dropout(t, 0.1), x).total == 0
    assert saved_bytes(lambda t: F.dropout(t, 0.1), x).total == x.numel() * 4  # CPU: the float noise


def test_dropout_inplace_and_identity_cases():
    x = torch.randn(4, 5)
    y = x.clone()
    assert regenerated_dropout(y, 0.5, inplace=True) is y
    assert torch.equal(y, reference_dropout(x, y != 0, 0.5)) and not torch.equal(y, x)
    for p, training in [(0.0, True), (1.0, True), (0.5, False)]:
        assert torch.equal(regenerated_dropout(x, p, training), F.dropout(x, p, training))
    with pytest.raises(ValueError, match="dropout probability"):
        regenerated_dropout(x, 1.5)


def test_dropout_under_autocast():
    x = torch.randn(16, 8, requires_grad=True)
    weight = torch.randn(8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = F.linear(x, weight)  # bfloat16
        out = regenerated_dropout(hidden, 0.4)
    assert out.dtype == torch.bfloat16
    grad_out = torch.randn_like(out)
    (grad_hidden,) = torch.autograd.grad(out, hidden, grad_out)
    assert torch.equal(grad_hidden, reference_dropout(grad_out, out != 0, 0.4))


# ---------------------------------------------------------------- LayerNorm


@pytest.mark.parametrize(
    "shape, affine, bias", [((3, 4, 6), True, True), ((3, 4, 6), True, False), ((3, 4, 6), False, False)]
)
def test_layer_norm_gradcheck(shape, affine, bias):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(shape[-1:], dtype=torch.float64)).requires_grad_() if affine else None
    beta = (0.2 * torch.randn(shape[-1:], dtype=torch.float64)).requires_grad_() if bias else None
    assert torch.autograd.gradcheck(lambda *t: layer_norm_from_output(t[0], shape[-1:], *t[1:]), (x, weight, beta))


def test_layer_norm_gradcheck_two_normalized_dims():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(3, 5, dtype=torch.float64)).requires_grad_()
    beta = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: layer_norm_from_output(t[0], (3, 5), *t[1:]), (x, weight, beta))


def ln_and_grads(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.detach().requires_grad_()
    out = module(x)
    grads = torch.autograd.grad(out, (x, module.weight, module.bias), grad_out)
    return out, grads


def trained_layer_norm(width: int) -> nn.LayerNorm:
    module = nn.LayerNorm(width)
    with torch.no_grad():  # γ away from its init of ones, β nonzero, as after training
        module.weight.copy_(1 + 0.3 * torch.randn(width))
        module.bias.copy_(0.2 * torch.randn(width))
    return module


def test_lean_layer_norm_matches_nn_layer_norm_fp32():
    module = trained_layer_norm(48)
    x, grad_out = 3 * torch.randn(6, 10, 48) + 1, torch.randn(6, 10, 48)
    expected, expected_grads = ln_and_grads(module, x, grad_out)
    apply_companions(module, lean_layernorm=True)
    assert type(module) is LeanLayerNorm
    out, grads = ln_and_grads(module, x, grad_out)
    assert torch.equal(out, expected)
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference)


def test_lean_layer_norm_under_autocast():
    module = trained_layer_norm(32)
    x, grad_out = torch.randn(8, 32, dtype=torch.bfloat16), torch.randn(8, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = ln_and_grads(module, x, grad_out)
        apply_companions(module, lean_layernorm=True)
        out, grads = ln_and_grads(module, x, grad_out)
    assert out.dtype == expected.dtype and torch.equal(out, expected)
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference, rtol=2e-2, atol=2e-2)


def test_lean_layer_norm_saves_output_not_input():
    """x → LayerNorm → Linear: the linear saves y; the lean LayerNorm adds only rstd to that."""
    rows, width = 64, 32
    block = nn.Sequential(trained_layer_norm(width), nn.Linear(width, width))
    x = torch.randn(rows, width, requires_grad=True)
    native = saved_bytes(block, x, exclude=parameter_tensors(block)).total
    apply_companions(block, lean_layernorm=True)
    lean = saved_bytes(block, x, exclude=parameter_tensors(block)).total
    full = rows * width * 4
    assert native == 2 * full + 2 * rows * 4  # x, y (by the linear), mean, rstd
    assert lean == full + rows * 4  # y, rstd


def test_layer_norm_gradcheck_with_unrecoverable_columns():
    """γ_j = 0 and |β_j| ≫ |γ_j|: those input columns are kept, the gradient stays exact."""
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(6, dtype=torch.float64)).index_fill(0, torch.tensor([1]), 0.0)
    bias = torch.randn(6, dtype=torch.float64).index_fill(0, torch.tensor([4]), 100 * weight[4].abs().item())
    assert ill_conditioned_columns(weight, bias).tolist() == [1, 4]
    inputs = (x, weight.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(lambda *t: layer_norm_from_output(t[0], (6,), *t[1:]), inputs)


def test_lean_layer_norm_keeps_input_columns_where_weight_is_zero():
    module = trained_layer_norm(16)
    with torch.no_grad():
        module.weight[3] = 0.0
    x, grad_out = torch.randn(5, 16), torch.randn(5, 16)
    expected, expected_grads = ln_and_grads(module, x, grad_out)
    apply_companions(module, lean_layernorm=True)
    out, grads = ln_and_grads(module, x, grad_out)
    torch.testing.assert_close(out, expected)
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference)
    exclude = parameter_tensors(module)
    y_and_rstd = 5 * 16 * 4 + 5 * 4
    column_and_mean = 5 * 4 + 5 * 4
    assert saved_bytes(module, x.requires_grad_(), exclude=exclude).total == y_and_rstd + column_and_mean
    with torch.no_grad():
        module.weight[3] = 1.0  # the version counter moves: the columns are recomputed
    assert saved_bytes(module, x, exclude=exclude).total == y_and_rstd


# ---------------------------------------------------------------- activation


def activation_instances() -> list[nn.Module]:
    instances = []
    for cls in elementwise_activation_types():
        try:
            instances.append(cls())
        except TypeError:  # needs arguments (ClippedGELUActivation)
            instances.append(cls(-10.0, 10.0))
    return instances


@pytest.mark.parametrize("mode", ACTIVATION_MODES)
def test_activation_forward_is_exact(mode):
    x = 3 * torch.randn(4, 50, requires_grad=True)
    for module in activation_instances():
        assert torch.equal(compressed_activation(x, module.forward, mode), module(x)), type(module).__name__


def test_int8_activation_derivative_error_bound():
    """|dx̂ − dx| ≤ |dy| · (max f' − min f') / 510 (half a quantisation step), plus fp32 rounding."""
    x, grad_out = 2 * torch.randn(64, 128), torch.randn(64, 128)
    for module in activation_instances():
        exact = input_grad(module, x, grad_out)
        approx = input_grad(lambda t: compressed_activation(t, module.forward, "int8"), x, grad_out)
        derivative = input_grad(module, x, torch.ones_like(x))
        half_step = (derivative.max() - derivative.min()) / 510
        bound = grad_out.abs() * (half_step * (1 + 1e-4) + 1e-6)
        assert ((approx - exact).abs() <= bound).all(), type(module).__name__


def test_bf16_gelu_derivative_error_bound():
    """|dx̂ − dx| ≤ |dy| · max|GELU''| · |x − bf16(x)|, with max|GELU''| = 2φ(0) < 0.8 and
    |x − bf16(x)| ≤ 2⁻⁸|x|; plus fp32 rounding."""
    x, grad_out = 2 * torch.randn(64, 128), torch.randn(64, 128)
    exact = input_grad(F.gelu, x, grad_out)
    approx = input_grad(lambda t: compressed_activation(t, F.gelu, "bf16"), x, grad_out)
    bound = grad_out.abs() * (0.8 * 2**-8 * x.abs() + 1e-6)
    assert ((approx - exact).abs() <= bound).all()


@pytest.mark.parametrize("mode, bytes_per_element", [("bf16", 2), ("int8", 1)])
def test_activation_saved_bytes(mode, bytes_per_element):
    x = torch.randn(32, 64, requires_grad=True)
    assert saved_bytes(F.gelu, x).total == x.numel() * 4
    compressed = saved_bytes(lambda t: compressed_activation(t, F.gelu, mode), x).total
    scalars = 8 if mode == "int8" else 0  # low and step, float32
    assert compressed == x.numel() * bytes_per_element + scalars


def test_invalid_activation_mode():
    with pytest.raises(ValueError, match="activation_compression 'fp4'"):
        apply_companions(nn.GELU(), activation_compression="fp4")
    with pytest.raises(ValueError, match="bf16, int8"):
        compressed_activation(torch.randn(3), F.gelu, "int4")


# ---------------------------------------------------------------- swapping on a model


def test_swap_and_remove_keep_parameters_and_classes():
    model = tiny_bert()
    before = {key: value.data_ptr() for key, value in model.state_dict().items()}
    classes = {name: type(module) for name, module in model.named_modules()}
    names = apply_companions(model, lean_dropout=True, lean_layernorm=True, activation_compression="int8")
    assert {key: value.data_ptr() for key, value in model.state_dict().items()} == before
    layer = model.encoder.layer[0]
    assert isinstance(layer.output.dropout, RegeneratedDropout) and isinstance(layer.output.dropout, nn.Dropout)
    assert isinstance(layer.output.LayerNorm, LeanLayerNorm) and isinstance(layer.output.LayerNorm, nn.LayerNorm)
    assert isinstance(layer.intermediate.intermediate_act_fn, transformers.activations.GELUActivation)
    assert "encoder.layer.0.attention.self" in names and "encoder.layer.1.intermediate.intermediate_act_fn" in names
    again = apply_companions(model, lean_dropout=True, lean_layernorm=True, activation_compression="int8")
    assert again == []  # idempotent
    assert remove_companions(model) == names
    assert {name: type(module) for name, module in model.named_modules()} == classes
    assert {key: value.data_ptr() for key, value in model.state_dict().items()} == before
    assert not hasattr(layer.intermediate.intermediate_act_fn, "activation_compression")


def test_module_filter_skips_modules():
    model = tiny_bert()
    names = apply_companions(
        model, lean_dropout=True, module_filter=lambda m, name: "layer.1" not in name
    )
    assert names and not any("layer.1" in name for name in names)


def train_step_grads(model: nn.Module, input_ids: torch.Tensor, seed: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    model(input_ids=input_ids).last_hidden_state.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_bert_exact_without_dropout(attn_implementation):
    """Dropout off: LayerNorm + dropout companions change nothing but rounding."""
    model, input_ids = tiny_bert(attn_implementation, dropout=0.0), torch.randint(0, 100, (2, 9))
    expected_out, expected = model(input_ids=input_ids).last_hidden_state, train_step_grads(model, input_ids)
    apply_companions(model, lean_dropout=True, lean_layernorm=True)
    assert torch.equal(model(input_ids=input_ids).last_hidden_state, expected_out)
    scale = max(grad.abs().max() for grad in expected)  # some grads are zero up to rounding (key bias)
    for grad, reference in zip(train_step_grads(model, input_ids), expected):
        assert (grad - reference).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("use_reentrant, activation", [(False, "int8"), (True, "bf16")])
def test_checkpoint_recompute_regenerates_the_same_masks(use_reentrant, activation):
    model, input_ids = tiny_bert("eager", dropout=0.3), torch.randint(0, 100, (2, 9))
    apply_companions(model, lean_dropout=True, lean_layernorm=True, activation_compression=activation)
    expected = train_step_grads(model, input_ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()
    for grad, reference in zip(train_step_grads(model, input_ids), expected):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)


def test_plain_checkpoint_of_dropout_block():
    linear = nn.Linear(16, 16)
    x = torch.randn(32, 16, requires_grad=True)

    def block(t):
        return linear(regenerated_dropout(F.gelu(linear(t)), 0.5))

    grads = []
    for wrapped in (block, lambda t: checkpoint(block, t, use_reentrant=False)):
        torch.manual_seed(3)
        grads.append(torch.autograd.grad(wrapped(x).sum(), (x, linear.weight)))
    for grad, reference in zip(*grads):
        assert torch.equal(grad, reference)


def attention_probability_bytes(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes saved in (batch, heads, L, L) tensors (or (batch · heads, L, L), as matmul saves them):
    attention probabilities and dropout masks."""
    batch, length = input_ids.shape
    with SavedTensorBytes(exclude=parameter_tensors(model)) as saved:
        model(input_ids=input_ids)
    shapes = {(batch, 2, length, length), (batch * 2, length, length)}
    return sum(n for (shape, _), n in saved.by_shape.items() if shape in shapes)


def test_eager_attention_dropout_mask_is_not_saved():
    """Eager BERT: softmax output, dropout noise and dropped probabilities are saved per layer;
    with the companion the noise is gone (BERT applies it with F.dropout, not its module)."""
    model, input_ids = tiny_bert("eager", dropout=0.1), torch.randint(0, 100, (2, 9))
    one = 2 * 2 * 9 * 9 * 4  # one (B, H, L, L) float32 tensor
    assert attention_probability_bytes(model, input_ids) == 2 * 3 * one
    apply_companions(model, lean_dropout=True)
    assert attention_probability_bytes(model, input_ids) == 2 * 2 * one


def test_dropout_free_model_saves_no_masks():
    model, input_ids = tiny_bert("eager", dropout=0.1), torch.randint(0, 100, (2, 9))
    apply_companions(model, lean_dropout=True)
    with SavedTensorBytes(exclude=parameter_tensors(model)) as with_dropout:
        model(input_ids=input_ids)
    model_without = tiny_bert("eager", dropout=0.0)
    with SavedTensorBytes(exclude=parameter_tensors(model_without)) as without_dropout:
        model_without(input_ids=input_ids)
    # Nothing is saved for dropout itself. The one addition: the dropped attention probabilities,
    # which the probabilities @ values matmul saves besides the softmax output (one per layer).
    batch, length = input_ids.shape
    assert with_dropout.total == without_dropout.total + 2 * batch * 2 * length * length * 4


# ---------------------------------------------------------------- attention


def test_sdpa_on_cpu_saves_probabilities_without_the_companion():
    """The premise of the attention companion: plain CPU SDPA with dropout keeps L² tensors."""
    model, input_ids = tiny_bert("sdpa", dropout=0.1), torch.randint(0, 100, (2, 9))
    assert attention_probability_bytes(model, input_ids) > 0


def test_sdpa_calls_a_fused_kernel_takes_run_unchanged():
    """Without dropout the CPU's SDPA takes its flash kernel, which keeps no probabilities: the
    companion leaves the call alone (a recompute would be a second attention forward for
    nothing) and says it found nothing to change; with dropout (the math kernel) it recomputes."""
    for dropout, acts in ((0.0, False), (0.1, True)):
        model, input_ids = tiny_bert("sdpa", dropout=dropout), torch.randint(0, 100, (2, 9))
        assert (attention_probability_bytes(model, input_ids) > 0) == acts  # what the plain call keeps
        wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=1.0, estimator="exact", lean_attention=True))
        assert attention_probability_bytes(model, input_ids) == 0
        model(input_ids=input_ids).last_hidden_state.sum().backward()
        status = wtacrs.modeling.companion_effects(model)["lean_attention"].status
        assert status == ("took effect" if acts else "nothing to change")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_recomputed_attention_is_bitwise_sdpa_and_saves_no_probabilities(dropout):
    model, input_ids = tiny_bert("sdpa", dropout=dropout), torch.randint(0, 100, (2, 9))
    torch.manual_seed(1)
    expected_out = model(input_ids=input_ids).last_hidden_state
    expected = train_step_grads(model, input_ids)
    names = apply_companions(model, lean_attention=True)
    assert names == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    torch.manual_seed(1)
    assert torch.equal(model(input_ids=input_ids).last_hidden_state, expected_out)
    for grad, reference in zip(train_step_grads(model, input_ids), expected):
        assert torch.equal(grad, reference)  # recompute restores the RNG: the same dropout mask


def step_peak(model: nn.Module, input_ids: torch.Tensor) -> int:
    with AllocatorPeak(baseline=[*parameter_tensors(model), input_ids]) as live:
        model(input_ids=input_ids).last_hidden_state.square().sum().backward()
    model.zero_grad(set_to_none=True)
    return live.peak - live.baseline


def test_recomputed_attention_lowers_the_live_peak():
    """The probabilities leave the peak, not just the autograd graph's view: checkpoint keeps its
    inputs in a closure that saved-tensor hooks do not see, so this counts every live tensor.
    Plain CPU SDPA with dropout keeps 3 (B, H, L, L) float tensors per layer (softmax output,
    dropout noise, dropped probabilities); the companion keeps none past its layer's forward but
    rebuilds one layer's three in backward, so the peak falls by (layers − 1) · 3 of them."""
    model, input_ids = tiny_bert("sdpa", dropout=0.1), torch.randint(0, 100, (2, 64))
    one = 2 * 2 * 64 * 64 * 4  # one (B, H, L, L) float32 tensor
    plain = step_peak(model, input_ids)
    apply_companions(model, lean_attention=True)
    lean = step_peak(model, input_ids)
    assert plain - lean >= (2 - 1) * 3 * one


def test_recomputed_attention_inside_gradient_checkpointing():
    """Nested non-reentrant checkpoints: the block recompute runs the attention recompute again."""
    model, input_ids = tiny_bert("sdpa", dropout=0.3), torch.randint(0, 100, (2, 9))
    apply_companions(model, lean_dropout=True, lean_layernorm=True, lean_attention=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    grads = train_step_grads(model, input_ids)
    # lean dropout draws other masks than nn.Dropout, so compare against itself without checkpointing
    model.gradient_checkpointing_disable()
    for grad, reference in zip(grads, train_step_grads(model, input_ids)):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)


def test_attention_companion_flags_and_removal():
    model = tiny_bert("sdpa")
    apply_companions(model, lean_dropout=True)
    attention = model.encoder.layer[0].attention.self
    assert attention.regenerate_dropout and not attention.recompute_sdpa
    remove_companions(model)
    assert type(attention) is transformers.models.bert.modeling_bert.BertSelfAttention
    assert not hasattr(attention, "regenerate_dropout") and not hasattr(attention, "recompute_sdpa")


def test_recomputed_attention_in_eval_and_no_grad_is_plain():
    model, input_ids = tiny_bert("sdpa", dropout=0.1), torch.randint(0, 100, (2, 9))
    apply_companions(model, lean_attention=True)
    with torch.no_grad():
        out = model(input_ids=input_ids).last_hidden_state
    model.eval()
    assert not torch.equal(out, model(input_ids=input_ids).last_hidden_state)  # training-mode dropout ran
    assert attention_probability_bytes(model, input_ids) == 0


# ---------------------------------------------------------------- activation recompute


def sampled_step(recompute: bool, input_ids: torch.Tensor, *, recompute_attention: bool = False,
                 row_recipe: bool = True, backward_draws: bool = False):
    """Grads and live peak of one step of tiny BERT under WTA-CRS@0.3 with the exact companions
    (recomputed layers redo the forward's draws unless `backward_draws`)."""
    import wtacrs

    model = tiny_bert("sdpa", dropout=0.1)
    config = wtacrs.WTACRSConfig.preset("sampler", 
        ratio=0.3, lean_dropout=True, lean_layernorm=True, lean_attention=True, recompute_activation=recompute,
        recompute_attention=recompute_attention, backward_draws=backward_draws,
    )
    wtacrs.apply(model, config)
    for layer in model.encoder.layer:
        if recompute:
            layer.intermediate.row_recipe = row_recipe
    torch.manual_seed(1)
    with wtacrs.batch(torch.arange(input_ids.shape[0])):
        with AllocatorPeak(baseline=[*parameter_tensors(model), input_ids]) as live:
            model(input_ids=input_ids).last_hidden_state.square().sum().backward()
    return model, [p.grad for p in model.parameters()], live.peak - live.baseline


def test_recomputed_activation_input_is_exact_and_lowers_the_peak():
    input_ids = torch.randint(0, 100, (4, 32))
    _, expected, peak = sampled_step(False, input_ids)
    model, grads, lean_peak = sampled_step(True, input_ids)
    assert type(model.encoder.layer[0].intermediate).__name__ == "RecomputedBertIntermediate"
    for grad, reference in zip(grads, expected):
        assert torch.equal(grad, reference)  # same draws, same dropout masks, same matmuls
    activation_input = 4 * 32 * 64 * 4  # (B, T, intermediate) fp32, one per layer
    assert peak - lean_peak >= (2 - 1) * activation_input  # every layer's but the one being recomputed


def test_recomputed_activation_rows_leave_the_peak():
    """With the row recipe, the output projection keeps indices, not its M sampled rows of the
    4·hidden activation: the peak falls by every layer's rows but the one in backward."""
    input_ids = torch.randint(0, 100, (4, 32))
    _, gathered, peak = sampled_step(True, input_ids, row_recipe=False)
    _, recomputed, lean_peak = sampled_step(True, input_ids)
    for grad, reference in zip(recomputed, gathered):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-7)  # same rows up to rounding
    sampled_rows = math.ceil(0.3 * 4 * 32) * 64 * 4  # at most k rows of (B·T, intermediate) fp32 per layer
    assert peak - lean_peak >= (2 - 1) * sampled_rows // 2  # duplicates merge: at least half of k distinct


def test_recompute_companions_compose_with_gradient_checkpointing_and_autocast():
    """Both recomputes and the row recipes nested inside HF gradient checkpointing, under bf16
    autocast: the same gradients as without checkpointing (same draws, same masks)."""
    import wtacrs

    input_ids = torch.randint(0, 100, (4, 16))
    grads = []
    for checkpointing in (False, True):
        model = tiny_bert("sdpa", dropout=0.1)
        wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, lean_dropout=True, lean_layernorm=True, lean_attention=True,
                                                recompute_activation=True, recompute_attention=True))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(1)
        with wtacrs.batch(torch.arange(4)), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=input_ids).last_hidden_state.float().square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for grad, reference in zip(*grads):
        torch.testing.assert_close(grad, reference)


def test_recomputed_attention_is_exact_and_lowers_the_peak():
    input_ids = torch.randint(0, 100, (4, 32))
    _, expected, peak = sampled_step(True, input_ids)
    model, grads, lean_peak = sampled_step(True, input_ids, recompute_attention=True)
    attention = model.encoder.layer[0].attention
    assert type(attention).__name__ == "RecomputedBertAttention"
    assert type(attention.self).__name__ == "AttentionCompanionBertSelfAttention"  # lean SDPA inside
    for grad, reference in zip(grads, expected):
        assert torch.equal(grad, reference)  # the RNG is restored: same draws, same dropout masks
    q_k_v = 3 * 4 * 32 * 32 * 4  # q, k, v of (B, T, hidden) fp32 per layer
    assert peak - lean_peak >= (2 - 1) * q_k_v


def test_recomputed_layers_draw_in_backward_alone_and_at_no_memory_cost():
    """With backward draws (the default) the layers inside recomputed sub-blocks (q, k, v, the
    attention output, the intermediate) and the output projection reading the recomputed
    activation's row recipe estimate their weight gradients from rows drawn with the true output
    gradient; every other gradient is bitwise that of forward draws (input gradients are exact
    either way), and the step's live peak grows by no more than one attention context
    (B, T, hidden), held while its block's backward runs."""
    input_ids = torch.randint(0, 100, (4, 32))
    model, forward_drawn, peak = sampled_step(True, input_ids, recompute_attention=True)
    _, backward_drawn, backward_peak = sampled_step(True, input_ids, recompute_attention=True, backward_draws=True)
    names = [name for name, _ in model.named_parameters()]
    sampled = {f"{name}.weight" for name, _ in sampled_modules(model)}
    assert len(sampled) == 12
    for name, grad, reference in zip(names, backward_drawn, forward_drawn):
        assert torch.isfinite(grad).all()
        if name in sampled:
            assert not torch.equal(grad, reference), name
        else:
            assert torch.equal(grad, reference), name
    assert backward_peak - peak <= 4 * 32 * 32 * 4


def test_recompute_attention_takes_the_outermost_attention_modules():
    model = tiny_bert("sdpa")
    names = apply_companions(model, recompute_attention=True)
    assert names == ["encoder.layer.0.attention", "encoder.layer.1.attention"]
    assert remove_companions(model) == names
    assert type(model.encoder.layer[0].attention) is transformers.models.bert.modeling_bert.BertAttention


def test_recompute_attention_skips_calls_with_a_key_value_cache():
    """GPT-2 trains with use_cache=True by default: the attention appends to the cache, which a
    recompute would do twice, so those calls run plain (and still train correctly)."""
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).train()
    input_ids = torch.randint(0, 100, (2, 9))
    expected = train_step_grads_lm(model, input_ids, use_cache=False)
    names = apply_companions(model, lean_attention=True,
                             recompute_attention=True)
    assert names == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert type(model.transformer.h[0].attn).__name__ == "RecomputedAttentionCompanionGPT2Attention"
    calls = []
    model.transformer.h[0].attn.c_attn.register_forward_hook(lambda *_: calls.append(1))
    for use_cache, runs in ((False, 2), (True, 1)):  # forward and recompute; forward only
        calls.clear()
        for grad, reference in zip(train_step_grads_lm(model, input_ids, use_cache=use_cache), expected):
            torch.testing.assert_close(grad, reference)
        assert len(calls) == runs


def train_step_grads_lm(model: nn.Module, input_ids: torch.Tensor, use_cache: bool) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=input_ids, labels=input_ids, use_cache=use_cache).loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_recompute_applies_only_to_linear_then_activation_modules():
    model = tiny_bert("sdpa")
    names = apply_companions(model, recompute_activation=True)
    assert names == ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (2, 9)))  # eval and no-grad run the plain forward
    assert remove_companions(model) == names


def test_recompute_finds_lora_wrapped_intermediate_layers():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert("sdpa"), peft.LoraConfig(r=2, target_modules=["dense"]))
    names = apply_companions(model, recompute_activation=True)
    assert [n.split("model.")[-1] for n in names] == ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]
    input_ids = torch.randint(0, 100, (2, 9))
    model(input_ids=input_ids).last_hidden_state.sum().backward()  # recompute through the adapters
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
    assert model.base_model.model.encoder.layer[0].intermediate.row_recipe  # no adapter dropout


def test_no_row_recipe_through_adapter_dropout():
    """Rows recomputed in backward would draw another dropout mask than forward did."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert("sdpa"), peft.LoraConfig(r=2, target_modules=["dense"], lora_dropout=0.1))
    apply_companions(model, recompute_activation=True)
    assert not model.base_model.model.encoder.layer[0].intermediate.row_recipe
