"""The learning-rate measurement's cost (`wtacrs.learning_rate.first_visit_variances`) on the main job's
setting (packaged MiniLM, BEST_EXACT, a probe batch of 32 x 64 with 40 real tokens) beside one
training step: quarter-batch chunks (the default) and one example at a time (the old default).

    .venv/bin/python benchmarks/lr_measurement_cost.py
"""
import time, torch, wtacrs
from transformers import AutoModelForSequenceClassification
from wtacrs.packaged import load_model
from wtacrs.learning_rate import first_visit_variances
from wtacrs.recipes import parse_recipe, BEST_EXACT
torch.manual_seed(0)
m = load_model("all-minilm-l6-v2", AutoModelForSequenceClassification, num_labels=3)
m = parse_recipe(BEST_EXACT).prepare(m)
g = torch.Generator().manual_seed(0)
b = {"input_ids": torch.randint(1000, 20000, (32, 64), generator=g), "attention_mask": torch.ones(32, 64, dtype=torch.long), "labels": torch.randint(0, 3, (32,), generator=g)}
b["attention_mask"][:, 40:] = 0
for chunk in (None, 1):
    t = time.perf_counter(); first_visit_variances(m, b, chunk_examples=chunk); print("chunk", chunk or "quarter", round(time.perf_counter() - t, 2), "s")
m.train(); opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
t = time.perf_counter()
for _ in range(3):
    with wtacrs.batch(attention_mask=b["attention_mask"]):
        m(**b).loss.backward()
    opt.step(); opt.zero_grad()
print("train step", round((time.perf_counter() - t) / 3, 2), "s")
