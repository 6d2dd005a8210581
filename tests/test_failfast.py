"""A failing rank ends the job: two no-ssh DeepSpeed launchers on loopback play two nodes of one
rank each (tiny recipe, real shards), and rank 1, on node 1, raises, is killed, stops, or its
DataLoader worker stops. Both launchers must exit non-zero within 60 s of the failure, the job's
output must name rank 1 on node 1 once, and no process of the job may be left, workers included."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid

import pytest
from cluster import wait_for

from conftest import ROOT, synth_shards, train_env

SCRIPT = os.path.join(ROOT, "launch", "train.sh")
MARK = "GAMA_DS_FAILFAST_JOB"
# Small limits so the tests are quick; the defaults are 30 s and 300 s.
LIMITS = ["train.heartbeat_timeout_s=8", "train.stall_timeout_s=20", "train.collective_timeout_s=120"]
_port = [29840]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failfast")
    synth_shards(tmp, clips=16, test_clips=4, seed=5)
    return tmp


def job_processes(job: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries this job's mark:
    launchers, ranks and DataLoader workers alike."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"{MARK}={job}".encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found[int(pid)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return found


def rank_pid(job: str, rank: int) -> int:
    for pid, cmd in job_processes(job).items():
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
        if "gama_ds.train" in cmd and f"RANK={rank}".encode() in env and "spawn_main" not in cmd:
            return pid
    return 0


def worker_pids(parent: int) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if ppid == parent and b"spawn_main" in f.read():
                    out.append(int(pid))
        except (OSError, ValueError):
            pass
    return out


def run_two_nodes(tmp_path, shards, fail) -> tuple[list[int], str, float, float]:
    """Start both nodes; `fail(job, out)` breaks rank 1 and returns when it did. Returns the
    launchers' exit codes, their output, and how long after the failure the last of them and
    the last process of the job ended."""
    _port[0] += 1
    job = uuid.uuid4().hex
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    out = tmp_path / "run"
    args = [
        "tiny",
        f"data.train=[{{path: {shards / 'train'}}}]",
        f"train.output_dir={out}",
        "train.epochs=50",
        "logging.every_steps=1",
        "logging.tensorboard=false",
        "logging.plot=false",
        *LIMITS,
    ]
    env = {
        **train_env(),
        "HOSTFILE": str(hostfile),
        "PYTHON": sys.executable,
        "NO_SSH": "1",
        "MASTER_PORT": str(_port[0]),
        MARK: job,
    }
    logs = [tmp_path / f"node{k}.log" for k in (0, 1)]
    nodes = []
    for k in (0, 1):
        with open(logs[k], "w") as log:
            nodes.append(
                subprocess.Popen(
                    [SCRIPT, *args],
                    env={**env, "NODE_RANK": str(k)},
                    cwd=tmp_path,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        failed_at = fail(job, out, logs)
        wait_for(lambda: all(n.poll() is not None for n in nodes), 300, "both launchers to exit")
        exited = time.monotonic() - failed_at
        wait_for(lambda: not job_processes(job), 60, f"the job's processes to end: {job_processes(job)}")
        gone = time.monotonic() - failed_at
    finally:
        for pid in job_processes(job):  # whatever is left, so that a failing test leaves nothing
            os.kill(pid, signal.SIGKILL)
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
    text = "\n".join(x.read_text(errors="replace") for x in logs)
    lines = text.replace("\r", "\n").splitlines()  # tqdm's bar ends its updates with \r only
    text = "\n".join(line for line in lines if "step/s" not in line and "s/step" not in line)
    return [n.returncode for n in nodes], text, exited, gone


def training(out, seconds=400):
    """Wait until the first optimizer step is logged."""
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().strip(), seconds, "the first training step")


def check(codes, text, exited, gone, what):
    assert all(c != 0 for c in codes), (codes, text[-4000:])
    reports = re.findall(r"gama-ds train: rank 1 on node 1 \(.*", text)
    assert len(reports) == 1 and what in reports[0], text[-4000:]
    assert text.count("ending all 2 ranks") == 1, text[-4000:]
    assert exited < 60 and gone < 60, (exited, gone, text[-3000:])


def test_an_exception_on_a_rank_of_node_1_ends_both_nodes(tmp_path, shards):
    from gama_ds.config import load_recipe
    from gama_ds.data.collate import Collator
    from gama_ds.data.stream import TrainStream, open_sets
    from gama_ds.data.tokenizer import load_tokenizer
    from gama_ds.train.preflight import stream_config

    # A clip whose every QA pair rank 1 alone reads in the first epoch, its features' bits
    # flipped: a real ShardError (checksum mismatch) on rank 1 only.
    recipe = load_recipe("tiny", [f"data.train=[{{path: {shards / 'train'}}}]"])
    collate = Collator(load_tokenizer("bytes"), 108, "alpaca_short", True)
    clips = []
    for rank in (0, 1):
        stream = TrainStream(
            open_sets([(str(shards / "train"), 1.0)]), stream_config(recipe), collate, rank, 2, 0
        )
        clips.append({k.rsplit("#", 1)[0] for batch in stream for k in batch["keys"]})
    _, victim, key = sorted(clips[1] - clips[0])[0].split("/")
    data = tmp_path / "data"
    shutil.copytree(shards / "train", data / "train")
    with tarfile.open(data / "train" / victim) as tar:
        info = tar.getmember(f"{key}.fbank.npy")
    with open(data / "train" / victim, "r+b") as f:
        f.seek(info.offset_data + 256)
        flipped = bytes(b ^ 1 for b in f.read(64))
        f.seek(info.offset_data + 256)
        f.write(flipped)

    def fail(job, out, logs):
        return wait_for(
            lambda: "gama-ds train: error:" in logs[1].read_text(errors="replace") and time.monotonic(),
            400,
            "rank 1's error",
            every=0.1,
        )

    codes, text, exited, gone = run_two_nodes(tmp_path, data, fail)
    check(codes, text, exited, gone, f"failed: ShardError: train/{victim}: sample '{key}'")


@pytest.mark.parametrize(
    "how, what",
    [
        ("kill", "sent no heartbeat"),
        ("stop", "sent no heartbeat"),
        ("stop-worker", "made no progress"),
    ],
)
def test_a_dead_or_stalled_rank_of_node_1_ends_both_nodes(tmp_path, shards, how, what):
    def fail(job, out, logs):
        training(out)
        pid = rank_pid(job, 1)
        assert pid, job_processes(job)
        if how == "kill":
            os.kill(pid, signal.SIGKILL)
        elif how == "stop":
            os.kill(pid, signal.SIGSTOP)
        else:
            (worker,) = worker_pids(pid)
            os.kill(worker, signal.SIGSTOP)  # a read that never returns: the rank waits for data
        return time.monotonic()

    codes, text, exited, gone = run_two_nodes(tmp_path, shards, fail)
    check(codes, text, exited, gone, what)
    if how == "stop-worker":
        assert "stuck in data" in text


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.heartbeat_timeout_s=0.5", "train.heartbeat_timeout_s must be at least 2, got 0.5"),
        (
            "train.stall_timeout_s=10",
            "train.stall_timeout_s 10 must be at least train.heartbeat_timeout_s 30",
        ),
        (
            "train.collective_timeout_s=300",
            "train.collective_timeout_s 300 must exceed train.stall_timeout_s 300",
        ),
    ],
)
def test_the_failure_limits_are_checked_before_anything_starts(override, message):
    from gama_ds.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe("tiny", [override])


def test_the_failure_limits_do_not_change_the_recipe_hash():
    # A resume may take other limits: they decide nothing about the trajectory.
    from gama_ds.config import load_recipe
    from gama_ds.train.loop import recipe_hash

    limits = ["train.heartbeat_timeout_s=5", "train.stall_timeout_s=60", "train.collective_timeout_s=100"]
    assert recipe_hash(load_recipe("tiny", limits)) == recipe_hash(load_recipe("tiny"))
