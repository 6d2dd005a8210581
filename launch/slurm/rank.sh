#!/usr/bin/env bash
# One rank of a Slurm job step: train.sbatch's srun starts one task per GPU, and this gives
# each the variables torch.distributed reads, from Slurm's task ids.
#
#   srun --ntasks-per-node=GPUS launch/slurm/rank.sh STAGE_OR_RECIPE [key=value ...]
#
# No launcher stands between Slurm and the ranks: Slurm's signals (USR1 before the time limit,
# TERM on scancel or preemption) reach each rank and its DataLoader workers directly, and so
# does its GPU binding (CUDA_VISIBLE_DEVICES per task; the rank picks its device among those).
set -euo pipefail

# Until Python listens (its first import), a USR1 would kill the task and, with it, the job.
trap '' USR1
: "${SLURM_PROCID:?run this under srun}"
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:?srun --ntasks-per-node=N} NODE_RANK=$SLURM_NODEID
exec "${PYTHON:-python3}" -m gama_ds.train "$@"
