"""launch/slurm/pipeline.sh and train.sbatch on a real two-node Slurm (tests/cluster.py: node1
and node2 are namespaces of this machine joined by a veth pair, with munged, slurmctld and a
slurmd each). Two stages of 2 nodes x 2 ranks chain through afterok and the export; the first,
warned by SIGUSR1 as at its time limit, saves, requeues itself and resumes on both nodes."""

from __future__ import annotations

import json
import os
import sys

import pytest
from cluster import FINISHED, QUIET, tail, tiny_data, wait_for

from conftest import ROOT

PIPELINE = os.path.join(ROOT, "launch", "slurm", "pipeline.sh")
STEPS = 6  # an epoch is 4 steps of 16 examples: the resumed attempt crosses an epoch boundary


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("slurm-data"))


def job_env(extra=None) -> dict:
    # sbatch exports the submitting environment to the job (the default --export=ALL).
    return {"PYTHON": sys.executable, "GPUS_PER_NODE": "2", "GAMA_DS_ROOT": ROOT, **(extra or {})}


def result_line(path) -> dict:
    return json.loads([x for x in path.read_text().splitlines() if x.startswith('{"step"')][-1])


def logged_steps(run) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]  # not the epochs' lines


def test_two_node_stages_chain_and_a_usr1_warning_requeues_and_resumes_a_stage_on_both_nodes(
    slurm, two_nodes, data, tmp_path
):
    shards = tmp_path / "shards"
    shards.mkdir()
    for n in (1, 2):
        (shards / f"stage{n}").symlink_to(data["train"])
    runs = tmp_path / "runs"
    env = job_env(
        {"STAGES": "tiny tiny", "DATA_ROOT": str(shards), "RUNS": str(runs), "SBATCH_ARGS": "--nodes=2"}
    )
    # Workers in the ranks' processes: spawning them costs 4 ranks many seconds, and they are
    # not what this test is about.
    args = [f"train.max_steps={STEPS}", "logging.every_steps=1", "data.num_workers=0", *QUIET]
    submitted = slurm.run(PIPELINE, *args, cwd=tmp_path, env=env).split()
    assert len(submitted) == 2
    job, second = submitted
    assert slurm.job(second)["Dependency"].startswith(f"afterok:{job}")
    run, output = runs / "stage1", runs / "stage1" / f"slurm-{job}.out"

    def trained_a_step(seen):
        two_nodes.ranks(seen)
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), tail(str(output)) + slurm.logs()
        return logged_steps(run)

    first = {}
    wait_for(lambda: trained_a_step(first), 300, f"job {job}'s first step\n{tail(str(output))}", every=0.1)
    # What --signal=USR1@T does at the time limit: USR1 to every process of the job's steps.
    slurm.run("scancel", "--signal=USR1", job)
    info = slurm.requeued(job, 1)
    assert info["Requeue"] == "1"
    # Requeued, stage 1 is not done: stage 2 still waits for it.
    assert slurm.job(second)["JobState"] == "PENDING"
    resumed = {}

    def finished():
        two_nodes.ranks(resumed)
        return (i := slurm.job(job))["JobState"] in FINISHED and i

    info = wait_for(finished, 300, f"job {job} to finish\n{tail(str(output))}", every=0.2)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(str(output), 30) + slurm.logs()
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
    # Both attempts ran two ranks on each node, rank 0 (the master's) on node1.
    assert first == resumed == {"node1": {0, 1}, "node2": {2, 3}}

    attempts = tmp_path / ".gama_ds" / f"slurm-{job}"
    stopped, done = result_line(attempts / "attempt-0.out"), result_line(attempts / "attempt-1.out")
    assert stopped["stopped_by"] == "SIGUSR1" and 1 <= stopped["step"] < STEPS
    assert done["stopped_by"] is None and done["step"] == done["total_steps"] == STEPS
    log = output.read_text(errors="replace")
    assert f"requeueing job {job} to resume" in log
    assert f"resumed from step-{stopped['step']:08d} at step {stopped['step']}" in log
    # Every step logged once, across both attempts: the second went on where the first saved.
    assert logged_steps(run) == list(range(1, STEPS + 1))
    # The world of 4 formed: node2's ranks reached node1's address through the veth, the only
    # way out of their network namespace.
    record = json.loads((run / "run.json").read_text())
    launch = record["launch"]
    assert record["world_size"] == 4
    assert launch["SLURM_JOB_ID"] == job and launch["SLURM_JOB_NODELIST"] == "node[1-2]"
    # node1's address as Slurm knows it (its NodeAddr), not a name the nodes would have to resolve.
    assert launch["MASTER_ADDR"] == two_nodes.node1.addr
    assert launch["hostfile"] == "node1 slots=2\nnode2 slots=2\n"
    # Every rank saved its share of the optimizer, node2's ranks too, on both saves.
    for step in (stopped["step"], STEPS):
        saved = run / "checkpoints" / f"step-{step:08d}"
        assert len(list(saved.glob("zero_pp_rank_*_optim_states.pt"))) == 4, sorted(saved.iterdir())

    for n, job_id in enumerate(submitted, 1):
        output = runs / f"stage{n}" / f"slurm-{job_id}.out"
        info = slurm.wait_state(job_id, FINISHED, 300)
        assert info["JobState"] == "COMPLETED", tail(str(output), 80)
        assert info["NodeList"] == "node[1-2]"
        assert f"exported {runs}/stage{n} to {runs}/stage{n}/export" in output.read_text(errors="replace")
        assert (runs / f"stage{n}" / "export" / "gama_ds.json").exists()
    stage2 = json.loads((runs / "stage2" / "run.json").read_text())
    assert stage2["world_size"] == 4 and stage2["recipe"]["train"]["init"] == f"{runs}/stage1/export"
    assert f"initialised from {runs}/stage1/export" in (runs / "stage2" / f"slurm-{second}.out").read_text()
    assert logged_steps(runs / "stage2") == list(range(1, STEPS + 1))

    # Submitted again, both stages are complete: nothing goes to the queue.
    again = slurm.run(PIPELINE, *args, cwd=tmp_path, env=env)
    assert again.split() == []
    assert slurm.run("squeue", "-h").strip() == ""
