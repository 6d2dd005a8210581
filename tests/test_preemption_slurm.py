"""SIGTERM as Slurm sends it on scancel, preemption or a time limit without --signal: to every
process of the job (batch script, srun, ranks, DataLoader workers), SIGKILL after KillWait.
The ranks save a complete checkpoint within it, and the same job submitted again resumes."""

from __future__ import annotations

import json
import os
import sys

from cluster import QUIET, tail, tiny_data, wait_for

from conftest import ROOT
from gama_ds.train.checkpoint import complete_tags

SBATCH = os.path.join(ROOT, "launch", "slurm", "train.sbatch")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def loss_steps(metrics) -> list[int]:
    return [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]


def test_scancel_saves_on_two_nodes_and_on_one_and_the_job_submitted_again_resumes(slurm, tmp_path):
    """Three jobs of world size 2: scancel on 2 nodes x 1 rank, resumed and scancelled again on
    1 node x 2 ranks, resumed to the end on 2 nodes; every step is logged once."""
    data = tiny_data(tmp_path)
    out, steps = tmp_path / "run", 16
    args = [
        SBATCH,
        "tiny",
        f"data.train=[{{path: {data['train']}}}]",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        "checkpoint.every_steps=1000",  # only the signals' checkpoints
        "logging.every_steps=1",
        *QUIET,
    ]
    shapes = {2: {"GPUS_PER_NODE": "1"}, 1: {"GPUS_PER_NODE": "2"}}
    metrics = out / "metrics.jsonl"

    def submit(nodes: int) -> tuple[str, object]:
        env = {"PYTHON": sys.executable, "GAMA_DS_ROOT": ROOT, **shapes[nodes]}
        job = slurm.run("sbatch", "--parsable", f"--nodes={nodes}", *args, cwd=tmp_path, env=env).strip()
        return job, tmp_path / f"slurm-gama-ds-{job}.out"

    saved = 0
    for nodes in (2, 1):
        job, output = submit(nodes)
        wait_for(
            lambda job=job, saved=saved: (
                metrics.exists()
                and len(loss_steps(metrics)) >= saved + 2
                or slurm.job(job)["JobState"] in ENDED
            ),
            300,
            f"job {job}'s second step\n{tail(str(output))}",
            every=0.2,
        )
        slurm.run("scancel", job)  # SIGTERM to every process of the job, SIGKILL after KillWait
        info = slurm.wait_state(job, ENDED, 120)
        log = output.read_text(errors="replace")
        assert info["JobState"] == "CANCELLED", log[-3000:]
        assert info["NodeList"] in (["node[1-2]"] if nodes == 2 else ["node1", "node2"])
        assert "train.sbatch: SIGTERM: the ranks save a checkpoint and stop" in log
        assert "Traceback" not in log, log[-3000:]  # no rank and no DataLoader worker died of it
        if saved:
            assert f"resumed from step-{saved:08d} at step {saved}" in log
        result = json.loads((out / "result.json").read_text())
        assert result["stopped_by"] == "SIGTERM" and saved + 2 <= result["step"] < steps, log[-3000:]
        saved = result["step"]
        assert complete_tags(str(out / "checkpoints"))[-1] == f"step-{saved:08d}"

    job, output = submit(2)
    info = slurm.wait_state(job, ENDED, 300)
    log = output.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", log[-3000:] + slurm.logs()
    assert f"resumed from step-{saved:08d} at step {saved}" in log
    assert loss_steps(metrics) == list(range(1, steps + 1))  # every step once, across three jobs
