#!/usr/bin/env bash
# The speed issue's GPU measurements, prepared for a lent device machine (its python3 holds CUDA torch,
# transformers and peft; nothing is installed). Random-weight Qwen3-1.7B shape, bf16, memory width = LoRA rank 64.
#
#   bash benchmarks/gpu_check.sh eager              # windows 1024 and 4096, batch 8: about 2 minutes
#   bash benchmarks/gpu_check.sh compiled [WINDOW [ITEM...]]  # one window (default 1024), reduce-overhead:
#        # compile times cold and warm of ITEMs (default: forward locas_step lora_step; ttt_speed --items)
#   bash benchmarks/gpu_check.sh equal              # compiled (reduce-overhead) runs equal eager ones on the GPU:
#                                                   # tiny Qwen3, locas ntp, locas mix and lora mix, 2 steps/chunk
#
# Writes ttt_speed's JSON (rewritten after each item: a run cut short keeps what it measured), plot and log to
# $OUT (the device tool's folder) or runs/gpu_check, and the GPU and package versions to gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
model=${LOCAS_GPU_CHECK_MODEL:-qwen3-1.7b}  # tiny: a dry run of this script on a CPU (with a stand-in nvidia-smi)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import sys, torch, transformers, peft
print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__)" | tee -a "$out/gpu.txt"
case "${1:-eager}" in
  eager)
    python3 benchmarks/ttt_speed.py --model "$model" --dtype bfloat16 --windows 1024 4096 --batch 8 \
      --out "$out/eager.json" 2>&1 | tee "$out/eager.log" ;;
  compiled)
    window=${2:-1024}
    items=("${@:3}")
    [ ${#items[@]} -gt 0 ] || items=(forward locas_step lora_step)
    python3 benchmarks/ttt_speed.py --model "$model" --dtype bfloat16 --windows "$window" --batch 1 \
      --compile reduce-overhead --repeats 3 --items "${items[@]}" --out "$out/compiled_$window.json" 2>&1 |
      tee "$out/compiled_$window.log" ;;
  equal)
    python3 - <<'PY' 2>&1 | tee "$out/equal.log"
import dataclasses, torch
from transformers import AutoModelForCausalLM, Qwen3Config
from locas.training.config import OnlineConfig
from locas.training.online import run_online
config = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config).to("cuda" if torch.cuda.is_available() else "cpu").eval()
text = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(1))
for case in [dict(method="locas"), dict(method="locas", loss="mix"), dict(method="lora", loss="mix")]:
    settings = OnlineConfig(chunk_size=64, context_window=64, steps_per_chunk=2, teacher_window=128, **case)
    eager = run_online(model, text, settings, progress=False)
    compiled = run_online(model, text, dataclasses.replace(settings, compile="reduce-overhead"), progress=False)
    difference = max(abs(a.nll_sum - b.nll_sum) / abs(a.nll_sum) for a, b in zip(eager.records, compiled.records))
    print(case, f"largest relative difference of a chunk's NLL: {difference:.2e}", flush=True)
PY
    ;;
  *) echo "usage: bash benchmarks/gpu_check.sh eager | compiled [WINDOW [ITEM...]] | equal" >&2; exit 2 ;;
esac
