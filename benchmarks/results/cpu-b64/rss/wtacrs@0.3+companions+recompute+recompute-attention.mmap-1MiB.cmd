MALLOC_MMAP_THRESHOLD_=1048576 python -m wtacrs.bench.rss '{"size": "bert-base", "method": "wtacrs@0.3+companions+recompute+recompute-attention", "batch": 64, "seq": 128, "seed": 0, "threads": 1}'
