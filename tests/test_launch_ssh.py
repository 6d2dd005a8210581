"""launch/train.sh over ssh, DeepSpeed's default multi-node path: the launcher on this machine
runs pdsh, which ssh-es into every host of the hostfile (here 127.0.0.1 and 127.0.0.2, served
by a real sshd) and starts that node's launcher with the variables of .gama_ds/deepspeed_env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from cluster import QUIET, Sshd, daemon, free_port, kill_marked, need, tiny_data

from conftest import ROOT, train_env


@pytest.fixture(scope="module")
def sshd():
    need(["sshd", "ssh", "ssh-keygen", "pdsh"], "openssh-server openssh-client pdsh")
    with daemon(Sshd, "gds-sshd-") as d:
        yield d


@pytest.fixture(scope="module")
def over_ssh(sshd, tmp_path_factory):
    """One tiny stage on two ssh "nodes": its output lines, run.json, folder and probe value."""
    tmp = tmp_path_factory.mktemp("ssh")
    data = tiny_data(tmp)
    (tmp / "hostfile").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    probe = uuid.uuid4().hex  # reaches the ranks only through .gama_ds/deepspeed_env
    env = {
        **train_env(),
        "PATH": f"{sshd.bin}:{os.environ['PATH']}",  # ssh with the fixture's port and key
        "HOSTFILE": str(tmp / "hostfile"),
        "PYTHON": sys.executable,
        "MASTER_PORT": str(free_port()),
        "GAMA_DS_PROBE": probe,
    }
    for name in ("NO_SSH", "NODE_RANK", "MASTER_ADDR", "GAMA_DS_FORWARD_ENV"):
        env.pop(name, None)
    args = ["tiny", f"data.train=[{{path: {data['train']}}}]", f"train.output_dir={tmp / 'run'}"]
    try:
        done = subprocess.run(
            [os.path.join(ROOT, "launch", "train.sh"), *args, "train.max_steps=3", *QUIET],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        kill_marked("GAMA_DS_PROBE", probe)  # launchers and ranks under sshd, after a timeout
    lines = [x for x in (done.stdout + done.stderr).splitlines() if "s/step" not in x and "step/s" not in x]
    assert done.returncode == 0, "\n".join(lines[-80:])
    run = json.loads((tmp / "run" / "run.json").read_text())
    return {"lines": lines, "run": run, "dir": tmp, "probe": probe}


def test_two_nodes_over_ssh_train_a_tiny_stage_with_the_forwarded_environment(over_ssh):
    lines, run, tmp = over_ssh["lines"], over_ssh["run"], over_ssh["dir"]
    # pdsh ran one launcher per host over ssh, each line prefixed with its host.
    assert any("cmd = pdsh -S -f 1024 -w 127.0.0.1,127.0.0.2 " in x for x in lines)
    assert any(x.startswith("127.0.0.1: ") and "node_rank=0" in x for x in lines)
    assert any(x.startswith("127.0.0.2: ") and "node_rank=1" in x for x in lines)
    result = json.loads([x for x in lines if x.startswith('127.0.0.1: {"step"')][-1].split(": ", 1)[1])
    assert result["step"] == result["total_steps"] == 3 and result["stopped_by"] is None
    assert run["world_size"] == 2 and run["launch"]["MASTER_ADDR"] == "127.0.0.1"
    assert (tmp / "run" / "checkpoints" / "step-00000003" / "COMPLETE").exists()
    # Rank 0 ran in an ssh session of an sshd started with an empty environment: the probe came
    # through the deepspeed_env file, as every GAMA_DS_* variable does.
    assert run["launch"]["GAMA_DS_PROBE"] == over_ssh["probe"]
    assert f"GAMA_DS_PROBE={over_ssh['probe']}" in (tmp / ".gama_ds" / "deepspeed_env").read_text()


def test_run_json_records_the_launch_command_and_hostfile_over_ssh(over_ssh):
    launch = over_ssh["run"]["launch"]
    assert launch.get("GAMA_DS_LAUNCH", "").startswith("launch/train.sh tiny")
    assert launch.get("hostfile") == (over_ssh["dir"] / "hostfile").read_text()
