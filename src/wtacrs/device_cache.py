"""Small constant tensors that eager steps make once per device and reuse (index ranges, the
draws' counter hashes): one ATen call fewer each time a draw needs one.

One store for the whole library, so that code tracing a step without running it (`wtacrs plan`,
on fake tensors) can keep the store to itself: `isolated`. Compiled code never reads it (dynamo
would trace through it anyway); the callers make their tensor in the graph there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

MAX_ENTRIES = 256  # dynamic padding makes a new k for most batch lengths: the oldest go first

_STORE: dict[tuple, Tensor] = {}


def get(key: tuple) -> Tensor | None:
    """The tensor stored under `key` (which names the device), if any."""
    return _STORE.get(key)


def put(key: tuple, tensor: Tensor) -> Tensor:
    """Store `tensor` under `key`, replacing what was there; returns it."""
    _STORE.pop(key, None)
    _STORE[key] = tensor
    while len(_STORE) > MAX_ENTRIES:
        del _STORE[next(iter(_STORE))]
    return tensor


def entries() -> list[Tensor]:
    """The stored tensors (for tests)."""
    return list(_STORE.values())


@contextmanager
def isolated() -> Iterator[None]:
    """An empty store over the block, the previous one back after it: what a traced step makes
    (fake tensors) never reaches a real step, and a trace sees the store as a process's first step."""
    saved = dict(_STORE)
    _STORE.clear()
    try:
        yield
    finally:
        _STORE.clear()
        _STORE.update(saved)
