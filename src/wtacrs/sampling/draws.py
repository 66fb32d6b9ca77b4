"""Draws: one row sample per tensor, shared by the layers that read it, from this step's uniforms.

- `DrawRegistry`: layers reading the same activation (q, k and v read one hidden-states tensor)
  share one `RowSample`; the first layer to see the tensor draws it, the others reuse it and save
  nothing new. Keyed by the tensor object (weak references), for one forward pass.
- `StepUniforms`: the uniforms of a draw are a hash of (seed, rank, step, layer slot, slot in the
  draw) (`wtacrs.counter_rng`), so a checkpoint recompute and a resumed run sample the same rows,
  on any device, with no generator state. A layer called several times per forward (ALBERT
  shares one layer across depth) reuses its slot: each call's estimate stays unbiased, the calls'
  draws are correlated and the cached norms are those of its last call.
- `draw_budget`: k of a draw.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from wtacrs import counter_rng
from wtacrs.config import WTACRSConfig
from wtacrs.functional import RowSample, _version, gather_rows, slot_budget
from wtacrs.sampling.rows import ForwardRows
from wtacrs.sampling.transport import to_device


@dataclass
class _Draw:
    """A sample shared by every layer that reads one tensor during one forward pass.

    Holds the small part (indices, weights) and only weak references to the big tensors: the
    input and the sampled rows, which the autograd graph owns. When the rows are gone but the
    input lives (gradient checkpointing discards saved tensors during forward), they are
    gathered again from the same indices, so every consumer and every recompute sees the
    same draw."""

    tensor: weakref.ref
    version: int | None
    rows: weakref.ref
    sample: RowSample  # with rows=None
    leader: int  # layer slot that drew it

    def reuse_for(self, x: Tensor) -> RowSample | None:
        if self.tensor() is not x or self.version != _version(x):
            return None
        rows = self.rows()
        if rows is None:
            rows = gather_rows(x, self.sample.indices, self.sample.weights)
            self.rows = weakref.ref(rows)
        return dataclasses.replace(self.sample, rows=rows)


class DrawRegistry:
    """The draws of the current forward pass, by tensor, and which layers shared one last time."""

    def __init__(self, shared: "DrawRegistry | None" = None):
        """`shared`: the registry whose groups this one's reuses join (a frame's draws join its
        model's groups)."""
        self._shared = shared
        # Searched by identity (`is`), newest first (q, k and v follow each other): compiled code
        # can compare tensors by identity but cannot take their id().
        self._draws: list[_Draw] = []
        self._groups: dict[int, set[int]] = {}  # leader slot -> slots that reused its draw
        self._members: tuple[tuple, Tensor] | None = None  # (groups as of, table)

    @property
    def groups(self) -> dict[int, set[int]]:
        """Leader slot -> the slots that reused its draw (the shared registry's, if any)."""
        return self._groups if self._shared is None else self._shared.groups

    def clear(self) -> None:
        self._draws.clear()

    def reuse(self, slot: int, x: Tensor) -> RowSample | None:
        """The sample an earlier layer drew from x in this forward (slot joins its group), or None."""
        for draw in reversed(self._draws):
            sample = draw.reuse_for(x)
            if sample is not None:
                self.groups.setdefault(draw.leader, {draw.leader}).add(slot)
                return sample
        return None

    def add(self, slot: int, x: Tensor, sample: RowSample) -> None:
        """Slot drew `sample` from x: later readers of x reuse it."""
        small = dataclasses.replace(sample, rows=None)
        self._draws.append(_Draw(weakref.ref(x), _version(x), weakref.ref(sample.rows), small, slot))

    def members(self, num_slots: int) -> Tensor:
        """(S, S) float32: [leader, member] = 1 for the members of each leader's last draw (and
        itself); rebuilt only when the groups change (in practice: after the first step)."""
        key = (num_slots, tuple((leader, tuple(sorted(group))) for leader, group in sorted(self.groups.items())))
        if self._members is None or self._members[0] != key:
            table = torch.eye(num_slots)
            for leader, group in self.groups.items():
                table[leader, [s for s in group if s < num_slots]] = 1.0
            self._members = (key, table)
        return self._members[1]

    def leaders(self, num_slots: int) -> Tensor:
        """(S,) int64: the slot whose draw each slot reused (itself when it drew)."""
        leaders = torch.arange(num_slots)
        for leader, group in self.groups.items():
            leaders[[s for s in group if s < num_slots]] = leader
        return leaders

    def load_leaders(self, leaders: Tensor) -> None:
        """Restore the groups from `leaders` (a checkpoint's): they decide whose cached norms score a draw."""
        groups: dict[int, set[int]] = {}
        for slot, leader in enumerate(leaders.tolist()):
            groups.setdefault(leader, {leader}).add(slot)
        self._groups = {leader: members for leader, members in groups.items() if len(members) > 1}


class StepUniforms:
    """This step's uniforms, one counter-based stream per slot: an (S, count) table per device and
    row layout (a `ForwardRows.key`, or the row count of a draw without one), made once per forward.
    Keyed by layout rather than count: in compiled code count may be a symbol, and a symbol used
    as a key would be made a constant."""

    def __init__(self):
        self._tables: dict[tuple[torch.device, str | int], Tensor] = {}
        self._rows: dict[tuple[torch.device, str | int], tuple[Tensor, ...]] = {}  # the tables' rows, by slot

    def clear(self) -> None:
        self._tables.clear()
        self._rows.clear()

    def table(self, device: torch.device, layout: str | int, count: int, num_slots: int,
              step_key: Tensor | int) -> Tensor:
        """(num_slots, count) float32 uniforms for draws laid out as `layout` under `step_key`: a
        `counter_rng.stream_key` of seed, rank and step, whose slot keys hash32(slot ^ step_key)
        are made on the host; or in a planned step those slot keys, (num_slots,) on the device."""
        key = (device, layout)
        if key not in self._tables:
            slot_keys = step_key if isinstance(step_key, Tensor) else to_device(
                counter_rng.lane_keys(num_slots, step_key), device)
            self._tables[key] = counter_rng.uniforms(slot_keys, count)
        return self._tables[key]

    def of_slot(self, slot: int, device: torch.device, layout: str | int, count: int, num_slots: int,
                step_key: Tensor | int) -> Tensor:
        """(count,) the uniforms of `slot`'s draw: its row of `table` (the table is split once,
        not sliced per draw)."""
        key = (device, layout)
        if key not in self._rows:
            self._rows[key] = self.table(device, layout, count, num_slots, step_key).unbind(0)
        return self._rows[key][slot]


def samples_inside_mask(config: WTACRSConfig, rows: ForwardRows | None) -> bool:
    """Whether draws over `rows` skip the rows outside its mask (padding)."""
    return rows is not None and rows.mask is not None and config.skip_padding


def draw_budget(config: WTACRSConfig, rows: ForwardRows | None, num_rows: int) -> tuple[int, bool]:
    """k of a draw over `num_rows` rows laid out as `rows`, and whether it covers every live row."""
    live = rows.live if samples_inside_mask(config, rows) else None
    k = slot_budget(config.ratio, config.budget, num_rows, live)
    return k, live is not None and k >= live
