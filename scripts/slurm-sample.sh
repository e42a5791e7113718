#!/bin/bash
# 10,000 synthetic volumes in 16 array tasks; exactly the files of one unsharded run.
#SBATCH --job-name=medsynth-sample
#SBATCH --array=0-15
#SBATCH --gpus=1
#SBATCH --output=samples/%x-%A_%a.log

set -euo pipefail
RUN=${RUN:-$SCRATCH/runs/ct}
OUT=${OUT:-$SCRATCH/synthetic}
exec medsynth sample "$RUN" -n 10000 -o "$OUT" --seed 1 --shard "$SLURM_ARRAY_TASK_ID/${SLURM_ARRAY_TASK_COUNT:-16}"
