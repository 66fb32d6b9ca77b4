python -m wtacrs.bench.rss {"size": "bert-base", "method": "lora+wtacrs@0.3+companions", "batch": 16, "seq": 128, "seed": 0, "threads": 1}
