"""`apply`, `remove` and `summary`: WTA-CRS on any PyTorch / Hugging Face model in one line.

Like torchao's `swap_linear_layers`, the targeted layers keep their identity and their very
Parameter objects (state_dict keys, optimizer references, weight tying, `isinstance` survive):
only their class changes to a sampled subclass, and `remove` changes it back.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from wtacrs.companions import COMPANION_OPTIONS, apply_companions, companion_usage, remove_companions
from wtacrs.config import WTACRSConfig
from wtacrs.layers import SampledLayerMixin, SampledLinear, sampled_conv1d_class
from wtacrs.sampling import SamplingState
from wtacrs.sampling.state import bind_frames

_STATE_ATTR = "wtacrs_state"
# `apply` warns when more of the blocks' trained weight matrices than this lie outside sampled
# layers (mixture-of-experts experts, embeddings inside blocks, custom layers).
UNCOVERED_WARNING_SHARE = 0.2

logger = logging.getLogger(__name__)


class NoMatchingModulesError(ValueError):
    """`target_modules` / `exclude_modules` selected no linear layer."""


def _conv1d_class() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _sampled_class_for(module: nn.Module) -> type[nn.Module] | None:
    """The sampled subclass for exactly nn.Linear and GPT-2's Conv1D; None for anything else
    (subclasses such as quantised linears have their own forward we must not bypass)."""
    if type(module) is nn.Linear:
        return SampledLinear
    if _conv1d_class() is not None and type(module) is _conv1d_class():
        return sampled_conv1d_class()
    return None


def _name_matches(name: str, spec: Any, module: nn.Module) -> bool:
    if spec is None:
        return False
    if callable(spec):
        return bool(spec(module, name))
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _is_excluded(name: str, spec: Any) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(part in spec for part in name.split("."))


def find_target_modules(model: nn.Module, config: WTACRSConfig) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every layer `config` selects, in model order.

    A layer is selected when it is an nn.Linear / Conv1D, is not excluded, and either its own
    name or the name of a module containing it matches `target_modules` (so "query" also
    reaches the LoRA matrices inside a PEFT-wrapped query). With target_modules None, the layers
    inside any nn.ModuleList (the repeated transformer blocks) are selected.
    """
    modules = dict(model.named_modules())
    if config.target_modules is None:
        roots = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]
    else:
        roots = [n for n, m in modules.items() if n and _name_matches(n, config.target_modules, m)]
    prefixes = tuple(r + "." for r in roots)
    return [
        (name, module)
        for name, module in modules.items()
        if _sampled_class_for(module) is not None
        and (name in roots or name.startswith(prefixes))
        and not _is_excluded(name, config.exclude_modules)
    ]


