"""Real cluster daemons for the launch tests: an sshd on loopback and a one-node Slurm.

Each runs in the foreground of its own process group, with its keys, config, state and logs in
a temporary folder, and is stopped by the fixture that started it, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import synth_shards, train_env

REQUIRE = os.environ.get("GAMA_DS_REQUIRE_CLUSTER_TESTS") == "1"


def need(programs: list[str], packages: str) -> None:
    """Skip (fail under `make test`, which sets GAMA_DS_REQUIRE_CLUSTER_TESTS=1) without them."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # daemons live in sbin
    missing = [p for p in programs if shutil.which(p, path=path) is None]
    reason = None
    if missing:
        reason = f"missing {', '.join(missing)}: apt-get install {packages} (`make test` does, as root)"
    elif os.geteuid() != 0:
        reason = "the daemons run as root here (sshd with a root key login, slurmd)"
    if reason:
        if REQUIRE:
            pytest.fail(f"GAMA_DS_REQUIRE_CLUSTER_TESTS=1: {reason}")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, seconds: float, what: str, every: float = 0.2):
    """condition()'s first true value, or a failure naming what never happened."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(every)


def start(cmd: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """TERM, then KILL, to the process group this module started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def kill_marked(name: str, value: str) -> list[int]:
    """SIGKILL every process whose environment has name=value: what a test started on the
    "remote" nodes runs under sshd, outside the test's own process group."""
    marker = f"{name}={value}".encode()
    killed = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            os.kill(int(pid), signal.SIGKILL)
            killed.append(int(pid))
        except OSError:
            pass
    return killed


def tail(path: str, lines: int = 40) -> str:
    """The end of a log, without tqdm's carriage-return lines."""
    try:
        with open(path, errors="replace") as f:
            text = [x for x in f.read().splitlines() if "step/s" not in x and "s/step" not in x]
    except OSError:
        return f"({path} missing)"
    return "\n".join(text[-lines:])


def tiny_data(tmp) -> dict:
    """Synthetic shards: 4 training shards (2 CPU ranks need at least 2), one test shard."""
    synth_shards(tmp, clips=16, test_clips=4, seed=5)
    return {"train": tmp / "train", "test": tmp / "test"}


QUIET = ["logging.tensorboard=false", "logging.plot=false"]


class Sshd:
    """sshd on 127.0.0.1 and 127.0.0.2 at a free port, a throwaway host key, root by key only.

    OpenSSH reads ~/.ssh/config from the passwd entry's home, not $HOME, so instead of touching
    root's, `bin/ssh` runs /usr/bin/ssh with this config: put `bin` first on PATH and both
    DeepSpeed's reachability check and pdsh's ssh use it."""

    def __init__(self, tmp: str):
        self.dir = tmp
        self.port = free_port()
        self.bin = os.path.join(tmp, "bin")
        os.makedirs(self.bin)
        for key in ("host_key", "user_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(tmp, key)], check=True
            )
        shutil.copy(os.path.join(tmp, "user_key.pub"), os.path.join(tmp, "authorized_keys"))
        self.write(
            "sshd_config",
            f"""Port {self.port}
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey {tmp}/host_key
AuthorizedKeysFile {tmp}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {tmp}/sshd.pid
""",
        )
        self.write(
            "ssh_config",
            f"""Host *
  Port {self.port}
  User root
  IdentityFile {tmp}/user_key
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
""",
        )
        self.write("bin/ssh", f'#!/bin/sh\nexec /usr/bin/ssh -F {tmp}/ssh_config "$@"\n')
        os.chmod(os.path.join(self.bin, "ssh"), 0o755)
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        config = f"{self.dir}/sshd_config"
        subprocess.run([sshd, "-t", "-f", config], check=True)
        # A bare environment: whatever a rank sees came through the ssh session, not from here.
        self.procs.append(start([sshd, "-D", "-e", "-f", config], f"{self.dir}/sshd.log", env={}))

    def write(self, name: str, text: str) -> None:
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(text)

    def ssh(self, host: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [os.path.join(self.bin, "ssh"), host, command], capture_output=True, text=True, timeout=30
        )

    def wait_ready(self) -> None:
        def up():
            assert self.procs[0].poll() is None, tail(f"{self.dir}/sshd.log")
            return all(self.ssh(h, "true").returncode == 0 for h in ("127.0.0.1", "127.0.0.2"))

        wait_for(up, 30, f"sshd on port {self.port}:\n{tail(f'{self.dir}/sshd.log')}", every=0.5)

    def close(self) -> None:
        for proc in self.procs:
            stop(proc)


