"""The training stream: the epoch plan's micro-batches, read, checked and collated for one rank.

`data/plan.py` decides what every global batch holds, from (seed, epoch) and the shard indexes
alone. This module decides who reads it and reads it:

- rank r takes micro-batch a x R + r of every global batch as its accumulation step a, so every
  rank yields the same number of batches (global batches x accumulation) by construction;
- the rank's batch k comes from DataLoader worker k % W, the order in which torch's DataLoader
  takes batches from its workers (rotated on resume);
- a worker reads each example's clip with one `pread` at the offset the shard's sample index
  gives (data/sample_index.py), checks its checksum, decodes it safely (no pickle) and keeps the
  last few clips, since a clip's QA pairs sit close together in the order.

The state is (epoch, global batches consumed, this rank's batches consumed, world size, a digest
of the settings and shards). Resuming seeks straight to the first unread micro-batch: on the
same world size exactly where the rank stopped, on another world size at the same global
example (the first global batch not yet trained). Changed settings or shards resume at the next
epoch boundary, with a note.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import DataConfig, choices
from ..errors import GamaDsError
from ..signals import deaf_to_stop_signals, start_resource_tracker_deaf_to_stop_signals, stop_signals_held
from . import sample_index, tag_sidecar
from .collate import IGNORE, Collator, Example
from .plan import EpochPlan, PlanError, Ref, rng
from .sample_index import SampleIndexError
from .shards import ShardError, decode_sample, read_index

log = logging.getLogger(__name__)
BAD_SAMPLE_POLICIES = choices(DataConfig, "on_bad_sample")
PADDING = "<padding>"


class StreamError(GamaDsError, ValueError):
    """A stream that cannot run as configured; the message says what to change."""


@dataclass
class ShardSet:
    root: str
    weight: float
    shards: list[dict]  # index entries: file, samples, qa_pairs, bytes, sha256, qa_per_sample, ...
    _examples: dict = field(default_factory=dict, repr=False)
    _starts: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.root))

    @property
    def indexed(self) -> bool:
        """Whether every shard has a sample index (offsets and checksums)."""
        return all("sample_index" in e for e in self.shards)

    def shard_examples(self, k: int) -> np.ndarray:
        """Examples per shard in an epoch: every QA pair (k = 0) or at most k per clip."""
        if k not in self._examples:
            if k == 0:
                counts = [e["qa_pairs"] for e in self.shards]
            else:
                counts = [int(np.minimum(e["qa_per_sample"], k).sum()) for e in self.shards]
            self._examples[k] = np.array(counts, dtype=np.int64)
        return self._examples[k]

    def examples(self, k: int) -> int:
        return int(self.shard_examples(k).sum())

    def sample_starts(self, shard: int, k: int) -> np.ndarray:
        """The first example index of each sample of a shard, and the shard's total last."""
        key = (shard, k)
        if key not in self._starts:
            per = np.asarray(self.shards[shard]["qa_per_sample"], dtype=np.int64)
            if k:
                per = np.minimum(per, k)
            self._starts[key] = np.concatenate([[0], np.cumsum(per)])
        return self._starts[key]

    def __getstate__(self):  # workers rebuild the caches they need
        return {"root": self.root, "weight": self.weight, "shards": self.shards}

    def __setstate__(self, state):
        self.__init__(**state)


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
        s = ShardSet(root, float(weight), index["shards"])
        if not s.indexed:
            log.warning(
                "%s was converted without per-sample indexes: each reader scans a shard's headers "
                "to find its samples, and samples are checked for structure only, not checksummed; "
                "convert it again with this gama_ds to have both",
                root,
            )
        sets.append(s)
    return sets


@dataclass
class StreamConfig:
    micro_batch: int  # examples per batch
    global_batch: int = 0  # examples per optimizer step over all ranks; 0: one micro-batch
    seed: int = 0
    shuffle_buffer: int = 1000  # examples per shuffle window of the global order
    examples_per_clip: int = 0  # 0: every QA pair of a clip each epoch; k: k of them
    bucket_batches: int = 8  # micro-batches per length-sorting run; 1 turns bucketing off
    on_bad_sample: str = "fail"  # fail: stop naming shard, key and cause; skip: count and go on
    lanes: int = 64  # shards read side by side per set (neighbouring examples' shards)
    cover_all: bool = False  # every example exactly once, the last global batch padded (eval)

    def __post_init__(self):
        if self.global_batch == 0:
            self.global_batch = self.micro_batch

    def check(self) -> None:
        for name in ("micro_batch", "shuffle_buffer", "bucket_batches", "lanes"):
            if getattr(self, name) < 1:
                raise StreamError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.global_batch % self.micro_batch:
            raise StreamError(
                f"the global batch {self.global_batch} is not a multiple of the micro-batch "
                f"{self.micro_batch}"
            )
        if self.examples_per_clip < 0:
            raise StreamError(f"examples_per_clip must be 0 (all) or positive, got {self.examples_per_clip}")
        if self.on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise StreamError(
                f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {self.on_bad_sample!r}"
            )


