"""`gama-ds verify` passes a sound shard set and names shard and sample for every fault."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from gama_ds.cli import main
from gama_ds.data import sample_index
from gama_ds.data.convert import ConvertOptions, convert
from gama_ds.data.shards import ShardError, decode_sample, sha256_file, verify


@pytest.fixture
def shard_set(qa_set, tmp_path):
    out = tmp_path / "out"
    convert([qa_set["gama"]], str(out), ConvertOptions(shard_samples=3), workers=1, progress=False)
    return out


def edit_index(out, change):
    index = json.loads((out / "index.json").read_text())
    change(index)
    (out / "index.json").write_text(json.dumps(index))


def reseal(out, name):
    """Make the index agree with a rewritten shard, so only the fault under test remains."""

    def change(index):
        entry = next(e for e in index["shards"] if e["file"] == name)
        side = sample_index.write(str(out / name), sample_index.scan(str(out / name), checksums=True))
        entry["sample_index"]["sha256"] = sha256_file(out / side)
        delta = os.path.getsize(out / name) - entry["bytes"]
        entry["bytes"] += delta
        entry["sha256"] = sha256_file(out / name)
        index["totals"]["bytes"] += delta

    edit_index(out, change)


def rewrite_shard(path, keep=lambda info: True, replace=None):
    """Copy a shard member by member, dropping or replacing some, with tar's own writer."""
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as dst:
        for info, data in members:
            if not keep(info):
                continue
            if replace and info.name in replace:
                data = replace[info.name]
                info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return [m.name for m, _ in members]


def test_a_sound_set_passes(shard_set):
    problems, seen = verify(str(shard_set))
    assert problems == [] and seen == {"shards": 3, "samples": 8}
    assert main(["verify", str(shard_set)]) == 0


def test_a_flipped_byte_is_caught(shard_set):
    path = shard_set / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    problems, _ = verify(str(shard_set))
    assert any(p.startswith("shard-000001.tar: sha256") for p in problems)
    assert main(["verify", str(shard_set)]) == 1


def test_bit_flips_inside_features_are_named_by_sample(shard_set):
    path = shard_set / "shard-000001.tar"
    with tarfile.open(path) as tar:
        info = [m for m in tar.getmembers() if m.name.endswith(".npy")][1]
    data = bytearray(path.read_bytes())
    for i in range(info.offset_data + 256, info.offset_data + 656):
        data[i] ^= 0x01  # the low mantissa bit: every value stays finite
    path.write_bytes(bytes(data))
    problems, _ = verify(str(shard_set))
    assert "shard-000001.tar: sample #1: checksum differs from shard-000001.idx.json's" in problems


def test_a_truncated_shard_is_caught(shard_set):
    path = shard_set / "shard-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    problems, _ = verify(str(shard_set))
    assert any(p.startswith("shard-000000.tar:") and "bytes, index says" in p for p in problems)
    assert any(p.startswith("shard-000000.tar: unreadable tar") for p in problems)


def test_a_missing_key_names_shard_and_sample(shard_set):
    path = shard_set / "shard-000002.tar"
    with tarfile.open(path) as tar:
        first_json = next(m.name for m in tar.getmembers() if m.name.endswith(".json"))
    names = rewrite_shard(path, keep=lambda info: info.name != first_json)
    assert first_json in names
    reseal(shard_set, "shard-000002.tar")
    problems, _ = verify(str(shard_set))
    key = first_json.split(".")[0]
    assert f"shard-000002.tar: sample {key!r}: missing json" in problems


def test_a_count_mismatch_is_caught(shard_set):
    def change(index):
        index["shards"][0]["samples"] += 1
        index["totals"]["samples"] += 1

    edit_index(shard_set, change)
    problems, _ = verify(str(shard_set))
    assert problems == ["shard-000000.tar: 3 samples (3 valid), index says 4"]


def test_per_sample_qa_counts_are_checked(shard_set):
    def change(index):
        counts = index["shards"][0]["qa_per_sample"]
        counts[0], counts[1] = counts[0] + 1, counts[1] - 1  # same total, wrong samples

    edit_index(shard_set, change)
    problems, _ = verify(str(shard_set))
    assert problems == ["shard-000000.tar: QA pairs per sample differ from the index's qa_per_sample"]


def test_duplicate_keys_and_unlisted_shards_are_caught(shard_set):
    shutil.copy(shard_set / "shard-000000.tar", shard_set / "shard-000003.tar")
    problems, _ = verify(str(shard_set))
    assert problems == ["shard-000003.tar: shard file not listed in index.json"]

    def change(index):
        index["shards"].append({**index["shards"][0], "file": "shard-000003.tar"})
        for field in ("samples", "qa_pairs", "bytes"):
            index["totals"][field] += index["shards"][0][field]
        index["totals"]["shards"] += 1

    edit_index(shard_set, change)
    problems, _ = verify(str(shard_set), workers=2)
    assert len(problems) == 3 and all("duplicates a key in shard-000000.tar" in p for p in problems)


def test_pickled_features_are_refused_without_unpickling(shard_set):
    buf = io.BytesIO()
    np.save(buf, np.array([{"boom": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ShardError, match="not a plain .npy array"):
        decode_sample("k", {"fbank.npy": buf.getvalue(), "json": b"{}"}, "shard-x.tar")
    path = shard_set / "shard-000001.tar"
    with tarfile.open(path) as tar:
        npy = next(m.name for m in tar.getmembers() if m.name.endswith(".npy"))
    rewrite_shard(path, replace={npy: buf.getvalue()})
    reseal(shard_set, "shard-000001.tar")
    problems, _ = verify(str(shard_set))
    assert f"sample {npy.split('.')[0]!r}: fbank.npy is not a plain .npy array" in problems[0]
    assert problems[1:] == [
        "shard-000001.tar: 3 samples (2 valid), index says 3",
        "shard-000001.tar: 2 QA pairs in valid samples, index says 5",
    ]


def test_wrong_dtype_and_frame_count_are_named(shard_set):
    ok = {
        "fbank.npy": None,
        "json": json.dumps(
            {
                "n_frames": 5,
                "qa": [{"instruction": "q", "input": "", "output": "a", "dataset": "", "task": ""}],
            }
        ).encode(),
    }
    for array, match in (
        (np.zeros((5, 128), np.float32), "float32 \\[5, 128\\], expected float16"),
        (np.zeros((4, 128), np.float16), "n_frames 5 but fbank.npy has 4 rows"),
        (np.full((5, 128), np.nan, np.float16), "NaN or inf"),
    ):
        buf = io.BytesIO()
        np.save(buf, array)
        with pytest.raises(ShardError, match=match):
            decode_sample("k", {**ok, "fbank.npy": buf.getvalue()}, "shard-x.tar")
