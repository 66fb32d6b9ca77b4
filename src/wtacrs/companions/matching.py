"""Recognising transformers modules by what their forward computes.

A companion that replaces a module's forward with an equivalent one must only touch modules
that compute exactly that. transformers copies a model's blocks into its relatives verbatim
(LlamaRMSNorm into Mistral, Qwen2, ...; LlamaMLP likewise), while look-alikes with the same
attributes compute something else (Gemma's RMSNorm scales by 1 + γ). Comparing the source text
of the forward methods tells them apart without a list of class names to keep up to date.
"""

from __future__ import annotations

import inspect
from functools import cache

from torch import nn

# class attribute of every class a companion swaps in: the class it replaced
ORIGINAL_CLASS = "_wtacrs_companion_of"


@cache
def _forward_source(cls: type) -> str | None:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):  # built-in or generated classes have no source
        return None


def computes_like(module: nn.Module, reference: type | None) -> bool:
    """Whether `module`'s class (or the class a companion swapped in for it) has a forward with the
    same source text as `reference.forward`; False when either has none."""
    if reference is None:
        return False
    cls = type(module).__dict__.get(ORIGINAL_CLASS, type(module))
    source = _forward_source(cls)
    return source is not None and source == _forward_source(reference)


def llama_class(name: str) -> type | None:
    """A class of transformers' LLaMA modelling code (the reference of the decoder companions),
    or None without transformers."""
    try:
        from transformers.models.llama import modeling_llama
    except ImportError:
        return None
    return getattr(modeling_llama, name)
