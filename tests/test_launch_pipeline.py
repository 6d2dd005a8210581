"""launch/pipeline.sh without ssh (NO_SSH=1, 2 CPU ranks on two "nodes", then on one): two tiny
stages chained through the first one's export; a pipeline stopped by a signal during stage 2
ends on every node, skips stage 1 and resumes stage 2 when run again; a finished pipeline run
again skips everything."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import psutil
from cluster import QUIET, free_port, tail, tiny_data, wait_for

from conftest import ROOT, train_env
from gama_ds.train.checkpoint import complete_tags

SCRIPT = os.path.join(ROOT, "launch", "pipeline.sh")
STEPS = 8  # 2 epochs of the tiny data; a checkpoint every 2 steps


def is_rank(p: psutil.Process) -> bool:
    """A training rank: not DeepSpeed's launcher, not a DataLoader worker."""
    with contextlib.suppress(psutil.Error):
        cmd = " ".join(p.cmdline())
        return "-m gama_ds.train" in cmd and "deepspeed.launcher" not in cmd
    return False


def test_pipeline_chains_skips_finished_stages_and_resumes_the_interrupted_one(tmp_path):
    data = tiny_data(tmp_path)
    for n in (1, 2):
        (tmp_path / "shards").mkdir(exist_ok=True)
        (tmp_path / "shards" / f"stage{n}").symlink_to(data["train"])
    (tmp_path / "two_nodes").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    (tmp_path / "one_node").write_text("127.0.0.1 slots=2\n")
    env = {
        **train_env(),
        "PYTHON": sys.executable,
        "NO_SSH": "1",
        "MASTER_PORT": str(free_port()),
        "STAGES": "tiny tiny",
        "DATA_ROOT": str(tmp_path / "shards"),
        "RUNS": str(tmp_path / "runs"),
    }
    # Batches made in the ranks (data.num_workers=0): workers are not what this test is about, and
    # spawning them costs each rank seconds at every epoch.
    args = [SCRIPT, f"train.max_steps={STEPS}", "checkpoint.every_steps=2", "logging.every_steps=1"]
    args += ["data.num_workers=0", *QUIET]
    runs = tmp_path / "runs"
    stage2 = runs / "stage2"

    # 1. Two nodes without ssh, one pipeline each; once stage 2 has a checkpoint, its ranks get
    # SIGUSR1 (a time-limit warning): they save, node 0 exits 75 without exporting, and node 1,
    # which waits for node 0's exports, hears that the stage stopped instead of waiting 30 min.
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    nodes = []
    for n, log in enumerate(logs):
        node_env = {
            **env,
            "NODE_RANK": str(n),
            "HOSTFILE": str(tmp_path / "two_nodes"),
            "EXPORT_WAIT": "1800",
        }
        with open(log, "w") as out:
            popen = subprocess.Popen(
                args, env=node_env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            nodes.append(popen)
    try:
        wait_for(
            lambda: complete_tags(str(stage2 / "checkpoints")) or any(p.poll() is not None for p in nodes),
            600,  # two stages' start-up on a busy 2-core machine
            "a checkpoint of stage 2",
            every=0.05,
        )
        ranks = [p for node in nodes for p in psutil.Process(node.pid).children(recursive=True) if is_rank(p)]
        assert len(ranks) == 2, [p.cmdline() for p in ranks]
        for p in ranks:
            p.send_signal(signal.SIGUSR1)
        for node in nodes:
            node.wait(timeout=120)
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
    assert [p.returncode for p in nodes] == [75, 75], tail(str(logs[0])) + tail(str(logs[1]))
    assert "stage 2 (tiny) stopped by SIGUSR1 at a checkpoint" in logs[0].read_text()
    assert "stage 2 (tiny) was stopped at a checkpoint; run the pipeline again" in logs[1].read_text()
    assert (runs / "stage1" / "export" / "gama_ds.json").exists()
    assert not (stage2 / "export").exists()
    stage1 = json.loads((runs / "stage1" / "run.json").read_text())
    assert stage1["world_size"] == 2 and "2 node(s) x 1 = world size 2" in logs[0].read_text()
    launch = stage1["launch"]
    assert launch["GAMA_DS_LAUNCH"].startswith("launch/train.sh tiny")
    assert launch["hostfile"] == (tmp_path / "two_nodes").read_text()
    assert launch["MASTER_ADDR"] == "127.0.0.1" and launch["NODE_RANK"] == "0"
    # Both nodes share this folder: without ssh neither writes DeepSpeed's environment file.
    assert not (tmp_path / ".gama_ds" / "deepspeed_env").exists()
    saved = int(complete_tags(str(stage2 / "checkpoints"))[-1].split("-")[1])
    assert 2 <= saved < STEPS
    log = logs[0]
    env.update(NODE_RANK="0", HOSTFILE=str(tmp_path / "one_node"))  # the same world size on one node

    # 2. Run again, on one node: stage 1 is skipped, stage 2 resumes from its checkpoint and is
    # exported.
    again = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = again.stdout + again.stderr
    assert again.returncode == 0, tail(str(log)) + output[-4000:]
    assert f"stage 1 (tiny): {runs}/stage1/export is complete, skipped" in output
    assert f"resumed from step-{saved:08d} at step {saved}" in output
    assert f"stage 2 (tiny): exported to {stage2}/export" in output
    export = json.loads((stage2 / "export" / "gama_ds.json").read_text())
    assert export["source"]["run"] == str(stage2)
    assert not (stage2 / "export.partial").exists()
    run = json.loads((stage2 / "run.json").read_text())
    assert run["recipe"]["train"]["init"] == f"{runs}/stage1/export"
    assert run["launch"]["GAMA_DS_RESUME"] == "auto"
    # Every step logged once: the stopped run saved at the step it stopped at.
    lines = (stage2 / "metrics.jsonl").read_text().splitlines()
    steps = [r["step"] for r in map(json.loads, lines) if "loss" in r]  # not the epochs' lines
    assert steps == list(range(1, STEPS + 1))

    # 3. Run once more: nothing left to do.
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("is complete, skipped") == 2 and "training in" not in done.stderr
