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


def test_scancel_saves_a_checkpoint_and_the_job_submitted_again_resumes(slurm, tmp_path):
    data = tiny_data(tmp_path)
    out, steps = tmp_path / "run", 24
    submit = [
        "sbatch",
        "--parsable",
        SBATCH,
        "tiny",
        f"data.train=[{{path: {data['train']}}}]",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        "checkpoint.every_steps=1000",  # only the signal's checkpoint
        "logging.every_steps=1",
        *QUIET,
    ]
    env = {"PYTHON": sys.executable, "GPUS_PER_NODE": "2", "GAMA_DS_ROOT": ROOT}
    job = slurm.run(*submit, cwd=tmp_path, env=env).strip()
    output = tmp_path / f"slurm-gama-ds-{job}.out"
    metrics = out / "metrics.jsonl"
    wait_for(
        lambda: metrics.exists() and len(loss_steps(metrics)) >= 2 or slurm.job(job)["JobState"] in ENDED,
        300,
        f"job {job}'s second step\n{tail(str(output))}",
        every=0.2,
    )
    slurm.run("scancel", job)  # SIGTERM to every process of the job, then SIGKILL after KillWait
    info = slurm.wait_state(job, ENDED, 120)
    assert info["JobState"] == "CANCELLED", tail(str(output), 60)
    log = output.read_text(errors="replace")
    assert "train.sbatch: SIGTERM: the ranks save a checkpoint and stop" in log
    result = json.loads((out / "result.json").read_text())
    saved = result["step"]
    assert result["stopped_by"] == "SIGTERM" and 2 <= saved < steps, log[-3000:]
    assert complete_tags(str(out / "checkpoints")) == [f"step-{saved:08d}"]
    assert "Traceback" not in log, log[-3000:]  # no rank and no DataLoader worker died of it

    again = slurm.run(*submit, cwd=tmp_path, env=env).strip()
    info = slurm.wait_state(again, ENDED, 300)
    output = tmp_path / f"slurm-gama-ds-{again}.out"
    assert info["JobState"] == "COMPLETED", tail(str(output), 60) + slurm.logs()
    assert f"resumed from step-{saved:08d} at step {saved}" in output.read_text(errors="replace")
    assert loss_steps(metrics) == list(range(1, steps + 1))  # every step once, across both jobs
