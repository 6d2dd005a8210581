"""A failing rank ends the job: every rank on every node, within seconds, the cause named once.

DeepSpeed's launcher ends the ranks of its own node when one exits with an error; nothing ends
the ranks on the other nodes, which wait in their next collective until the process group
times out, and a rank that hangs without exiting is never noticed at all. So each rank runs a
watchdog thread that talks to the other ranks through a key-value store they all reach: the
process group's own TCPStore at MASTER_ADDR:MASTER_PORT (hosted by rank 0, or by torchrun's
agent), through a connection and a key prefix of its own.

- Every rank registers (host, node, pid) and then publishes a heartbeat each `interval`: a tick
  counter, how many batches its main thread has taken, and what it is doing (data, step, eval,
  save).
- Rank 0's watchdog reads all heartbeats. A rank whose tick stops for `heartbeat_s` is dead,
  stopped or frozen; when no rank has taken a batch for `stall_s` (armed once the first batch
  is trained on, so model loading and kernel builds do not count) the job is stalled, and the
  ranks behind the others, or busy with something else, are named.
- A rank that raises records its error before it exits. Errors that are the echo of another
  rank's failure (a collective whose peer went away, a DataLoader worker its launcher killed)
  wait for the real cause to be recorded first, and only stand in for it when none comes.
- The first record wins. Every rank that sees it leaves at once: rank 0 prints the one line that
  names the failing rank, its node and its error (rank 1 does when rank 0 itself failed), kills
  its DataLoader workers (and, on the same machine, a failed rank that cannot end itself) and
  exits with status 1. Rank 0, whose process hosts the store, first waits briefly until the
  others have read the record.
- Rank 0's own heartbeat is watched by rank 1. Rank 0 gone where it hosts the store (the store
  stops answering within `heartbeat_s`): rank 1 says so, everyone leaves.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger("gama_ds.train")
EXIT_CODE = 1  # what a rank ended by another rank's failure exits with
PREFIX = "gama_ds/watchdog/"
FAILURE = "failure"
_runs = itertools.count()  # training runs started in this process: each gets keys of its own


def _node() -> str:
    """This node's number as the launchers say it (DeepSpeed, torchrun, Slurm), else '?'."""
    for key in ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID", "NODE_RANK"):
        if key in os.environ:
            return os.environ[key]
    return "?"


def _machine() -> str:
    """Processes with the same machine id can see each other's pids: same kernel boot and pid
    namespace (two nodes on one host in a test, or ranks of one node)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return f"{socket.gethostname()}/{os.getpid()}"  # never equal to another process's


def _started(pid: int) -> str | None:
    """The kernel's start time of `pid`, which tells a process from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def is_echo(err: BaseException) -> bool:
    """An error that another rank's failure causes here: a collective or store whose peer went
    away, or a DataLoader worker killed from outside (DeepSpeed's launcher stops a node's ranks
    and their workers when one of them fails)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    if "Original Traceback" in text:  # an exception raised in a DataLoader worker: its own
        return False
    echoes = ("Connection closed by peer", "Connection reset", "Broken pipe", "DataLoader worker (pid")
    return any(s in text for s in echoes)


def _describe(err: BaseException) -> str:
    """`Type: first line`; for an error re-raised from a DataLoader worker, the worker's own."""
    lines = [x for x in str(err).strip().splitlines() if x.strip()]
    if "Original Traceback" in str(err) and lines:
        kind, _, message = lines[-1].partition(": ")
        return f"{kind.rsplit('.', 1)[-1]}: {message}"[:500]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]


