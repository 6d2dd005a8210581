"""Writes samples into shard-NNNNNN.tar files, rolling over at a sample count or a size.

Each shard is written to `<name>.tmp`, fsynced and renamed, so a shard file that exists is
complete; its sample index (offsets, checksums, QA lengths: data/sample_index.py) is written
beside it the same way, and its entry (counts, bytes, sha256, the sample index) is then handed
to a callback.
"""

from __future__ import annotations

import os
import tarfile

import webdataset as wds

from . import sample_index
from .shards import SHARD_FIELDS, sha256_file, shard_name


class ShardWriter:
    """Writes samples into shard-NNNNNN.tar files, rolling over at the configured limits."""

    def __init__(self, out: str, start: int, max_samples: int | None, max_bytes: int | None, on_shard):
        self.out, self.next_index, self.on_shard = out, start, on_shard
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.writer = self.file = None
        self.samples = self.qa_pairs = self.size = 0
        self.qa_per_sample: list[int] = []

    def add(self, key: str, members: dict[str, bytes], qa_pairs: int, clip_index: int) -> None:
        grow = sum(tarfile.BLOCKSIZE * (1 + -(-len(v) // tarfile.BLOCKSIZE)) for v in members.values())
        full_count = self.max_samples and self.samples + 1 > self.max_samples
        full_bytes = self.max_bytes and _closed_size(self.size + grow) > self.max_bytes
        if self.writer is not None and (full_count or full_bytes):
            self.finish(next_clip=clip_index)
        if self.writer is None:
            self.file = open(self._path(tmp=True), "wb")
            # Fixed member metadata: the same samples always give the same bytes.
            self.writer = wds.TarWriter(
                self.file, encoder=False, mtime=0, user="gama_ds", group="gama_ds", mode=0o444
            )
        self.writer.write({"__key__": key, **members})
        self.samples += 1
        self.qa_pairs += qa_pairs
        self.qa_per_sample.append(qa_pairs)
        self.size += grow

    def finish(self, next_clip: int) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        tmp, final = self._path(tmp=True), self._path(tmp=False)
        os.replace(tmp, final)
        size, digest = os.path.getsize(final), sha256_file(final)
        values = (os.path.basename(final), self.samples, self.qa_pairs, size, digest, self.qa_per_sample)
        entry = dict(zip(SHARD_FIELDS, values, strict=True))
        name = sample_index.write(final, sample_index.scan(final, checksums=True))
        entry["sample_index"] = {"file": name, "sha256": sha256_file(os.path.join(self.out, name))}
        self.on_shard(entry, next_clip)
        self.writer = self.file = None
        self.samples = self.qa_pairs = self.size = 0
        self.qa_per_sample = []
        self.next_index += 1

    def _path(self, tmp: bool) -> str:
        return os.path.join(self.out, shard_name(self.next_index) + (".tmp" if tmp else ""))


def _closed_size(content: int) -> int:
    """A tar's file size once closed: two zero blocks, padded to whole 10 KiB records."""
    return -(-(content + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
