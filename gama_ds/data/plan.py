"""The epoch plan: one global, seeded order of examples that does not depend on the world size.

Everything here is a pure function of (seed, epoch) and the shard indexes. The number of ranks
and DataLoader workers only decides who reads which micro-batch, never what a global batch
holds, so every example is trained once per epoch on any number of readers, and a run resumes
on another number of ranks at the same global example.

Per epoch and shard set, in order:

1. lanes    - the set's shards, in a seeded order, are dealt to `lanes` lanes greedily by
              example count; the set's order takes one example from each lane in turn. Lanes
              keep reads sequential within a shard while neighbouring examples come from
              different shards.
2. mix      - with several sets, each window of `shuffle_buffer` positions takes from each set
              a seeded multinomial share by the mixing weights; a set that runs dry starts a
              new, reshuffled pass.
3. shuffle  - each window of `shuffle_buffer` positions is permuted by its own seeded draw.
4. batches  - positions g*G .. g*G+G-1 are global batch g (G: the recipe's global batch).
              With bucketing, each run of `bucket_batches` micro-batches of it is sorted by
              QA length, cut into micro-batches, and the cuts are shuffled; micro-batch j goes
              to rank j % R as its accumulation step j // R.

An epoch has `examples` positions (the sets' example counts summed) and trains on
`global_batches` x G of them; the rest, fewer than one global batch, is left over (dropped:
the next epoch's order is a new draw, so no example is left over every time).

An example is named by a `Ref`: (set, pass, shard, sample, k), its k-th QA pair taken this
epoch. Locating it needs only `qa_per_sample` from the index; bucketing also needs the QA
lengths that the per-shard sample index holds (data/sample_index.py).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import GamaDsError


class PlanError(GamaDsError, ValueError):
    """A plan that cannot be made as configured; the message says what to change."""


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


@dataclass(frozen=True)
class Ref:
    set: int
    pass_: int
    shard: int
    sample: int
    k: int  # which of the QA pairs taken from the clip this epoch


class _Lanes:
    """One pass over one set: shards dealt to lanes, positions -> (shard, example in shard)."""

    def __init__(self, counts: np.ndarray, order: np.ndarray, lanes: int):
        lanes = max(1, min(lanes, len(order)))
        heap = [(0, lane) for lane in range(lanes)]
        members: list[list[int]] = [[] for _ in range(lanes)]
        for shard in order:  # greedy: the shortest lane takes the next shard
            total, lane = heapq.heappop(heap)
            members[lane].append(int(shard))
            heapq.heappush(heap, (total + int(counts[shard]), lane))
        self.members = [np.array(m, dtype=np.int64) for m in members]
        self.starts = [np.concatenate([[0], np.cumsum(counts[m])]) for m in self.members]
        length = np.array([s[-1] for s in self.starts], dtype=np.int64)
        # Round t takes one example from each lane still longer than t, in lane order. Rounds
        # fall into segments between consecutive distinct lane lengths, each with its lanes.
        self.bounds = np.unique(length[length > 0])
        prev = np.concatenate([[0], self.bounds[:-1]])
        self.alive = [np.flatnonzero(length >= b) for b in self.bounds]
        sizes = np.array([len(a) for a in self.alive], dtype=np.int64)
        self.seg_start = np.concatenate([[0], np.cumsum((self.bounds - prev) * sizes)])
        self.round0 = prev

    def locate(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in the pass -> (shard index, example index inside the shard)."""
        seg = np.searchsorted(self.seg_start, q, side="right") - 1
        shards = np.empty(len(q), dtype=np.int64)
        within = np.empty(len(q), dtype=np.int64)
        for i, s in enumerate(seg):
            alive = self.alive[s]
            r = int(q[i] - self.seg_start[s])
            lane = alive[r % len(alive)]
            t = int(self.round0[s]) + r // len(alive)
            j = int(np.searchsorted(self.starts[lane], t, side="right")) - 1
            shards[i] = self.members[lane][j]
            within[i] = t - self.starts[lane][j]
        return shards, within


