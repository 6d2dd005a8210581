#!/usr/bin/env bash
# One node's launcher inside a Slurm job step (train.sbatch's srun, one task per node):
# launch/train.sh with NO_SSH=1 and this node's rank.
#
#   srun --ntasks-per-node=1 launch/slurm/node.sh STAGE_OR_RECIPE [key=value ...]
#
# Slurm's --signal=USR1@T goes to every process of the step. The trainer's ranks catch it and
# save at the next step; DeepSpeed's launchers would die of it and take the ranks down with them,
# so they inherit an ignored USR1 (the ranks install their own handler over it).
set -euo pipefail

trap '' USR1
export NO_SSH=1 NODE_RANK=${SLURM_NODEID:?run this under srun}
exec "$(dirname "$(realpath "$0")")/../train.sh" "$@"