class Reader:
    """Reads the examples of refs for one worker: sample indexes, open files and the last few
    decoded clips are kept. Bad samples raise under `fail` and come back as None under `skip`."""

    def __init__(
        self,
        sets: list[ShardSet],
        cfg: StreamConfig,
        epoch: int,
        keep_clips: int = 32,
        with_tags: bool = True,
    ):
        self.sets, self.cfg, self.epoch = sets, cfg, epoch
        self.with_tags = with_tags  # False: tag files are never opened, and every Example.tags is None
        self.indexes: OrderedDict = OrderedDict()
        self.files: OrderedDict = OrderedDict()
        self.clips: OrderedDict = OrderedDict()
        self.tag_lists: OrderedDict = OrderedDict()
        self.keep_clips = keep_clips
        self.broken: dict[tuple[int, int], ShardError] = {}
        self.bad = 0
        self.names = [s.name for s in sets]

    def _where(self, si: int, shard: int) -> str:
        return f"{self.names[si]}/{self.sets[si].shards[shard]['file']}"

    def index(self, si: int, shard: int) -> sample_index.SampleIndex:
        key = (si, shard)
        if key in self.broken:
            raise self.broken[key]
        if key not in self.indexes:
            s, entry, where = self.sets[si], self.sets[si].shards[shard], self._where(si, shard)
            try:
                size = os.path.getsize(os.path.join(s.root, entry["file"]))
                if size != entry["bytes"]:
                    raise ShardError(f"{where}: {size} bytes, the index says {entry['bytes']}")
                index = sample_index.load(s.root, entry)
                if len(index) != entry["samples"]:
                    raise ShardError(f"{where}: {len(index)} samples, the index says {entry['samples']}")
            except (OSError, SampleIndexError, tarfile.TarError, ShardError) as err:
                # A damaged shard is a bad sample for each of its samples, reported each time.
                self.broken[key] = err if isinstance(err, ShardError) else ShardError(f"{where}: {err}")
                raise self.broken[key] from None
            self.indexes[key] = index
            if len(self.indexes) > 4 * self.cfg.lanes * len(self.sets):
                self.indexes.popitem(last=False)
        self.indexes.move_to_end(key)
        return self.indexes[key]

    def tags(self, si: int, shard: int, sample: int, key: str) -> list | None:
        """The clip's tags from its shard's tag file (None: the set is not tagged, or the run
        needs no tags).

        A tag file that is gone or changed is not a bad sample but a changed data set: it ends
        the run whatever `on_bad_sample` says, since skipping would drop a whole shard."""
        if not self.with_tags:
            return None
        at = (si, shard)
        if at not in self.tag_lists:
            try:
                self.tag_lists[at] = tag_sidecar.load(self.sets[si].root, self.sets[si].shards[shard])
            except tag_sidecar.TagsError as err:
                raise StreamError(
                    f"{self.names[si]}: {err}. The run reads the tags its index named when it started; "
                    "`gama-ds tag` keeps the files of the tagging before the current one, so the set was "
                    "tagged twice since, or the file was damaged: resume the run to read the current tags "
                    "(`gama-ds verify` checks them)"
                ) from None
            if len(self.tag_lists) > 4 * self.cfg.lanes * len(self.sets):
                self.tag_lists.popitem(last=False)
        self.tag_lists.move_to_end(at)
        tagged = self.tag_lists[at]
        if tagged is None:
            return None
        keys, tags = tagged
        if keys[sample] != key:  # a whole shard out of line: never a skipped sample
            raise StreamError(
                f"{self._where(si, shard)}: sample {key!r} (#{sample}) is not its tags' #{sample} "
                f"({keys[sample]!r}); `gama-ds verify` checks the set"
            )
        return tags[sample]

    def qa_bytes(self, ref: Ref) -> int:
        """The ref's QA text length in bytes, from the sample index (bucketing); 0 if unknown."""
        try:
            lengths = self.index(ref.set, ref.shard).qa_bytes[ref.sample]
        except ShardError:
            return 0  # a broken shard: reported when its samples are read
        picks = self._picks(ref, len(lengths))
        return lengths[picks[ref.k]] if ref.k < len(picks) else 0

    def _picks(self, ref: Ref, n_qa: int) -> list[int]:
        k = self.cfg.examples_per_clip
        if not k or n_qa <= k:
            return list(range(n_qa))
        draw = rng(self.cfg.seed, self.epoch, ref.set, ref.pass_, ref.shard, ref.sample, 1 << 23)
        return sorted(draw.choice(n_qa, k, replace=False).tolist())

    def _fd(self, si: int, shard: int) -> int:
        key = (si, shard)
        if key not in self.files:
            path = os.path.join(self.sets[si].root, self.sets[si].shards[shard]["file"])
            self.files[key] = os.open(path, os.O_RDONLY)
            if len(self.files) > 2 * self.cfg.lanes * len(self.sets):
                os.close(self.files.popitem(last=False)[1])
        self.files.move_to_end(key)
        return self.files[key]

    def _clip(self, si: int, shard: int, sample: int):
        key = (si, shard, sample)
        if key in self.clips:
            self.clips.move_to_end(key)
            return self.clips[key]
        index = self.index(si, shard)
        start, end = int(index.offsets[sample]), int(index.offsets[sample + 1])
        where = self._where(si, shard)
        try:
            data = os.pread(self._fd(si, shard), end - start, start)
        except OSError as err:
            raise ShardError(f"{where}: sample {sample}: {err}") from err
        if index.checksums is not None and sample_index.checksum(data) != index.checksums[sample]:
            try:
                name, _ = sample_index.split_members(data, where)
            except SampleIndexError:
                name = f"#{sample}"
            raise ShardError(
                f"{where}: sample {name!r} (#{sample}, bytes {start}..{end}): checksum mismatch, "
                "its bytes changed since conversion"
            )
        try:
            name, members = sample_index.split_members(data, f"{where}: sample #{sample}")
        except SampleIndexError as err:
            raise ShardError(str(err)) from None
        clip = decode_sample(name, members, where)
        self.clips[key] = clip
        if len(self.clips) > self.keep_clips:
            self.clips.popitem(last=False)
        return clip

    def example(self, ref: Ref) -> Example | None:
        try:
            clip = self._clip(ref.set, ref.shard, ref.sample)
            tags = self.tags(ref.set, ref.shard, ref.sample, clip.key)
        except ShardError as err:
            if self.cfg.on_bad_sample == "fail":
                raise
            self.bad += 1
            log.warning("skipping bad sample: %s", err)
            return None
        qa = clip.meta["qa"]
        j = self._picks(ref, len(qa))[ref.k]
        return Example(f"{self._where(ref.set, ref.shard)}/{clip.key}#{j}", clip.fbank, qa[j], tags=tags)

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


