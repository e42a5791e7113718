#!/bin/bash
# Train on one node with 4 GPUs; safe to pre-empt and requeue (see docs/cluster.md).
#SBATCH --job-name=medsynth-train
#SBATCH --nodes=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --output=runs/%x-%j.log

set -euo pipefail
DATA=${DATA:-$HOME/data/ct}
RUN=${RUN:-$SCRATCH/runs/ct}
CONFIG=${CONFIG:-configs/ct-128.yaml}
export MEDSYNTH_CACHE=${MEDSYNTH_CACHE:-$SCRATCH/medsynth-cache}

# exec: torchrun receives SLURM's SIGTERM and passes it on; medsynth checkpoints and exits 143,
# and the requeued job resumes from $RUN/checkpoints/last.pt with this same command.
exec torchrun --standalone --nproc_per_node "${SLURM_GPUS_ON_NODE:-4}" -m medsynth train "$DATA" -o "$RUN" --config "$CONFIG"
