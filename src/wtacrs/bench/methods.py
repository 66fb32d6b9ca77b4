"""Training methods to compare, named by composable specs such as "lora+wtacrs@0.3+checkpointing".

Components, joined by "+":
    full                 plain fine-tuning of every weight (alone, or with fused-adamw)
    checkpointing        Hugging Face gradient checkpointing (non-reentrant)
    lora                 PEFT LoRA (r=8, alpha=16, all linear layers; the head is trained fully)
    wtacrs@R | crs@R | topk@R | uniform@R    `wtacrs.apply` with that estimator at ratio R
    companions           lean dropout, lean LayerNorm and lean (recomputed) attention, all exact
    act=MODE             activation compression MODE (an approximation)
    recompute            the activation input of BERT's intermediate recomputed in backward (exact)
    recompute-attention  the attention sub-blocks recomputed in backward (exact)
    attention            sampled attention matmuls
    fused-adamw          each parameter's AdamW step runs in backward as soon as its gradient is
                         complete, which then is freed (`wtacrs.bench.training.BackwardFusedAdamW`):
                         no full set of gradients ever exists; not a WTA-CRS technique, applies to
                         any method (compare against full+fused-adamw too)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from torch import Tensor, nn

from wtacrs.bench.models import is_seq2seq

SAMPLERS = {"wtacrs": "wta-crs", "crs": "crs", "priority": "priority", "topk": "topk", "uniform": "uniform"}
LORA_RANK = 8
LORA_ALPHA = 16
DEFAULT_METHODS: tuple[str, ...] = (
    "full",
    "checkpointing",
    "lora",
    "wtacrs@0.3",
    "wtacrs@0.1",
    "lora+wtacrs@0.3",
    "lora+wtacrs@0.1",
    "wtacrs@0.3+companions",
    "lora+wtacrs@0.3+companions",
    "wtacrs@0.3+companions+recompute",
    "lora+wtacrs@0.3+companions+recompute",
    "wtacrs@0.3+companions+recompute+recompute-attention",
    "lora+wtacrs@0.3+companions+recompute+recompute-attention",
    "wtacrs@0.3+checkpointing",
    "wtacrs@0.3+companions+checkpointing",
    "crs@0.3",
    "topk@0.3",
)


class MethodError(ValueError):
    """A method spec that cannot be parsed, or that this installation cannot run."""


@dataclass(frozen=True)
class Method:
    """A parsed method spec; `name` is the spec as written."""

    name: str
    lora: bool = False
    checkpointing: bool = False
    estimator: str | None = None
    ratio: float = 1.0
    companions: bool = False
    activation_compression: str | None = None
    attention: bool = False
    fused_optimizer: bool = False
    recompute_activation: bool = False
    recompute_attention: bool = False

    @property
    def uses_wtacrs(self) -> bool:
        return (
            self.estimator is not None or self.companions or self.attention or self.recompute_activation
            or self.recompute_attention or self.activation_compression is not None
        )


def parse_method(spec: str) -> Method:
    """Parse "lora+wtacrs@0.3+companions"-style specs; raises MethodError naming the bad part."""
    parts = [p.strip() for p in spec.split("+")]
    if parts == ["full"]:
        return Method(spec)
    method = Method(spec)
    if "full" in parts and "lora" in parts:
        raise MethodError(f"method {spec!r} names both full fine-tuning and LoRA")
    for part in parts:
        method = _with_component(method, part, spec)
    return method


def _with_component(method: Method, part: str, spec: str) -> Method:
    name, _, value = part.partition("@")
    if part == "full":  # all weights trained: the default, named only to combine with fused-adamw
        return method
    if name in SAMPLERS and value:
        if method.estimator is not None:
            raise MethodError(f"method {spec!r} names two samplers")
        return replace(method, estimator=SAMPLERS[name], ratio=_ratio(value, spec))
    if part.startswith("act="):
        return replace(method, activation_compression=part[4:])
    flags = {
        "lora": "lora", "checkpointing": "checkpointing", "companions": "companions", "attention": "attention",
        "fused-adamw": "fused_optimizer", "recompute": "recompute_activation",
        "recompute-attention": "recompute_attention",
    }
    if part in flags and not value:
        return replace(method, **{flags[part]: True})
    raise MethodError(
        f"bad component {part!r} in method {spec!r}; use {', '.join(['full', *flags])}, act=MODE or SAMPLER@RATIO "
        f"with SAMPLER in {', '.join(SAMPLERS)}"
    )


def _ratio(value: str, spec: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        raise MethodError(f"bad ratio {value!r} in method {spec!r}") from None
    if not 0.0 < ratio <= 1.0:
        raise MethodError(f"ratio must be in (0, 1], got {value!r} in method {spec!r}")
    return ratio


def prepare(model: nn.Module, method: Method, seed: int = 0) -> nn.Module:
    """Turn a freshly built model into `method`'s trainable model (may wrap it, e.g. LoRA)."""
    if method.checkpointing:
        _enable_checkpointing(model)
    if method.lora:
        model = _with_lora(model)
    if method.uses_wtacrs:
        model = _with_wtacrs(model, method, seed)
    return model


