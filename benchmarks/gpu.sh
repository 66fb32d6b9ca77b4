#!/usr/bin/env bash
# CUDA benchmarks of wtacrs: `wtacrs bench memory`, `speed` and `batch` for a BERT-base-size model
# (random weights), batch 64, sequence 128, fp32, AdamW. Well under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu.sh [OUT]        # OUT defaults to benchmarks/results/gpu
#
# Needs no network and installs nothing. It runs the package from this checkout's src/ with the
# first Python whose torch sees a GPU and that has transformers, peft, matplotlib and tqdm:
# $PYTHON if set, else .venv/bin/python, else python3 (the GPU image's python3 has them all).
# A venv made here with `pip install -c constraints.txt -e '.[all]'` holds the CPU build of torch,
# so on a GPU machine the image's python3 is the one normally picked.
# Writes OUT/{memory,speed,batch}.{json,md}, PNG plots and OUT/log.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

probe='import torch, transformers, peft, matplotlib, tqdm; assert torch.cuda.is_available()'
PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3; do
    if [ -n "$candidate" ] && "$candidate" -c "$probe" 2>/dev/null; then PY="$candidate"; break; fi
done
if [ -z "$PY" ]; then
    echo "gpu.sh: no Python with CUDA-enabled torch, transformers, peft, matplotlib and tqdm found" >&2
    exit 1
fi

bench() { timeout "$1" "$PY" -m wtacrs.cli bench "${@:2}" --model bert-base --seq 128 --device cuda --out "$OUT"; }
{
    "$PY" -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    bench 100 memory --batch 64 || echo "gpu.sh: memory failed ($?)"
    bench 130 speed --batch 64 --warmup 3 --steps 10 || echo "gpu.sh: speed failed ($?)"
    # The issue's budget, 12 GB, on a subset of methods (each probe is a fresh model).
    bench 220 batch --batch 64 --budget-gb 12 --multiple 16 --methods full checkpointing lora wtacrs@0.3 \
        lora+wtacrs@0.3+companions wtacrs@0.3+companions+checkpointing \
        wtacrs@0.3+companions+recompute+recompute-attention || echo "gpu.sh: batch failed ($?)"
} 2>&1 | tee "$OUT/log.txt"
