"""Memory accounting: bytes saved for backward, counted exactly with saved_tensors_hooks."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn


class SavedTensorBytes:
    """Context manager counting the distinct storages autograd saves for backward.

    Storages are counted once however many ops save them (q, k and v may save one sample), and
    storages of `exclude` tensors (parameters, which live anyway) are not counted.

    Example:
        with SavedTensorBytes(exclude=model.parameters()) as saved:
            loss = model(**batch).loss
        saved.total  # bytes
    """

    def __init__(self, exclude=()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self.by_shape: Counter[tuple[tuple[int, ...], torch.dtype]] = Counter()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._excluded and ptr not in self.storages:
            self.storages[ptr] = storage.nbytes()
            self.by_shape[(tuple(t.shape), t.dtype)] += storage.nbytes()
        return t

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def parameter_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers: tensors that exist whether or not anything is saved for backward."""
    return [*model.parameters(), *model.buffers()]