def _enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of every block (transformers 5 renamed the method; same behaviour)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _with_lora(model: nn.Module) -> nn.Module:
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is in the [peft] extra
        raise MethodError("LoRA methods need peft: pip install 'wtacrs[peft]'") from e
    task = peft.TaskType.SEQ_2_SEQ_LM if is_seq2seq(model) else peft.TaskType.SEQ_CLS
    config = peft.LoraConfig(task_type=task, r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules="all-linear")
    return peft.get_peft_model(model, config)


def wtacrs_config(method: Method, seed: int = 0):
    """The `wtacrs.WTACRSConfig` that `method` applies."""
    import wtacrs

    if not hasattr(wtacrs, "WTACRSConfig"):
        raise MethodError(f"method {method.name!r} needs wtacrs.apply, which this installation lacks")
    sampled = method.estimator is not None
    return wtacrs.WTACRSConfig(
        ratio=method.ratio if sampled else 1.0,
        estimator=method.estimator if sampled else "exact",
        attention=method.attention,
        seed=seed,
        lean_dropout=method.companions,
        lean_layernorm=method.companions,
        lean_attention=method.companions,
        recompute_activation=method.recompute_activation,
        recompute_attention=method.recompute_attention,
        activation_compression=method.activation_compression,
    )


def _with_wtacrs(model: nn.Module, method: Method, seed: int) -> nn.Module:
    import wtacrs

    try:
        config = wtacrs_config(method, seed)
        model = wtacrs.apply(model, config) or model
    except (TypeError, NotImplementedError) as e:
        raise MethodError(f"method {method.name!r} is not supported by this installation: {e}") from e
    if method.companions or method.activation_compression or method.recompute_activation or method.recompute_attention:
        _ensure_companions(model, method)
    return model


def _ensure_companions(model: nn.Module, method: Method) -> None:
    """Swap in the companions the config asks for. `apply_companions` skips modules already
    swapped, so this changes nothing where `wtacrs.apply` has done it from the config flags."""
    from wtacrs.companions import apply_companions

    apply_companions(model, dropout=method.companions, layernorm=method.companions,
                     activation=method.activation_compression, attention=method.companions,
                     recompute_activation=method.recompute_activation,
                     recompute_attention=method.recompute_attention)


def batch_context(method: Method, example_ids: Tensor, host_mask: Tensor | None = None
                  ) -> contextlib.AbstractContextManager:
    """`wtacrs.batch(example_ids, host_mask)` for methods that sample, else a no-op context."""
    if not method.uses_wtacrs:
        return contextlib.nullcontext()
    import wtacrs

    return wtacrs.batch(example_ids, host_mask)