class Watchdog:
    """One per rank. `start` once the process group exists; `watch` the loader; `close` at the
    end; `failed` with any exception that leaves training."""

    def __init__(self):
        self.store = None
        self.rank = self.world = 0
        self.phase, self.batches, self.armed = "start", 0, False
        self.me: dict = {}
        self.ranks: dict[int, dict] = {}
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._own_failure_at: float | None = None
        self._rank0_beat, self._rank0_at = None, time.monotonic()

    # -- the main thread's side

    def start(self, rank: int, world: int, heartbeat_s: float, stall_s: float) -> None:
        self.rank, self.world = rank, world
        self.heartbeat_s, self.stall_s = heartbeat_s, stall_s
        self.interval = min(1.0, heartbeat_s / 5)
        # Its own connection: waiting reads give up after heartbeat_s, so a store that stops
        # answering (rank 0 frozen) is noticed; the process group's connection never gives up.
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=heartbeat_s),
            wait_for_workers=False,
        )
        # Every rank starts the same number of runs, so they agree on the prefix; a second run in
        # one process (a world of one: tests, benchmarks) never reads the first one's records, nor
        # does torchrun's next attempt, whose agent keeps its store across restarts.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"{PREFIX}{attempt}.{next(_runs)}/", store)
        self.me = {
            "host": socket.gethostname(),
            "node": _node(),
            "pid": os.getpid(),
            "machine": _machine(),
            "started": _started(os.getpid()),
        }
        self.store.compare_set(FAILURE, "", "")  # the key exists from now on: reads never wait for it
        self.store.set(f"rank/{rank}", json.dumps(self.me))
        self._beat(0)
        self.store.add("registered", 1)
        self._thread = threading.Thread(target=self._run, name="gama-ds-watchdog", daemon=True)
        self._thread.start()

    def watch(self, batches, busy: str = "step"):
        """Iterate `batches`, telling the watchdog whether this rank waits for data or works."""
        it = iter(batches)
        try:
            while True:
                self.phase = "data"
                try:
                    batch = next(it)
                except StopIteration:
                    return
                self.batches += 1
                self.phase = busy
                if busy == "step" and self.batches >= 2:
                    self.armed = True  # the first batch (kernel builds, first collectives) is done
                yield batch
        finally:
            if hasattr(it, "close"):  # a loop that breaks stops the loader's workers now
                it.close()

    def busy(self, phase: str) -> None:
        """Something that is neither data nor a step (a checkpoint save): counts as progress."""
        self.phase = phase
        self.batches += 1

    def close(self) -> None:
        """The normal end. Rank 0, which may host the store, waits until every rank is done with it."""
        if self.store is None:
            return
        self._closing.set()
        self._thread.join(timeout=5 * self.interval)
        try:
            self.store.add("closed", 1)
            deadline = time.monotonic() + self.heartbeat_s
            while self.rank == 0 and self.store.add("closed", 0) < self.world and time.monotonic() < deadline:
                time.sleep(0.05)
        except dist.DistError:
            pass
        self.store = None

    def failed(self, err: BaseException) -> None:
        """An exception is leaving training on this rank: make sure every rank hears of it."""
        if self.store is None:
            return
        if is_echo(err):
            # Give the real cause time to be recorded (another rank's error, or rank 0 noticing a
            # dead rank's heartbeat); the watchdog thread ends this process when it is.
            deadline = time.monotonic() + self.heartbeat_s + 5 * self.interval
            while time.monotonic() < deadline:
                time.sleep(self.interval)
        record = {"rank": self.rank, **self.me, "what": f"failed: {_describe(err)}", "kind": "error"}
        try:
            if self._record(record):
                if self.rank == 0:
                    self._wait_for_readers(record)  # the store lives in this process
                else:
                    self.store.add("read", 1)
        except dist.DistError:
            pass
        self._own_failure_at = time.monotonic()
        if self.world == 1:  # nobody to tell; the caller (a notebook, a test) lives on
            self._closing.set()

    # -- the watchdog thread

    def _beat(self, tick: int) -> None:
        self.store.set(f"beat/{self.rank}", f"{tick} {self.batches} {int(self.armed)} {self.phase}")

    def _record(self, record: dict) -> bool:
        text = json.dumps(record)
        return self.store.compare_set(FAILURE, "", text).decode() == text

    def _run(self) -> None:
        tick, watcher = 0, None
        while not self._closing.wait(self.interval):
            tick += 1
            try:
                self._beat(tick)
                text = self.store.get(FAILURE).decode()
                if self.rank == 1 and 0 not in self.ranks:
                    self.ranks[0] = self._read_rank(0)  # to name rank 0 if its store goes
                if self.rank == 0 and watcher is None and not text:
                    watcher = _Watcher.when_all_registered(self)
                found = None
                if not text and watcher is not None:
                    found = watcher.check()
                elif not text and self.rank == 1 and self.ranks.get(0):
                    found = self._check_rank0()
                if found:
                    text = json.dumps(found) if self._record(found) else self.store.get(FAILURE).decode()
            except dist.DistError as err:
                if self._closing.is_set():
                    return
                self._store_lost(err)
                return
            if text:
                self._end(json.loads(text))
                return

    def _check_rank0(self) -> dict | None:
        """Rank 0 watches every rank but itself; rank 1 watches rank 0. (Where rank 0 hosts the
        store, a frozen rank 0 also shows as a store that stops answering; under torchrun the
        store lives in the agent and only the heartbeat tells.)"""
        beat, now = self.store.get("beat/0").decode().split(" ", 1)[0], time.monotonic()
        if beat != self._rank0_beat:
            self._rank0_beat, self._rank0_at = beat, now
            return None
        if now - self._rank0_at <= self.heartbeat_s:
            return None
        what = (
            f"sent no heartbeat for {now - self._rank0_at:.0f} s (train.heartbeat_timeout_s "
            f"{self.heartbeat_s:g}): it was killed, stopped or its node is gone"
        )
        return {"rank": 0, **self.ranks[0], "what": what, "kind": "silent"}

    def _store_lost(self, err: BaseException) -> None:
        if self.rank == 1:
            info = self.ranks.get(0) or self._read_rank(0) or {}
            where = f"node {info.get('node', '?')} ({info.get('host', os.environ['MASTER_ADDR'])})"
            store = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            self._say(
                f"rank 0 on {where} is gone: the store at {store} stopped answering ({_describe(err)}); "
                f"ending all {self.world} ranks"
            )
        self._exit()

    def _read_rank(self, rank: int) -> dict | None:
        try:
            return json.loads(self.store.get(f"rank/{rank}").decode())
        except (dist.DistError, ValueError):
            return None

    def _end(self, record: dict) -> None:
        failed = record["rank"]
        if failed == self.rank and record["kind"] == "error":
            # This rank's own exception: its main thread is on its way out, printing the error.
            # Only if it never gets there does the watchdog end it.
            while self._own_failure_at is None or time.monotonic() - self._own_failure_at < 30:
                if self._closing.wait(self.interval):
                    return
            self._exit()
        if self.rank != 0:  # rank 0 counts the others' reads, to keep its store up for them
            try:
                self.store.add("read", 1)
            except dist.DistError:
                pass
        if self.rank == (1 if failed == 0 else 0):  # the lowest rank that did not fail
            self._report(record)
        if record["kind"] == "silent" and record["machine"] == self.me["machine"]:
            # A stopped or frozen rank cannot end itself; on its machine, we can.
            if _started(record["pid"]) == record["started"]:
                try:
                    os.kill(record["pid"], signal.SIGKILL)
                except OSError:
                    pass
        if self.rank == 0:
            self._wait_for_readers(record)
        self._exit()

    def _report(self, record: dict) -> None:
        self._say(
            f"rank {record['rank']} on node {record['node']} ({record['host']}, pid {record['pid']}) "
            f"{record['what']}; ending all {self.world} ranks"
        )

    def _wait_for_readers(self, record: dict) -> None:
        """Keep the store (in this process) up until the other ranks have read the record: all
        but rank 0, and but a silent failed rank."""
        others = self.world - 1 - (1 if record["kind"] == "silent" else 0)
        deadline = time.monotonic() + 5 * self.interval + 2
        try:
            while self.store.add("read", 0) < others and time.monotonic() < deadline:
                time.sleep(0.05)
        except dist.DistError:
            pass

    @staticmethod
    def _say(text: str) -> None:
        # On a line of its own: rank 0's progress bar may have left the cursor mid-line.
        print(f"\ngama-ds train: {text}", file=sys.stderr, flush=True)

    @staticmethod
    def _exit() -> None:
        """Leave now, whatever the main thread is blocked in, and take the DataLoader workers along."""
        for child in multiprocessing.active_children():
            try:
                child.kill()
            except OSError:
                pass
        os._exit(EXIT_CODE)


