"""What is alive at a training step's CPU peak, by the op and the source lines that allocated it.

One step of `decoder_memory.py`'s trial for each recipe spec, under torch.profiler with memory
events and Python stacks (as `wtacrs.memory.AllocatorPeak`, plus stacks): the allocations made
inside the step and still alive at its peak, grouped by the allocating op and the nearest
wtacrs / transformers / peft frames. Answers "what is the step's excess made of" where
`decoder_memory.py` only gives the total. `--count-saved` runs the step as `decoder_memory.py`
does, with `SavedTensorBytes` counting the forward's saved tensors.

    python benchmarks/peak_attribution.py --seq 512 full+checkpointing wtacrs@0.3+companions+recompute+keep-gate
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch

from decoder_memory import DTYPES, make
from wtacrs.memory import SavedTensorBytes, cpu_allocations, replay_allocations

SOURCES = ("wtacrs/", "transformers/", "peft/", "torch/utils/checkpoint")


def origin(event) -> str:
    """The allocating op and up to three source frames of ours or the libraries'."""
    names, parent = [], event.parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.parent
    frames = [n.split("/")[-1] for n in names if any(s in n for s in SOURCES)][:3]
    return f"{names[0] if names else '?'} | {' < '.join(frames)}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="+")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--count-saved", action="store_true", help="count saved tensors during the step")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for spec in args.methods:
        trial = make(spec, args.model, args.batch, args.seq, DTYPES[args.dtype])
        saved = SavedTensorBytes(exclude=list(trial.model.parameters())) if args.count_saved else None
        profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                         with_stack=True)
        with profile:
            trial.step(saved)
        allocations = cpu_allocations(profile)
        whole = replay_allocations(allocations)
        at_peak = replay_allocations(allocations, stop=whole.peak_index).alive.values()
        groups: collections.Counter[str] = collections.Counter()
        counts: collections.Counter[str] = collections.Counter()
        for allocation in at_peak:
            groups[origin(allocation.event)] += allocation.nbytes
            counts[origin(allocation.event)] += 1
        print(f"\n{spec}: the step adds {whole.peak / 2**20:.3f} MB at its peak\n")
        print("| MB | blocks | op and source |\n|---:|---:|---|")
        for where, nbytes in groups.most_common(args.top):
            print(f"| {nbytes / 2**20:.3f} | {counts[where]} | {where} |")
        del trial
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
