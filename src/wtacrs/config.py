"""`WTACRSConfig`: what to sample, how, and which memory-lean companions to use."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union

from wtacrs.atomic import write_json_atomic
from wtacrs.estimators import ESTIMATORS, validate_ratio
from wtacrs.functional import BUDGETS

CONFIG_NAME = "wtacrs_config.json"

# Compact storages of the activation-function input (`wtacrs.companions.activation`).
ACTIVATION_MODES: tuple[str, ...] = ("bf16", "int8")

# The names transformers gives a task's new head (sequence classification, extractive QA).
TASK_HEADS: tuple[str, ...] = ("classifier", "qa_outputs", "score", "pre_classifier")
# Task heads and poolers read one summary vector per example: tiny activations, and sampling
# their input would only add variance. LoRA's up-projection reads the rank-r output of the
# down-projection: r numbers per token, too few to be worth a draw. Matched as name components.
DEFAULT_EXCLUDES: tuple[str, ...] = (*TASK_HEADS, "pooler", "lm_head", "lora_B")

ModuleFilter = Callable[[Any, str], bool]
TargetSpec = Union[list[str], tuple[str, ...], str, ModuleFilter, None]


class WTACRSConfigError(ValueError):
    """An invalid WTACRSConfig field or file."""


@dataclass(frozen=True)
class CompanionOption:
    """One memory companion's option of `WTACRSConfig`: the field's `companion` metadata, read
    into `COMPANIONS` (the one list of them that validation, `AUTO_COMPANIONS`,
    `wtacrs.companions.apply_companions`, the usage report and the recipes go by).

    Attributes:
        name: the WTACRSConfig field, and `apply_companions`' keyword.
        doc: its entry in WTACRSConfig's docstring.
        auto: its default, None, is decided per model by `wtacrs.apply` (`AUTO_COMPANIONS`).
        modes: a storage option's values besides None (off); empty for a flag (True or False).
        requires: another option that must be on with this one, and `reason` why.
        reported: `wtacrs.summary` reports whether it took effect (`keep_gate` only changes what
            `recompute_activation` keeps, and is reported as that).
    """

    name: str
    doc: str
    auto: bool = False
    modes: tuple[str, ...] = ()
    requires: str | None = None
    reason: str = ""
    reported: bool = True

    @property
    def off(self) -> bool | None:
        """The value that turns the companion off."""
        return None if self.modes else False

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this option ("must be ..."), or None."""
        if self.modes:
            return None if value is None or value in self.modes else (
                f"must be None or one of {', '.join(map(repr, self.modes))}, got {value!r}")
        if isinstance(value, bool) or (self.auto and value is None):
            return None
        allowed = "True, False or None (auto)" if self.auto else "True or False"
        return f"must be {allowed}, got {value!r}"

    def unmet(self, values: dict[str, Any]) -> str | None:
        """Which requirement `values` ({option: value}) break ("keep_gate keeps ...: set
        recompute_activation"), or None."""
        if self.requires and values.get(self.name) and not values.get(self.requires):
            return f"{self.name} {self.reason}: set {self.requires}"
        return None

    def docstring_entry(self) -> str:
        doc = self.doc + (" None (default): on for decoder-only language models, off otherwise (decided by "
                          "`wtacrs.apply`; `AUTO_COMPANIONS`)." if self.auto else "")
        return textwrap.fill(f"{self.name}: {doc}", width=100, initial_indent=" " * 8, subsequent_indent=" " * 12)


_COMPANION = "companion"  # the metadata key of the companion options' fields


def _companion(default: Any, help: str, doc: str, **option: Any) -> Any:
    """A companion option's field: its default, `help` (as every field's) and its
    `CompanionOption` (less the name, which is the field's)."""
    return field(default=default, metadata={"help": help, _COMPANION: CompanionOption(name="", doc=doc, **option)})


