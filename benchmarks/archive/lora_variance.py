"""Is LoRA's down-projection gradient harder to sample than a full weight's? A closed-form check.

Run: python benchmarks/archive/lora_variance.py

all-MiniLM-L6-v2 on the first 32 SST-2 training sentences (padded batch, padding rows included,
true ‖dY_i‖ as scores): WTA-CRS@0.3's and CRS@0.3's relative variance E‖dŴ − dW‖² / ‖dW‖²
(`wtacrs.bench.variance.exact_variances`) for the query and value weights of blocks 0, 3 and 5,
once for full fine-tuning and once for PEFT LoRA (r=8, alpha 16, no dropout) with lora_B drawn
N(0, 0.02²) as after some training (lora_B starts at zero, where lora_A's gradient is zero).
"""

from __future__ import annotations

import csv

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from wtacrs.bench.variance import capture_linear_io, exact_variances
from wtacrs.packaged import packaged_model_dir

LAYERS = r"layer\.(0|3|5)\.attention\.self\.(query|value)"


def model(lora: bool):
    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(str(packaged_model_dir()), num_labels=2)
    if lora:
        m = get_peft_model(m, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0))
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    return m.train()


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_model_dir()))
    with open("../shared/data/glue/SST-2/train.tsv") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:33]
    inputs = dict(tokenizer([r[0] for r in rows], padding=True, return_tensors="pt"),
                  labels=torch.tensor([int(r[1]) for r in rows]))
    print("| layer | CRS@0.3 | WTA-CRS@0.3 |\n|---|---:|---:|")
    for lora in (False, True):
        for name, (x, dy) in capture_linear_io(model(lora), inputs, layers=LAYERS).items():
            v = exact_variances(x, dy, 0.3)
            print(f"| {name.split('encoder.')[-1]} | {v['crs']:.2f} | {v['wta-crs']:.2f} |")


if __name__ == "__main__":
    main()
