"""The README's library example, as written, on the packaged SmolLM2-135M with PEFT LoRA: the live
peak of one training step (forward, backward, AdamW step) with plain LoRA, with the bare sampler
(`WTACRSConfig.preset("sampler")`, the library's default before 0.2.0) and with `wtacrs.apply(model)`
(the recommended recipe, the default now). Batch 2 × 256 tokens, fp32, CPU allocator peak
(`wtacrs.memory.AllocatorPeak`, weights, optimizer state and batch included).

    .venv/bin/python benchmarks/library_default.py [seq-cls|causal-lm]   # minutes on 2 cores

Issue 31's target: the default's live peak at most 0.5x plain LoRA's.
"""

from __future__ import annotations

import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import wtacrs
from wtacrs.memory import AllocatorPeak, optimizer_state_tensors, parameter_tensors
from wtacrs.packaged import load_model, load_tokenizer

BATCH, SEQ = 2, 256


def step_peak(config: str | None, head: str) -> float:
    """MiB: the live peak of the third training step (the first two allocate the optimizer state),
    with a sequence-classification head ("seq-cls") or the pre-trained LM head ("causal-lm")."""
    torch.manual_seed(0)
    causal = head == "causal-lm"
    if causal:
        model = load_model("smollm2-135m", AutoModelForCausalLM)
    else:
        model = load_model("smollm2-135m", AutoModelForSequenceClassification, num_labels=2)
    model.config.pad_token_id = load_tokenizer("smollm2-135m").pad_token_id or 0
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM" if causal else "SEQ_CLS", r=8, lora_alpha=16,
                                             target_modules="all-linear"))
    if config == "default":
        wtacrs.apply(model)
    elif config == "sampler":
        wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 1000, (BATCH, SEQ), generator=g),
             "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.int64), "labels": torch.tensor([0, 1])}
    batch["attention_mask"][1, SEQ // 2:] = 0  # right padding, the pad token there: the head reads the last real one
    batch["input_ids"][1, SEQ // 2:] = model.config.pad_token_id
    if causal:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    peak = None
    for _ in range(3):
        baseline = [*parameter_tensors(model), *optimizer_state_tensors(optimizer), *batch.values()]
        with AllocatorPeak(baseline=baseline) as peak:
            with wtacrs.batch(attention_mask=batch["attention_mask"]) if config else _nothing():
                model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return peak.peak / 2**20


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


if __name__ == "__main__":
    head = sys.argv[1] if len(sys.argv) > 1 else "seq-cls"
    peaks = {name: step_peak(config, head) for name, config in
             (("LoRA", None), ("LoRA + WTACRSConfig.preset('sampler')", "sampler"), ("LoRA + wtacrs.apply(model)", "default"))}
    lora = peaks["LoRA"]
    print(f"{head} head, batch {BATCH} x {SEQ}\n\n| model | live peak MiB | x LoRA |\n|---|---:|---:|")
    for name, mib in peaks.items():
        print(f"| {name} | {mib:,.1f} | {mib / lora:.2f} |")
    sys.exit(0)