class _Watcher:
    """Rank 0's view of all heartbeats: who stopped beating, and whether anyone still progresses."""

    def __init__(self, dog: Watchdog, ranks: list[dict]):
        self.dog, self.ranks = dog, ranks
        self.keys = [f"beat/{r}" for r in range(dog.world)]
        dog.ranks = dict(enumerate(ranks))
        now = time.monotonic()
        self.ticks = [None] * dog.world
        self.tick_at = [now] * dog.world
        self.progress, self.progress_at = -1, now

    @classmethod
    def when_all_registered(cls, dog: Watchdog) -> _Watcher | None:
        """Every rank registers right after the process group's rendezvous; until then, None."""
        keys = [f"rank/{r}" for r in range(dog.world)]
        if dog.store.add("registered", 0) < dog.world:
            return None
        return cls(dog, [json.loads(v.decode()) for v in dog.store.multi_get(keys)])

    def check(self) -> dict | None:
        dog, now = self.dog, time.monotonic()
        beats = [v.decode().split(" ", 3) for v in dog.store.multi_get(self.keys)]
        for r, (tick, *_rest) in enumerate(beats):
            if tick != self.ticks[r]:
                self.ticks[r], self.tick_at[r] = tick, now
            elif now - self.tick_at[r] > dog.heartbeat_s:
                return self._record(
                    r,
                    "silent",
                    f"sent no heartbeat for {now - self.tick_at[r]:.0f} s (train.heartbeat_timeout_s "
                    f"{dog.heartbeat_s:g}): it was killed, stopped or its node is gone",
                )
        batches = [int(b[1]) for b in beats]
        total = sum(batches)
        if total != self.progress:
            self.progress, self.progress_at = total, now
            return None
        if not all(b[2] == "1" for b in beats) or now - self.progress_at <= dog.stall_s:
            return None
        phases = [b[3] for b in beats]
        # The rank behind the others (fewest batches), else the one doing something else.
        behind = [r for r in range(dog.world) if batches[r] == min(batches)]
        if len(behind) == dog.world:
            common = max(set(phases), key=phases.count)
            behind = [r for r in range(dog.world) if phases[r] != common]
        idle = now - self.progress_at
        stalled = f"made no progress for {idle:.0f} s (train.stall_timeout_s {dog.stall_s:g})"
        if not behind:  # every rank alike: name none of them in particular
            return self._record(0, "stall", f"and every other rank {stalled}, all in {phases[0]}")
        r = behind[0]
        others = ", ".join(f"rank {k}: {phases[k]}" for k in range(dog.world) if k != r)
        where = f"stuck in {phases[r]} after {batches[r]} batches ({others})"
        return self._record(r, "stall", f"{stalled}, {where}")

    def _record(self, rank: int, kind: str, what: str) -> dict:
        return {"rank": rank, **self.ranks[rank], "what": what, "kind": kind}
