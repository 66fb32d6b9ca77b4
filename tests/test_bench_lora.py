"""The bench's trials take the LoRA of the caller (`make_trial(lora=...)`, `Setup.lora`), so a
benchmark script with its own adapters runs on the bench's trial and interleaving."""

import torch

from wtacrs.bench.suite import Setup, run_speed
from wtacrs.bench.training import make_trial
from wtacrs.recipes import LoraSettings

ATTENTION_ONLY = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"))


def _adapted(model: torch.nn.Module) -> dict[str, int]:
    """{module name: rank} of every LoRA A projection."""
    return {name.removesuffix(".lora_A.default"): module.out_features
            for name, module in model.named_modules() if name.endswith("lora_A.default")}


def test_make_trial_builds_the_lora_it_is_given():
    default = _adapted(make_trial("llama-tiny", "lora", batch=2, seq=8).model)
    given = _adapted(make_trial("llama-tiny", "lora", batch=2, seq=8, lora=ATTENTION_ONLY).model)
    assert set(default.values()) == {8} and any(name.endswith("mlp.down_proj") for name in default)
    assert set(given.values()) == {4} and len(given) == 4  # q and v of 2 blocks
    assert all(name.endswith(("q_proj", "v_proj")) for name in given)


def test_interleaved_speed_runs_on_the_setups_lora():
    setup = Setup("llama-tiny", 2, 8, ("lora", "lora+wtacrs@0.5"), torch.device("cpu"), lora=ATTENTION_ONLY)
    assert set(_adapted(setup.trial("lora").model).values()) == {4}
    rows = run_speed(setup, warmup=0, steps=1, peak=False, interleave=True)
    assert [row["method"] for row in rows] == ["lora", "lora+wtacrs@0.5"]
    assert all("error" not in row and row["step_s"] > 0 for row in rows), rows
