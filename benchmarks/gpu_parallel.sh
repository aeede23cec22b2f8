#!/usr/bin/env bash
# Everything a lent GPU should measure, in one command: parallel single editing at B = 1..64 for FT-M,
# LoRA and ROME with the evaluation's share (edit and eval seconds per case, --eval $EVAL), on a local
# checkpoint (MODEL=/path) or a random Llama-2-7B-shaped model in bfloat16; then the 7B rehearsal
# (FT-M, LoRA, ROME, MEMIT: peak memory against the memory model, seconds per step, the cost model's
# efficiency there, for `overtone study plan --gpu`'s profiles.yaml).
#   bash benchmarks/gpu_parallel.sh                 # all of it
#   EDITORS="ft-m" SIZES=1,8,64 EVAL=both bash benchmarks/gpu_parallel.sh
#   DEVICE=cpu SHAPE=tiny SIZES=1,2 bash benchmarks/gpu_parallel.sh     # a check of the scripts on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
for editor in ${EDITORS:-ft-m lora rome}; do
    "$PYTHON" benchmarks/gpu_parallel.py --editor "$editor" --sizes "${SIZES:-1,2,4,8,16,32,64}" \
        --eval "${EVAL:-both}" --device "${DEVICE:-cuda}" --shape "${SHAPE:-llama-2-7b}" ${MODEL:+--model "$MODEL"}
done
"$PYTHON" benchmarks/rehearsal_7b.py --device "${DEVICE:-cuda}" --shape "${SHAPE:-llama-2-7b}" \
    --json "${REHEARSAL_JSON:-runs/rehearsal-${DEVICE:-cuda}.json}"
