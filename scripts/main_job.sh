#!/usr/bin/env bash
# The main job, end to end on the embedded default model:
#   perplexity of the first 4K tokens of a book -> memorize them into a memory (+ a few NTP steps)
#   -> perplexity with the memory -> export a dense checkpoint -> the reloaded checkpoint's perplexity.
# Usage: bash scripts/main_job.sh [TEXT_FILE] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
book="${1:-../shared/data/pg19/349.txt}"
out="${2:-runs/main_job}"
bash scripts/install.sh
locas=.venv/bin/locas
tokens=(--max-tokens 4096 --window 1024)
rm -rf "$out" && mkdir -p "$out"

echo "== 1. perplexity without memory"
$locas nll "$book" "${tokens[@]}" | tee "$out/nll_before.txt"
echo "== 2. memorize the text (width 64, highest) and train the memory 5 steps (NTP)"
$locas memorize "$book" "${tokens[@]}" --width 64 --init highest --train-steps 5 --lr 1e-2 \
    --out "$out/memory.safetensors"
echo "== 3. perplexity with the memory"
$locas nll "$book" "${tokens[@]}" --memory "$out/memory.safetensors" | tee "$out/nll_memory.txt"
echo "== 4. merge the memory into the weights (to_dense) and save a plain checkpoint"
$locas export --memory "$out/memory.safetensors" --out "$out/dense"
echo "== 5. perplexity of the reloaded dense checkpoint, no memory attached"
$locas nll "$book" "${tokens[@]}" --model "$out/dense" | tee "$out/nll_dense.txt"

perplexity() { sed -E 's/.*perplexity ([0-9.]+).*/\1/' "$1"; }
before=$(perplexity "$out/nll_before.txt")
with_memory=$(perplexity "$out/nll_memory.txt")
dense=$(perplexity "$out/nll_dense.txt")
echo "== perplexity: before $before, with memory $with_memory, dense checkpoint $dense"
.venv/bin/python - "$before" "$with_memory" "$dense" <<'PY'
import sys
before, with_memory, dense = map(float, sys.argv[1:])
assert with_memory < before, f"the memory did not lower the perplexity ({before} -> {with_memory})"
assert abs(dense - with_memory) <= 1e-3, f"dense checkpoint perplexity {dense} != memory model {with_memory}"
print(f"OK: {100 * (with_memory / before - 1):+.2f}% perplexity; dense checkpoint matches the memory model")
PY