@dataclass
class WTACRSConfig:
    """How `wtacrs.apply` samples a model.

    The defaults are the recommended recipe (`PRESETS["recommended"]`, what `wtacrs finetune`
    trains with): ratio 0.3, the activation and attention sub-blocks recomputed in backward,
    every sampled layer drawing its rows there with its true output-gradient norms, and the exact
    companions on decoder-only language models. `WTACRSConfig.preset("sampler")` is the bare
    sampler of the paper (rows drawn in forward, scored by the gradient-norm cache).

    Attributes:
        ratio: fraction of token rows kept for each weight gradient, in (0, 1].
        budget: what `ratio` is a fraction of. "live" (default): the rows inside the attention
            mask, so the ratio is the share of real tokens kept. "all": every row of the padded
            batch, as the paper's code counts (its batches are padded to the maximum length, so
            on short sentences its "0.3" keeps every real token; see benchmarks/ACCURACY.md).
            With `attention`, the score product's keys are counted the same way.
        skip_padding: rows outside the attention mask (padding) are never sampled (default). Right
            when the loss ignores padded positions, as classification and language-model losses
            do; a padded row that receives a non-zero output gradient raises
            `wtacrs.PaddingGradientError` at the end of the step. False: padded rows are sampled
            like real ones, for losses that read them (extractive QA: the start/end softmax spans
            every position) or models without an attention mask.
        estimator: "wta-crs" (default), "crs", "priority" (k distinct rows, Duffield et al. 2007),
            "uniform", "topk" (biased, ablation) or "exact".
        target_modules: None = every nn.Linear / GPT-2 Conv1D inside the model's repeated blocks
            (any nn.ModuleList); a list of name suffixes (PEFT-style: "query" matches
            "...attention.self.query"); a regex string matched against the full name; or a
            callable (module, qualified_name) -> bool.
        exclude_modules: name components or a regex never sampled (task heads by default).
        attention: also sample the attention score (QKᵀ) and output (P·V) matmuls.
        grad_norm: "cache" uses ‖dY‖ from each example's previous visit (needs example ids via
            `wtacrs.batch`); "none" uses activation norms only.
        position_prior: with the cache, examples not seen yet are scored with each layer's
            moving-average norm per token position (`wtacrs.cache`); False: activation norms
            only, as the paper's cache.
        seed: base seed of the per-(step, layer) sampling generators.
        backward_draws: layers inside a recomputed sub-block (`recompute_activation`,
            `recompute_attention`), and the projection reading the recomputed activation's row
            recipe, draw their rows in backward, scored with the true ‖dY_i‖ instead of the
            cache's or the prior's estimate: the least-variance scores, at no memory cost (their
            inputs live, or their rows are recomputed, until backward anyway). False draws them
            in forward like every other layer (the paper's estimator; bitwise the gradients
            without recompute).
    """

    ratio: float = field(default=0.3, metadata={"help": "fraction of token rows kept, in (0, 1]"})
    budget: Literal["live", "all"] = field(
        default="live", metadata={"help": "ratio of live (non-padding) rows or of all rows"})
    skip_padding: bool = field(default=True, metadata={"help": "never sample padding rows (zero-gradient check)"})
    estimator: Literal["wta-crs", "crs", "priority", "uniform", "topk", "exact"] = field(
        default="wta-crs", metadata={"help": "row estimator"})
    target_modules: TargetSpec = field(default=None, metadata={"help": "modules to sample (None = all block linears)"})
    exclude_modules: list[str] | str | None = field(
        default_factory=lambda: list(DEFAULT_EXCLUDES), metadata={"help": "never sampled"})
    attention: bool = field(default=False, metadata={"help": "sample the two attention matmuls"})
    grad_norm: Literal["cache", "none"] = field(default="cache", metadata={"help": "score source for ‖dY‖"})
    position_prior: bool = field(default=True, metadata={"help": "score unseen examples by per-position norms"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    backward_draws: bool = field(
        default=True, metadata={"help": "layers of recomputed sub-blocks draw in backward with the true |dY|"})
    # The memory companions, in the order `wtacrs.summary` reports them.
    lean_dropout: bool | None = _companion(
        None, "dropout without stored masks (None: auto)", auto=True,
        doc="dropout regenerates its mask in backward instead of storing it (exact).")
    lean_layernorm: bool | None = _companion(
        None, "LayerNorm backward from its output (None: auto)", auto=True,
        doc="LayerNorm, and LLaMA-style RMSNorm, backward from its saved output, not its input "
            "(exact up to rounding).")
    lean_attention: bool | None = _companion(
        None, "SDPA without stored probabilities (None: auto)", auto=True,
        doc="SDPA attention recomputes its probabilities in backward instead of saving them (exact; one "
            "more attention forward per layer).")
    activation_compression: str | None = _companion(
        None, "compact activation input (approximate)", modes=ACTIVATION_MODES,
        doc="None (exact) or a compact storage of the activation-function input (an approximation; "
            "see `wtacrs.companions.activation`).")
    recompute_activation: bool = _companion(
        True, "recompute the activation input in backward",
        doc="the activation input of `act(dense(x))` modules (BERT's intermediate) is recomputed in "
            "backward (exact; one more matmul per block); in LLaMA-style gated MLPs the gated part "
            "act(gate(x)) ⊙ up(x) (two more).")
    keep_gate: bool = _companion(
        False, "with recompute_activation: gated MLPs keep gate(x), recompute up(x) only",
        requires="recompute_activation", reason="keeps the gate of the gated MLP's recompute", reported=False,
        doc="with `recompute_activation`, gated MLPs keep gate(x) (one intermediate-size tensor per block) "
            "and recompute only act(gate(x)) ⊙ up(x): one more matmul instead of two, and the down "
            "projection's drawn rows need only up(x) on them.")
    recompute_attention: bool = _companion(
        True, "recompute the attention sub-blocks in backward",
        doc="the attention sub-blocks (projections, attention, output projection) keep only their input "
            "and run again in backward (exact; a third of a BERT block's forward matmuls once more).")
    chunked_lm_loss: bool | None = _companion(
        None, "causal-LM loss in chunks, without the full logits (None: auto)", auto=True,
        doc="a causal LM's next-token loss is computed in chunks of tokens, never holding the (tokens × "
            "vocabulary) logits; the training forward returns no logits (exact; no extra matmul; "
            "`wtacrs.companions.lm_loss`).")

    def __post_init__(self) -> None:
        self._validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning a field after construction (`config.ratio = 0.5`, also after `wtacrs.apply`,
        which reads the config as it trains) is checked like the constructor's arguments; a bad
        value raises WTACRSConfigError and leaves the config as it was."""
        if not self.__dict__.get("_validated") or name not in _FIELD_NAMES:
            object.__setattr__(self, name, value)
            return
        previous = self.__dict__[name]
        object.__setattr__(self, name, value)
        try:
            self._validate()
        except WTACRSConfigError:
            object.__setattr__(self, name, previous)
            raise

    def _validate(self) -> None:
        """Check every field, normalising some (ratio to float, target lists to lists); raises
        WTACRSConfigError naming the field."""
        try:
            object.__setattr__(self, "ratio", validate_ratio(self.ratio))
        except ValueError as e:
            raise WTACRSConfigError(f"WTACRSConfig.ratio: {e}") from None
        self._check_choice("estimator", ESTIMATORS)
        self._check_choice("budget", BUDGETS)
        self._check_choice("grad_norm", ("cache", "none"))
        for name in ("attention", "backward_draws", "position_prior", "skip_padding"):
            if not isinstance(getattr(self, name), bool):
                raise WTACRSConfigError(f"WTACRSConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for option in COMPANIONS:
            problem = option.problem(getattr(self, option.name))
            if problem:
                raise WTACRSConfigError(f"WTACRSConfig.{option.name} {problem}")
        values = self.companion_options()
        for option in COMPANIONS:
            unmet = option.unmet(values)
            if unmet:
                raise WTACRSConfigError(f"WTACRSConfig.{unmet}=True too")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise WTACRSConfigError(f"WTACRSConfig.seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "target_modules",
                           _check_pattern("target_modules", self.target_modules, allow_callable=True))
        object.__setattr__(self, "exclude_modules",
                           _check_pattern("exclude_modules", self.exclude_modules, allow_callable=False))

    def companion_options(self) -> dict[str, Any]:
        """{companion option: its value}, every one of `COMPANIONS`: the keywords of
        `wtacrs.companions.apply_companions`."""
        return {option.name: getattr(self, option.name) for option in COMPANIONS}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "WTACRSConfig":
        """The config of a named preset (`PRESETS`), with `overrides` on top.

        >>> WTACRSConfig.preset("sampler", ratio=0.5).recompute_attention
        False
        """
        if name not in PRESETS:
            raise WTACRSConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def with_auto_companions(self, on: bool) -> "WTACRSConfig":
        """A copy whose auto companions (`AUTO_COMPANIONS` left None) are `on`."""
        return dataclasses.replace(self, **{name: on for name in AUTO_COMPANIONS if getattr(self, name) is None})

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise WTACRSConfigError(f"WTACRSConfig.{name} must be one of {', '.join(map(repr, choices))}, "
                                    f"got {value!r}")

    # -- JSON round trip ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if callable(self.target_modules):
            raise WTACRSConfigError("WTACRSConfig.target_modules is a callable, which cannot be saved as JSON")
        return dataclasses.asdict(self)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `wtacrs_config.json` into `directory` atomically; returns its path."""
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "WTACRSConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise WTACRSConfigError(f"unknown WTACRSConfig field(s): {', '.join(unknown)}; "
                                    f"known: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "WTACRSConfig":
        """Read `wtacrs_config.json` from `directory` (or a path to the file itself); raises
        WTACRSConfigError naming the file when it is missing, unreadable or not a config."""
        path = Path(directory)
        path = path / CONFIG_NAME if path.is_dir() else path
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise WTACRSConfigError(f"no {CONFIG_NAME} at {path}") from None
        except IsADirectoryError:
            raise WTACRSConfigError(f"{path} is a folder, not a {CONFIG_NAME} file") from None
        except OSError as e:
            raise WTACRSConfigError(f"{path} cannot be read: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise WTACRSConfigError(f"{path} is not UTF-8 text (byte {e.start}): not a {CONFIG_NAME}") from None
        except json.JSONDecodeError as e:
            raise WTACRSConfigError(f"{path} is not valid JSON: {e}") from None
        except RecursionError:
            raise WTACRSConfigError(f"{path} is not a {CONFIG_NAME}: its JSON is nested too deeply") from None
        if not isinstance(values, dict):
            raise WTACRSConfigError(f"{path} must hold a JSON object, got {type(values).__name__}")
        return cls.from_dict(values)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(WTACRSConfig))

# The memory companions' options, in the order of their fields (and of `wtacrs.summary`'s report).
COMPANIONS: tuple[CompanionOption, ...] = tuple(
    dataclasses.replace(f.metadata[_COMPANION], name=f.name)
    for f in dataclasses.fields(WTACRSConfig) if _COMPANION in f.metadata
)
# The exact companions whose default (None) is decided per model by `wtacrs.apply`: on for
# decoder-only language models, where they cut SmolLM2-135M's live peak to 0.22–0.32x LoRA's;
# off for encoders, where at MiniLM's size they cost more step time than they save memory
# (docs/recipes.md).
AUTO_COMPANIONS: tuple[str, ...] = tuple(option.name for option in COMPANIONS if option.auto)
# Their entries in WTACRSConfig's docstring come from their fields (`CompanionOption.doc`).
WTACRSConfig.__doc__ = WTACRSConfig.__doc__.rstrip() + "\n" + "\n".join(
    option.docstring_entry() for option in COMPANIONS) + "\n    "


def _check_pattern(name: str, value: Any, *, allow_callable: bool) -> Any:
    if value is None or (allow_callable and callable(value)):
        return value
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise WTACRSConfigError(f"WTACRSConfig.{name}: invalid regex {value!r}: {e}") from None
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return list(value)
    kinds = "a list of name suffixes, a regex string" + (", a callable" if allow_callable else "") + " or None"
    raise WTACRSConfigError(f"WTACRSConfig.{name} must be {kinds}, got {value!r}")


# Named configs. "recommended" is the default; "sampler" is the paper's estimator alone (rows drawn
# in forward, scored by the gradient-norm cache, no recompute and no companion).
PRESETS: dict[str, dict[str, Any]] = {
    "recommended": {},
    "sampler": {"recompute_activation": False, "recompute_attention": False,
                **{name: False for name in AUTO_COMPANIONS}},
}
