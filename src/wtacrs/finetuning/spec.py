"""The frozen specification of `wtacrs finetune` runs: every setting resolved once (`Settings`),
and one run's recipe and seed (`RunSpec`), which names its folder, label and learning rate."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from wtacrs.recipes import LoraSettings, Recipe, SamplingSettings, parse_recipe

# The general defaults; a task overrides some (`Task.defaults`: QA windows, the offline demo).
DEFAULTS = {
    "epochs": 3.0, "batch_size": 32, "max_length": 128, "warmup_ratio": 0.06, "weight_decay": 0.01,
    "max_train_samples": None, "max_eval_samples": None, "lr": 5e-5, "lora_lr": 5e-4,
}
# Sampling recipes need larger steps than their baseline: the sampling noise inflates Adam's
# second moment and so shortens its steps (benchmarks/ACCURACY.md; docs/architecture.md "An unbiased
# estimator still changes the optimiser's step"). v, each sampled layer's relative gradient
# variance, is measured before training (`wtacrs.learning_rate`). PER_LAYER (the default): each
# sampled layer's rate times √(1 + its v), the others unchanged; MEASURED: every parameter's times
# √(1 + median v) (no better on SST-2, worse at ratio 0.1: benchmarks/ACCURACY.md); a number:
# every parameter's times it.
MEASURED = "measured"
PER_LAYER = "measured-per-layer"
# Settings recorded per run (a --resume must repeat them) on top of the task's extra ones.
TRAINING_SETTINGS = ("epochs", "batch_size", "max_length", "warmup_ratio", "weight_decay", "max_train_samples",
                     "max_eval_samples", "bf16", "fp16")
LORA_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout")


@dataclass(frozen=True)
class Settings:
    """Everything one `wtacrs finetune` command runs with, defaults filled in and checked."""

    task: str
    model: str
    data_dir: str | None
    recipes: tuple[Recipe, ...]
    seeds: tuple[int, ...]
    output_dir: str
    epochs: float
    batch_size: int
    max_length: int
    warmup_ratio: float
    weight_decay: float
    max_train_samples: int | None
    max_eval_samples: int | None
    default_lr: float  # full fine-tuning's default learning rate for this task
    default_lora_lr: float
    lr: float | None = None  # --lr: every run's base learning rate
    sampled_lr: str | float = PER_LAYER  # --sampled-lr: how sampling recipes raise the base rate
    budget: str = "live"
    target_modules: tuple[str, ...] | None = None
    pad_to_max_length: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    doc_stride: int = 128
    n_best: int = 20
    max_answer_length: int = 30
    bf16: bool = False
    fp16: bool = False
    compile: str | None = None  # --compile: a torch.compile backend, or None for eager
    resume: bool = False
    overwrite: bool = False
    force: bool = False  # --force: --resume a run whose run.json or lr_scales.json is missing or unreadable
    in_process: bool = False
    no_progress: bool = False

    def runs(self) -> list[RunSpec]:
        """One RunSpec per (seed, recipe), seeds outermost."""
        return [RunSpec(self, recipe, seed) for seed in self.seeds for recipe in self.recipes]

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout)

    def with_output_dir(self, output_dir: str) -> Settings:
        return dataclasses.replace(self, output_dir=output_dir)


@dataclass(frozen=True)
class RunSpec:
    """One run: the command's settings, a recipe and a seed."""

    settings: Settings
    recipe: Recipe
    seed: int

    @property
    def task(self):
        from wtacrs.tasks import get_task

        return get_task(self.settings.task)

    @property
    def variants(self) -> list[str]:
        """Settings the run's label carries besides its recipe ("budget-all", "pad-max",
        "targets=output.dense,intermediate.dense")."""
        s, tags = self.settings, []
        if self.recipe.samples:
            tags += ["budget-all"] if s.budget == "all" else []
            tags += [f"targets={','.join(s.target_modules)}"] if s.target_modules else []
        return tags + (["pad-max"] if s.pad_to_max_length else [])

    @property
    def label(self) -> str:
        """The recipe's canonical spec with the run's variants: "wtacrs@0.3+companions+pad-max"."""
        return "+".join([self.recipe.spec, *self.variants])

    @property
    def folder(self) -> Path:
        """<output-dir>/<task>/<model>/<label>/seed<seed>, each part one folder name of safe
        characters (`folder_name`), so no option's text can lead outside --output-dir."""
        from wtacrs.finetuning.models import model_name

        s = self.settings
        parts = (s.task, model_name(s.model), self.label, f"seed{self.seed}")
        return Path(s.output_dir).joinpath(*map(folder_name, parts))

    @property
    def learning_rate(self) -> float:
        """The base learning rate: --lr if given, else the task's default for LoRA or full
        fine-tuning; for a sampling recipe times --sampled-lr when that is a number (when it is
        measured, the measured factor applies on top: `measures_lr`)."""
        s = self.settings
        base = s.lr if s.lr is not None else s.default_lora_lr if self.recipe.lora else s.default_lr
        return base * s.sampled_lr if self.recipe.samples and not self.measures_lr else base

    @property
    def measures_lr(self) -> bool:
        """Whether the run's learning rates come from the measured gradient noise."""
        return self.recipe.samples and self.settings.sampled_lr in (MEASURED, PER_LAYER)

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(budget=self.settings.budget, target_modules=self.settings.target_modules,
                                skip_padding=not self.task.loss_reads_padding)

    def recorded_settings(self) -> dict:
        """What a run was started with and a --resume must repeat: the model and data (absolute
        paths where local), the learning rate and every setting that applies to this recipe and
        task. The rest is in the folder's name."""
        s = self.settings
        names = [*TRAINING_SETTINGS, *(LORA_SETTINGS if self.recipe.lora else ()), *self.task.extra_settings]
        local = {name: os.path.abspath(value) if value is not None and Path(value).exists() else value
                 for name, value in (("model", s.model), ("data_dir", s.data_dir))}
        sampled = {"sampled_lr": s.sampled_lr} if self.recipe.samples else {}
        return {**local, "lr": self.learning_rate, **sampled, **{name: getattr(s, name) for name in names}}


_UNSAFE_IN_FOLDER_NAME = re.compile(r"[^A-Za-z0-9._+=,@-]")


def folder_name(text: str) -> str:
    """`text` as one folder name: characters other than letters, digits and ._+=,@- become "_",
    and a name of dots only ("", ".", "..") becomes "_" too."""
    name = _UNSAFE_IN_FOLDER_NAME.sub("_", text)
    return "_" if not name.strip(".") else name


def parse_recipes(specs: list[str], default_ratio: float) -> tuple[Recipe, ...]:
    """Recipes from --method specs ("wtacrs" alone takes `default_ratio`); raises RecipeError."""
    return tuple(parse_recipe(spec, default_ratio) for spec in specs)
