#!/usr/bin/env bash
# Real-size backbone on GPUs in one command (issue 15): training samples/s, peak memory and MFU under DeepSpeed
# ZeRO-2 + bf16 + gradient checkpointing, and embeddings/s with reasoning off and on. Random weights built from a
# config JSON (no download). Needs a CUDA machine with the repo's environment (`make install`).
#
#   bench/gpu.sh                                              # Qwen2.5-VL-3B layout on every visible GPU
#   CONFIG=moon3/model/real/qwen2_5_vl_7b.json BATCH=4 bench/gpu.sh
#   GPUS=1 STEPS=10 bench/gpu.sh
#
# Settings (environment): CONFIG, GPUS (default: all visible), BATCH (query/product pairs per GPU per step, 8),
# STEPS (timed, 20), WARMUP (5), ZERO (2), PRODUCTS (2000), EMBED_ITEMS (256), EMBED_BATCH (32),
# PEAK_TFLOPS (bf16 dense per GPU; default from the GPU's name), OUT (default bench/results/gpu-<time>).
# Results: $OUT/train.json, $OUT/embed.json and Markdown rows (also $OUT/report.md) for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
CONFIG=${CONFIG:-moon3/model/real/qwen2_5_vl_3b.json}
GPUS=${GPUS:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}
if [ "${GPUS:-0}" -lt 1 ]; then
  echo "bench/gpu.sh: no CUDA GPU visible; this benchmark needs one (moon3 model plan works without)" >&2
  exit 1
fi
BATCH=${BATCH:-8}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
ZERO=${ZERO:-2}
PRODUCTS=${PRODUCTS:-2000}
EMBED_ITEMS=${EMBED_ITEMS:-256}
EMBED_BATCH=${EMBED_BATCH:-32}
PEAK_TFLOPS=${PEAK_TFLOPS:-0}
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

echo "== plan (estimate) =="
# (moon3.cli imported, not run as __main__: `python -m moon3.cli` misses the stage commands registered at its end)
"$PY" -c 'from moon3.cli import app; app()' model plan "$CONFIG" --gpus "$GPUS" --batch "$BATCH" | tee "$OUT/plan.txt"
echo "== data =="
"$PY" -m bench.bench_gpu data --out "$OUT/data" --products "$PRODUCTS" --image-size 512
echo "== train: $GPUS GPU(s), ZeRO-$ZERO, bf16, gradient checkpointing =="
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m bench.bench_gpu train \
  --config "$CONFIG" --data "$OUT/data" --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --zero "$ZERO" \
  --precision bf16 --peak-tflops "$PEAK_TFLOPS" --out "$OUT/train.json"
echo "== embed: reasoning off and on =="
"$PY" -m bench.bench_gpu embed --config "$CONFIG" --data "$OUT/data" --items "$EMBED_ITEMS" --batch "$EMBED_BATCH" \
  --out "$OUT/embed.json"
echo "== report ($OUT/report.md) =="
"$PY" -m bench.bench_gpu report "$OUT" | tee "$OUT/report.md"
