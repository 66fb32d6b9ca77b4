"""Peak resident set size of one training step, measured in a fresh Python process.

Run by `peak_rss_of_step`; as a script it reads a JSON job from argv[1] and prints a JSON result.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch

from wtacrs.memory import process_peak_rss


def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_of_step(size: str, method: str, batch: int, seq: int, seed: int = 0, threads: int | None = None) -> dict:
    """Build the trial and run one step in a child process; its peak RSS (VmHWM) and RSS before the step.

    Returns {"peak_rss_bytes", "rss_before_step_bytes", "child_step_s"}, or {"rss_error": message}.
    """
    job = dict(size=size, method=method, batch=batch, seq=seq, seed=seed, threads=threads or torch.get_num_threads())
    done = subprocess.run([sys.executable, "-m", "wtacrs.bench.rss", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"rss_error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(job: dict) -> dict:
    from wtacrs.bench.training import make_trial

    torch.set_num_threads(job["threads"])
    trial = make_trial(job["size"], job["method"], job["batch"], job["seq"], seed=job["seed"])
    before = _rss_now_bytes()
    start = time.perf_counter()
    trial.step()
    seconds = time.perf_counter() - start
    peak = process_peak_rss()
    return {"peak_rss_bytes": peak, "rss_before_step_bytes": before, "child_step_s": seconds}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