def is_decoder_only_lm(model: nn.Module) -> bool:
    """Whether `model` (maybe PEFT-wrapped) is of a decoder-only language-model family (LLaMA,
    GPT-2, Qwen, ...: a causal-LM architecture with no masked-LM one and no encoder), whatever
    its head: where the recommended recipe turns on the exact companions (`AUTO_COMPANIONS`)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
    except ImportError:  # pragma: no cover - transformers is in the [hf] extra
        return False
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _encoder_prefix(model: nn.Module) -> str | None:
    """Qualified name of the encoder of an encoder-decoder model, else None."""
    config = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(config, "is_encoder_decoder", False) or get_encoder is None:
        return None
    encoder = get_encoder()
    return next((name for name, m in model.named_modules() if m is encoder), None)


def _stream(name: str, encoder_prefix: str | None) -> str:
    """Which attention mask describes this layer's rows: the encoder's, the decoder's or the model's."""
    if encoder_prefix is None:
        return "main"
    return "encoder" if name.startswith(encoder_prefix + ".") else "decoder"


def _begin_forward(model: nn.Module, state: SamplingState, signature: inspect.Signature, module, args, kwargs
                   ) -> tuple[tuple, dict] | None:
    if not (model.training and torch.is_grad_enabled()):
        return None  # nothing samples: an eval forward leaves the step's frames alone
    if not torch.compiler.is_compiling():
        follow_model_changes(model, state)
    changed = None
    if state.config.recompute_attention and asks_for_kv_cache(model, kwargs):
        kwargs = {**kwargs, "use_cache": False}
        changed = (args, kwargs)
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = kwargs
    mask = bound.get("attention_mask")
    mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
    decoder_mask = bound.get("decoder_attention_mask")
    decoder_mask = decoder_mask if isinstance(decoder_mask, Tensor) and decoder_mask.dim() == 2 else None
    state.begin_forward({"main": mask, "encoder": mask, "decoder": decoder_mask}, _device(model, mask))
    return changed


def asks_for_kv_cache(model: nn.Module, kwargs: dict) -> bool:
    """Whether a forward of `model` with `kwargs` would build a key/value cache (`use_cache`, given
    or the config's default, as a decoder's is). The recomputed attention skips a call given a
    cache (it would append to it twice), and training needs none: training forwards and the
    learning-rate measurement run with use_cache=False, as Hugging Face gradient checkpointing
    does."""
    return kwargs.get("use_cache", getattr(getattr(model, "config", None), "use_cache", False)) is True


def _end_forward(model: nn.Module, state: SamplingState, module, args, output) -> None:
    if model.training and torch.is_grad_enabled():
        state.end_forward(_tensors(output))


def _tensors(output: Any) -> list[Tensor]:
    """The tensors of a forward's output (a tensor, a ModelOutput, a tuple or dict of them)."""
    if isinstance(output, Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else []
    return [t for value in values for t in _tensors(value)]


def _device(model: nn.Module, mask: Tensor | None) -> torch.device:
    """The device a forward of `model` runs on (its mask's, else its first parameter's)."""
    if mask is not None:
        return mask.device
    return next(model.parameters()).device


def follow_model_changes(model: nn.Module, state: SamplingState) -> None:
    """What changed on `model` since `apply`, taken in before its training forward: layers added
    (PEFT injecting LoRA matrices) are sampled too, and gradient checkpointing enabled since is
    bound to the frames."""
    _swap_new_targets(model, state)
    _bind_checkpointing(model, state)


def _bind_checkpointing(model: nn.Module, state: SamplingState) -> None:
    """Hugging Face gradient checkpointing's function, on every module that has one, runs its
    region in the frames current at its first run (`sampling.state.bind_frames`): the region's
    recompute in backward then draws from its own forward's frame, whatever forwards ran since.
    Under torch.compile, a region holding the recompute companions' own checkpoints is refused
    with a clear error (dynamo cannot trace a checkpoint nested in another)."""
    recomputes = state.config.recompute_activation or state.config.recompute_attention
    for module in model.modules():
        function = module.__dict__.get("_gradient_checkpointing_func")
        if function is not None and not getattr(function, "_wtacrs_binds_frames", False):
            module._gradient_checkpointing_func = _binding_frames(function, recomputes)


def _binding_frames(checkpoint_function: Callable, recomputes: bool) -> Callable:
    def checkpoint_in_frames(region, *args, **kwargs):
        if recomputes and torch.compiler.is_compiling():
            _refuse_nested_checkpoints_under_compile()
        return checkpoint_function(bind_frames(region), *args, **kwargs)

    checkpoint_in_frames._wtacrs_binds_frames = True
    return checkpoint_in_frames


NESTED_CHECKPOINTS_UNDER_COMPILE = (
    "wtacrs: torch.compile cannot trace Hugging Face gradient checkpointing around the recompute companions "
    "(recompute_activation, recompute_attention), which checkpoint their own sub-blocks: dynamo does not trace a "
    "checkpoint nested in another. Use one of them: the recommended recipe without gradient_checkpointing_enable(), "
    "or gradient checkpointing with WTACRSConfig(recompute_activation=False, recompute_attention=False) (e.g. "
    "WTACRSConfig.preset(\"sampler\")). Eager steps compose both.")


@torch.compiler.disable(reason=NESTED_CHECKPOINTS_UNDER_COMPILE)  # fullgraph=True reports the reason
def _refuse_nested_checkpoints_under_compile() -> None:
    """Run outside the trace (a graph break), so that the error reaches the caller as written."""
    raise RuntimeError(NESTED_CHECKPOINTS_UNDER_COMPILE)


def apply(model: nn.Module, config: WTACRSConfig | None = None) -> nn.Module:
    """Sample the weight gradients of `model`'s targeted linear layers, in place.

    Without `config`, the recommended recipe (`WTACRSConfig()`'s defaults): ratio 0.3, both
    recomputes with every sampled layer drawing in backward, and the exact companions on
    decoder-only language models (`is_decoder_only_lm`).

    Forward outputs are unchanged (bitwise) in train and eval mode; in training, each targeted
    layer stores only the sampled rows of its input. Works on plain Transformers models and on
    PEFT-wrapped ones (the frozen base weights store nothing; LoRA matrices are sampled). The
    model is changed by `TRANSFORMS` in turn, all sharing one `SamplingState` (config, seed,
    step); if one fails, those already made are undone.

    Returns:
        the same `model`.
    Raises:
        NoMatchingModulesError: nothing matched `config.target_modules`.
        ValueError: wtacrs is already applied to this model.
    """
    config = (config or WTACRSConfig()).with_auto_companions(is_decoder_only_lm(model))
    if hasattr(model, _STATE_ATTR):
        raise ValueError("wtacrs is already applied to this model; call wtacrs.remove(model) first")
    state = SamplingState(config, model)
    made: list[Transform] = []
    try:
        for transform in TRANSFORMS:
            transform.apply(model, state)
            made.append(transform)
    except Exception:
        for transform in reversed(made):  # never leave a half-applied model behind
            transform.remove(model, state)
        raise
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: plain layers with the identical Parameter objects; returns `model`."""
    state = sampling_state(model)
    if state.awaits_backward():
        raise RuntimeError("wtacrs.remove: a training forward of this model has not run its backward yet, and its "
                           "recomputes in backward need the sampled model; call backward (or drop its outputs) first")
    for transform in reversed(TRANSFORMS):
        transform.remove(model, state)
    return model


@dataclass(frozen=True)
class Transform:
    """One change `apply` makes to a model, and its undoing by `remove`."""

    name: str
    apply: Callable[[nn.Module, SamplingState], None]
    remove: Callable[[nn.Module, SamplingState], None]


def _sample_linears(model: nn.Module, state: SamplingState) -> None:
    targets = find_target_modules(model, state.config)
    if not targets:
        raise NoMatchingModulesError(
            f"no nn.Linear/Conv1D layer matched target_modules={state.config.target_modules!r} "
            f"(exclude_modules={state.config.exclude_modules!r})"
        )
    _swap(model, state, targets)
    _warn_uncovered_blocks(model, targets)
    signature = inspect.signature(model.forward)
    state.attach(model.register_forward_pre_hook(partial(_begin_forward, model, state, signature), with_kwargs=True),
                 model.register_forward_hook(partial(_end_forward, model, state)))
    setattr(model, _STATE_ATTR, state)


def _warn_uncovered_blocks(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """Warn when the repeated blocks hold many trained weight-matrix parameters in modules no
    sampled class exists for (mixture-of-experts models keep their experts as 3-D parameters, not
    nn.Linear): their activations are stored in full, so the saving is smaller than it looks.
    Linear layers left out on purpose (`exclude_modules`, such as LoRA's rank-r `lora_B`, or
    outside `target_modules`) are not counted as such."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    covered = {id(p) for _, layer in targets for p in layer.parameters(recurse=False)}
    outside: dict[str, int] = {}
    total = 0
    for prefix, block in blocks:
        for owner, module in block.named_modules(prefix=prefix):
            samplable = isinstance(module, SampledLayerMixin) or _sampled_class_for(module) is not None
            for p in module.parameters(recurse=False):
                if p.dim() < 2 or not p.requires_grad:
                    continue
                total += p.numel()
                if id(p) not in covered and not samplable:
                    outside[owner] = outside.get(owner, 0) + p.numel()
    uncovered = sum(outside.values())
    if total and uncovered / total > UNCOVERED_WARNING_SHARE:
        example = max(outside, key=outside.get)
        logger.warning("wtacrs: sampled layers cover %.0f%% of the blocks' trained weight matrices; %.0f%% are in "
                       "modules wtacrs cannot sample (e.g. %s), whose inputs are stored in full",
                       100 * (total - uncovered) / total, 100 * uncovered / total, example)


def _unsample_linears(model: nn.Module, state: SamplingState) -> None:
    for module in model.modules():
        if isinstance(module, SampledLayerMixin):
            module.__class__ = module.original_class()
            del module.wtacrs_state, module.wtacrs_slot, module.wtacrs_stream
    state.detach()
    delattr(model, _STATE_ATTR)


def _sample_attention(model: nn.Module, state: SamplingState) -> None:
    config = state.config
    if config.attention:  # transformers' attention registry is the only generic way into HF attention code
        from wtacrs.sampled_attention.transformers import enable_sampled_attention

        # Keyed by the state's seed, rank and step like the linears: a recompute redraws the same slices.
        enable_sampled_attention(model, config.ratio, config.estimator, budget=config.budget, state=state)


def _unsample_attention(model: nn.Module, state: SamplingState) -> None:
    if _runs_sampled_attention(model):
        from wtacrs.sampled_attention.transformers import disable_sampled_attention

        disable_sampled_attention(model)


def _add_companions(model: nn.Module, state: SamplingState) -> None:
    state.record_companions(apply_companions(model, **state.config.companion_options()))


def _remove_companions(model: nn.Module, state: SamplingState) -> None:
    remove_companions(model)


# In order: sampled attention before the companions, which may swap the attention modules' classes.
TRANSFORMS: tuple[Transform, ...] = (
    Transform("sampled linears", _sample_linears, _unsample_linears),
    Transform("sampled attention", _sample_attention, _unsample_attention),
    Transform("companions", _add_companions, _remove_companions),
)


def _swap(model: nn.Module, state: SamplingState, targets: list[tuple[str, nn.Module]]) -> None:
    encoder_prefix = _encoder_prefix(model)
    for name, module in targets:
        module.__class__ = _sampled_class_for(module)
        stream = _stream(name, encoder_prefix)
        module.wtacrs_state, module.wtacrs_slot, module.wtacrs_stream = state, state.add_layer(name, stream), stream
    state.swapped_with(sum(1 for _ in model.modules()))


def _swap_new_targets(model: nn.Module, state: SamplingState) -> None:
    """Layers added after `apply` (PEFT injecting LoRA matrices) are sampled too."""
    if sum(1 for _ in model.modules()) != state.num_modules:
        _swap(model, state, find_target_modules(model, state.config))


def sampling_state(model: nn.Module) -> SamplingState:
    """The SamplingState `apply` attached to `model` (cache, step counter, config)."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("wtacrs is not applied to this model; call wtacrs.apply(model, config) first")
    return state


def sampled_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SampledLayerMixin)]


@dataclass(frozen=True)
class CompanionEffect:
    """What one companion did on a model: the modules it was applied to and those it acted on in
    a training forward (`wtacrs.companions.usage`)."""

    applied: tuple[str, ...]
    acted: tuple[str, ...]
    trained: bool  # a forward with gradients has run since `apply`

    @property
    def status(self) -> str:
        """"took effect", "nothing to change" (no module to apply it to, or none acted in
        training), or "not run yet" (applied, but no training forward has run)."""
        if self.acted:
            return "took effect"
        return "not run yet" if self.applied and not self.trained else "nothing to change"


def companion_effects(model: nn.Module) -> dict[str, CompanionEffect]:
    """{companion option of the model's WTACRSConfig that is on: its CompanionEffect}, in
    `COMPANION_OPTIONS` order. A companion that found nothing to change (T5's layer norm is neither an
    nn.LayerNorm nor LLaMA-style, DeBERTa's attention calls no SDPA) says so instead of claiming a saving."""
    state = sampling_state(model)
    found = companion_usage(model)
    return {
        option: CompanionEffect(*map(tuple, found.get(option, ([], []))), trained=state.step > 0)
        for option in COMPANION_OPTIONS if getattr(state.config, option)
    }


def sampled_attention_modules(model: nn.Module) -> list[str]:
    """Qualified names of the attention modules whose QKᵀ and PV products are sampled
    (`WTACRSConfig.attention`; none unless the model runs the "wtacrs" attention)."""
    if not _runs_sampled_attention(model):
        return []
    from wtacrs.sampled_attention.transformers import sampled_attention_names

    return sampled_attention_names(model)


def _runs_sampled_attention(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == "wtacrs"


def summary(model: nn.Module) -> str:
    """Which layers are sampled, at what ratio, the bytes their inputs keep for backward, whether
    the attention matmuls are sampled, and which companions took effect.

    Only layers whose weight is trained count (a frozen base layer under LoRA stores no input
    either way). The bytes are predicted per token from where each layer drew in the last training
    step (`SamplingState.stored_input`): against the same model and companions unsampled, whose layers
    keep their inputs whole (once per input tensor, and nothing for an input the op making it keeps
    anyway, as SDPA keeps its output), a layer drawing in forward keeps ratio × (its input + 12
    bytes of index and weight) per row, once per shared draw; one drawing in backward from
    recomputed rows keeps 4 bytes (the row norm); one inside a checkpointed region keeps nothing
    either way. Before any training step every layer is counted as drawing in forward.
    Companions are reported as `companion_effects` finds them (run a training step first to see
    which acted); their own savings are not in the count. A model in eval mode is said to be.
    """
    state = sampling_state(model)
    layers = _trained_sampled_modules(model)
    frozen = len(sampled_modules(model)) - len(layers)
    lines = [f"wtacrs: {len(layers)} sampled layers, estimator={state.config.estimator}, ratio={state.config.ratio}"
             + (f" ({frozen} frozen layers store no input and are not counted)" if frozen else "")]
    if not model.training:
        lines.append("(the model is in eval mode, as from_pretrained returns it: layers are sampled and companions "
                     "act in training mode only; call model.train() before training)")
    lines += _layer_lines(state, layers)
    attention = sampled_attention_modules(model)
    lines.append(f"sampled attention: {f'{len(attention)} modules' if attention else 'off'}")
    effects = companion_effects(model)
    lines += ["companions:"] if effects else []
    for option, effect in effects.items():
        counts = f"{len(effect.acted)} of {len(effect.applied)} modules acted" if effect.applied else "no such module"
        lines.append(f"  {option:<22} {effect.status} ({counts})")
    return "\n".join(lines)


def saved_input_bytes_per_token(model: nn.Module) -> tuple[float, float]:
    """(unsampled, sampled): bytes per token the trained sampled layers' inputs keep for backward,
    predicted as `summary` explains."""
    return _saved_input_bytes(sampling_state(model), [m for _, m in _trained_sampled_modules(model)])


def _trained_sampled_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The sampled layers whose weight is trained (LoRA's frozen base layers store no input)."""
    return [(name, m) for name, m in sampled_modules(model) if m.weight.requires_grad]


def _input_width(module: nn.Module) -> int:
    """in_features of a sampled layer (GPT-2's Conv1D keeps its weight as (in, out))."""
    return module.weight.shape[1] if isinstance(module, nn.Linear) else module.weight.shape[0]


def _saved_input_bytes(state: SamplingState, layers: list[nn.Module]) -> tuple[float, float]:
    leader_of = state.draw_leaders()
    unsampled = sampled = 0.0
    counted = set()  # draw groups (layers known to read one input tensor) already counted
    for module in layers:
        slot = module.wtacrs_slot
        stored, kept_anyway = state.stored_input(slot)
        stored = stored or "rows"
        group = leader_of.get(slot, slot)
        if stored == "nothing" or group in counted:
            continue
        counted.add(group)
        nbytes = _input_width(module) * module.weight.element_size()
        unsampled += 0 if kept_anyway else nbytes
        sampled += state.config.ratio * (nbytes + 12) if stored == "rows" else 4
    return unsampled, sampled


def _layer_lines(state: SamplingState, layers: list[tuple[str, nn.Module]]) -> list[str]:
    """One line per sampled layer, then the bytes per token their inputs keep, unsampled and sampled."""
    leader_of = state.draw_leaders()
    lines = []
    stored = [state.stored_input(module.wtacrs_slot)[0] for _, module in layers]
    for (name, module), kept in zip(layers, stored):
        slot = module.wtacrs_slot
        leader = leader_of.get(slot, slot)
        where = {"rows": "draws in forward", "norms": "draws in backward",
                 "nothing": "draws in backward (checkpointed region)"}.get(kept, "")
        shares = f", shares input of layer {leader}" if leader != slot else ""
        lines.append(f"  {name:<60} in={_input_width(module):<6} {where}{shares}")
    unsampled, sampled = _saved_input_bytes(state, [m for _, m in layers])
    regions = stored.count("nothing")
    lines.append(f"sampled layers' inputs kept for backward, bytes per token: {unsampled:.0f} unsampled, "
                 f"{sampled:.0f} sampled ({unsampled - sampled:.0f} saved"
                 + (f"; {regions} layers in checkpointed regions keep none either way" if regions else "")
                 + "). The companions' savings are not counted: `wtacrs bench memory` measures a step's peak, "
                 "`wtacrs plan` predicts it")
    if all(kept is None for kept in stored):
        lines.append("(before any training step: every layer counted as drawing in forward)")
    return lines
