"""Tagging a shard set: every clip's features through the tagger, a tag file per shard, the index.

The tars are read, never written. Clips are batched across shard boundaries; a shard's tag file
is written once its last clip is tagged. `gama-ds tag` first removes the tag files the index
does not name (the tagging before the current one, and what a stopped tagging left), then writes
the new tag files under a new generation number, then the index (atomically). A tagging that
stops anywhere leaves the current one in force; the one it replaces keeps its files until the
next tagging, so a training run that started on them keeps reading them (it reads the tag files
its index named when it started).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from ..data import tag_sidecar
from ..data.shards import INDEX, ShardError, decode_sample, iter_members, read_index
from .options import TagOptions
from .tagger import Tagger


def provenance(tagger: Tagger, options: TagOptions, generation: int) -> dict:
    """The index's `provenance.tagger`."""
    return {
        **tagger.describe(),
        "top_k": options.top_k,
        "threshold": options.threshold,
        "batch_size": options.batch_size,
        "generation": generation,
    }


def _clips(root: str, entries: list[dict]):
    """(shard number, key, features) of every clip, in shard order."""
    for i, entry in enumerate(entries):
        n = 0
        for key, members in iter_members(os.path.join(root, entry["file"])):
            yield i, key, decode_sample(key, members, entry["file"]).fbank
            n += 1
        if n != entry["samples"]:
            raise ShardError(f"{entry['file']}: {n} samples, the index says {entry['samples']}")


def tag_entries(
    root: str,
    entries: list[dict],
    tagger: Tagger,
    options: TagOptions,
    generation: int,
    threads: int,
    progress: bool = True,
) -> list[dict]:
    """Tag the shards' clips and write their tag files; returns the entries with `tags` set."""
    from tqdm import tqdm

    if tagger.device.type == "cpu":
        torch.set_num_threads(threads)
    done: dict[int, tuple[list[str], list]] = {i: ([], []) for i in range(len(entries))}
    out = [dict(e) for e in entries]

    def flush(batch: list) -> None:
        tags = tagger.tag([f for _, _, f in batch], options.top_k, options.threshold, options.batch_size)
        for (i, key, _), clip_tags in zip(batch, tags, strict=True):
            keys, lists = done[i]
            keys.append(key)
            lists.append(clip_tags)
            if len(keys) == entries[i]["samples"]:
                out[i]["tags"] = tag_sidecar.write(root, entries[i]["file"], generation, keys, lists)
                del done[i]

    total = sum(e["samples"] for e in entries)
    batch: list = []
    with tqdm(total=total, unit="clip", desc="tag", disable=not progress) as bar:
        for clip in _clips(root, entries):
            batch.append(clip)
            if len(batch) == options.batch_size:
                flush(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            flush(batch)
            bar.update(len(batch))
    for i in list(done):  # shards without samples
        out[i]["tags"] = tag_sidecar.write(root, entries[i]["file"], generation, [], [])
    return out


def tag_set(
    root: str,
    options: TagOptions,
    threads: int,
    progress: bool = True,
    log=lambda msg: print(msg, file=sys.stderr),
    tagger: Tagger | None = None,
) -> dict:
    """`gama-ds tag`: (re-)tag a converted shard set in place; returns the new index."""
    index = read_index(root)
    options.check()  # before the model loads
    tagger = tagger or options.load()
    previous = index.get("provenance", {}).get("tagger") or {}
    generation = previous.get("generation", 0) + 1
    in_force = {e["tags"]["file"] for e in index["shards"] if "tags" in e}
    # The tagging before the current one, and what a tagging that stopped before its index left.
    strays = [n for n in os.listdir(root) if tag_sidecar.PATTERN.match(n.removesuffix(".tmp"))]
    _remove(root, [n for n in strays if n not in in_force])
    shards = tag_entries(root, index["shards"], tagger, options, generation, threads, progress)
    index["shards"] = shards
    index.setdefault("provenance", {})["tagger"] = provenance(tagger, options, generation)
    write_index(root, index)  # the files in force until now stay, for runs reading them
    clips = index["totals"]["samples"]
    log(f"{root}: {clips} clips in {len(shards)} shard(s) tagged (generation {generation})")
    return index


def write_index(root: str, index: dict) -> None:
    path = os.path.join(root, INDEX)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _remove(root: str, names: list[str]) -> None:
    for name in names:
        try:
            os.remove(os.path.join(root, name))
        except FileNotFoundError:
            pass
