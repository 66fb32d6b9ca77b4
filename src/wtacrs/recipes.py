"""Recipes: the one language naming a way to train, for the library, `finetune`, `bench` and `report`.

A recipe is components joined by "+", e.g. ``lora+wtacrs@0.3+companions+recompute``:

    full                 every weight trained (the default; named alone or with fused-adamw)
    lora                 PEFT LoRA adapters (`LoraSettings`: r 8, alpha 16, every linear layer of
                         the model but its output head, no dropout), the task head trained fully
    velora               LoRA whose A projections keep a compressed copy of their input (PEFT's
                         VeLoRA, Miles et al. 2024): a peer to compare with, not combinable with a
                         sampler (both replace the A projection's backward)
    SAMPLER@R            `wtacrs.apply` with that estimator keeping a fraction R of the token rows
                         (wtacrs, crs, priority, topk, uniform)
    attention            the attention score and output matmuls sampled too (needs a sampler)
    companions           the exact memory companions: dropout masks regenerated, LayerNorm/RMSNorm
                         backward from its output, attention probabilities recomputed, and a causal
                         LM's next-token loss in chunks (never the whole batch's logits)
    recompute            the activation function's input recomputed in backward (exact)
    keep-gate            with recompute: gated MLPs (LLaMA's) keep their gate projection's output
                         and recompute only the up projection (half the recompute's matmuls for
                         one more intermediate-size tensor per block)
    recompute-attention  the attention sub-blocks recomputed in backward (exact)
    no-cache             no gradient-norm cache: layers that draw in forward score rows by their
                         activation norms alone (`WTACRSConfig.grad_norm="none"`; needs a sampler)
    act=MODE             the activation input stored compressed (an approximation)
    checkpointing        Hugging Face gradient checkpointing of every block (non-reentrant)
    fused-adamw          each parameter's AdamW step runs in backward as soon as its gradient is
                         complete (`wtacrs bench` only: a Trainer owns its optimizer)

The same recipe builds the same model everywhere (`Recipe.prepare`), so the same spec means the
same memory in `wtacrs bench` and `wtacrs finetune`, and every table prints the canonical spec
(`Recipe.spec`: components in the order above).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from wtacrs.config import ACTIVATION_MODES, AUTO_COMPANIONS, COMPANIONS, TASK_HEADS, WTACRSConfig

SAMPLERS = {"wtacrs": "wta-crs", "crs": "crs", "priority": "priority", "topk": "topk", "uniform": "uniform"}
FLAGS = {  # component -> Recipe field
    "lora": "lora", "attention": "sampled_attention", "companions": "companions", "recompute": "recompute",
    "keep-gate": "keep_gate", "recompute-attention": "recompute_attention", "no-cache": "no_cache",
    "checkpointing": "checkpointing", "fused-adamw": "fused_adamw",
}
# WTACRSConfig companion option -> the Recipe field that sets it: "companions" turns on every
# auto companion (the exact ones the recommended config turns on for decoder-only LMs).
COMPANION_FIELDS: dict[str, str] = {
    **{option: "companions" for option in AUTO_COMPANIONS},
    "activation_compression": "activation_compression", "recompute_activation": "recompute", "keep_gate": "keep_gate",
    "recompute_attention": "recompute_attention",
}
# The exact WTA-CRS recipe that beats gradient checkpointing on both axes for the offline default
# (all-MiniLM-L6-v2, benchmarks/RESULTS.md): in `wtacrs bench` (batch 32, seq 64, interleaved) the
# same live peak at 0.89x its step time; in `wtacrs finetune`'s runs 0.97x its peak at 0.86x its
# step. The companions (regenerated dropout, lean LayerNorm) cost more time than they save memory
# at that size; for bert-base at batch 16 the measured winner was wtacrs@0.3+companions+recompute
# (checkpointing's peak at 0.861x its step time). Every sampled layer of this recipe draws in
# backward with its true output-gradient norms (WTACRSConfig.backward_draws): on SST-2 it is within
# 0.22 of full fine-tuning's accuracy (benchmarks/ACCURACY.md), at checkpointing's peak and 0.98x
# full's step time at bert-base batch 16.
BEST_EXACT = "wtacrs@0.3+recompute+recompute-attention"


class RecipeError(ValueError):
    """A recipe spec that cannot be parsed, or a combination that cannot run."""


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapters of recipes with `lora` (one place: bench and finetune train the same)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0  # >0 makes LoRA read a dropped copy of each input: one more stored activation
    target_modules: str | tuple[str, ...] = "all-linear"


@dataclass(frozen=True)
class SamplingSettings:
    """How sampling recipes count and choose rows (see `wtacrs.WTACRSConfig`)."""

    budget: str = "live"
    target_modules: tuple[str, ...] | None = None
    skip_padding: bool = True


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe; build one with `parse_recipe`."""

    lora: bool = False
    velora: bool = False
    estimator: str | None = None  # a `wtacrs.estimators` name; None = no weight-gradient sampling
    ratio: float | None = None
    sampled_attention: bool = False
    companions: bool = False
    recompute: bool = False
    keep_gate: bool = False
    recompute_attention: bool = False
    no_cache: bool = False
    activation_compression: str | None = None
    checkpointing: bool = False
    fused_adamw: bool = False

    @property
    def samples(self) -> bool:
        """Whether weight gradients are estimated from sampled rows."""
        return self.estimator is not None

    @property
    def uses_wtacrs(self) -> bool:
        """Whether `wtacrs.apply` changes the model (sampling or any companion)."""
        return self.samples or any(self.companion_options.values())

    @property
    def companion_options(self) -> dict[str, Any]:
        """The `WTACRSConfig` companion options this recipe sets: {option: value} (`COMPANION_FIELDS`)."""
        return {option: getattr(self, field) for option, field in COMPANION_FIELDS.items()}

    @property
    def draws_in_backward(self) -> bool:
        """Whether some sampled layers draw in backward with their true ‖dY_i‖ (a sampler with a
        recompute companion: `WTACRSConfig.backward_draws`, on in every recipe)."""
        return self.samples and (self.recompute or self.recompute_attention)

    @property
    def spec(self) -> str:
        """The canonical spec: components in the documented order."""
        sampler = {v: k for k, v in SAMPLERS.items()}.get(self.estimator)
        parts = ["velora" if self.velora else "lora" if self.lora else "full"]
        parts += [f"{sampler}@{self.ratio:g}"] if sampler else []
        for name in ("attention", "companions", "recompute", "keep-gate", "recompute-attention", "no-cache"):
            parts += [name] if getattr(self, FLAGS[name]) else []
        parts += [f"act={self.activation_compression}"] if self.activation_compression else []
        parts += [name for name in ("checkpointing", "fused-adamw") if getattr(self, FLAGS[name])]
        if parts[0] == "full" and len(parts) > 1 and parts[1] != "fused-adamw":
            parts = parts[1:]  # "full" is implied, except beside fused-adamw alone
        return "+".join(parts)

    def wtacrs_config(self, seed: int = 0, sampling: SamplingSettings = SamplingSettings()) -> WTACRSConfig:
        """The `WTACRSConfig` this recipe applies (exact estimator when it only uses companions)."""
        return WTACRSConfig(
            ratio=self.ratio if self.samples else 1.0, estimator=self.estimator or "exact",
            budget=sampling.budget, skip_padding=sampling.skip_padding, grad_norm="none" if self.no_cache else "cache",
            target_modules=list(sampling.target_modules) if sampling.target_modules else None,
            attention=self.sampled_attention, seed=seed,
            **self.companion_options,
        )

    def prepare(self, model: nn.Module, *, seed: int = 0, task_type: str = "SEQ_CLS",
                lora: LoraSettings = LoraSettings(), sampling: SamplingSettings = SamplingSettings()) -> nn.Module:
        """Turn a freshly loaded model into this recipe's trainable model: checkpointing, then
        LoRA (returns PEFT's wrapper), then `wtacrs.apply`.

        Args:
            task_type: PEFT's `TaskType` name for LoRA ("SEQ_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM",
                "CAUSAL_LM"): it decides which head PEFT trains fully.
        """
        if self.checkpointing:
            enable_checkpointing(model)
        if self.lora:
            model = with_lora(model, lora, task_type, velora=self.velora)
        if self.uses_wtacrs:
            import wtacrs

            wtacrs.apply(model, self.wtacrs_config(seed, sampling))
        return model


