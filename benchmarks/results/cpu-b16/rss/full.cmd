python -m wtacrs.bench.rss {"size": "bert-base", "method": "full", "batch": 16, "seq": 128, "seed": 0, "threads": 1}
