"""Real clusters for the launch tests: two nodes built on this machine, with Slurm and sshd.

A node is a set of namespaces the test makes itself (network, UTS, mount and PID), held by one
small init process: its own hostname, its own loopback and one end of a veth pair to the other
node (SUBNET's addresses exist only inside the two namespaces), and its own /etc/hosts, bind-
mounted in its private mount namespace, so that node1 and node2 resolve on both nodes. Daemons
and commands enter a node with nsenter. Killing a node's init ends every process of its PID
namespace, and with them the network namespace and its end of the veth: teardown is bounded and
leaves nothing behind, also when a test fails or (PR_SET_PDEATHSIG) pytest itself is killed.

The file system is shared between the nodes, as on a cluster: jobs read this checkout and write
their runs into the test's folders. Nothing here touches this machine's own network, hostname
or /etc/hosts, nor any address outside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import synth_shards, train_env

REQUIRE = os.environ.get("GAMA_DS_REQUIRE_CLUSTER_TESTS") == "1"
SUBNET = "10.213.0"  # node N is SUBNET.N, inside the nodes' network namespaces only
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def unusable(reason: str) -> None:
    """Skip, or fail under `make test` (GAMA_DS_REQUIRE_CLUSTER_TESTS=1), naming the reason."""
    if REQUIRE:
        pytest.fail(f"GAMA_DS_REQUIRE_CLUSTER_TESTS=1: {reason}")
    pytest.skip(reason)


def need(programs: list[str], packages: str) -> None:
    """The daemons' programs, and root (they run as root here: sshd's root key login, slurmd)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # daemons live in sbin
    missing = [p for p in programs if shutil.which(p, path=path) is None]
    if missing:
        unusable(f"missing {', '.join(missing)}: apt-get install {packages} (`make test` does, as root)")
    elif os.geteuid() != 0:
        unusable("the cluster tests run as root (namespaces, sshd with a root key login, slurmd)")


def need_namespaces() -> None:
    """The kernel and our privileges must allow the nodes' namespaces and a veth pair."""
    need(["unshare", "nsenter", "ip"], "util-linux iproute2")
    probe = (
        "unshare --net --uts --mount --pid --fork --mount-proc --propagation private -- "
        "sh -c 'hostname probe && ip link set lo up && ip link add name probe0 type veth peer name probe1'"
    )
    done = subprocess.run(["sh", "-c", probe], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        unusable(
            "cannot build the test's two nodes: unshare of network, UTS, mount and PID namespaces "
            f"with a veth pair failed (a container without CAP_SYS_ADMIN/CAP_NET_ADMIN?): "
            f"{done.stderr.strip() or done.returncode}"
        )


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


def start(cmd: list[str], log: str, env: dict | None = None, preexec_fn=None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=preexec_fn
        )


def stop(*procs: subprocess.Popen) -> None:
    """TERM, then KILL, to the process groups this module started, all at once, until none of
    them is left: a daemon under nsenter is nsenter's child, and may still be saving its state
    when nsenter has died of the TERM."""

    def gone(proc) -> bool:
        proc.poll()  # reaps nsenter, else it would count as left
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    left = list(procs)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            left = [p for p in left if not gone(p)]
            time.sleep(0.1)
        if not left:
            return
    raise RuntimeError(f"process groups {[p.pid for p in left]} survived SIGKILL")


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


def die_with_parent() -> None:
    """In a child before exec: SIGKILL when pytest dies, however it dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


# The PID namespace's init reaps orphans (a job's processes whose parent died), as init does.
INIT = """import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
"""


class Node:
    """One node's namespaces, held by its init; `unshare --kill-child` and the pdeathsig chain
    the init's life to pytest's."""

    def __init__(self, name: str, addr: str, folder: str, hosts: str):
        self.name, self.addr = name, addr
        log = os.path.join(folder, f"{name}.init.log")
        setup = (
            f"mount --bind {shlex.quote(hosts)} /etc/hosts && hostname {name} && ip link set lo up"
            f" && echo ready && exec {shlex.quote(sys.executable)} -c {shlex.quote(INIT)}"
        )
        self.unshare = start(
            [
                "unshare",
                "--net",
                "--uts",
                "--mount",
                "--propagation=private",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child=SIGKILL",
                "--",
                "sh",
                "-c",
                setup,
            ],
            log,
            preexec_fn=die_with_parent,
        )

        def ready():
            assert self.unshare.poll() is None, f"{name}'s namespaces: {tail(log)}"
            children = f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children"
            with open(children) as f:
                pids = f.read().split()
            return "ready" in tail(log) and pids and int(pids[0])

        try:
            self.init = wait_for(ready, 30, f"{name}'s namespaces")  # its pid here, 1 on the node
        except BaseException:
            self.unshare.kill()  # and with it the init (--kill-child)
            self.unshare.wait()
            raise
        self.pid_ns = os.readlink(f"/proc/{self.init}/ns/pid")

    def enter(self, cmd: list[str], cwd=None) -> list[str]:
        """cmd run on this node; nsenter's mount namespace starts at /, hence the --wd."""
        where = f"--wd={cwd or os.getcwd()}"
        return ["nsenter", "-t", str(self.init), "-n", "-u", "-m", "-p", where, "--", *cmd]

    def pids(self) -> list[int]:
        """This machine's ids of the node's processes, its init aside."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if int(pid) != self.init and os.readlink(f"/proc/{pid}/ns/pid") == self.pid_ns:
                    found.append(int(pid))
        return found

    def ranks(self) -> set[int]:
        """The RANKs of the training processes running on this node now."""
        ranks = set()
        for pid in self.pids():
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"gama_ds.train" not in f.read():
                        continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(x.partition(b"=")[::2] for x in f.read().split(b"\0") if x)
                if b"RANK" in env:
                    ranks.add(int(env[b"RANK"]))
        return ranks

    def close(self) -> None:
        """SIGKILL to the init: the kernel kills the rest of the PID namespace with it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init, signal.SIGKILL)
        try:
            self.unshare.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.unshare.kill()
            self.unshare.wait(timeout=10)


