#!/usr/bin/env bash
# Submit every stage as a Slurm job (launch/slurm/train.sbatch), each waiting for the previous
# one to succeed (--dependency=afterok) and starting from that stage's export.
#
#   launch/slurm/pipeline.sh [key=value ...]        (the overrides go to every stage)
#
# STAGES DATA_ROOT EVAL_ROOT RUNS INIT: as for launch/pipeline.sh (stage N: the Nth recipe,
#              shards $DATA_ROOT/stageN, run $RUNS/stageN, export $RUNS/stageN/export)
# SBATCH_ARGS  sbatch options for every stage, e.g. "--nodes=4 --partition=gpu --time=24:00:00"
# GPUS_PER_NODE PYTHON: passed to the jobs (see train.sbatch)
#
# Prints one job id per submitted stage. A stage whose export is complete is not submitted;
# each job exports its run when the stage finished, and a job that hits its time limit is
# requeued and resumes. Job output: $RUNS/stageN/slurm-JOBID.out. A failed stage cancels the
# stages after it (--kill-on-invalid-dep); fix it and run this script again.
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
: "${DATA_ROOT:?set DATA_ROOT: stage N trains on the shards in \$DATA_ROOT/stageN}"
RUNS=${RUNS:-runs}
read -r -a stages <<<"${STAGES:-stage1 stage2 stage3 stage4 stage5}"
read -r -a sbatch_args <<<"${SBATCH_ARGS:-}"
export GAMA_DS_ROOT
GAMA_DS_ROOT=$(realpath "$(dirname "$(realpath "$0")")/../..")

init=${INIT:-}
previous=
for k in "${!stages[@]}"; do
    n=$((k + 1))
    recipe=${stages[k]}
    run=$RUNS/stage$n
    out=$run/export
    if [[ -f $out/gama_ds.json ]]; then
        echo "pipeline: stage $n ($recipe): $out is complete, not submitted" >&2
        init=$out
        continue
    fi
    args=("$recipe" "data.train=[{path: $DATA_ROOT/stage$n}]" "train.output_dir=$run")
    [[ -n ${EVAL_ROOT:-} ]] && args+=("data.eval=[{path: $EVAL_ROOT/stage$n}]")
    [[ -n $init ]] && args+=("train.init=$init")
    mkdir -p "$run" # Slurm opens the job's output file there and creates no folders
    options=(--parsable --job-name="gama-ds-stage$n" --output="$run/slurm-%j.out" --kill-on-invalid-dep=yes)
    [[ -n $previous ]] && options+=(--dependency="afterok:$previous")
    previous=$(EXPORT=$out sbatch "${options[@]}" "${sbatch_args[@]}" \
        "$GAMA_DS_ROOT/launch/slurm/train.sbatch" "${args[@]}" "$@")
    previous=${previous%%;*} # --parsable prints "id" or "id;cluster"
    echo "pipeline: stage $n ($recipe): job $previous" >&2
    echo "$previous"
    init=$out
done
