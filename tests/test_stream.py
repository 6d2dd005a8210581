"""The training stream on real shards from `gama-ds convert`: 2 ranks x 2 DataLoader workers."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import tarfile
import threading

import psutil
import pytest
from cluster import wait_for

from gama_ds.data import sample_index
from gama_ds.data.collate import Collator
from gama_ds.data.convert import ConvertOptions, convert
from gama_ds.data.shards import ShardError, sha256_file
from gama_ds.data.stream import StreamConfig, StreamLoader, TrainStream, open_sets
from gama_ds.data.tokenizer import byte_tokenizer
from gama_ds.synth import synthesize

COLLATOR = Collator(byte_tokenizer(), cutoff_len=108)


def shards_of(tmp, name, clips, per_shard, seed):
    data = synthesize(str(tmp / f"{name}_audio"), clips=clips, test_clips=0, seed=seed)
    out = str(tmp / name)
    convert(
        [data["train"]],
        out,
        ConvertOptions(shard_samples=per_shard),
        workers=1,
        progress=False,
        log=lambda m: None,
    )
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    return {
        "even": shards_of(tmp, "even", 32, 4, 0),  # 8 shards x 4 clips x 4 QA pairs = 128 examples
        "uneven": shards_of(tmp, "uneven", 30, 4, 1),  # 7 shards of 4 clips and one of 2
        "other": shards_of(tmp, "other", 16, 2, 2),  # 8 shards of 2 clips
        "tmp": tmp,
    }


def rank_keys(sets, cfg, world=2, workers=2, loader=None):
    out = []
    for rank in range(world):
        stream = TrainStream(sets, cfg, COLLATOR, rank, world, workers)
        out.append([b["keys"] for b in (loader or StreamLoader)(stream)])
    return out


def global_batches(per_rank, accumulation):
    """Rank batches -> the global batches they make up, each as the sorted list of its examples."""
    steps = len(per_rank[0]) // accumulation
    window = [slice(g * accumulation, (g + 1) * accumulation) for g in range(steps)]
    return [sorted(k for batches in per_rank for b in batches[w] for k in b) for w in window]


def test_an_epoch_covers_every_example_once_across_ranks_and_workers(data):
    per_rank = rank_keys(open_sets([(data["even"], 1.0)]), StreamConfig(micro_batch=4, global_batch=16))
    flat = [k for batches in per_rank for b in batches for k in b]
    assert len(per_rank[0]) == len(per_rank[1]) == 16
    assert len(flat) == len(set(flat)) == 128  # disjoint and complete


def test_global_batches_do_not_depend_on_ranks_or_workers(data):
    # 120 examples in 8 uneven shards, global batch 16: 7 global batches, 8 examples left over,
    # on 1 rank, 2 ranks x 2 workers, 4 ranks and 8 ranks (more readers than shards).
    sets = open_sets([(data["uneven"], 1.0)])
    cfg = StreamConfig(micro_batch=2, global_batch=16, shuffle_buffer=24)
    one = global_batches(rank_keys(sets, cfg, world=1, workers=0), 8)
    assert len(one) == 7 and all(len(set(g)) == 16 for g in one)
    assert len({k for g in one for k in g}) == 112  # 120 - 8 left over, none twice
    for world, workers in ((2, 2), (4, 0), (8, 0)):
        per_rank = rank_keys(sets, cfg, world=world, workers=workers)
        assert {len(b) for b in per_rank} == {7 * 8 // world}
        assert global_batches(per_rank, 8 // world) == one, (world, workers)


def test_the_same_call_gives_the_same_batches_and_another_epoch_reshuffles(data):
    sets = open_sets([(data["even"], 1.0)])
    cfg = StreamConfig(micro_batch=4, shuffle_buffer=8)
    stream = TrainStream(sets, cfg, COLLATOR, 0, 1, 0)
    first = [b["keys"] for b in StreamLoader(stream)]
    stream.epoch = 0
    assert [b["keys"] for b in StreamLoader(stream)] == first
    second = [b["keys"] for b in StreamLoader(stream)]  # the loader moved on to epoch 1
    assert second != first and sorted(sum(second, [])) == sorted(sum(first, []))


def test_neighbouring_examples_come_from_different_shards(data):
    # Lanes: a micro-batch mixes shards even when the shuffle window is one example.
    sets = open_sets([(data["even"], 1.0)])
    batches = rank_keys(sets, StreamConfig(micro_batch=4, shuffle_buffer=1, bucket_batches=1), 1, 0)[0]
    shards_per_batch = [len({k.split("/")[1] for k in b}) for b in batches]
    assert min(shards_per_batch) == 4, shards_per_batch


SETUPS = {
    "mixed-2-workers": (lambda d: [(d["uneven"], 1.0), (d["other"], 0.5)], dict(global_batch=8), 2),
    "k-per-clip-3-workers": (lambda d: [(d["uneven"], 1.0)], dict(examples_per_clip=2, global_batch=16), 3),
    "in-process": (lambda d: [(d["even"], 1.0)], dict(shuffle_buffer=3, global_batch=8), 0),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_resuming_from_the_state_continues_exactly(data, setup):
    """A state taken at the first batch, in mid-shard or at the epoch's end (where the next epoch
    starts) resumes a new loader exactly there. One pass over two epochs takes all three states,
    so that each setup's workers start as few times as the check needs."""
    specs, extra, workers = SETUPS[setup]
    sets = open_sets(specs(data))
    cfg = StreamConfig(micro_batch=4, **{"shuffle_buffer": 6, **extra})

    def stream():
        return TrainStream(sets, cfg, COLLATOR, 1, 2, workers)

    n = len(stream())
    where = {"first": 1, "mid-shard": 5, "epoch-end": n}
    loader = StreamLoader(stream())
    run, states = [], {}
    for batch in loader:
        run.append(batch["keys"])
        for name, k in where.items():
            if len(run) == k:  # as a checkpoint takes it, while the workers read ahead
                states[name] = json.loads(json.dumps(loader.state_dict()))
    run += [b["keys"] for b in loader]  # the second epoch
    assert len(run) == 2 * n and sorted(states) == sorted(where)

    for name, k in where.items():
        resumed = StreamLoader(stream())
        assert resumed.load_state_dict(states[name]) is None, name
        rest = [b["keys"] for b in resumed]
        if name == "epoch-end":  # the state says "next epoch": the resumed loop runs epoch 1
            assert states[name]["epoch"] == 1 and states[name]["batches"] == 0
            assert rest == run[n:], name
        else:
            assert rest == run[k:n], name