class TwoNodes:
    """node1 and node2: each a Node, joined by a veth pair (eth1 on both, SUBNET.1 and .2)."""

    def __init__(self, tmp: str):
        self.dir = tmp
        self.hosts = os.path.join(tmp, "hosts")
        with open(self.hosts, "w") as f:
            f.write(f"127.0.0.1 localhost\n{SUBNET}.1 node1\n{SUBNET}.2 node2\n")
        self.nodes: list[Node] = []

    @property
    def node1(self) -> Node:
        return self.nodes[0]

    @property
    def node2(self) -> Node:
        return self.nodes[1]

    def start(self) -> None:
        for n in (1, 2):
            self.nodes.append(Node(f"node{n}", f"{SUBNET}.{n}", self.dir, self.hosts))
        # Made inside node1 with its peer placed straight into node2: this machine's own network
        # namespace never holds either end. Only node1's network is entered, so that node2's
        # init is known by this machine's id for it.
        veth = ["ip", "link", "add", "name", "eth1", "type", "veth", "peer", "name", "eth1"]
        subprocess.run(
            ["nsenter", "-t", str(self.node1.init), "-n", *veth, "netns", str(self.node2.init)],
            check=True,
            timeout=30,
        )
        for node in self.nodes:
            self.run_on(node, "ip", "addr", "add", f"{node.addr}/24", "dev", "eth1")
            self.run_on(node, "ip", "link", "set", "eth1", "up")

    def wait_ready(self) -> None:
        for node in self.nodes:
            other = self.node2 if node is self.node1 else self.node1
            seen = self.run_on(node, "sh", "-c", f"hostname; getent hosts {other.name}").stdout.split()
            assert seen[:2] == [node.name, other.addr], f"{node.name} sees itself and {other.name} as {seen}"

    def ranks(self, seen: dict | None = None) -> dict[str, set[int]]:
        """The RANKs running on each node now, added to `seen` (poll it while a job runs)."""
        seen = seen if seen is not None else {}
        for node in self.nodes:
            seen.setdefault(node.name, set()).update(node.ranks())
        return seen

    def run_on(
        self, node: Node, *cmd: str, check: bool = True, cwd=None, env=None, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            node.enter(list(cmd), cwd), capture_output=True, text=True, env=env, timeout=timeout
        )
        if check and done.returncode != 0:
            pytest.fail(
                f"on {node.name}: {shlex.join(cmd)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
            )
        return done

    def start_on(
        self, node: Node, cmd: list[str], log: str, env: dict | None = None, cwd=None
    ) -> subprocess.Popen:
        return start(node.enter(cmd, cwd), log, env)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self.nodes.clear()


