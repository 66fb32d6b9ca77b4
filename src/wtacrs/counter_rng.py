"""Counter-based uniform random numbers from integer tensor ops.

A draw is a pure function of integer keys (seed, rank, step, layer) and a counter (the slot):
u = hash(keys, counter). Unlike a `torch.Generator`, which is host state that a compiler cannot
trace and whose stream differs between CPU and CUDA, the same keys give the same numbers in eager
and compiled code and on every device, and replaying a step (checkpoint recompute, resume) needs
nothing but the step number.

The hash is Chris Wellons' `lowbias32` (hash-prospector, 2018: 32-bit xorshift-multiply, bias
~0.17 of an ideal hash), chained over the keys. Everything stays in int64 below 2^53 so no
product overflows: 32-bit multiplication modulo 2^32 is split into 16-bit halves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wtacrs import device_cache

_MASK32 = 0xFFFF_FFFF
_MASK16 = 0xFFFF


def _mul32(x: Tensor | int, constant: int) -> Tensor | int:
    """x · constant mod 2^32 for x in [0, 2^32), without leaving int64's exact range."""
    low, high = constant & _MASK16, constant >> 16
    return (x * low + ((x * high) & _MASK16) * 65536) & _MASK32


def hash32(x: Tensor | int) -> Tensor | int:
    """lowbias32 of values in [0, 2^32) → values in [0, 2^32): int64 tensors or Python ints alike."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(*keys: int) -> int:
    """One 32-bit key from several non-negative integers (seed, rank, step, layer), on the host."""
    key = 0x9E3779B9
    for k in keys:
        key = hash32(key ^ (k & _MASK32))
    return key


def lane_keys(lanes: int, key: int) -> Tensor:
    """(lanes,) int64 on the host: hash32(lane ^ key) for lane = 0 … lanes − 1, the keys of
    `lanes` streams under one key (computed on Python ints: no tensor op)."""
    return torch.tensor([hash32(lane ^ key) for lane in range(lanes)], dtype=torch.int64)


def uniforms(keys: Tensor, count: int) -> Tensor:
    """`count` uniforms in (0, 1] for each key.

    Args:
        keys: (L,) int64 stream keys in [0, 2^32), e.g. from `stream_key`.
    Returns:
        (L, count) float32 with 24 random bits each (exact in float32), never 0, so that
        s / u and -log(u) stay finite.
    """
    bits = hash32(_counter_hashes(count, keys.device) ^ keys.unsqueeze(1))  # hashing the counter first: nearby keys share no values
    return ((bits >> 8) + 1).to(torch.float32) * 2.0**-24


def _counter_hashes(count: int, device: torch.device) -> Tensor:
    """(count,) hash32(0 … count − 1), the same for every key: made once per device in eager code
    (`wtacrs.device_cache`) and sliced; compiled code makes it in the graph."""
    if torch.compiler.is_compiling():
        return hash32(torch.arange(count, dtype=torch.int64, device=device))
    key = ("counter hashes", device)  # the longest so far, sliced
    made = device_cache.get(key)
    if made is None or made.shape[0] < count:
        made = device_cache.put(key, hash32(torch.arange(count, dtype=torch.int64, device=device)))
    return made[:count]
