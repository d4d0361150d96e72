#!/usr/bin/env bash
# Prepared one-GPU benchmark (experiments/perf/gpu_bench.py, its docstring says what it measures): generation and
# DPO training tokens/s of SmolLM2-135M-Instruct in bf16, written to one JSON file.
#   bash experiments/perf/gpu_bench.sh [--out PATH] [--model DIR] [--peak-tflops 989]   # one CUDA GPU, < 8 min
#   bash experiments/perf/gpu_bench.sh --dry-run [--with-vllm] [--out PATH]            # tiny sizes, any CPU
# Python: $PYTHON, else the repository's .venv, else python3 (it needs torch, transformers, deepspeed, vllm
# optionally, and alignlab importable from this checkout).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" "$ROOT/experiments/perf/gpu_bench.py" "$@"