@pytest.mark.parametrize("before,after,workers", [(2, 1, 0), (1, 2, 2), (2, 4, 0)])
def test_another_world_size_resumes_at_the_same_global_example(data, before, after, workers):
    sets = open_sets([(data["uneven"], 1.0)])
    cfg = StreamConfig(micro_batch=2, global_batch=8, shuffle_buffer=10)
    whole = [k for g in global_batches(rank_keys(sets, cfg, world=1, workers=0), 4) for k in g]
    states, trained = [], []
    for rank in range(before):  # every rank stops after 5 global batches, as at a checkpoint
        loader = StreamLoader(TrainStream(sets, cfg, COLLATOR, rank, before, 0))
        it = iter(loader)
        trained += [k for _ in range(5 * 4 // before) for k in next(it)["keys"]]
        states.append(json.loads(json.dumps(loader.state_dict())))
        it.close()
    rest = []
    for rank in range(after):
        loader = StreamLoader(TrainStream(sets, cfg, COLLATOR, rank, after, workers))
        assert loader.load_state_dict(states[0]) is None
        rest += [k for b in loader for k in b["keys"]]
    assert len(trained) + len(rest) == len(whole) == 120  # 15 whole global batches
    assert sorted(trained + rest) == sorted(whole)  # nothing repeated, nothing skipped
    assert sorted(trained) == sorted(whole[: 5 * 8])


def test_mixing_weights_are_honoured(data):
    sets = open_sets([(data["even"], 3.0), (data["other"], 1.0)])
    cfg = StreamConfig(micro_batch=4, global_batch=8)
    keys = [
        k
        for r in range(2)
        for _ in range(2)
        for b in StreamLoader(TrainStream(sets, cfg, COLLATOR, r, 2, 0))
        for k in b["keys"]
    ]
    share = sum(k.startswith("even/") for k in keys) / len(keys)
    # About 380 examples: a binomial share's standard deviation is about 0.022.
    assert len(keys) > 300 and abs(share - 0.75) < 0.07, share


def test_k_examples_per_clip_take_k_different_pairs_of_every_clip(data):
    sets = open_sets([(data["even"], 1.0)])
    keys = [k for b in rank_keys(sets, StreamConfig(micro_batch=4, examples_per_clip=2), 1, 0)[0] for k in b]
    clips = {}
    for k in keys:
        clip, qa = k.rsplit("#", 1)
        clips.setdefault(clip, set()).add(qa)
    assert len(keys) == 64 and len(clips) == 32 and all(len(q) == 2 for q in clips.values())


def test_an_eval_stream_covers_every_example_once_on_any_world_size(data):
    sets = open_sets([(data["uneven"], 1.0)])  # 120 examples
    for world in (1, 3, 7, 40):  # 40 ranks x 4: fewer examples than one global batch
        cfg = StreamConfig(micro_batch=4, global_batch=4 * world, bucket_batches=1, cover_all=True)
        per_rank = rank_keys(sets, cfg, world=world, workers=0)
        flat = [k for p in per_rank for b in p for k in b]
        assert len(flat) == len(set(flat)) == 120, world
        assert len({len(p) for p in per_rank}) == 1


def corrupt_one_sample(src, dst):
    """Copy a shard set and replace one sample's features with bytes that are not .npy."""
    shutil.copytree(src, dst)
    index = json.load(open(os.path.join(dst, "index.json")))
    entry = index["shards"][3]
    path = os.path.join(dst, entry["file"])
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad_name = next(m.name for m, _ in members if m.name.endswith(".npy"))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, payload in members:
            if info.name == bad_name:
                payload = b"definitely not numpy"
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    entry["bytes"], entry["sha256"] = os.path.getsize(path), sha256_file(path)
    # As a converter would have indexed it: the bad bytes are what the checksum vouches for.
    name = sample_index.write(path, sample_index.scan(path, checksums=True))
    entry["sample_index"] = {"file": name, "sha256": sha256_file(os.path.join(dst, name))}
    json.dump(index, open(os.path.join(dst, "index.json"), "w"))
    return entry["file"], bad_name.split(".")[0]


def test_bad_samples_fail_by_name_or_are_skipped_and_counted(data):
    root = str(data["tmp"] / "corrupt")
    shard, key = corrupt_one_sample(data["even"], root)
    sets = open_sets([(root, 1.0)])
    with pytest.raises(
        ShardError, match=rf"corrupt/{shard}: sample '{key}': fbank.npy is not a plain .npy array"
    ):
        list(StreamLoader(TrainStream(sets, StreamConfig(micro_batch=4), COLLATOR, 0, 1, 2)))
    skip = StreamConfig(micro_batch=4, global_batch=8, on_bad_sample="skip")
    counts, bad, keys = [], 0, []
    for rank in range(2):
        batches = list(StreamLoader(TrainStream(sets, skip, COLLATOR, rank, 2, 2)))
        counts.append(len(batches))
        bad += sum(b["bad_samples"] for b in batches)
        keys += [k for b in batches for k in b["keys"]]
    # The bad clip's 4 QA pairs are each counted and missing; the 124 others are all there.
    assert counts == [16, 16] and bad == 4 and len(set(keys)) == len(keys) == 124


def test_a_truncated_shard_is_caught_even_at_a_member_boundary(data):
    root = str(data["tmp"] / "truncated")
    shutil.copytree(data["even"], root)
    path = os.path.join(root, "shard-000002.tar")
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[4].offset  # the start of the third sample: a clean cut
    with open(path, "r+b") as f:
        f.truncate(cut)
    sets = open_sets([(root, 1.0)])
    with pytest.raises(ShardError, match=r"truncated/shard-000002.tar: \d+ bytes, the index says"):
        list(StreamLoader(TrainStream(sets, StreamConfig(micro_batch=4), COLLATOR, 0, 1, 0)))


def test_changed_settings_resume_at_the_next_epoch_with_a_note(data):
    sets = open_sets([(data["even"], 1.0)])
    loader = StreamLoader(TrainStream(sets, StreamConfig(micro_batch=4), COLLATOR, 0, 1, 0))
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    it.close()
    other = StreamLoader(TrainStream(sets, StreamConfig(micro_batch=4, shuffle_buffer=7), COLLATOR, 0, 1, 0))
    assert "settings or shards changed" in other.load_state_dict(state) and other.epoch == 1


def test_batches_are_bucketed_by_length(data):
    sets = open_sets([(data["even"], 1.0), (data["other"], 1.0)])

    def padding(bucket_batches):
        stream = TrainStream(
            sets,
            StreamConfig(micro_batch=4, global_batch=32, bucket_batches=bucket_batches),
            COLLATOR,
            0,
            1,
            0,
        )
        return sum(float(b["pad_fraction"]) for b in StreamLoader(stream))

    assert padding(8) < padding(1)


def test_a_bad_sample_error_stays_the_error_and_leaves_nothing_behind(data):
    # Workers of a loader stopped by an error, if left to the garbage collector, could die
    # (their queues' semaphores gone) and fail the next loader; stopped while still sending
    # a batch, one could abort and torch would report that instead of the shard's error.
    # Either happened about once in ten stops, so a handful of stops make it visible.
    root = str(data["tmp"] / "corrupt-again")
    shard, key = corrupt_one_sample(data["even"], root)
    sets = open_sets([(root, 1.0)])
    before = set(multiprocessing.active_children())
    for _ in range(6):
        with pytest.raises(ShardError, match=rf"{shard}: sample '{key}'"):
            list(StreamLoader(TrainStream(sets, StreamConfig(micro_batch=4), COLLATOR, 0, 1, 2)))
        # A worker that torch had to terminate is reaped a moment after the loader returns.
        wait_for(lambda: not set(multiprocessing.active_children()) - before, 10, "the workers to exit", 0.05)
    skip_cfg = StreamConfig(micro_batch=4, on_bad_sample="skip")
    skip = StreamLoader(TrainStream(sets, skip_cfg, COLLATOR, 0, 1, 2))
    assert len(list(skip)) == len(skip)


def flip_bits_inside_a_sample(src, dst):
    """Copy a shard set and flip the low bit of 400 bytes of one sample's features in place:
    the shard keeps its size and every value stays finite, so only a checksum can tell."""
    shutil.copytree(src, dst)
    entry = json.load(open(os.path.join(dst, "index.json")))["shards"][5]
    path = os.path.join(dst, entry["file"])
    with tarfile.open(path) as tar:
        info = next(m for m in tar.getmembers() if m.name.endswith(".npy"))
    with open(path, "r+b") as f:
        f.seek(info.offset_data + 256)
        data = f.read(400)
        f.seek(info.offset_data + 256)
        f.write(bytes(b ^ 1 for b in data))
    return entry["file"], info.name.split(".")[0]


def test_flipped_bits_in_a_sample_are_a_bad_sample_named_by_shard_and_key(data):
    root = str(data["tmp"] / "flipped")
    shard, key = flip_bits_inside_a_sample(data["even"], root)
    sets = open_sets([(root, 1.0)])
    with pytest.raises(ShardError, match=rf"flipped/{shard}: sample '{key}' .*checksum mismatch"):
        list(StreamLoader(TrainStream(sets, StreamConfig(micro_batch=4), COLLATOR, 0, 1, 0)))
    skip = StreamLoader(
        TrainStream(sets, StreamConfig(micro_batch=4, on_bad_sample="skip"), COLLATOR, 0, 1, 0)
    )
    batches = list(skip)
    keys = [k for b in batches for k in b["keys"]]
    # Only that clip's 4 QA pairs are lost: the reader read no other sample's bytes wrongly.
    assert sum(b["bad_samples"] for b in batches) == 4 and len(set(keys)) == 124
    assert not any(k.startswith(f"flipped/{shard}/{key}#") for k in keys)


def test_a_shard_set_converted_before_sample_indexes_reads_the_same(data):
    root = str(data["tmp"] / "old")
    shutil.copytree(data["uneven"], root)
    index = json.load(open(os.path.join(root, "index.json")))
    for entry in index["shards"]:
        os.remove(os.path.join(root, entry.pop("sample_index")["file"]))
    json.dump(index, open(os.path.join(root, "index.json"), "w"))
    cfg = StreamConfig(micro_batch=4, global_batch=8)

    def batches(path):
        per_rank = rank_keys(open_sets([(path, 1.0)]), cfg, world=2, workers=0)
        return [[k.split("/", 1)[1] for k in b] for p in per_rank for b in p]

    assert batches(root) == batches(data["uneven"])


def test_workers_survive_stop_signals_from_their_first_instant(data):
    """Slurm's SIGTERM and SIGUSR1 reach every process of the step, DataLoader workers too, and
    workers start afresh at every epoch. Signalled from the moment they exist (a spawned worker
    spends its first second importing torch, before any worker_init_fn), the epoch still ends
    with every batch; the rank is the one that answers (here: it ignores them)."""
    sets = open_sets([(data["even"], 1.0)])
    stream = TrainStream(sets, StreamConfig(micro_batch=4), COLLATOR, 0, 1, 2)
    me, hit, done = os.getpid(), set(), threading.Event()

    def signal_new_workers():
        while not done.is_set():
            for child in psutil.Process(me).children():
                with contextlib.suppress(psutil.Error):
                    if "spawn_main" in " ".join(child.cmdline()):  # not the resource tracker
                        for sig in (signal.SIGTERM, signal.SIGUSR1):
                            child.send_signal(sig)
                        hit.add(child.pid)
            done.wait(0.005)  # poll for new workers until the epoch is over

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    poker = threading.Thread(target=signal_new_workers, daemon=True)
    poker.start()
    try:
        loader = StreamLoader(stream)
        got = [b["keys"] for b in loader]
    finally:
        done.set()
        poker.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert len(got) == len(loader) > 0
    assert len(hit) == 2  # both workers were signalled
