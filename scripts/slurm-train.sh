#!/bin/bash
# Train on one node with 4 GPUs; pre-emptible, and requeues itself at the time limit
# (see docs/cluster.md). Submit with: sbatch scripts/slurm-train.sh
#SBATCH --job-name=medsynth-train
#SBATCH --nodes=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=runs/%x-%j.log

set -uo pipefail
DATA=${DATA:-$HOME/data/ct}
RUN=${RUN:-$SCRATCH/runs/ct}
CONFIG=${CONFIG:-configs/ct-128.yaml}
export MEDSYNTH_CACHE=${MEDSYNTH_CACHE:-$SCRATCH/medsynth-cache}

# SLURM sends USR1 to this script 2 minutes before the time limit (and TERM on pre-emption).
# Pass it on to torchrun as TERM, which forwards it to every rank: medsynth writes a checkpoint
# and exits. Then put the job back in the queue; the next run of this same command resumes
# from $RUN/checkpoints/last.pt. A run that finished, or failed for another reason, is not requeued.
signalled=0
trap 'signalled=1; kill -TERM "$pid" 2>/dev/null' USR1 TERM
torchrun --standalone --nproc_per_node "${SLURM_GPUS_ON_NODE:-4}" \
    -m medsynth train "$DATA" -o "$RUN" --config "$CONFIG" &
pid=$!
wait "$pid"
status=$?
# A trapped signal interrupts `wait`; wait again for training to finish its checkpoint.
while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"
    status=$?
done
if [ "$signalled" = 1 ]; then
    echo "medsynth: stopped by the scheduler (exit $status); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
