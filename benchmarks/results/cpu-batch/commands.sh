#!/usr/bin/env bash
cd /work/main
export MALLOC_MMAP_THRESHOLD_=1048576
.venv/bin/wtacrs bench batch --model bert-base --seq 128 --budget-gb 12 --batch 64 --multiple 8 --threads 2 \
  --methods full --out benchmarks/results/cpu-batch/full
.venv/bin/wtacrs bench batch --model bert-base --seq 128 --budget-gb 12 --batch 128 --multiple 64 --threads 2 \
  --methods wtacrs@0.3+companions+checkpointing --out benchmarks/results/cpu-batch/wtacrs_companions_checkpointing
