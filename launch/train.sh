#!/usr/bin/env bash
# One stage on every node of a hostfile, with DeepSpeed's launcher.
#
#   launch/train.sh STAGE_OR_RECIPE [key=value ...]
#
# HOSTFILE     the nodes, `host slots=N` per line (default ./hostfile; see hostfile.example)
# NO_SSH=1     no ssh: run this same command on every node yourself, with NODE_RANK=0..N-1
# NODE_RANK    this node's rank (NO_SSH=1 only); node 0 is the hostfile's first host
# MASTER_ADDR  address of node 0 that every node can reach (default: the hostfile's first host)
# MASTER_PORT  default 29500
# DEVICES      devices per node to check `slots` against (default: nvidia-smi's count, if any)
# PYTHON       the Python that has gama_ds and deepspeed (default: python3)
#
# The ranks' environment: variables named in GAMA_DS_FORWARD_ENV (default: NCCL_* PYTHONPATH
# OMP_NUM_THREADS TORCH_EXTENSIONS_DIR HF_* TRANSFORMERS_* CUDA_* GAMA_DS_*) are written to
# .gama_ds/deepspeed_env (with HOSTFILE and GAMA_DS_LAUNCH, which run.json records) and handed to
# DeepSpeed as its .deepspeed_env file, which it exports on every node it starts over ssh. With
# NO_SSH=1 no file is written: each node's launcher inherits this shell's environment.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
recipe=$1
shift
PYTHON=${PYTHON:-python3}
HOSTFILE=$(realpath -m "${HOSTFILE:-./hostfile}")
MASTER_PORT=${MASTER_PORT:-29500}

devices=${DEVICES:-}
if [[ -z $devices ]] && command -v nvidia-smi >/dev/null 2>&1; then
    if ! listing=$(nvidia-smi -L 2>&1); then
        echo "train.sh: nvidia-smi failed on $(hostname): $listing" >&2
        echo "train.sh: fix the node's driver, or set DEVICES to the ranks per node" >&2
        exit 2
    fi
    devices=$(grep -c '^GPU ' <<<"$listing" || true)
    # The ranks must then find their GPU, rather than train in fp32 on CPU.
    ((devices > 0)) && export GAMA_DS_REQUIRE_GPU=1
fi
check=("$PYTHON" -m gama_ds.launch check "$HOSTFILE" "$recipe" "$@")
[[ -n $devices ]] && check+=(--devices "$devices")
[[ -n ${NODE_RANK:-} ]] && check+=(--node-rank "$NODE_RANK")
"${check[@]}" >&2 # fails, naming the file and line, before anything starts
MASTER_ADDR=${MASTER_ADDR:-$("${check[@]}" --field master)}

export HOSTFILE
export GAMA_DS_LAUNCH="launch/train.sh $recipe $*"

if [[ ${NO_SSH:-0} != 1 ]]; then
    # Only the ssh path reads it; without ssh every node's launcher inherits this shell.
    mkdir -p .gama_ds
    env_file=$PWD/.gama_ds/deepspeed_env
    forward=${GAMA_DS_FORWARD_ENV:-"NCCL_ PYTHONPATH OMP_NUM_THREADS TORCH_EXTENSIONS_DIR HF_ TRANSFORMERS_ CUDA_ GAMA_DS_"}
    : >"$env_file"
    while IFS='=' read -r name value; do
        for prefix in $forward HOSTFILE; do
            if [[ $name == "$prefix"* && $value != *$'\n'* ]]; then
                printf '%s=%s\n' "$name" "$value" >>"$env_file"
                break
            fi
        done
    done < <(env)
    export DS_ENV_FILE=$env_file
fi

args=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ ${NO_SSH:-0} == 1 ]]; then
    args+=(--no_ssh --node_rank "${NODE_RANK:?NO_SSH=1 needs NODE_RANK, 0 for the first host in the hostfile}")
fi
exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module gama_ds.train "$recipe" "$@"
