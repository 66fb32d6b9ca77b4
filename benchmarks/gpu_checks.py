"""CUDA against CPU for the sampled path's randomness (run by benchmarks/gpu.sh on a lent GPU).

Prints whether the counter-based uniforms are bitwise the same on both devices, how many WTA-CRS
slots draw the same row from the same scores (float32 cumulative sums may round differently on
the two devices, which can move a draw at a boundary), and whether a sampled BERT step's
gradients are reproducible on CUDA run to run.
"""

import torch
import transformers

import wtacrs
from wtacrs import counter_rng
from wtacrs.estimators import sample_slots

keys = counter_rng.hash32(torch.arange(64) ^ counter_rng.stream_key(0, 0, 7))
cpu = counter_rng.uniforms(keys, 4096)
gpu = counter_rng.uniforms(keys.cuda(), 4096).cpu()
print(f"uniforms bitwise equal on CPU and CUDA: {torch.equal(cpu, gpu)}")

scores = torch.exp(2 * torch.randn(64, 4096, generator=torch.Generator().manual_seed(0)))
i_cpu, w_cpu = sample_slots(scores, 1229, "wta-crs", cpu[:, :1229])
i_gpu, w_gpu = (t.cpu() for t in sample_slots(scores.cuda(), 1229, "wta-crs", gpu.cuda()[:, :1229]))
same = (i_cpu == i_gpu).float().mean().item()
print(f"WTA-CRS slots drawing the same row on CPU and CUDA: {same:.6f}; "
      f"max weight difference where equal: {(w_cpu - w_gpu)[i_cpu == i_gpu].abs().max().item():.3g}")


def grads() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=256, num_labels=2)
    model = wtacrs.apply(transformers.BertForSequenceClassification(config).cuda().train(),
                         wtacrs.WTACRSConfig.preset("sampler", ratio=0.3))
    ids = torch.arange(8)
    mask = torch.ones(8, 64, dtype=torch.long)
    inputs = {"input_ids": torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(1)).cuda(),
              "attention_mask": mask.cuda(), "labels": torch.zeros(8, dtype=torch.long).cuda()}
    for _ in range(2):  # the second step draws with cached norms
        model.zero_grad()
        with wtacrs.batch(ids, mask):
            model(**inputs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


a, b = grads(), grads()
print(f"sampled BERT step on CUDA reproducible run to run: {all(torch.equal(a[n], b[n]) for n in a)}")
