"""launch/slurm/train.sbatch and launch/slurm/pipeline.sh on a real one-node Slurm (munged,
slurmctld and slurmd from Debian, started by the fixture): a stage warned by SIGUSR1 saves,
requeues itself and resumes to the end; two stages chain through afterok and the export."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from cluster import QUIET, Slurm, daemon, need, tail, tiny_data, wait_for

from conftest import ROOT
from gama_ds.train.checkpoint import complete_tags

SBATCH = os.path.join(ROOT, "launch", "slurm", "train.sbatch")
PIPELINE = os.path.join(ROOT, "launch", "slurm", "pipeline.sh")


@pytest.fixture(scope="module")
def slurm():
    need(["munged", "slurmctld", "slurmd", "sbatch", "scontrol"], "slurmctld slurmd slurm-client munge")
    with daemon(Slurm, "gds-slurm-") as s:
        yield s


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("slurm-data"))


def job_env(extra=None) -> dict:
    # sbatch exports the submitting environment to the job (the default --export=ALL).
    return {"PYTHON": sys.executable, "GPUS_PER_NODE": "2", "GAMA_DS_ROOT": ROOT, **(extra or {})}


def result_line(path) -> dict:
    return json.loads([x for x in path.read_text().splitlines() if x.startswith('{"step"')][-1])


def test_a_stage_warned_by_usr1_requeues_and_resumes_to_the_end(slurm, data, tmp_path):
    out, steps = tmp_path / "run", 12
    job = slurm.run(
        "sbatch",
        "--parsable",
        SBATCH,
        "tiny",
        f"data.train=[{{path: {data['train']}}}]",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        "checkpoint.every_steps=2",
        "logging.every_steps=1",
        *QUIET,
        cwd=tmp_path,
        env=job_env(),
    ).strip()
    output = tmp_path / f"slurm-gama-ds-{job}.out"
    wait_for(
        lambda: complete_tags(str(out / "checkpoints")) or slurm.job(job)["JobState"] != "RUNNING" and None,
        240,
        f"job {job}'s first checkpoint\n{tail(str(output))}",
        every=0.1,
    )
    # What --signal=USR1@T does at the time limit: USR1 to every process of the job's steps.
    slurm.run("scancel", "--signal=USR1", job)
    info = wait_for(
        lambda: (i := slurm.job(job))["Restarts"] == "1" and i["JobState"] == "PENDING" and i,
        120,
        f"job {job} to requeue itself\n{tail(str(output))}",
        every=0.5,
    )
    assert info["Requeue"] == "1"
    # Slurm holds a requeued job for two minutes (BeginTime); let it start sooner, but not within
    # the second of the requeue (its new SubmitTime): slurmd compares to the second with the
    # revoked credential.
    wait_for(
        lambda: time.strftime("%Y-%m-%dT%H:%M:%S") > info["SubmitTime"],
        10,
        f"the second after the requeue at {info['SubmitTime']}",
        every=0.05,
    )
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 300)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(str(output), 30) + slurm.logs()

    attempts = tmp_path / ".gama_ds" / f"slurm-{job}"
    first, second = result_line(attempts / "attempt-0.out"), result_line(attempts / "attempt-1.out")
    assert first["stopped_by"] == "SIGUSR1" and 2 <= first["step"] < steps
    assert second["stopped_by"] is None and second["step"] == second["total_steps"] == steps
    log = output.read_text(errors="replace")
    assert f"requeueing job {job} to resume" in log
    assert f"resumed from step-{first['step']:08d} at step {first['step']}" in log
    # Every step logged once, across both attempts: the second went on where the first saved.
    lines = (out / "metrics.jsonl").read_text().splitlines()
    metrics = [r["step"] for r in map(json.loads, lines) if "loss" in r]  # not the epochs' lines
    assert metrics == list(range(1, steps + 1))
    run = json.loads((out / "run.json").read_text())
    launch = run["launch"]
    assert launch["SLURM_JOB_ID"] == job and launch["SLURM_JOB_NODELIST"] == "localhost"
    assert launch["hostfile"] == "localhost slots=2\n" and launch["NODE_RANK"] == "0"
    assert launch["MASTER_ADDR"] == "127.0.0.1" and run["world_size"] == 2  # NodeAddr, not the name


def test_the_slurm_pipeline_chains_stages_through_afterok_and_the_export(slurm, data, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for n in (1, 2):
        (shards / f"stage{n}").symlink_to(data["train"])
    runs = tmp_path / "runs"
    env = job_env({"STAGES": "tiny tiny", "DATA_ROOT": str(shards), "RUNS": str(runs)})
    submitted = slurm.run(PIPELINE, "train.max_steps=2", *QUIET, cwd=tmp_path, env=env).split()
    assert len(submitted) == 2
    first, second = submitted
    assert slurm.job(second)["Dependency"].startswith(f"afterok:{first}")
    for n, job in enumerate(submitted, 1):
        output = runs / f"stage{n}" / f"slurm-{job}.out"
        info = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 300)
        assert info["JobState"] == "COMPLETED", tail(str(output), 80)
        assert f"exported {runs}/stage{n} to {runs}/stage{n}/export" in output.read_text(errors="replace")
        assert (runs / f"stage{n}" / "export" / "gama_ds.json").exists()
    stage2 = json.loads((runs / "stage2" / "run.json").read_text())
    assert stage2["recipe"]["train"]["init"] == f"{runs}/stage1/export"
    assert f"initialised from {runs}/stage1/export" in (runs / "stage2" / f"slurm-{second}.out").read_text()

    # Submitted again, both stages are complete: nothing goes to the queue.
    again = slurm.run(PIPELINE, "train.max_steps=2", *QUIET, cwd=tmp_path, env=env)
    assert again.split() == []
    assert slurm.run("squeue", "-h").strip() == ""