class Sshd:
    """An sshd on each node (port 22 of its address), a throwaway host key, root by key only.

    OpenSSH reads ~/.ssh/config from the passwd entry's home, not $HOME, so instead of touching
    root's, `bin/ssh` runs /usr/bin/ssh with this config: put `bin` first on PATH and both
    DeepSpeed's reachability check and pdsh's ssh use it."""

    def __init__(self, nodes: TwoNodes, tmp: str):
        self.nodes, self.dir = nodes, tmp
        self.bin = os.path.join(tmp, "bin")
        os.makedirs(self.bin)
        for key in ("host_key", "user_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(tmp, key)], check=True
            )
        shutil.copy(os.path.join(tmp, "user_key.pub"), os.path.join(tmp, "authorized_keys"))
        for node in nodes.nodes:
            self.write(
                f"sshd_config.{node.name}",
                f"""ListenAddress {node.addr}
HostKey {tmp}/host_key
AuthorizedKeysFile {tmp}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {tmp}/sshd.{node.name}.pid
""",
            )
        self.write(
            "ssh_config",
            f"""Host *
  User root
  IdentityFile {tmp}/user_key
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  ConnectTimeout 10
  LogLevel ERROR
""",
        )
        self.write("bin/ssh", f'#!/bin/sh\nexec /usr/bin/ssh -F {tmp}/ssh_config "$@"\n')
        os.chmod(os.path.join(self.bin, "ssh"), 0o755)
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        for node in self.nodes.nodes:
            config = f"{self.dir}/sshd_config.{node.name}"
            subprocess.run([sshd, "-t", "-f", config], check=True)
            # A bare environment: whatever a rank sees came through the ssh session, not from here.
            log = f"{self.dir}/sshd.{node.name}.log"
            self.procs.append(self.nodes.start_on(node, [sshd, "-D", "-e", "-f", config], log, env={}))

    def write(self, name: str, text: str) -> None:
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(text)

    def ssh(self, node: Node, host: str, command: str) -> subprocess.CompletedProcess:
        """`ssh host command` from node."""
        return self.nodes.run_on(node, os.path.join(self.bin, "ssh"), host, command, check=False, timeout=30)

    def logs(self) -> str:
        return "\n".join(
            f"== sshd on {n.name}\n{tail(f'{self.dir}/sshd.{n.name}.log', 10)}" for n in self.nodes.nodes
        )

    def wait_ready(self) -> None:
        def up():
            for proc in self.procs:
                assert proc.poll() is None, self.logs()
            node1 = self.nodes.node1
            return all(self.ssh(node1, n.name, "hostname").stdout.strip() == n.name for n in self.nodes.nodes)

        wait_for(up, 30, f"ssh from node1 into both nodes:\n{self.logs()}", every=0.5)

    def close(self) -> None:
        stop(*self.procs)


