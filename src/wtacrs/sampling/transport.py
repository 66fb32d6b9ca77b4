"""Host ↔ device copies that never make the device wait for the host."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device`, copied pinned and non-blocking where that matters (CUDA)."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def to_host(t: Tensor) -> Tensor:
    """A device tensor copied into pinned host memory without waiting (read it after an event)."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
