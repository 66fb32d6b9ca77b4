"""The issue-15 probe: ATen calls of one warm training step of a 2-layer BERT (hidden 128, batch 8,
seq 64), plain and with WTA-CRS@0.3 (no optimizer step, as the issue counted it).

    python benchmarks/aten_probe.py
"""
import torch, transformers, wtacrs
from wtacrs.bench.dispatch import AtenCounter
def build(ratio):
    torch.manual_seed(0)
    m = transformers.BertForSequenceClassification(transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512, num_labels=2)).train()
    return wtacrs.apply(m, wtacrs.WTACRSConfig.preset("sampler", ratio=ratio)) if ratio else m
B,T=8,64
g=torch.Generator().manual_seed(0)
inputs=dict(input_ids=torch.randint(0,1000,(B,T),generator=g), attention_mask=torch.ones(B,T,dtype=torch.long), labels=torch.randint(0,2,(B,),generator=g))
for ratio in (None, 0.3):
    m=build(ratio); ids=torch.arange(B)
    for i in range(3):
        with AtenCounter() as c:
            with (wtacrs.batch(ids, inputs["attention_mask"]) if ratio else torch.enable_grad()):
                m(**inputs).loss.backward()
        m.zero_grad()
    print(f"ratio={ratio}", c.summary())
