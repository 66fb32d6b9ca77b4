"""The memory/time plane from separate runs: step times of a `bench speed --no-peak` run joined by
method with the peaks of `bench memory` runs of the same setup.

Run: python benchmarks/archive/memory_time_plane.py SPEED_JSON MEMORY_JSON... --out PNG
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wtacrs.bench.plots import plot_memory_time_plane


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("speed", type=Path)
    parser.add_argument("memory", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    peaks = {r["method"]: r["peak_bytes"] for path in args.memory for r in json.loads(path.read_text())["rows"]}
    rows = [dict(r, peak_bytes=peaks[r["method"]])
            for r in json.loads(args.speed.read_text())["rows"] if r["method"] in peaks]
    plot_memory_time_plane(rows, args.out)
    for r in rows:
        print(f"{r['method']}: {r['step_s']:.1f} s, {r['peak_bytes'] / 1e9:.3f} GB")


if __name__ == "__main__":
    main()