def parse_recipe(spec: str, default_ratio: float | None = None) -> Recipe:
    """Parse a spec such as "lora+wtacrs@0.3+companions"; raises RecipeError naming the bad part.

    Args:
        default_ratio: the ratio of a sampler named without one ("wtacrs"); None = required.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RecipeError(f"empty recipe {spec!r}")
    parts = [p.strip() for p in spec.split("+")]
    if "full" in parts and ("lora" in parts or "velora" in parts):
        raise RecipeError(f"recipe {spec!r} names both full fine-tuning and LoRA")
    recipe = Recipe()
    for part in parts:
        recipe = _with_component(recipe, part, spec, default_ratio)
    if recipe.velora and recipe.samples:
        raise RecipeError(f"recipe {spec!r}: VeLoRA and a sampler both replace LoRA A's backward; choose one")
    for option in COMPANIONS:  # keep-gate needs recompute
        if option.unmet(recipe.companion_options):
            raise RecipeError(f"recipe {spec!r}: '{_component(option.name)}' {option.reason}; "
                              f"add '{_component(option.requires)}'")
    if recipe.no_cache and not recipe.samples:
        raise RecipeError(f"recipe {spec!r}: 'no-cache' turns off a sampler's cache; add one (e.g. wtacrs@0.3)")
    if recipe.sampled_attention and not recipe.samples:
        raise RecipeError(f"recipe {spec!r}: 'attention' samples the attention matmuls at a sampler's ratio; "
                          "add one (e.g. wtacrs@0.3)")
    return recipe


def _component(option: str) -> str:
    """The recipe component that turns on the companion `option` (a flag's)."""
    return {field: component for component, field in FLAGS.items()}[COMPANION_FIELDS[option]]


def _with_component(recipe: Recipe, part: str, spec: str, default_ratio: float | None) -> Recipe:
    name, at, value = part.partition("@")
    if part == "full":
        return recipe
    if name in SAMPLERS:
        if recipe.samples:
            raise RecipeError(f"recipe {spec!r} names two samplers")
        if not at and default_ratio is None:
            raise RecipeError(f"recipe {spec!r}: give {name}'s ratio, e.g. {name}@0.3")
        return replace(recipe, estimator=SAMPLERS[name], ratio=_ratio(value, spec) if at else default_ratio)
    if part == "velora":
        return replace(recipe, lora=True, velora=True)
    if part.startswith("act="):
        mode = part[len("act="):]
        if mode not in ACTIVATION_MODES:
            raise RecipeError(f"recipe {spec!r}: act= takes one of {', '.join(ACTIVATION_MODES)}, got {mode!r}")
        return replace(recipe, activation_compression=mode)
    if part in FLAGS:
        return replace(recipe, **{FLAGS[part]: True})
    raise RecipeError(f"bad component {part!r} in recipe {spec!r}; use full, velora, {', '.join(FLAGS)}, act=MODE or "
                      f"SAMPLER@RATIO with SAMPLER in {', '.join(SAMPLERS)}")


def _ratio(value: str, spec: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        raise RecipeError(f"bad ratio {value!r} in recipe {spec!r}") from None
    if not 0.0 < ratio <= 1.0:
        raise RecipeError(f"ratio must be in (0, 1], got {value!r} in recipe {spec!r}")
    return ratio


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of every block (transformers 5 renamed the method; same
    behaviour), without the key/value cache a training forward never uses (transformers would
    turn it off at each forward, with a warning)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def with_lora(model: nn.Module, settings: LoraSettings, task_type: str, velora: bool = False) -> nn.Module:
    """`model` wrapped by PEFT with LoRA adapters as `settings` say (VeLoRA's with `velora`)."""
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is in the [peft] extra
        raise RecipeError("LoRA recipes need peft: pip install 'wtacrs[peft]'") from e
    targets = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    # A question-answering head is new: trained in full (PEFT's modules_to_save) and kept out of
    # "all-linear", which leaves out only LM and classification heads. PEFT knows it only as
    # "qa_outputs" (ModernBERT's is "classifier") and refuses its full copy beside an adapter.
    heads = [name for name, module in model.named_children()
             if task_type == "QUESTION_ANS" and name in TASK_HEADS and isinstance(module, nn.Linear)]
    config = peft.LoraConfig(task_type=getattr(peft.TaskType, task_type), r=settings.r, lora_alpha=settings.alpha,
                             lora_dropout=settings.dropout, target_modules=targets, modules_to_save=heads or None,
                             exclude_modules=heads if heads and targets == "all-linear" else None,
                             **({"velora_config": peft.VeloraConfig()} if velora else {}))
    return peft.get_peft_model(model, config)
