"""launch/train.sh over ssh, DeepSpeed's default multi-node path, across the two nodes of
tests/cluster.py: started on node1, the launcher runs pdsh, which ssh-es into node1 and node2
(each its own network namespace, served by its own sshd) and starts that node's launcher with
the variables of .gama_ds/deepspeed_env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from cluster import QUIET, kill_marked, tail, tiny_data, wait_for

from conftest import ROOT, train_env


def test_two_nodes_over_ssh_train_a_tiny_stage_with_the_forwarded_environment(sshd, two_nodes, tmp_path):
    data = tiny_data(tmp_path)
    (tmp_path / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
    probe = uuid.uuid4().hex  # reaches the ranks only through .gama_ds/deepspeed_env
    env = {
        **train_env(),
        "PATH": f"{sshd.bin}:{os.environ['PATH']}",  # ssh with the fixture's keys
        "HOSTFILE": str(tmp_path / "hostfile"),
        "PYTHON": sys.executable,
        "GAMA_DS_PROBE": probe,
    }
    for name in ("NO_SSH", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GAMA_DS_FORWARD_ENV"):
        env.pop(name, None)
    run = tmp_path / "run"
    args = ["tiny", f"data.train=[{{path: {data['train']}}}]", f"train.output_dir={run}"]
    args += ["train.max_steps=3", "data.num_workers=0", *QUIET]
    log = tmp_path / "launch.log"
    seen = {}
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            two_nodes.node1.enter([os.path.join(ROOT, "launch", "train.sh"), *args], tmp_path),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: two_nodes.ranks(seen) and launcher.poll() is not None,
            300,
            f"launch/train.sh to end\n{tail(str(log))}",
            every=0.2,
        )
    finally:
        launcher.kill()
        launcher.wait()
        kill_marked("GAMA_DS_PROBE", probe)  # launchers and ranks under sshd, after a timeout
    lines = [
        x for x in log.read_text(errors="replace").splitlines() if "s/step" not in x and "step/s" not in x
    ]
    assert launcher.returncode == 0, "\n".join(lines[-80:])

    # pdsh ran one launcher per node over ssh, each line prefixed with its host; each node ran
    # its rank in its own namespaces, and rank 1 reached node1's address from node2.
    assert any("cmd = pdsh -S -f 1024 -w node1,node2 " in x for x in lines)
    assert any(x.startswith("node1: ") and "node_rank=0" in x for x in lines)
    assert any(x.startswith("node2: ") and "node_rank=1" in x for x in lines)
    assert seen == {"node1": {0}, "node2": {1}}
    result = json.loads([x for x in lines if x.startswith('node1: {"step"')][-1].split(": ", 1)[1])
    assert result["step"] == result["total_steps"] == 3 and result["stopped_by"] is None
    record = json.loads((run / "run.json").read_text())
    launch = record["launch"]
    assert record["world_size"] == 2 and launch["MASTER_ADDR"] == "node1"
    assert (run / "checkpoints" / "step-00000003" / "COMPLETE").exists()
    # Rank 0 ran in an ssh session of an sshd started with an empty environment: the probe came
    # through the deepspeed_env file, as every GAMA_DS_* variable does, and with it the launch
    # command and hostfile that run.json records.
    assert launch["GAMA_DS_PROBE"] == probe
    assert f"GAMA_DS_PROBE={probe}" in (tmp_path / ".gama_ds" / "deepspeed_env").read_text()
    assert launch["GAMA_DS_LAUNCH"].startswith("launch/train.sh tiny")
    assert launch["hostfile"] == "node1 slots=1\nnode2 slots=1\n"
