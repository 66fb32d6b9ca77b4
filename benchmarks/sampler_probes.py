"""Probes of the sampled path on a tiny random BERT: the per-step properties a sampler bug would
break. Written on 2026-12-01 (d8ab8e3) for a suspected accuracy regression after the device-path
sampler (ee6c48a), which more seeds refuted (archive/ACCURACY_2026-11-27_to_2026-12-01.md). All
four held then (benchmarks/ACCURACY.md as of d8ab8e3).

    python benchmarks/sampler_probes.py [--draws 300]

1. The uniforms of a layer's draw change from step to step.
2. An example the cache has not seen is scored by the position prior (not the all-ones fill).
3. The cache gives an example's norms back unchanged at another batch position and padded length.
4. In training mode with dropout on (masks fixed by reseeding before each forward), the mean of
   `--draws` sampled weight gradients is within its standard error of the exact one, per layer.
"""

from __future__ import annotations

import argparse

import torch
import transformers as hf

import wtacrs
import wtacrs.sampling.state as sampling_state_module

CONFIG = hf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=32)


def tiny_bert(sampled: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = hf.BertForSequenceClassification(CONFIG).train()
    return wtacrs.apply(model, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3)) if sampled else model


def tiny_batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    mask = (torch.arange(10) < torch.tensor([[10], [6], [8]])).long()
    return {"input_ids": torch.randint(1, 100, (3, 10)) * mask, "attention_mask": mask, "labels": torch.tensor([0, 1, 0])}


class DrawLog:
    """Records (uniforms, multiplier) of every draw while active."""

    def __init__(self):
        self.draws: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._real = sampling_state_module.draw_rows

    def __enter__(self):
        def logged(x, k, estimator, multiplier, u, covers_live=False):
            self.draws.append((u.clone(), None if multiplier is None else multiplier.clone()))
            return self._real(x, k, estimator, multiplier, u, covers_live)
        sampling_state_module.draw_rows = logged
        return self

    def __exit__(self, *exc):
        sampling_state_module.draw_rows = self._real


def step(model, batch, ids) -> None:
    model.zero_grad()
    with wtacrs.batch(ids, batch["attention_mask"]):
        model(**batch).loss.backward()


def uniforms_and_prior() -> None:
    model, batch = tiny_bert(True), tiny_batch()
    firsts = []
    for ids in (torch.arange(3), torch.arange(3, 6)):
        with DrawLog() as log:
            step(model, batch, ids)
        firsts.append(log.draws[0])
    print("1. first draw's uniforms differ between steps:", not torch.equal(firsts[0][0], firsts[1][0]))
    print("2. unseen examples' multipliers at step 2 vary (position prior), not all 1:",
          bool((firsts[1][1][0] != 1).any()))


def layout_stability() -> None:
    batch = tiny_batch()
    order = torch.tensor([2, 0, 1])
    moved = {k: torch.cat([v[order], torch.zeros(3, 2, dtype=v.dtype)], 1) if v.dim() == 2 else v[order]
             for k, v in batch.items()}
    multipliers = []
    for second, ids in ((batch, torch.arange(3)), (moved, order)):
        model = tiny_bert(True)
        step(model, batch, torch.arange(3))
        with DrawLog() as log:
            step(model, second, ids)
        width = second["attention_mask"].shape[1]
        row = 0 if second is batch else 1  # example 0's row in that batch
        multipliers.append(log.draws[-1][1][0].view(3, width)[row][second["attention_mask"][row].bool()])
    print("3. example 0's cached multipliers equal at another position and padding:",
          torch.equal(multipliers[0], multipliers[1]))


def dropout_unbiasedness(draws: int) -> None:
    batch = tiny_batch()

    def grads(model, ids=None) -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(123)  # the same dropout masks in every forward
        with wtacrs.batch(ids, batch["attention_mask"]) if ids is not None else torch.enable_grad():
            model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()
                if "encoder" in n and n.endswith("weight") and "LayerNorm" not in n}

    exact = grads(tiny_bert(False))
    model = tiny_bert(True)
    total = {n: torch.zeros_like(g) for n, g in exact.items()}
    squared = dict.fromkeys(exact, 0.0)
    for r in range(draws):
        for n, g in grads(model, torch.arange(3) + 10 * (r % 2)).items():  # two id sets: a warm cache
            total[n] += g
            squared[n] += float((g - exact[n]).square().sum())
    print(f"4. per layer (dropout on): relative variance, and error of the mean of {draws} draws / its standard error:")
    for n in exact:
        error = float((total[n] / draws - exact[n]).square().sum()) ** 0.5
        standard_error = (squared[n] / draws / draws) ** 0.5
        relative = squared[n] / draws / float(exact[n].square().sum())
        print(f"   {n}: {relative:.3g}, {error / standard_error:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=300)
    args = p.parse_args()
    uniforms_and_prior()
    layout_stability()
    dropout_unbiasedness(args.draws)


if __name__ == "__main__":
    main()
