#!/usr/bin/env bash
# The runs behind docs/RESULTS.md: SmolLM2-135M on real SST-2 sentences (a GLUE-style directory with train.tsv;
# ours was the project's shared data folder), on one CPU machine.
#   SST2_DIR=PATH/TO/sst2 bash scripts/results.sh [OUT_DIR]      (about 35 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results}
COMMON=(experiment=smollm2_sst2 "task.data_dir=${SST2_DIR:?set SST2_DIR to a directory with SST-2 train.tsv}"
        trainer.enable_progress_bar=false)
# 1. int8 (the default linear codec): zero-shot vs trained, and the baseline for 2 and 3
python train.py "${COMMON[@]}" hydra.run.dir="$OUT/int8"
# 2. the float32 payload ablation, same seeds and steps
python train.py "${COMMON[@]}" quantization=none hydra.run.dir="$OUT/none"
# 3. four simulated machines (k = 4 micro-batches of 4, 16 examples per step) for 150 steps: the same 2400
#    examples as run 1 had seen at its step-150 validation
python train.py "${COMMON[@]}" optimizer.k=4 trainer.max_steps=150 hydra.run.dir="$OUT/k4"
python -m lightning_zo.report "$OUT/int8" "$OUT/none" "$OUT/k4" --out docs/results
