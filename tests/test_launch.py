"""launch/train.sh: checks before launching, and two nodes on one machine with the real
DeepSpeed launcher in its no-ssh mode (each node starts its own launcher, NODE_RANK=0 and 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, synth_shards, train_env
from gama_ds.launch import HostfileError, check, main, parse_hostfile

SCRIPT = os.path.join(ROOT, "launch", "train.sh")


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"no hosts"),
        ("# only a comment\n\n", r"no hosts"),
        ("node-a slots=2\nnode-b slots=2 extra\n", r":2: expected 'HOST slots=N'"),
        ("node-a\n", r":1: expected 'HOST slots=N'"),
        ("node-a slots=0\n", r":1: node-a has slots=0"),
        ("node-a slots=2\n# x\nnode-a slots=2\n", r":3: node-a is listed twice"),
    ],
)
def test_bad_hostfiles_are_named_by_line(tmp_path, text, message):
    with pytest.raises(HostfileError, match=message):
        parse_hostfile(write(tmp_path / "hostfile", text))


def test_hostfile_shape_checks(tmp_path):
    good = write(tmp_path / "good", "node-a slots=2  # first\nnode-b slots=2\n")
    assert parse_hostfile(good) == {"node-a": 2, "node-b": 2}
    shape = check(good, "tiny", ["train.global_batch_size=16", "train.micro_batch_size=4"])
    assert shape["world_size"] == 4 and shape["accumulation"] == 1 and shape["master"] == "node-a"
    with pytest.raises(HostfileError, match="this node has 8 devices"):
        check(good, "tiny", [], devices=8)
    with pytest.raises(HostfileError, match="different slot counts"):
        check(write(tmp_path / "uneven", "a slots=2\nb slots=4\n"), "tiny", [])
    with pytest.raises(HostfileError, match="NODE_RANK=2"):
        check(good, "tiny", [], node_rank=2)
    with pytest.raises(ValueError, match=r"micro_batch_size 4 x world size 4 \(2 node\(s\) x 2\)"):
        check(good, "tiny", ["train.global_batch_size=24"])
    with pytest.raises(HostfileError, match="cannot read"):
        check(str(tmp_path / "missing"), "tiny", [])


def test_the_check_takes_the_trainers_options_among_the_overrides(tmp_path, capsys):
    # launch/train.sh hands the same arguments to the check and to the trainer.
    good = write(tmp_path / "hostfile", "node-a slots=2\n")
    argv = ["check", good, "tiny", "train.micro_batch_size=2", "--resume", "auto", "--stop-at", "5"]
    assert main([*argv, "train.global_batch_size=12", "--field", "world_size"]) == 0
    assert capsys.readouterr().out.strip() == "2"
    assert main([*argv, "train.global_batch_size=13"]) == 2
    assert "global_batch_size" in capsys.readouterr().err


def test_train_sh_refuses_a_bad_job_before_starting_anything(tmp_path):
    hostfile = write(tmp_path / "hostfile", "node-a slots=2\nnode-a slots=2\n")
    done = subprocess.run(
        [SCRIPT, "tiny"],
        env={**train_env(), "HOSTFILE": hostfile, "PYTHON": sys.executable},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and f"{hostfile}:2: node-a is listed twice" in done.stderr
    assert "deepspeed" not in done.stderr.lower()


def test_two_nodes_without_ssh_train_a_tiny_stage_to_the_end(tmp_path):
    synth_shards(tmp_path, clips=16, test_clips=4, seed=5)
    # Two "nodes" on loopback: node 0 is 127.0.0.1, node 1 another name for this machine.
    hostfile = write(tmp_path / "hostfile", "127.0.0.1 slots=1\nlocalhost slots=1\n")
    out = tmp_path / "run"
    args = [
        "tiny",
        f"data.train=[{{path: {tmp_path / 'train'}}}]",
        f"data.eval=[{{path: {tmp_path / 'test'}}}]",
        f"train.output_dir={out}",
        "train.max_steps=3",
        "logging.every_steps=1",
        "logging.tensorboard=false",
        "logging.plot=false",
    ]
    env = {
        **train_env(),
        "HOSTFILE": hostfile,
        "PYTHON": sys.executable,
        "NO_SSH": "1",
        "MASTER_PORT": "29677",
    }
    nodes = [
        subprocess.Popen(
            [SCRIPT, *args],
            env={**env, "NODE_RANK": str(k)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for k in (0, 1)
    ]
    try:
        logs = [n.communicate(timeout=420)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, 9)
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "2 node(s) x 1 = world size 2" in logs[0]
    result = json.loads([x for x in logs[0].splitlines() if x.startswith('{"step"')][-1])
    assert result["step"] == 3 and result["total_steps"] == 3
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    assert run["launch"]["GAMA_DS_LAUNCH"].startswith("launch/train.sh tiny")
    assert run["launch"]["hostfile"] == (tmp_path / "hostfile").read_text()
    assert run["launch"]["MASTER_ADDR"] == "127.0.0.1" and run["launch"]["NODE_RANK"] == "0"
    # Both nodes share this folder: without ssh neither writes DeepSpeed's environment file.
    assert not (tmp_path / ".gama_ds" / "deepspeed_env").exists()
    assert (out / "checkpoints").is_dir()
