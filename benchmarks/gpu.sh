#!/usr/bin/env bash
# CUDA benchmarks of wtacrs in one call, for a lent GPU: BERT-base size (random weights), seq 128,
# fp32, AdamW. About 7 minutes on one H100/H200, plus the plans (step 6: a few minutes of CPU).
#
#   bash benchmarks/gpu.sh [OUT]        # OUT defaults to benchmarks/results/gpu
#
# 1. `bench calls`: ATen calls and device-to-host syncs of one step per method (batch 8).
# 2. `bench speed --interleave`, batch 64: step time and peak (torch.cuda.max_memory_allocated) of
#    full, checkpointing, LoRA, LoRA+checkpointing and the WTA-CRS recipes, round-robin in one process.
# 3. `bench batch`: the largest batch within 12 GB of the same methods.
# 4. benchmarks/gpu_checks.py: the counter-based draws on CUDA equal the CPU's.
# 5. Issue 16's decoder peers: `bench speed --interleave` on the SmolLM2-135M config (random
#    weights), bf16, batch 2, seq 1024: LoRA, LoRA+checkpointing, VeLoRA and the LoRA+WTA-CRS
#    recipes with keep-gate, into OUT/decoder/.
# 6. `wtacrs plan` for steps 2, 3 and 5's workloads on this GPU's table entry (PLAN_GPU, default
#    h100-80gb; h200 on an H200), predictions beside the measurements above: OUT/plan/ and
#    OUT/decoder/plan/ (docs/plan.md's validation table takes a row from each lent GPU).
# Needs no network and installs nothing. It runs the package from this checkout's src/ with the
# first Python whose torch sees a GPU and that has transformers, peft, matplotlib and tqdm:
# $PYTHON if set, else .venv/bin/python, else python3 (the GPU image's python3 has them all).
# Writes OUT/{calls,speed,batch}.{json,md}, OUT/decoder/speed.{json,md}, PNG plots, OUT/checks.txt and
# OUT/log.txt.
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

METHODS=(full checkpointing lora lora+checkpointing wtacrs@0.3 wtacrs@0.3+companions+recompute+recompute-attention
         lora+wtacrs@0.3+companions+recompute+recompute-attention wtacrs@0.3+companions+checkpointing)
DECODER_METHODS=(lora lora+checkpointing velora lora+wtacrs@0.3+companions+recompute
                 lora+wtacrs@0.3+companions+recompute+keep-gate lora+wtacrs@0.3+companions+recompute+keep-gate+recompute-attention)
bench() { timeout "$1" "$PY" -m wtacrs.cli bench "${@:2}" --model bert-base --seq 128 --device cuda --out "$OUT"; }
{
    "$PY" -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PY" benchmarks/gpu_checks.py | tee "$OUT/checks.txt" || echo "gpu.sh: checks failed ($?)"
    bench 60 calls --batch 8 --methods "${METHODS[@]}" || echo "gpu.sh: calls failed ($?)"
    bench 150 speed --batch 64 --warmup 3 --steps 10 --interleave --methods "${METHODS[@]}" || echo "gpu.sh: speed failed ($?)"
    bench 150 batch --batch 64 --budget-gb 12 --multiple 16 --methods "${METHODS[@]}" || echo "gpu.sh: batch failed ($?)"
    timeout 150 "$PY" -m wtacrs.cli bench speed --model smollm2-135m --seq 1024 --batch 2 --dtype bfloat16 --device cuda \
        --warmup 3 --steps 10 --interleave --out "$OUT/decoder" --methods "${DECODER_METHODS[@]}" \
        || echo "gpu.sh: decoder speed failed ($?)"
    PLAN_GPU="${PLAN_GPU:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -qi h200 && echo h200 || echo h100-80gb)}"
    timeout 600 "$PY" -m wtacrs.cli plan --model bert-base --seq 128 --batch 64 --gpu "$PLAN_GPU" --budget 12 --multiple 16 \
        --methods "${METHODS[@]}" --out "$OUT/plan" || echo "gpu.sh: plan failed ($?)"
    timeout 300 "$PY" -m wtacrs.cli plan --model smollm2-135m --seq 1024 --batch 2 --dtype bfloat16 --gpu "$PLAN_GPU" \
        --no-search --methods "${DECODER_METHODS[@]}" --out "$OUT/decoder/plan" || echo "gpu.sh: decoder plan failed ($?)"
} 2>&1 | tee "$OUT/log.txt"
