"""launch/train.sh: checks before launching (two nodes without ssh train in
test_launch_pipeline.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, train_env
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