class Slurm:
    """munged, slurmctld and slurmd for one node called localhost (2 CPUs), no accounting.

    Clients find it through SLURM_CONF in `self.env`; jobs inherit that environment."""

    def __init__(self, tmp: str):
        self.dir = tmp
        for sub in ("state", "spool", "munge"):
            os.makedirs(os.path.join(tmp, sub))
        os.chmod(os.path.join(tmp, "munge"), 0o700)
        key = os.path.join(tmp, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf = os.path.join(tmp, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write(
                f"""ClusterName=gamads
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={tmp}/munge/socket
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobRequeue=1
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
            )
        self.env = {**train_env(), "SLURM_CONF": self.conf}
        for name in list(self.env):  # this process may itself run inside someone's Slurm job
            if name.startswith(("SLURM_", "SBATCH_", "SRUN_")) and name != "SLURM_CONF":
                del self.env[name]
        self.key = key
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        tmp, key = self.dir, self.key
        self.procs.append(
            start(
                [
                    shutil.which("munged") or "/usr/sbin/munged",
                    "--foreground",
                    "--force",
                    f"--socket={tmp}/munge/socket",
                    f"--key-file={key}",
                    f"--pid-file={tmp}/munge/pid",
                    f"--seed-file={tmp}/munge/seed",
                    f"--log-file={tmp}/munge/log",
                ],
                f"{tmp}/munged.out",
            )
        )
        wait_for(lambda: os.path.exists(f"{tmp}/munge/socket"), 30, "munged's socket")
        slurmctld = shutil.which("slurmctld") or "/usr/sbin/slurmctld"
        slurmd = shutil.which("slurmd") or "/usr/sbin/slurmd"
        self.procs.append(start([slurmctld, "-D", "-i", "-f", self.conf], f"{tmp}/slurmctld.out", self.env))
        self.procs.append(
            start([slurmd, "-D", "-N", "localhost", "-f", self.conf], f"{tmp}/slurmd.out", self.env)
        )

    def run(self, *cmd: str, check: bool = True, cwd=None, env: dict | None = None) -> str:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, cwd=cwd, env={**self.env, **(env or {})}
        )
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)}: exit {done.returncode}\n{done.stdout}{done.stderr}\n{self.logs()}")
        return done.stdout

    def logs(self) -> str:
        names = ("slurmctld.log", "slurmd.log")
        return "\n".join(f"== {n}\n{tail(os.path.join(self.dir, n), 15)}" for n in names)

    def wait_ready(self) -> None:
        def idle():
            for p in self.procs:
                assert p.poll() is None, f"a Slurm daemon exited with {p.returncode}\n{self.logs()}"
            done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
            return done.stdout.strip() == "idle"

        wait_for(idle, 60, "the Slurm node to be idle", every=0.5)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Dependency, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id)
        fields = {}
        for word in text.split():
            name, _, value = word.partition("=")
            fields.setdefault(name, value)
        return fields

    def wait_state(self, job_id: str, states: tuple[str, ...], seconds: float) -> dict:
        def reached():
            info = self.job(job_id)
            return info if info["JobState"] in states else None

        return wait_for(reached, seconds, f"job {job_id} to reach {states}\n{self.logs()}", every=0.5)

    def close(self) -> None:
        if not self.procs:
            return
        # Jobs first, so that slurmd's step daemons take their training processes with them.
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            queue = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True, timeout=30)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(0.5)
        for proc in reversed(self.procs):
            stop(proc)


@contextlib.contextmanager
def daemon(kind, prefix: str):
    """A started and ready daemon in a short temporary folder (unix socket paths are short)."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    d = kind(tmp)
    try:
        d.start()
        d.wait_ready()
        yield d
    finally:
        d.close()
        shutil.rmtree(tmp, ignore_errors=True)
