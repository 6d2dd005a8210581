"""The training stream: which example each (rank, DataLoader worker) reads, exactly.

Everything below is a pure function of (seed, epoch, world size, worker count) and the shard
indexes, so the same call gives the same batches on every run, and a stream rebuilt from its
state continues exactly where the old one stopped.

Per epoch, as a chain of small stages (each worker runs it for itself):

1. plan      - each shard set's shards, in a seeded order, go to the R x W readers greedily
               by QA count (readers end up within one shard of each other); every reader gets
               the same example quota: the smallest reader's count, in whole micro-batches.
2. examples  - a reader walks its shards in order and expands every clip into its QA pairs
               (or k of them), through a seeded shuffle buffer; a set that runs dry starts a
               new, reshuffled pass (only with mixing or `examples_per_clip`).
3. mix       - with several sets, each example comes from a set drawn by the mixing weights.
4. batches   - windows of `bucket_batches` micro-batches are sorted by token length, cut
               into micro-batches and shuffled, so a batch wastes little on padding.
5. share     - the rank's batch k comes from worker k % W, which is the order in which
               torch's DataLoader takes batches from its workers (rotated on resume).

Every rank therefore yields the same number of batches per epoch by construction. The state is
(epoch, batches consumed, a digest of the stream's settings and shards); resuming replays the
consumed part of the epoch (reading and decoding, not collating: about 130 us per clip) and
continues. A different world size, or changed settings or shards, resume at the next epoch
boundary, with a note saying so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import DataConfig, choices
from ..errors import GamaDsError
from .collate import Collator, Example
from .shards import ShardError, decode_sample, iter_members, read_index

log = logging.getLogger(__name__)
BAD_SAMPLE_POLICIES = choices(DataConfig, "on_bad_sample")


class StreamError(GamaDsError, ValueError):
    """A stream that cannot run as configured; the message says what to change."""


@dataclass
class ShardSet:
    root: str
    weight: float
    shards: list[dict]  # index entries: file, samples, qa_pairs, bytes, sha256

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.root))


def open_sets(specs: list[tuple[str, float]]) -> list[ShardSet]:
    """[(shard directory, mixing weight)] -> checked shard sets."""
    if not specs:
        raise StreamError("no shard sets given")
    sets = []
    for root, weight in specs:
        if not weight > 0:
            raise StreamError(f"mixing weight of {root} must be positive, got {weight}")
        index = read_index(root)
        if not index["shards"]:
            raise StreamError(f"{root}: the index lists no shards")
        sets.append(ShardSet(root, float(weight), index["shards"]))
    return sets


@dataclass
class StreamConfig:
    micro_batch: int  # examples per batch
    seed: int = 0
    shuffle_buffer: int = 1000  # examples held for shuffling, per worker and shard set
    examples_per_clip: int = 0  # 0: every QA pair of a clip each epoch; k: k of them
    bucket_batches: int = 8  # micro-batches per length-sorting window; 1 turns bucketing off
    on_bad_sample: str = "fail"  # fail: stop naming shard, key and cause; skip: count and go on
    batch_multiple: int = 1  # per-rank batches per epoch are a multiple of this (accumulation)

    def check(self) -> None:
        for name in ("micro_batch", "shuffle_buffer", "bucket_batches", "batch_multiple"):
            if getattr(self, name) < 1:
                raise StreamError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.examples_per_clip < 0:
            raise StreamError(f"examples_per_clip must be 0 (all) or positive, got {self.examples_per_clip}")
        if self.on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise StreamError(
                f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {self.on_bad_sample!r}"
            )


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


@dataclass
class EpochPlan:
    """Which shards each reader walks this epoch, and how many batches each worker yields."""

    sets: list[ShardSet]
    cfg: StreamConfig
    epoch: int
    world_size: int
    num_workers: int
    reader_shards: list[list[list[int]]] = field(init=False)  # [reader][set] -> shard indices
    quota: int = field(init=False)  # examples per reader
    rank_batches: int = field(init=False)

    def __post_init__(self):
        readers = self.world_size * self.num_workers
        for s in self.sets:
            if len(s.shards) < readers:
                raise StreamError(
                    f"{s.root} has {len(s.shards)} shards but {self.world_size} ranks x {self.num_workers} "
                    f"workers need at least {readers}: reconvert with a smaller --shard-size or "
                    f"--shard-samples, or use fewer DataLoader workers"
                )
        self.reader_shards = [[[] for _ in self.sets] for _ in range(readers)]
        counts = np.zeros(readers, dtype=np.int64)
        for si, s in enumerate(self.sets):
            order = _rng(self.cfg.seed, self.epoch, si, 0).permutation(len(s.shards))
            set_counts = np.zeros(readers, dtype=np.int64)
            for shard in order:
                r = int(np.argmin(set_counts))
                self.reader_shards[r][si].append(int(shard))
                set_counts[r] += self.examples_in(s.shards[shard])
            counts += set_counts
        per_reader = int(counts.min()) // self.cfg.micro_batch
        m = self.cfg.batch_multiple
        self.rank_batches = (per_reader * self.num_workers) // m * m
        self.quota = per_reader * self.cfg.micro_batch
        if self.rank_batches == 0:
            raise StreamError(
                f"too little data: each of {readers} readers gets {int(counts.min())} examples, less than "
                f"the {self.cfg.micro_batch * m} one step per rank needs"
            )

    def examples_in(self, shard: dict) -> int:
        k = self.cfg.examples_per_clip
        return shard["qa_pairs"] if k == 0 else sum(min(q, k) for q in shard["qa_per_sample"])

    def worker_batches(self, worker: int) -> int:
        return len(range(worker, self.rank_batches, self.num_workers))


class _BadSamples:
    def __init__(self, policy: str):
        self.policy, self.count, self.reported = policy, 0, 0

    def handle(self, err: ShardError) -> None:
        if self.policy == "fail":
            raise err
        self.count += 1
        log.warning("skipping bad sample: %s", err)

    def new(self) -> int:
        """Bad samples met since the last call: summed over batches, ranks and workers."""
        fresh, self.reported = self.count - self.reported, self.count
        return fresh


def _clips(s: ShardSet, shards: list[int], bad: _BadSamples):
    """(key, fbank, meta) per clip of the given shards, in order.

    A shard whose size or sample count disagrees with the index (truncated, overwritten) is a
    bad sample too, so a damaged shard never passes silently.
    """
    for shard in shards:
        entry = s.shards[shard]
        name = f"{s.name}/{entry['file']}"
        path = os.path.join(s.root, entry["file"])
        seen = 0
        try:
            if os.path.getsize(path) != entry["bytes"]:
                raise ShardError(f"{name}: {os.path.getsize(path)} bytes, the index says {entry['bytes']}")
            for key, members in iter_members(path):
                seen += 1
                try:
                    sample = decode_sample(key, members, name)
                except ShardError as err:
                    bad.handle(err)
                    continue
                yield f"{name}/{key}", sample.fbank, sample.meta
            if seen != entry["samples"]:
                raise ShardError(f"{name}: {seen} samples, the index says {entry['samples']}")
        except (ShardError, OSError) as err:
            bad.handle(err if isinstance(err, ShardError) else ShardError(f"{name}: {err}"))


def _examples(plan: EpochPlan, reader: int, si: int, bad: _BadSamples):
    """An endless example stream of one set for one reader, pass after pass."""
    cfg, s = plan.cfg, plan.sets[si]
    shards = plan.reader_shards[reader][si]
    for p in range(1 << 30):
        order = (
            shards
            if p == 0
            else [shards[i] for i in _rng(cfg.seed, plan.epoch, reader, si, p).permutation(len(shards))]
        )
        rng = _rng(cfg.seed, plan.epoch, reader, si, p, 1)
        buffer: list[Example] = []
        produced = 0
        for key, fbank, meta in _clips(s, order, bad):
            qa = meta["qa"]
            picks = range(len(qa))
            if cfg.examples_per_clip and len(qa) > cfg.examples_per_clip:
                picks = sorted(rng.choice(len(qa), cfg.examples_per_clip, replace=False).tolist())
            for j in picks:
                example = Example(f"{key}#{j}", fbank, qa[j])
                produced += 1
                if len(buffer) < cfg.shuffle_buffer:
                    buffer.append(example)
                    continue
                i = int(rng.integers(len(buffer)))
                buffer[i], example = example, buffer[i]
                yield example
        for i in rng.permutation(len(buffer)):
            yield buffer[i]
        if produced == 0:
            raise StreamError(f"{s.root}: reader {reader} found no readable samples in its shards")


def _mixed(plan: EpochPlan, reader: int, bad: _BadSamples):
    streams = [_examples(plan, reader, si, bad) for si in range(len(plan.sets))]
    if len(streams) == 1:
        for _ in range(plan.quota):
            yield next(streams[0])
        return
    weights = np.array([s.weight for s in plan.sets])
    choices = _rng(plan.cfg.seed, plan.epoch, reader, 1 << 20).choice(
        len(streams), plan.quota, p=weights / weights.sum()
    )
    for c in choices:
        yield next(streams[c])


def _batches(plan: EpochPlan, reader: int, examples, length):
    """Length-bucketed micro-batches: sort each window by length, cut, shuffle the cuts."""
    cfg = plan.cfg
    window = cfg.micro_batch * cfg.bucket_batches
    rng = _rng(cfg.seed, plan.epoch, reader, 1 << 21)
    pending: list[Example] = []

    def flush():
        ordered = sorted(pending, key=length) if cfg.bucket_batches > 1 else pending
        cuts = [ordered[i : i + cfg.micro_batch] for i in range(0, len(ordered), cfg.micro_batch)]
        for i in rng.permutation(len(cuts)) if cfg.bucket_batches > 1 else range(len(cuts)):
            yield cuts[i]

    for example in examples:
        pending.append(example)
        if len(pending) == window:
            yield from flush()
            pending = []
    if pending:
        yield from flush()


class TrainStream(IterableDataset):
    """An IterableDataset of collated batches for one rank; use it with `make_loader`."""

    def __init__(
        self,
        sets: list[ShardSet],
        cfg: StreamConfig,
        collator: Collator,
        rank: int,
        world_size: int,
        num_workers: int,
    ):
        cfg.check()
        if not 0 <= rank < world_size:
            raise StreamError(f"rank {rank} is outside world size {world_size}")
        self.sets, self.cfg, self.collator = sets, cfg, collator
        self.rank, self.world_size = rank, world_size
        self.loader_workers = num_workers  # 0: batches are made in the training process
        self.num_workers = max(1, num_workers)  # readers per rank
        self.epoch, self.skip = 0, 0
        self.plan(0)  # fail now, before any process group or worker starts, if it cannot run

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(self.sets, self.cfg, epoch, self.world_size, self.num_workers)

    def digest(self) -> str:
        """What decides the batches besides epoch, world size and workers."""
        what = [
            asdict(self.cfg),
            [(st.root, st.weight, [e["sha256"] for e in st.shards]) for st in self.sets],
            self.collator.settings(),
        ]
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return self.plan(self.epoch).rank_batches

    def __iter__(self):
        info = get_worker_info()
        # The DataLoader always asks worker 0 first; after `skip` batches the next batch is
        # due from logical worker skip % W, so DataLoader worker i plays (i + skip) % W.
        worker = ((info.id if info is not None else 0) + self.skip) % self.num_workers
        if info is None and self.loader_workers > 0:
            raise StreamError(
                "this stream was planned for DataLoader workers; iterate it through StreamLoader"
            )
        plan = self.plan(self.epoch)
        reader = self.rank * self.num_workers + worker
        n = plan.worker_batches(worker)
        skip = len(range(worker, self.skip, self.num_workers))
        bad = _BadSamples(self.cfg.on_bad_sample)
        length = self.collator.length
        for i, batch in enumerate(_batches(plan, reader, _mixed(plan, reader, bad), length)):
            if i >= n:
                return
            if i < skip:  # consumed before the checkpoint: replayed, not collated
                continue
            out = self.collator(batch)
            out["keys"] = [e.key for e in batch]
            out["bad_samples"] = bad.new()
            yield out


def _ignore_stop_signals(worker_id: int) -> None:
    """A preemption warning (SIGUSR1, as Slurm's --signal sends it to every process of the job)
    and Ctrl-C are for the rank, which saves a checkpoint while its workers keep serving it.
    SIGTERM keeps its default: multiprocessing stops leftover workers with it at exit."""
    for sig in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _stop_workers(it) -> None:
    """Stop a DataLoader iterator's workers now, not when the garbage collector gets to it: after
    an error its traceback keeps it alive, and a worker still starting then finds its queues'
    semaphores gone, dies, and fails whichever DataLoader runs next.

    A worker stopped while its queue thread is still pickling a batch can abort as its
    interpreter exits (CPython ends the thread with a forced unwind through torch's C++ frame).
    Nothing is lost, the batch was not wanted, but torch's SIGCHLD handler would raise for it
    and hide the error that stopped the loop, or fail a run that simply reached its last step."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:  # no workers
        return
    try:
        shutdown()
    except RuntimeError as err:
        if "DataLoader worker" not in str(err):
            raise


class StreamLoader:
    """A DataLoader over a TrainStream that knows how far it got: its state resumes exactly."""

    def __init__(self, stream: TrainStream, start_method: str = "spawn"):
        self.stream = stream
        self.start_method = start_method
        self.consumed = 0

    def __len__(self) -> int:
        return len(self.stream)

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches per rank in `epoch`: epochs differ a little when shards differ in size."""
        return self.stream.plan(epoch).rank_batches

    def __iter__(self):
        stream = self.stream
        stream.skip = self.consumed
        workers = stream.loader_workers
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            # Workers are not forked: the parent holds torch's and the tokenizer's thread pools.
            multiprocessing_context=self.start_method if workers > 0 else None,
            worker_init_fn=_ignore_stop_signals if workers > 0 else None,
            # Its own generator: starting an iterator then draws nothing from the global RNG,
            # so a resumed run's dropout masks stay those of the uninterrupted run.
            generator=torch.Generator().manual_seed(stream.cfg.seed + stream.epoch),
        )
        it = iter(loader)
        try:
            for batch in it:
                self.consumed += 1
                yield batch
        finally:
            _stop_workers(it)
        stream.epoch += 1
        self.consumed = 0

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def state_dict(self) -> dict:
        s = self.stream
        epoch, batches = s.epoch, self.consumed
        if batches >= len(s):  # the epoch's last batch was taken: the next start is a new epoch
            epoch, batches = epoch + 1, 0
        return {
            "epoch": epoch,
            "batches": batches,
            "world_size": s.world_size,
            "num_workers": s.loader_workers,
            "seed": s.cfg.seed,
            "digest": s.digest(),
        }

    def load_state_dict(self, state: dict) -> str | None:
        """Continue from `state`; returns a note when it cannot be exact."""
        s = self.stream
        same = (state["world_size"], state["num_workers"], state["digest"]) == (
            s.world_size,
            s.loader_workers,
            s.digest(),
        )
        if same and state["batches"] < len(s):
            s.epoch, self.consumed = state["epoch"], state["batches"]
            return None
        s.epoch = state["epoch"] + (1 if state["batches"] else 0)
        self.consumed = 0
        if (state["world_size"], state["num_workers"]) != (s.world_size, s.loader_workers):
            why = (
                f"the checkpoint was taken with {state['world_size']} ranks x {state['num_workers']} "
                f"workers, this run has {s.world_size} x {s.loader_workers}"
            )
        else:
            why = "the stream's settings or shards changed since the checkpoint"
        return f"{why}: resuming at the start of epoch {s.epoch}"
