#!/usr/bin/env bash
# Parallel single editing on a CUDA device: edits per second at B = 1..64 for FT-M, LoRA and ROME,
# on a local checkpoint (MODEL=/path) or a random Llama-2-7B-shaped model in bfloat16.
#   bash benchmarks/gpu_parallel.sh                 # all three editors
#   EDITORS="ft-m" SIZES=1,8,64 bash benchmarks/gpu_parallel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
for editor in ${EDITORS:-ft-m lora rome}; do
    "$PYTHON" benchmarks/gpu_parallel.py --editor "$editor" --sizes "${SIZES:-1,2,4,8,16,32,64}" \
        ${MODEL:+--model "$MODEL"}
done
