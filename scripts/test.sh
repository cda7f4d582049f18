#!/usr/bin/env bash
# The test command: install (idempotent), lint, run every test (tiny random models + the embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
