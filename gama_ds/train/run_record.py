"""`run.json`: what a run was (recipe, its hash, command line, world size, DeepSpeed config,
launcher variables, code commit), written by rank 0 when training starts; `result.json`: how
its latest start ended (the line the trainer prints), for nodes that do not see that line."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

from .. import __version__
from .preflight import RUN_FILE


def write_run_file(out_dir, recipe, plan, digest, recipe_path, overrides, world, model) -> None:
    os.makedirs(out_dir, exist_ok=True)
    record = {
        "recipe_hash": digest,
        "recipe_path": recipe_path,
        "overrides": list(overrides),
        "argv": sys.argv,
        "world_size": world,
        "gama_ds": __version__,
        "deepspeed_config": plan.ds_config,
        "precision": plan.precision,
        "recipe": asdict(recipe),
        "launch": launch_info(),
        "llm_share_on_rank0": local_share(model),
        "tagger": plan.tagger,  # with a soft prompt: the tagger of the shards (the export names it)
    }
    with open(os.path.join(out_dir, RUN_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


RESULT_FILE = "result.json"


def write_result_file(out_dir: str, result: dict) -> None:
    """Replaced whole (a reader on another node never sees half of it)."""
    path = os.path.join(out_dir, RESULT_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def launch_info() -> dict:
    """How this job was started: the launcher's variables, the node list, the code's commit."""
    keys = (
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "SLURM_JOB_ID",
        "SLURM_JOB_NODELIST",
        "SLURM_NNODES",
        "HOSTFILE",
        "NODE_RANK",
    )
    info = {k: os.environ[k] for k in keys if k in os.environ}
    # What the launch scripts forwarded to this rank (on remote nodes: through .deepspeed_env),
    # GAMA_DS_LAUNCH, train.sh's command line, among them.
    info.update({k: v for k, v in os.environ.items() if k.startswith("GAMA_DS_")})
    if os.path.isfile(os.environ.get("HOSTFILE", "")):
        with open(os.environ["HOSTFILE"], encoding="utf-8") as f:
            info["hostfile"] = f.read()
    try:
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        info["commit"] = (
            subprocess.run(
                ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def local_share(model) -> float:
    """The share of the LLM's elements this rank holds: 1 unless ZeRO-3 partitioned it."""
    held = total = 0
    for p in model.llm.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else n
    return held / max(total, 1)
