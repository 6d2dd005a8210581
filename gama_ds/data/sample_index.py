"""The per-shard sample index: where each sample lies in its tar, its checksum, its QA lengths.

`gama-ds convert` writes it beside every shard as `shard-NNNNNN.idx.json` and names it, with
its sha256, in the shard's `index.json` entry (`sample_index`). With it a reader takes any part
of a shard: it reads one sample's bytes with one `pread` at its offset, instead of decoding the
tar from its start, and checks them against the checksum taken at conversion before the sample
is used, so a bit flip inside a sample's features is a bad sample, not a silent training input.
The checksum is xxHash's XXH3-64: zlib's CRC-32 took as long as decoding the sample, XXH3 an
eighth of that.

The tar itself is unchanged: stock `tarfile` and webdataset read the shards as before.

Shard sets converted before this index existed have no `sample_index` entries; readers then
locate the samples by scanning the shard's headers once (`scan`) and can check only the
samples' structure, not their bytes (a note says so when such a set is opened).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass

import numpy as np
import xxhash
from webdataset.tariterators import base_plus_ext

from ..errors import GamaDsError

FORMAT = "gama_ds.sample_index"
SUFFIX = ".idx.json"


class SampleIndexError(GamaDsError, ValueError):
    """A sample index that does not match its shard; the message names the shard."""


@dataclass
class SampleIndex:
    offsets: np.ndarray  # int64 [n + 1]: sample i's bytes are offsets[i]:offsets[i + 1]
    checksums: list[str] | None  # XXH3-64 of those bytes, hex; None for shards converted without
    qa_bytes: list[list[int]]  # per sample, per QA pair: UTF-8 bytes of instruction, input, output

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "offsets": self.offsets.tolist(),
            "xxh3_64": self.checksums,
            "qa_bytes": self.qa_bytes,
        }


def checksum(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def index_file(shard_file: str) -> str:
    """shard-000012.tar -> shard-000012.idx.json"""
    return os.path.splitext(shard_file)[0] + SUFFIX


def qa_lengths(meta: dict) -> list[int]:
    return [
        sum(len(str(pair.get(f, "")).encode("utf-8")) for f in ("instruction", "input", "output"))
        for pair in meta.get("qa", [])
    ]


def split_members(data: bytes, where: str) -> tuple[str, dict[str, bytes]]:
    """One sample's tar records (as cut out by its offsets) -> (key, {ext: bytes}).

    Plain ustar headers are parsed one block at a time by tarfile's own `TarInfo.frombuf`
    (which checks each header's checksum); records with extended headers (pax, GNU long
    names) go through a whole `tarfile` reader. The first way costs a tenth of the second.
    """
    key, members, pos = None, {}, 0
    try:
        while pos + tarfile.BLOCKSIZE <= len(data):
            info = tarfile.TarInfo.frombuf(data[pos : pos + tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
            if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                return _split_with_tarfile(data, where)
            start = pos + tarfile.BLOCKSIZE
            key = _add_member(members, key, info.name, data[start : start + info.size])
            pos = start + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    except tarfile.TarError as err:
        raise SampleIndexError(f"{where}: unreadable sample records: {err}") from err
    if key is None:
        raise SampleIndexError(f"{where}: no sample at this offset")
    return key, members


def _add_member(members: dict, key: str | None, name: str, payload: bytes) -> str:
    k, ext = base_plus_ext(name)
    if k is None or (key is not None and k != key):
        raise tarfile.TarError(f"member {name!r} does not belong to sample {key!r}")
    if ext in members:
        raise tarfile.TarError(f"sample {k!r} has {ext} twice")
    members[ext] = payload
    return k


def _split_with_tarfile(data: bytes, where: str) -> tuple[str, dict[str, bytes]]:
    key, members = None, {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    key = _add_member(members, key, info.name, tar.extractfile(info).read())
    except tarfile.TarError as err:
        raise SampleIndexError(f"{where}: unreadable sample records: {err}") from err
    if key is None:
        raise SampleIndexError(f"{where}: no sample at this offset")
    return key, members


def _ranges(path: str) -> list[list]:
    """[key, first byte, end byte, (json offset, json size)] per sample, from the tar's headers
    alone (members' data is skipped)."""
    out: list[list] = []
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            k, ext = base_plus_ext(info.name)
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if out and out[-1][0] == k:
                out[-1][2] = end
            else:
                out.append([k, info.offset, end, None])
            if ext == "json":
                out[-1][3] = (info.offset_data, info.size)
    return out


def _qa_lengths(data: bytes) -> list[int]:
    try:
        return qa_lengths(json.loads(data))
    except (ValueError, AttributeError):
        return []  # a broken sample: the reader reports it when it meets it


def scan(path: str, checksums: bool) -> SampleIndex:
    """Build a shard's sample index from the shard: at conversion (with checksums, reading every
    byte), or for a shard set converted before sample indexes existed (without: there is nothing
    to check the bytes against, and only the headers and the small JSON members are read)."""
    ranges = _ranges(path)
    offsets = np.array([r[1] for r in ranges] + [ranges[-1][2] if ranges else 0], dtype=np.int64)
    if len(ranges) > 1 and np.any(offsets[1:-1] != np.array([r[2] for r in ranges[:-1]])):
        raise SampleIndexError(f"{os.path.basename(path)}: samples are not contiguous in the tar")
    sums, qa = [], []
    with open(path, "rb") as f:
        for key, start, end, meta in ranges:
            if checksums:
                data = os.pread(f.fileno(), end - start, start)
                sums.append(checksum(data))
                _, members = split_members(data, f"{os.path.basename(path)}: sample {key!r}")
                qa.append(_qa_lengths(members.get("json", b"")))
            else:
                qa.append(_qa_lengths(os.pread(f.fileno(), meta[1], meta[0]) if meta else b""))
    return SampleIndex(offsets, sums if checksums else None, qa)


def write(shard_path: str, index: SampleIndex) -> str:
    """Write the index beside its shard (tmp + rename, like the shard); returns its file name."""
    name = index_file(os.path.basename(shard_path))
    final = os.path.join(os.path.dirname(shard_path), name)
    with open(final + ".tmp", "w", encoding="utf-8") as f:
        json.dump(index.to_json(), f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(final + ".tmp", final)
    return name


def load(root: str, entry: dict) -> SampleIndex:
    """The sample index of one shard entry: its file when the entry names one, else a scan."""
    shard = entry["file"]
    ref = entry.get("sample_index")
    if ref is None:
        return scan(os.path.join(root, shard), checksums=False)
    path = os.path.join(root, ref["file"])
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise SampleIndexError(f"{shard}: sample index {ref['file']} unreadable: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SampleIndexError(f"{shard}: {ref['file']} is not a {FORMAT} file")
    offsets = np.asarray(data["offsets"], dtype=np.int64)
    n = entry["samples"]
    if len(offsets) != n + 1 or len(data["qa_bytes"]) != n or len(data["xxh3_64"] or [0] * n) != n:
        raise SampleIndexError(f"{shard}: {ref['file']} lists {len(offsets) - 1} samples, the index says {n}")
    return SampleIndex(offsets, data["xxh3_64"], data["qa_bytes"])
