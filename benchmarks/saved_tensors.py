"""Which tensors a BERT-base training step still saves for backward, and which op keeps them.

Run: python benchmarks/saved_tensors.py [--batch 4] [--seq 128] > benchmarks/SAVED_TENSORS.md

For full fine-tuning, WTA-CRS@0.3, and WTA-CRS@0.3 with the exact companions (lean dropout and
LayerNorm), it walks the autograd graph of one forward (random weights, fp32, train mode) and
sums the distinct storage bytes each op keeps, so one can see what sampling removed and what
remains for the other techniques.
"""

from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification

import wtacrs
from wtacrs.memory import parameter_tensors, saved_bytes_by_op, saved_tensors_by_op

METHODS = {
    "full fine-tuning": None,
    "WTA-CRS@0.3": wtacrs.WTACRSConfig.preset("sampler", ratio=0.3),
    "WTA-CRS@0.3 + lean dropout + lean LayerNorm": wtacrs.WTACRSConfig(
        ratio=0.3, lean_dropout=True, lean_layernorm=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 30522, (args.batch, args.seq)),
              "labels": torch.zeros(args.batch, dtype=torch.long)}
    print(f"# Saved-for-backward tensors by op: BERT-base, batch {args.batch}, seq {args.seq}, "
          f"fp32, attn={args.attn}\n")
    print(f"Command: `python benchmarks/saved_tensors.py --batch {args.batch} --seq {args.seq} --attn {args.attn}` "
          f"(torch {torch.__version__}, CPU). Bytes are distinct storages; parameters excluded.\n")
    for title, config in METHODS.items():
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(attn_implementation=args.attn)).train()
        if config is not None:
            wtacrs.apply(model, config)
        with wtacrs.batch(torch.arange(args.batch)):
            loss = model(**inputs).loss
        rows = saved_bytes_by_op(saved_tensors_by_op(loss, exclude=parameter_tensors(model)))
        total = sum(b for _, b, _ in rows)
        print(f"## {title}: {total / 2**20:.1f} MiB\n\n| op | MiB | tensors |\n|---|---:|---:|")
        for op, nbytes, count in rows:
            if nbytes >= 2**16:
                print(f"| {op} | {nbytes / 2**20:.1f} | {count} |")
        print()


if __name__ == "__main__":
    main()