class TrainStream(IterableDataset):
    """An IterableDataset of collated batches for one rank; iterate it through StreamLoader."""

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
        plan = self.plan(0)  # fail now, before any process group or worker starts, if it cannot run
        try:
            self.accumulation = plan.accumulation(world_size)
        except PlanError as err:
            raise StreamError(str(err)) from None

    def plan(self, epoch: int) -> EpochPlan:
        try:
            return EpochPlan(self.sets, self.cfg, epoch)
        except PlanError as err:
            raise StreamError(str(err)) from None

    def digest(self) -> str:
        """What decides the global order besides the epoch (not the world size or workers)."""
        what = [
            asdict(self.cfg),
            [(st.root, st.weight, [e["sha256"] for e in st.shards]) for st in self.sets],
            self.collator.settings(),
        ]
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return self.batches_in(self.plan(self.epoch))

    def batches_in(self, plan: EpochPlan) -> int:
        g = plan.global_batches
        if self.cfg.cover_all:
            g = -(-plan.examples // self.cfg.global_batch)
        return g * self.accumulation

    def __iter__(self):
        info = get_worker_info()
        if info is None and self.loader_workers > 0:
            raise StreamError(
                "this stream was planned for DataLoader workers; iterate it through StreamLoader"
            )
        plan = self.plan(self.epoch)
        # Tags are read only for a prompt that holds them: a run without a soft prompt never
        # depends on tag files, so tagging its shards while it trains cannot disturb it.
        reader = Reader(self.sets, self.cfg, self.epoch, with_tags=self.collator.soft_prompt is not None)
        # The DataLoader asks its workers in turn, worker 0 first: after `skip` batches, worker
        # i makes the rank's batches skip + i, skip + i + W, ...
        first = self.skip + (info.id if info is not None else 0)
        cached: dict[int, list] = {}
        reported = 0
        try:
            for k in range(first, self.batches_in(plan), self.num_workers):
                g, j = EpochPlan.rank_slot(k, self.rank, self.world_size, self.accumulation)
                if g not in cached:
                    cached.clear()
                    cached[g] = self._micro_batches(plan, g, reader)
                batch = self._read(cached[g][j], reader, plan, g, j)
                out = self.collator(batch)
                out["keys"] = [e.key for e in batch if e.key != PADDING]
                out["bad_samples"], reported = reader.bad - reported, reader.bad
                yield out
        finally:
            reader.close()

    def _micro_batches(self, plan: EpochPlan, g: int, reader: Reader) -> list[list]:
        if not self.cfg.cover_all:
            return plan.micro_batches(g, reader.qa_bytes)
        size = self.cfg.global_batch
        start = g * size
        refs = plan.refs(start, min(start + size, plan.examples))
        refs += [None] * (size - len(refs))  # past the last example: padding
        m = self.cfg.micro_batch
        return [refs[i : i + m] for i in range(0, size, m)]

    def _read(self, refs: list, reader: Reader, plan: EpochPlan, g: int, j: int) -> list[Example]:
        batch = [e for e in (reader.example(r) for r in refs if r is not None) if e is not None]
        pads = sum(r is None for r in refs)
        if pads:  # eval's last global batch: rows that take part in the forward but count nothing
            filler = batch[0] if batch else reader.example(plan.refs(0, 1)[0])
            if filler is not None:
                ids, _ = self.collator.example_tokens(filler)
                padding = Example(PADDING, filler.fbank, filler.qa, (ids, [IGNORE] * len(ids)), filler.tags)
                batch += [padding] * pads
        if not batch:
            raise StreamError(
                f"epoch {self.epoch}, global batch {g}, micro-batch {j}: every example is a bad sample"
            )
        return batch


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
    for worker in getattr(it, "_workers", []):
        if worker.is_alive():  # stuck past torch's join; it ignores the SIGTERM torch sent
            worker.kill()
            worker.join(10)


class StreamLoader:
    """A DataLoader over a TrainStream that knows how far it got: its state resumes exactly."""

    def __init__(self, stream: TrainStream, start_method: str = "spawn"):
        self.stream = stream
        self.start_method = start_method
        self.consumed = 0
        self.length = len(stream)  # batches per epoch, the same in every epoch

    def __len__(self) -> int:
        return len(self.stream)

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches per rank in `epoch` (the same in every epoch: the plan's size is fixed)."""
        return self.stream.batches_in(self.stream.plan(epoch))

    def epoch_counts(self, epoch: int) -> dict:
        """Examples in an epoch, trained on (before bad samples), left over; world-size free."""
        plan = self.stream.plan(epoch)
        trained = plan.global_batches * self.stream.cfg.global_batch
        return {"epoch_examples": plan.examples, "epoch_trained": trained, "epoch_left_over": plan.left_over}

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
            # The rank saves on a stop signal while its workers keep serving it (signals.py).
            worker_init_fn=deaf_to_stop_signals if workers > 0 else None,
            # Its own generator: starting an iterator then draws nothing from the global RNG,
            # so a resumed run's dropout masks stay those of the uninterrupted run.
            generator=torch.Generator().manual_seed(stream.cfg.seed + stream.epoch),
        )
        if workers > 0:
            # Starting a tracker unblocks SIGTERM in this process: have it started beforehand.
            start_resource_tracker_deaf_to_stop_signals()
        with stop_signals_held():  # workers start here, at every epoch
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

    @property
    def at_epoch_end(self) -> bool:
        """True once the epoch's last batch has been handed out (and until the next starts)."""
        return self.consumed == self.length

    def state_dict(self) -> dict:
        s = self.stream
        epoch, batches = s.epoch, self.consumed
        if batches >= len(s):  # the epoch's last batch was taken: the next start is a new epoch
            epoch, batches = epoch + 1, 0
        return {
            "epoch": epoch,
            "batches": batches,  # this rank's, exact on the same world size
            "global_batches": batches // s.accumulation,  # whole global batches: any world size
            "world_size": s.world_size,
            "accumulation": s.accumulation,
            "seed": s.cfg.seed,
            "digest": s.digest(),
        }

    def load_state_dict(self, state: dict) -> str | None:
        """Continue from `state`; returns a note when it cannot continue at the same example."""
        s = self.stream
        if state.get("digest") != s.digest() or "accumulation" not in state:
            s.epoch = state["epoch"] + (1 if state["batches"] else 0)
            self.consumed = 0
            return (
                "the stream's settings or shards changed since the checkpoint: "
                f"resuming at the start of epoch {s.epoch}"
            )
        s.epoch = state["epoch"]
        if state["world_size"] == s.world_size:
            self.consumed = state["batches"]
            return None
        self.consumed = state["global_batches"] * s.accumulation
        if state["batches"] % state["accumulation"]:
            g = state["global_batches"]
            return f"the checkpoint was taken inside global batch {g}: resuming at its start"
        return None
