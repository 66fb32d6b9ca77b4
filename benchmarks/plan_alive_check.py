"""What `AllocatorPeak` cannot see, checked: after a warm-up step, the tensors alive besides the
baseline ones (parameters, AdamW state, the batch), every tensor `gc` reaches; then the
measured peak of the next step (`wtacrs bench memory`'s measurement) beside the traced one.
A buffer kept across steps would be allocated before the measured step and missed by it.

    python benchmarks/plan_alive_check.py bert-base wtacrs@0.3+companions+recompute+recompute-attention 8 128
"""

from __future__ import annotations

import gc
import sys

import torch

from wtacrs.bench.training import make_trial, measure_step_memory
from wtacrs.memory import optimizer_state_tensors, parameter_tensors
from wtacrs.planning.models import model_spec
from wtacrs.planning.tracer import trace_step
from wtacrs.recipes import parse_recipe


def main(model: str, recipe: str, batch: int, seq: int) -> None:
    trial = make_trial(model, recipe, batch, seq)
    trial.step()
    state = [*parameter_tensors(trial.model), *optimizer_state_tensors(trial.optimizer), *trial.inputs.values()]
    baseline = {t.untyped_storage().data_ptr() for t in state}
    extra = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu":
            storage = o.untyped_storage()
            if storage.data_ptr() not in baseline and storage.nbytes() > 0:
                extra[storage.data_ptr()] = storage.nbytes()
    print(f"alive beyond the baseline after the warm-up step: {sum(extra.values()):,} B in {len(extra)} storages")
    print(f"measured peak: {measure_step_memory(trial)['peak_bytes']:,} B")
    print(f"traced peak:   {trace_step(model_spec(model), parse_recipe(recipe), batch, seq, target='cpu').peak_bytes:,} B")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