class EpochPlan:
    """The global order of one epoch; see the module docstring."""

    def __init__(self, sets, cfg, epoch: int):
        self.sets, self.cfg, self.epoch = sets, cfg, epoch
        self.set_examples = [s.examples(cfg.examples_per_clip) for s in sets]
        for s, n in zip(sets, self.set_examples, strict=True):
            if n == 0:
                raise PlanError(f"{s.root}: no examples")
        self.examples = int(sum(self.set_examples))
        g = cfg.global_batch
        self.global_batches = self.examples // g
        self.left_over = self.examples - self.global_batches * g
        if self.global_batches == 0 and not cfg.cover_all:  # a covering stream pads its last batch
            raise PlanError(
                f"too little data: {self.examples} examples in an epoch, less than one global batch of {g}"
            )
        self.window = cfg.shuffle_buffer
        windows = math.ceil(self.examples / self.window)
        if len(sets) > 1:
            weights = np.array([s.weight for s in sets], dtype=np.float64)
            draw = rng(cfg.seed, epoch, 1 << 20)
            full = draw.multinomial(self.window, weights / weights.sum(), size=windows)
            last = self.examples - (windows - 1) * self.window
            full[-1] = draw.multinomial(last, weights / weights.sum())
        else:
            full = np.full((windows, 1), self.window, dtype=np.int64)
            full[-1, 0] = self.examples - (windows - 1) * self.window
        self.window_counts = full  # [window, set]: examples each set gives each window
        self.set_before = np.concatenate([np.zeros((1, len(sets)), np.int64), np.cumsum(full, 0)[:-1]])

    # -- positions -> refs

    @lru_cache(maxsize=8)  # noqa: B019 - one plan per epoch, a handful of passes each
    def lanes(self, si: int, pass_: int) -> _Lanes:
        s = self.sets[si]
        order = rng(self.cfg.seed, self.epoch, si, pass_).permutation(len(s.shards))
        return _Lanes(s.shard_examples(self.cfg.examples_per_clip), order, self.cfg.lanes)

    @lru_cache(maxsize=4)  # noqa: B019
    def _window_perm(self, w: int) -> np.ndarray:
        size = int(self.window_counts[w].sum())
        return rng(self.cfg.seed, self.epoch, w, 1 << 22).permutation(size)

    def refs(self, start: int, stop: int) -> list[Ref]:
        """The examples at global positions start .. stop - 1, in that order."""
        pos = np.arange(start, stop)
        result: list = [None] * len(pos)
        windows = pos // self.window
        for w in np.unique(windows):
            at = np.flatnonzero(windows == w)
            pre = self._window_perm(int(w))[pos[at] - w * self.window]
            bounds = np.cumsum(self.window_counts[w])
            which = np.searchsorted(bounds, pre, side="right")
            for si in np.unique(which):
                sel = which == si
                index = self.set_before[w, si] + pre[sel] - (bounds[si] - self.window_counts[w, si])
                for i, ref in zip(at[sel], self._set_refs(int(si), index), strict=True):
                    result[i] = ref
        return result

    def _set_refs(self, si: int, index: np.ndarray) -> list[Ref]:
        """Indexes into set si's endless order (pass after pass) -> refs, in the same order."""
        s, n, k = self.sets[si], self.set_examples[si], self.cfg.examples_per_clip
        result: list = [None] * len(index)
        passes = index // n
        for p in np.unique(passes):
            at = np.flatnonzero(passes == p)
            shards, within = self.lanes(si, int(p)).locate(index[at] % n)
            for i, shard, e in zip(at, shards, within, strict=True):
                starts = s.sample_starts(int(shard), k)
                sample = int(np.searchsorted(starts, e, side="right")) - 1
                result[i] = Ref(si, int(p), int(shard), sample, int(e - starts[sample]))
        return result

    # -- global batches -> micro-batches -> ranks

    def micro_batches(self, g: int, length) -> list[list[Ref]]:
        """Global batch g cut into micro-batches, in the world-size-free order j = 0, 1, ..."""
        cfg = self.cfg
        refs = self.refs(g * cfg.global_batch, (g + 1) * cfg.global_batch)
        m = cfg.micro_batch
        if cfg.bucket_batches <= 1:
            return [refs[i : i + m] for i in range(0, len(refs), m)]
        cuts = []
        block = m * cfg.bucket_batches
        for b in range(0, len(refs), block):
            chunk = sorted(refs[b : b + block], key=length)
            cuts.extend(chunk[i : i + m] for i in range(0, len(chunk), m))
        order = rng(cfg.seed, self.epoch, g, 1 << 21).permutation(len(cuts))
        return [cuts[i] for i in order]

    def accumulation(self, world_size: int) -> int:
        per_step = self.cfg.micro_batch * world_size
        if self.cfg.global_batch % per_step:
            raise PlanError(
                f"global batch {self.cfg.global_batch} is not a multiple of micro-batch "
                f"{self.cfg.micro_batch} x {world_size} ranks"
            )
        return self.cfg.global_batch // per_step

    @staticmethod
    def rank_slot(k: int, rank: int, world_size: int, accumulation: int) -> tuple[int, int]:
        """A rank's k-th micro-batch of the epoch -> (global batch, micro-batch index j)."""
        g, a = divmod(k, accumulation)
        return g, a * world_size + rank
