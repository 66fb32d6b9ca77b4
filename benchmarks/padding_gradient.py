"""How much of each weight gradient do padding rows carry under an extractive-QA head?

Attention masking keeps padded rows out of the real rows' outputs, but BERT's QA head puts its
start/end softmax over every position, padding included, so padded rows get output gradient.
Up to commit 1edc947 the sampler skipped rows outside the attention mask, which dropped
dW_pad = Σ_{padded i} X_iᵀ dY_i from every estimate: a bias of ‖dW_pad‖ / ‖dW‖ per layer.

The study's SQuAD setting (`benchmarks/accuracy_study.sh`: windows of 192 tokens, stride 64,
padded to 192): one batch of the first `--batch-size` training windows of the dev-v1.1.json
articles the study trains on, through all-MiniLM-L6-v2 with its QA head (fresh, or a
fine-tuned checkpoint via --model), exact forward and backward, per encoder linear layer.

    python benchmarks/padding_gradient.py --squad ../shared/data/squad/dev-v1.1.json
    python benchmarks/padding_gradient.py --squad ... --model <run>/checkpoint-260
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from wtacrs.packaged import packaged_model_dir
from wtacrs.tasks.squad import first_train_windows


def padding_shares(model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖dW_pad‖ / ‖dW‖ of every encoder nn.Linear for one exact forward/backward of `batch`."""
    padded = batch["attention_mask"] == 0  # (B, T)
    shares, hooks = {}, []

    def share(x, dy):
        whole = torch.einsum("bti,bto->oi", x, dy)
        pad = torch.einsum("bti,bto->oi", x * padded[..., None], dy)
        return float(pad.norm() / whole.norm())

    def measure(name):  # forward hook: in backward, share of `name`'s dW from the padding rows
        def hook(module, args, output):
            x = args[0].detach()
            output.register_hook(lambda grad: shares.update({name: share(x, grad)}))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".encoder." in f".{name}.":
            hooks.append(module.register_forward_hook(measure(name)))
    model.train()
    model(**batch).loss.backward()
    for h in hooks:
        h.remove()
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--squad", required=True, help="a SQuAD v1.1 JSON file (split by article as the study does)")
    parser.add_argument("--model", help="model folder (default: the packaged all-MiniLM-L6-v2, fresh QA head)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    path = args.model or packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForQuestionAnswering.from_pretrained(path)
    batch = first_train_windows(args.squad, tokenizer, args.batch_size)
    shares = padding_shares(model, batch)
    padded = float((batch["attention_mask"] == 0).float().mean())
    values = sorted(shares.values())
    print(f"model {path}; {args.batch_size} windows of 192 tokens, {padded:.1%} of rows padding")
    print(f"‖dW_pad‖/‖dW‖ over {len(values)} encoder linear layers: median {statistics.median(values):.3f}, "
          f"min {values[0]:.3f}, max {values[-1]:.3f}")
    for name, value in shares.items():
        print(f"  {name:<50} {value:.3f}")


if __name__ == "__main__":
    main()
