"""Counting the ATen calls of a training step, and the ones that make a GPU wait for the host.

A GPU runs ahead of Python only while nothing asks it for a value: every call below copies a
device value to the host (a number, or a result whose size depends on the data) and stalls the
queue. On a CPU none of them costs a wait, but the count is the same, so the CPU measures what a
GPU would suffer. Per-call overhead (a kernel launch each on a GPU) is what the total counts.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Calls whose result needs data on the host: a scalar read, or an output whose shape is data.
SYNC_OPS: frozenset[str] = frozenset({
    "_local_scalar_dense", "item", "nonzero", "nonzero_static", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "masked_select", "repeat_interleave", "is_nonzero", "equal",
})


# wtacrs code that works on host tensors only (the cache's store, the batch's host mask and ids):
# its calls cost host time but never make a GPU wait, so they are counted apart.
HOST_SITES: tuple[str, ...] = ("wtacrs.cache.", "wtacrs.batching:", "wtacrs.sampling.rows:forward_rows",
                               "wtacrs.sampling.rows:live_count", "wtacrs.sampling.recorder:check_padding",
                               "wtacrs.sampling.fold:",
                               "wtacrs.companions.dropout:_draw_seed",  # a seed from the host generator
                               "wtacrs.sampling.norms:_filled_norms")
DEVICE_SITES_IN_HOST_MODULES: tuple[str, ...] = ("wtacrs.cache.store:encode_norms",)
# Host-only functions that call shared tensor math (`estimators.fill_missing_norms` on the cache's
# norms): every call under them is theirs, whichever function makes it.
HOST_CALLERS: frozenset[str] = frozenset({"wtacrs.sampling.norms:_filled_norms"})


def is_host_site(site: str) -> bool:
    return site.startswith(HOST_SITES) and not site.startswith(DEVICE_SITES_IN_HOST_MODULES)


class AtenCounter(TorchDispatchMode):
    """`with AtenCounter() as c: step()` counts every ATen call (`c.calls`) by name and the
    sync-forcing ones (`c.syncs`): those in SYNC_OPS, and copies from a GPU to the host."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.sync_sites: Counter[str] = Counter()  # "module:function" of the wtacrs code that asked
        self.call_sites: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] += 1
        site = _library_site()
        self.call_sites[site] += 1
        if name in SYNC_OPS or _copies_to_host(name, args, kwargs or {}):
            self.syncs[name] += 1
            self.sync_sites[site] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def summary(self) -> dict[str, int]:
        """Calls and sync-forcing calls, all and on the device path (host-only sites left out)."""
        host_calls = sum(n for site, n in self.call_sites.items() if is_host_site(site))
        host_syncs = sum(n for site, n in self.sync_sites.items() if is_host_site(site))
        return {"aten_calls": self.total, "sync_calls": self.total_syncs,
                "device_calls": self.total - host_calls, "device_syncs": self.total_syncs - host_syncs,
                "host_store_calls": host_calls}


def _copies_to_host(name: str, args: tuple, kwargs: dict) -> bool:
    """A `.cpu()`/`.to("cpu")`/`copy_` of a tensor that lives on an accelerator."""
    if name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
        target = kwargs.get("device")
        return args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
    if name == "copy_" and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        return args[0].device.type == "cpu" and args[1].device.type != "cpu" and not kwargs.get("non_blocking")
    return False


def _library_site() -> str:
    """The innermost library function (outside wtacrs.bench and wtacrs.cli) on the stack, or "model";
    or the host-only function in HOST_CALLERS that it runs under."""
    frame = sys._getframe(2)
    site = None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        name = frame.f_code.co_name
        # A companion's TorchFunctionMode sits between any caller and the op: not a site of its own.
        if (module.startswith("wtacrs.") and not module.startswith(("wtacrs.bench", "wtacrs.cli"))
                and name != "__torch_function__"):
            here = f"{module}:{name}"
            if here in HOST_CALLERS:
                return here
            site = site or here
        frame = frame.f_back
    return site or "model"
