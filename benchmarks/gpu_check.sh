#!/usr/bin/env bash
# The speed issue's GPU measurements, prepared for a lent device machine (its python3 holds CUDA torch,
# transformers and peft; nothing is installed). Random-weight Qwen3-1.7B shape, bf16, memory width = LoRA rank 64.
#
#   bash benchmarks/gpu_check.sh eager              # windows 1024 and 4096, batch 8: about 2 minutes
#   bash benchmarks/gpu_check.sh compiled [WINDOW]  # one window (default 1024), reduce-overhead: compile
#                                                   # times cold and warm for the forward, Locas and LoRA steps
#
# Writes ttt_speed's JSON, plot and log to $OUT (the device tool's folder) or runs/gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
case "${1:-eager}" in
  eager)
    python3 benchmarks/ttt_speed.py --model qwen3-1.7b --dtype bfloat16 --windows 1024 4096 --batch 8 \
      --out "$out/eager.json" 2>&1 | tee "$out/eager.log" ;;
  compiled)
    window=${2:-1024}
    python3 benchmarks/ttt_speed.py --model qwen3-1.7b --dtype bfloat16 --windows "$window" --batch 1 \
      --compile reduce-overhead --out "$out/compiled_$window.json" 2>&1 | tee "$out/compiled_$window.log" ;;
  *) echo "usage: bash benchmarks/gpu_check.sh eager | compiled [WINDOW]" >&2; exit 2 ;;
esac
