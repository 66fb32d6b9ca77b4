"""Eager vs inductor-compiled training step (forward + backward, no optimizer), plain and
WTA-CRS@0.3 (`wtacrs.batch(..., model=)` for the compiled one): 2-layer BERT, hidden 128, batch 8,
seq 64, dropout off, one thread; 3 warm-up steps (the compiles), then 30 interleaved steps.

    PYTHONPATH=src python benchmarks/compile_timing.py
"""
import statistics, sys, time
import torch, transformers as hf, wtacrs
torch.set_num_threads(1)
torch._dynamo.config.trace_autograd_ops = True

def build(sampled):
    torch.manual_seed(0)
    cfg = hf.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        problem_type="single_label_classification")
    m = hf.BertForSequenceClassification(cfg).train()
    return wtacrs.apply(m, wtacrs.WTACRSConfig.preset("sampler", ratio=0.3, seed=0)) if sampled else m

g = torch.Generator().manual_seed(0)
ids = torch.randint(1, 1000, (8, 64), generator=g)
lengths = torch.randint(20, 65, (8,), generator=g)
mask = (torch.arange(64) < lengths[:, None]).long()
batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (8,), generator=g)}
ex = torch.arange(8)

def make(model):
    def step(b):
        loss = model(**b).loss
        loss.backward()
        return loss.detach()
    return step

runs = {}
for name, sampled, compiled in [("plain eager", False, False), ("wtacrs eager", True, False),
                                ("plain compiled", False, True), ("wtacrs compiled", True, True)]:
    model = build(sampled)
    f = make(model)
    if compiled:
        f = torch.compile(f, fullgraph=True)
    t0 = time.time()
    for _ in range(3):  # warm-up (compiles)
        model.zero_grad(set_to_none=False)
        with wtacrs.batch(ex, mask, model=model if (sampled and compiled) else None):
            f(batch)
    print(name, "warm-up (3 steps, compiles included) s:", round(time.time() - t0, 1), flush=True)
    runs[name] = (model, f, sampled, compiled)

times = {n: [] for n in runs}
for rep in range(30):  # interleaved
    for n, (model, f, sampled, compiled) in runs.items():
        model.zero_grad(set_to_none=False)
        t = time.perf_counter()
        with wtacrs.batch(ex, mask, model=model if (sampled and compiled) else None):
            f(batch)
        times[n].append(time.perf_counter() - t)
for n, ts in times.items():
    print(f"{n:16s} median {statistics.median(ts) * 1e3:7.2f} ms  (30 interleaved steps, min {min(ts) * 1e3:.2f})")
