"""Per-shard tag files: a shard's clips' audio event tags, beside the shard, outside its tar.

`gama-ds tag` (or `gama-ds convert --tagger`) writes `shard-NNNNNN.tags.G.json` for every shard
and names it with its sha256 in the shard's `index.json` entry (`tags`); G counts the taggings of
the set, so a new tagging never writes over the files the current index names: an interrupted
one leaves the set as it was. The tars are never rewritten. Readers (`iter_samples`, the
training stream) merge a clip's tags into `Sample.meta["tags"]` / `Example.tags`.

A clip's tags: [[label, score], ...], score-descending; [] when no label passed the tagging's
top_k and threshold. docs/FORMAT.md is the spec.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

from ..errors import GamaDsError

FORMAT = "gama_ds.tags"
PATTERN = re.compile(r"^shard-\d{6}\.tags\.\d+\.json$")


class TagsError(GamaDsError, ValueError):
    """A shard's tag file that does not match the index or its shard; the message names the shard.
    Readers raise it as their ShardError (a bad sample)."""


def file_name(shard_file: str, generation: int) -> str:
    """shard-000012.tar, 3 -> shard-000012.tags.3.json"""
    return f"{os.path.splitext(shard_file)[0]}.tags.{generation}.json"


def write(root: str, shard_file: str, generation: int, keys: list[str], tags: list[list]) -> dict:
    """Write one shard's tags (tmp, fsync, rename); returns the index entry's `tags` value."""
    name = file_name(shard_file, generation)
    path = os.path.join(root, name)
    doc = {"format": FORMAT, "shard": shard_file, "keys": keys, "tags": [[list(t) for t in c] for c in tags]}
    data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest()}


def load(root: str, entry: dict) -> tuple[list[str], list[list]] | None:
    """(keys, tags) of a shard entry, checked against the index; None for an untagged shard."""
    ref = entry.get("tags")
    if ref is None:
        return None
    shard = entry["file"]
    path = os.path.join(root, ref["file"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise TagsError(f"{shard}: its tags {ref['file']} are unreadable: {err}") from None
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise TagsError(
            f"{shard}: its tags {ref['file']} changed since tagging (sha256 differs from the index's)"
        )
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TagsError(f"{shard}: its tags {ref['file']} are not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("shard") != shard:
        raise TagsError(f"{shard}: {ref['file']} is not a {FORMAT} file of this shard")
    keys, tags = doc.get("keys"), doc.get("tags")
    if (
        not isinstance(keys, list)
        or not isinstance(tags, list)
        or not len(keys) == len(tags) == entry["samples"]
    ):
        raise TagsError(f"{shard}: {ref['file']} does not list one tag list per sample ({entry['samples']})")
    return keys, tags


def problems(
    root: str, entry: dict, keys: list[str], top_k: int | None, threshold: float | None
) -> list[str]:
    """What `gama-ds verify` finds wrong with a shard's tags, given the keys the shard holds."""
    try:
        loaded = load(root, entry)
    except TagsError as err:
        return [str(err)]
    if loaded is None:
        return []
    name = entry["tags"]["file"]
    stored_keys, tags = loaded
    if stored_keys != keys:
        return [f"{entry['file']}: {name} lists other sample keys than the shard holds"]
    out = []
    for key, clip in zip(keys, tags, strict=True):
        if not _valid(clip, top_k, threshold):
            out.append(
                f"{entry['file']}: sample {key!r}: tags in {name} are not [label, score] pairs, "
                f"score-descending, at most top_k {top_k}, each at least threshold {threshold}"
            )
    return out


def _valid(clip, top_k: int | None, threshold: float | None) -> bool:
    if not isinstance(clip, list) or (top_k is not None and len(clip) > top_k):
        return False
    last = math.inf
    for pair in clip:
        ok = isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
        score = pair[1] if ok else None
        if not ok or isinstance(score, bool) or not isinstance(score, (int, float)):
            return False
        if not 0.0 <= score <= last or (threshold is not None and score < threshold):
            return False
        last = score
    return True


def merge(samples, tagged: tuple[list[str], list[list]] | None, where: str):
    """Yield `samples` with meta["tags"] set from the shard's tags, checking keys line up."""
    if tagged is None:
        yield from samples
        return
    keys, tags = tagged
    for i, sample in enumerate(samples):
        if i >= len(keys) or keys[i] != sample.key:
            raise TagsError(f"{where}: sample {sample.key!r} (#{i}) is not the tags' sample #{i}")
        sample.meta["tags"] = tags[i]
        yield sample