class Slurm:
    """munged and slurmctld on node1, a slurmd on each node, no accounting.

    Client commands run on a node (node1 unless told) with SLURM_CONF from `self.env`; jobs
    inherit that environment (sbatch's default --export=ALL)."""

    def __init__(self, nodes: TwoNodes, tmp: str):
        self.nodes, self.dir = nodes, tmp
        for sub in ("state", "spool", "munge"):
            os.makedirs(os.path.join(tmp, sub))
        os.chmod(os.path.join(tmp, "munge"), 0o700)
        self.key = os.path.join(tmp, "munge", "munge.key")
        with open(self.key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(self.key, 0o400)
        # A unix socket at a file path: both nodes reach it (abstract sockets would be per node).
        self.socket = os.path.join(tmp, "munge", "socket")
        cpus = os.cpu_count()
        node_lines = "".join(
            f"NodeName={n.name} NodeAddr={n.addr} CPUs={cpus} RealMemory=1000 State=UNKNOWN\n"
            for n in nodes.nodes
        )
        names = ",".join(n.name for n in nodes.nodes)
        self.conf = os.path.join(tmp, "slurm.conf")
        # Every node has a network of its own: Slurm's default ports are free on both.
        with open(self.conf, "w") as f:
            f.write(
                f"""ClusterName=gamads
SlurmctldHost={nodes.node1.name}({nodes.node1.addr})
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool/%n
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.%n.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.%n.log
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
# A pending job whose dependency was met or whose StartTime came starts within the second, not
# at the next pass of the main loop (60 s by default).
SchedulerParameters=sched_interval=1
JobRequeue=1
ReturnToService=2
{node_lines}PartitionName=test Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""
            )
        self.env = {**train_env(), "SLURM_CONF": self.conf}
        for name in list(self.env):  # this process may itself run inside someone's Slurm job
            if name.startswith(("SLURM_", "SBATCH_", "SRUN_")) and name != "SLURM_CONF":
                del self.env[name]
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        tmp, nodes = self.dir, self.nodes
        munged = [
            shutil.which("munged") or "/usr/sbin/munged",
            "--foreground",
            "--force",
            f"--socket={self.socket}",
            f"--key-file={self.key}",
            f"--pid-file={tmp}/munge/pid",
            f"--seed-file={tmp}/munge/seed",
            f"--log-file={tmp}/munge/log",
        ]
        self.procs.append(nodes.start_on(nodes.node1, munged, f"{tmp}/munged.out"))
        wait_for(lambda: os.path.exists(self.socket), 30, f"munged's socket\n{tail(f'{tmp}/munge/log')}")
        for node in nodes.nodes:  # a credential made on each node decodes there
            nodes.run_on(node, "sh", "-c", f"munge -n -S {self.socket} | unmunge -S {self.socket} >/dev/null")
        slurmctld = shutil.which("slurmctld") or "/usr/sbin/slurmctld"
        slurmd = shutil.which("slurmd") or "/usr/sbin/slurmd"
        self.procs.append(
            nodes.start_on(
                nodes.node1, [slurmctld, "-D", "-i", "-f", self.conf], f"{tmp}/slurmctld.out", self.env
            )
        )
        for node in nodes.nodes:
            os.makedirs(f"{tmp}/spool/{node.name}")
            cmd = [slurmd, "-D", "-N", node.name, "-f", self.conf]
            self.procs.append(nodes.start_on(node, cmd, f"{tmp}/slurmd.{node.name}.out", self.env))

    def run(
        self, *cmd: str, node: Node | None = None, check: bool = True, cwd=None, env: dict | None = None
    ) -> str:
        """A client command's output, run on node (node1 by default)."""
        done = self.nodes.run_on(
            node or self.nodes.node1, *cmd, check=False, cwd=cwd, env={**self.env, **(env or {})}
        )
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)}: exit {done.returncode}\n{done.stdout}{done.stderr}\n{self.logs()}")
        return done.stdout

    def logs(self) -> str:
        names = ["slurmctld.log", *(f"slurmd.{n.name}.log" for n in self.nodes.nodes)]
        return "\n".join(f"== {n}\n{tail(os.path.join(self.dir, n), 15)}" for n in names)

    def wait_ready(self) -> None:
        want = sorted(f"{n.name} idle" for n in self.nodes.nodes)

        def idle():
            for p in self.procs:
                assert p.poll() is None, f"a Slurm daemon exited with {p.returncode}\n{self.logs()}"
            return sorted(self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).splitlines()) == want

        wait_for(idle, 60, f"both Slurm nodes to be idle\n{self.logs()}", every=0.5)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Dependency, NodeList, ...)."""
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

    def requeued(self, job_id: str, restarts: int, seconds: float = 120) -> dict:
        """Waits until the job requeued itself for the `restarts`th time, then lets it start now
        rather than after the two minutes Slurm holds a requeued job (BeginTime)."""
        info = wait_for(
            lambda: (i := self.job(job_id))["Restarts"] == str(restarts) and i["JobState"] == "PENDING" and i,
            seconds,
            f"job {job_id} to requeue itself\n{self.logs()}",
            every=0.5,
        )
        # Not within the second of the requeue (the job's new SubmitTime): slurmd compares to the
        # second with the credential it revoked.
        wait_for(
            lambda: time.strftime("%Y-%m-%dT%H:%M:%S") > info["SubmitTime"],
            10,
            f"the second after the requeue at {info['SubmitTime']}",
            every=0.05,
        )
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        return info

    def close(self) -> None:
        if not self.procs:
            return
        # Jobs first, so that slurmd's step daemons take their training processes with them;
        # whatever remains dies with the nodes.
        controller = self.procs[1] if len(self.procs) > 1 else None
        deadline = time.monotonic() + 30
        with contextlib.suppress(subprocess.TimeoutExpired):  # a controller that does not answer
            if controller is not None and controller.poll() is None:
                self.run("scancel", "--full", "--user=root", check=False)
            while time.monotonic() < deadline and controller is not None and controller.poll() is None:
                if not self.run("squeue", "-h", check=False).strip():
                    break
                time.sleep(0.5)
        stop(*self.procs)


@contextlib.contextmanager
def daemon(make, prefix: str):
    """make(folder), started and ready, in a short temporary folder (unix socket paths are
    short); closed and removed afterwards, also when the test fails."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    d = make(tmp)
    try:
        d.start()
        d.wait_ready()
        yield d
    finally:
        d.close()
        shutil.rmtree(tmp, ignore_errors=True)
