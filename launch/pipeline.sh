#!/usr/bin/env bash
# Every stage in order with launch/train.sh, each started from the previous stage's export.
#
#   launch/pipeline.sh [key=value ...]        (the overrides go to every stage)
#
# STAGES       the recipes in order (default: stage1 stage2 stage3 stage4 stage5); the Nth is stage N
# DATA_ROOT    stage N trains on the shards in $DATA_ROOT/stageN (required)
# EVAL_ROOT    if set, stage N evaluates on $EVAL_ROOT/stageN
# RUNS         stage N's run goes to $RUNS/stageN and its export to $RUNS/stageN/export (default: runs)
# INIT         stage 1's train.init, e.g. the reference's base folder (default: none)
# EXPORT_WAIT  NO_SSH=1 on a node other than 0: seconds to wait for node 0's export (default 1800;
#              a stage stopped by a signal ends the wait at once, with exit 75 as on node 0)
# HOSTFILE NO_SSH NODE_RANK MASTER_ADDR MASTER_PORT DEVICES PYTHON: as for launch/train.sh
#
# Run it again after anything stops it: a stage whose export is complete is skipped (the export
# is written as export.partial and renamed when done), and the interrupted stage resumes from its
# latest complete checkpoint (every stage runs with GAMA_DS_RESUME=auto, which is harmless
# before the first checkpoint). Ranks stopped by SIGTERM/SIGUSR1 save, then the script exits 75.
# With NO_SSH=1, start this on every node; node 0 exports, the others wait for its export.
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
: "${DATA_ROOT:?set DATA_ROOT: stage N trains on the shards in \$DATA_ROOT/stageN}"
PYTHON=${PYTHON:-python3}
RUNS=${RUNS:-runs}
read -r -a stages <<<"${STAGES:-stage1 stage2 stage3 stage4 stage5}"
here=$(dirname "$(realpath "$0")")
node=0
[[ ${NO_SSH:-0} == 1 ]] && node=${NODE_RANK:?NO_SSH=1 needs NODE_RANK, 0 for the first host in the hostfile}
export GAMA_DS_RESUME=auto
log=$(mktemp)
started=$(mktemp) # its time: when the current stage started
trap 'rm -f "$log" "$started"' EXIT

init=${INIT:-}
for k in "${!stages[@]}"; do
    n=$((k + 1))
    recipe=${stages[k]}
    run=$RUNS/stage$n
    out=$run/export
    if [[ -f $out/gama_ds.json ]]; then
        echo "pipeline: stage $n ($recipe): $out is complete, skipped" >&2
        init=$out
        continue
    fi
    if [[ -e $out ]]; then
        echo "pipeline: stage $n ($recipe): $out exists but is not a complete export; move it away" >&2
        exit 2
    fi

    args=("$recipe" "data.train=[{path: $DATA_ROOT/stage$n}]" "train.output_dir=$run")
    [[ -n ${EVAL_ROOT:-} ]] && args+=("data.eval=[{path: $EVAL_ROOT/stage$n}]")
    [[ -n $init ]] && args+=("train.init=$init")
    echo "pipeline: stage $n ($recipe): training in $run" >&2
    # stdout only: the trainer's result line; pdsh prefixes it with the host, hence grep -o.
    status=0
    touch "$started"
    "$here/train.sh" "${args[@]}" "$@" | tee "$log" || status=$?
    if ((status != 0)); then
        echo "pipeline: stage $n ($recipe) failed (exit $status); run the pipeline again to resume it" >&2
        exit "$status"
    fi

    if [[ $node != 0 ]]; then
        wait=${EXPORT_WAIT:-1800}
        deadline=$((SECONDS + wait))
        until [[ -f $out/gama_ds.json ]]; do
            # Node 0 exports a finished stage only; rank 0's result says whether it finished.
            if [[ $run/result.json -nt $started ]] && grep -q '"stopped_by": "' "$run/result.json"; then
                echo "pipeline: stage $n ($recipe) was stopped at a checkpoint; run the pipeline again" >&2
                exit 75
            fi
            if ((SECONDS >= deadline)); then
                echo "pipeline: stage $n ($recipe): node 0 wrote no export to $out in ${wait}s" >&2
                exit 1
            fi
            sleep 2
        done
        init=$out
        continue
    fi

    result=$(grep -o '{"step".*' "$log" | tail -n 1 || true)
    if [[ -z $result ]]; then
        echo "pipeline: stage $n ($recipe): the trainer printed no result line" >&2
        exit 1
    fi
    stopped=$("$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1])["stopped_by"] or "")' "$result")
    if [[ -n $stopped ]]; then
        echo "pipeline: stage $n ($recipe) stopped by $stopped at a checkpoint; run the pipeline again" >&2
        exit 75
    fi
    rm -rf "$out.partial"
    "$PYTHON" -m gama_ds export "$run" --out "$out.partial" >&2
    mv "$out.partial" "$out"
    echo "pipeline: stage $n ($recipe): exported to $out" >&2
    init=$out
done
