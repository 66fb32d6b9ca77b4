"""Lean LayerNorm forward + backward against `F.layer_norm`, interleaved, one thread.

    python benchmarks/lean_layernorm_speed.py [--old FILE]   # FILE: an earlier layernorm.py to compare

Shape of all-MiniLM-L6-v2 at batch 32, sequence 64 (2048 rows, hidden 384) and of bert-base at
batch 16, sequence 128 (2048 rows, hidden 768); fp32; median of 30 interleaved rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
import torch.nn.functional as F

from wtacrs.companions.layernorm import layer_norm_from_output


def _load(path: str):
    spec = importlib.util.spec_from_file_location("old_layernorm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.layer_norm_from_output


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", help="an earlier companions/layernorm.py")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    none = torch.empty(0, dtype=torch.long)
    for rows, hidden in ((2048, 384), (2048, 768)):
        x = torch.randn(rows, hidden, requires_grad=True)
        w, b = torch.randn(hidden, requires_grad=True), torch.randn(hidden, requires_grad=True)
        g = torch.randn(rows, hidden)
        ways = {"F.layer_norm": lambda: F.layer_norm(x, (hidden,), w, b, 1e-12),
                "lean": lambda: layer_norm_from_output(x, (hidden,), w, b, 1e-12, none)}
        if args.old:
            old = _load(args.old)
            ways["lean, before"] = lambda: old(x, (hidden,), w, b, 1e-12, none)
        times = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, forward in ways.items():
                start = time.perf_counter()
                forward().backward(g)
                times[name].append(time.perf_counter() - start)
        line = ", ".join(f"{name} {statistics.median(t) * 1e3:.2f} ms" for name, t in times.items())
        print(f"{rows} x {hidden}: {line}")


if __name__ == "__main__":
    main()
