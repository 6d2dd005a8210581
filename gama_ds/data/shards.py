"""The shard format: index reading, safe sample decoding and verification.

A shard is a plain tar; each sample is `<key>.fbank.npy` (float16 [n_frames, 128], written
without pickle) and `<key>.json` (clip metadata and its QA list). `index.json` beside the
shards lists every shard with its counts, size and sha256. docs/FORMAT.md is the spec.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from webdataset.tariterators import base_plus_ext

from ..audio import NUM_MEL_BINS, TARGET_FRAMES
from ..errors import GamaDsError
from . import tag_sidecar
from .pool import ordered_map

INDEX = "index.json"
REJECTS = "rejects.jsonl"
FORMAT = "gama_ds.shards"
FORMAT_VERSION = 1
FBANK = "fbank.npy"
META = "json"
MEMBERS = (FBANK, META)
SHARD_PATTERN = re.compile(r"^shard-\d{6}\.tar$")
SAMPLE_INDEX_PATTERN = re.compile(r"^shard-\d{6}\.idx\.json$")
QA_FIELDS = ("instruction", "input", "output", "dataset", "task")
# One index entry, in order; qa_per_sample lets the stream plan exact example counts.
SHARD_FIELDS = ("file", "samples", "qa_pairs", "bytes", "sha256", "qa_per_sample")
# Written since per-sample indexes exist ({file, sha256} of the shard's data/sample_index.py
# file); absent in older shard sets, which stay readable. `tags`: {file, sha256} of the shard's
# data/tag_sidecar.py file, once the set is tagged.
OPTIONAL_FIELDS = ("sample_index", "tags")


class ShardError(GamaDsError, ValueError):
    """A shard or sample that does not match the format; the message names where."""


@dataclass
class Sample:
    key: str
    fbank: np.ndarray  # float16 [n_frames, 128], unpadded
    meta: dict


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def read_index(root: str) -> dict:
    path = os.path.join(root, INDEX)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise ShardError(f"{path}: no index; is {root} a gama-ds convert output?") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ShardError(f"{path}: unreadable index: {err}") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} index")
    if index.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format version {index.get('format_version')}, this gama_ds reads {FORMAT_VERSION}"
        )
    for i, entry in enumerate(index.get("shards", [])):
        missing = [k for k in SHARD_FIELDS if k not in entry]
        if missing:
            raise ShardError(f"{path}: shards[{i}] lacks {', '.join(missing)}")
    return index


def encode_features(fbank: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(fbank, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_sample(fbank: np.ndarray, meta: dict) -> dict[str, bytes]:
    return {FBANK: encode_features(fbank), META: encode_meta(meta)}


@lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[tuple, bool, np.dtype]:
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def load_npy(data: bytes) -> np.ndarray:
    """np.load without pickle, with the header parse memoised.

    numpy parses every header with ast.literal_eval, which costs as much as the rest of a
    sample's decoding; clips of equal length share one header, so each is parsed once.
    """
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        raise ValueError("no .npy magic")
    wide = data[6] >= 2  # versions 2 and 3 have a 4-byte header length
    start = 12 + int.from_bytes(data[8:12], "little") if wide else 10 + int.from_bytes(data[8:10], "little")
    shape, fortran, dtype = _npy_header(bytes(data[:start]))
    if dtype.hasobject:
        raise ValueError("object arrays would need unpickling; refused")
    count = math.prod(shape)
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f"{len(data) - start} data bytes for shape {shape} of {dtype}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


def decode_sample(key: str, members: dict[str, bytes], where: str) -> Sample:
    """Check and decode one sample's members; never unpickles. `where` names the shard."""
    at = f"{where}: sample {key!r}"
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise ShardError(f"{at}: missing {', '.join(missing)}")
    extra = sorted(set(members) - set(MEMBERS))
    if extra:
        raise ShardError(f"{at}: unexpected member(s) {', '.join(extra)}")
    try:
        fbank = load_npy(members[FBANK])
    except ValueError as err:
        raise ShardError(f"{at}: {FBANK} is not a plain .npy array: {err}") from err
    if fbank.dtype != np.float16 or fbank.ndim != 2 or fbank.shape[1] != NUM_MEL_BINS:
        raise ShardError(
            f"{at}: {FBANK} is {fbank.dtype} {list(fbank.shape)}, expected float16 [n, {NUM_MEL_BINS}]"
        )
    if not 1 <= fbank.shape[0] <= TARGET_FRAMES:
        raise ShardError(f"{at}: {fbank.shape[0]} frames, expected 1..{TARGET_FRAMES}")
    # An all-ones float16 exponent is inf or NaN; the integer test is 20x faster than isfinite.
    if np.bitwise_and(fbank.view(np.uint16), 0x7C00).max() == 0x7C00:
        raise ShardError(f"{at}: {FBANK} holds NaN or inf")
    try:
        meta = json.loads(members[META].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{at}: {META} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ShardError(f"{at}: {META} is not an object")
    if meta.get("n_frames") != fbank.shape[0]:
        raise ShardError(f"{at}: n_frames {meta.get('n_frames')} but {FBANK} has {fbank.shape[0]} rows")
    qa = meta.get("qa")
    if not isinstance(qa, list) or not qa:
        raise ShardError(f"{at}: no QA pairs")
    for j, pair in enumerate(qa):
        if not isinstance(pair, dict) or not all(isinstance(pair.get(f), str) for f in QA_FIELDS):
            raise ShardError(f"{at}: qa[{j}] lacks one of {', '.join(QA_FIELDS)} as text")
    return Sample(key, fbank, meta)


def iter_members(path: str):
    """Yield (key, {ext: bytes}) per sample in tar order, raising ShardError.

    Members of one sample are adjacent, as webdataset requires; a key seen again later is
    yielded again so callers can report duplicates. The seekable "r:" mode over a buffered
    file reads each member in one call; the "r|" stream mode copies it in 10 KiB records and
    is half as fast.
    """
    name = os.path.basename(path)
    key, members = None, {}
    try:
        with open(path, "rb", buffering=1 << 20) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = base_plus_ext(info.name)  # webdataset's own key rule
                if k is None:
                    raise ShardError(f"{name}: member {info.name!r} has no <key>.<ext> name")
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                if ext in members:
                    raise ShardError(f"{name}: sample {k!r} has {ext} twice")
                members[ext] = tar.extractfile(info).read()
    except tarfile.TarError as err:
        raise ShardError(f"{name}: unreadable tar after sample {key!r}: {err}") from err
    if key is not None:
        yield key, members


def iter_samples(path: str):
    """The shard's samples, checked, with their tags in meta["tags"] when the index beside the
    shard names tags for it."""
    name = os.path.basename(path)
    samples = (decode_sample(key, members, name) for key, members in iter_members(path))
    try:
        yield from tag_sidecar.merge(samples, _tags_beside(path), name)
    except tag_sidecar.TagsError as err:
        raise ShardError(str(err)) from None


def load_tags(root: str, entry: dict) -> tuple[list[str], list[list]] | None:
    """(keys, tags) of a shard entry's tag file, checked against the index; None if untagged."""
    try:
        return tag_sidecar.load(root, entry)
    except tag_sidecar.TagsError as err:
        raise ShardError(str(err)) from None


def _tags_beside(path: str) -> tuple[list[str], list[list]] | None:
    root, name = os.path.split(path)
    where = os.path.join(root or ".", INDEX)
    try:
        st = os.stat(where)
    except OSError:
        return None  # a shard on its own: nothing to merge
    entry = _index_entries(where, st.st_ino, st.st_mtime_ns, st.st_size).get(name)
    return None if entry is None else load_tags(root or ".", entry)


@lru_cache(maxsize=8)
def _index_entries(path: str, _ino: int, _mtime: int, _size: int) -> dict[str, dict]:
    """The index's shard entries by file name; the stat values key the cache, so a rewritten
    index (a new tagging) is read again."""
    return {e["file"]: e for e in read_index(os.path.dirname(path))["shards"]}


def verify_shard(root: str, entry: dict, tagging: dict | None = None) -> tuple[list[str], list[str]]:
    """Check one shard against its index entry (and its tags against the index's `tagging`
    provenance). Returns (problems, keys seen)."""
    name = entry["file"]
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        return [f"{name}: listed in the index but missing"], []
    problems = []
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes, index says {entry['bytes']}")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        problems.append(f"{name}: sha256 {digest[:16]}..., index says {entry['sha256'][:16]}...")
    keys, samples, qa_pairs, per_sample = [], 0, 0, []
    try:
        for key, members in iter_members(path):
            keys.append(key)
            try:
                sample = decode_sample(key, members, name)
            except ShardError as err:
                problems.append(str(err))
                per_sample.append(None)
                continue
            samples += 1
            qa_pairs += len(sample.meta["qa"])
            per_sample.append(len(sample.meta["qa"]))
    except ShardError as err:
        problems.append(str(err))
    if samples != entry["samples"] or len(keys) != entry["samples"]:
        problems.append(f"{name}: {len(keys)} samples ({samples} valid), index says {entry['samples']}")
    if qa_pairs != entry["qa_pairs"]:
        problems.append(f"{name}: {qa_pairs} QA pairs in valid samples, index says {entry['qa_pairs']}")
    elif per_sample != entry["qa_per_sample"]:
        problems.append(f"{name}: QA pairs per sample differ from the index's qa_per_sample")
    problems.extend(_verify_sample_index(root, entry))
    tagging = tagging or {}
    problems.extend(tag_sidecar.problems(root, entry, keys, tagging.get("top_k"), tagging.get("threshold")))
    return problems, keys


def _verify_sample_index(root: str, entry: dict) -> list[str]:
    """The shard's sample index: present, unchanged, and true of the shard as it is now."""
    from . import sample_index

    ref = entry.get("sample_index")
    if ref is None:
        return []
    path = os.path.join(root, ref["file"])
    if not os.path.isfile(path):
        return [f"{entry['file']}: its sample index {ref['file']} is missing"]
    if sha256_file(path) != ref["sha256"]:
        return [f"{ref['file']}: sha256 differs from the index's"]
    try:
        fresh = sample_index.scan(os.path.join(root, entry["file"]), checksums=True)
        # Checked against the shard as it is; the shard against index.json is checked above.
        stored = sample_index.load(root, dict(entry, samples=len(fresh)))
    except (sample_index.SampleIndexError, tarfile.TarError, OSError) as err:
        return [f"{ref['file']}: {err}"]
    same = len(stored) == len(fresh)
    bad = (
        [i for i, (a, b) in enumerate(zip(stored.checksums, fresh.checksums, strict=True)) if a != b]
        if same
        else []
    )
    if len(stored) != len(fresh) or not np.array_equal(stored.offsets, fresh.offsets):
        return [f"{ref['file']}: sample offsets differ from the shard's"]
    return [f"{entry['file']}: sample #{i}: checksum differs from {ref['file']}'s" for i in bad]


def verify(root: str, workers: int = 1, progress: bool = False) -> tuple[list[str], dict]:
    """Check a shard directory against its index. Returns (problems, totals seen)."""
    index = read_index(root)
    entries = index["shards"]
    problems: list[str] = []
    listed = {e["file"] for e in entries}
    indexes = {e["sample_index"]["file"] for e in entries if "sample_index" in e}
    for name in sorted(os.listdir(root)):
        if SHARD_PATTERN.match(name) and name not in listed:
            problems.append(f"{name}: shard file not listed in {INDEX}")
        if SAMPLE_INDEX_PATTERN.match(name) and name not in indexes:
            problems.append(f"{name}: sample index not listed in {INDEX}")
    totals = index.get("totals", {})
    for field_, key in (
        ("shards", None),
        ("samples", "samples"),
        ("qa_pairs", "qa_pairs"),
        ("bytes", "bytes"),
    ):
        want = len(entries) if key is None else sum(e[key] for e in entries)
        if totals.get(field_) != want:
            problems.append(
                f"{INDEX}: totals.{field_} is {totals.get(field_)}, the shard entries add up to {want}"
            )
    from tqdm import tqdm

    seen: dict[str, str] = {}
    samples = 0
    tagging = index.get("provenance", {}).get("tagger")
    if tagging is not None and any("tags" not in e for e in entries):
        problems.append(f"{INDEX}: the set is tagged but some shards have no tags")
    if tagging is None and any("tags" in e for e in entries):
        problems.append(f"{INDEX}: shards name tags but the provenance has no tagger")
    jobs = [(root, e, tagging) for e in entries]
    with ordered_map(_verify_entry, jobs, min(workers, len(jobs)), window=len(jobs)) as results:
        bar = tqdm(results, total=len(jobs), unit="shard", desc="verify", disable=not progress)
        for entry, (shard_problems, keys) in zip(entries, bar, strict=True):
            problems.extend(shard_problems)
            samples += len(keys)
            for key in keys:
                if key in seen:
                    problems.append(f"{entry['file']}: sample {key!r} duplicates a key in {seen[key]}")
                else:
                    seen[key] = entry["file"]
    return problems, {"shards": len(entries), "samples": samples}


def _verify_entry(args: tuple[str, dict, dict | None]):
    return verify_shard(*args)
