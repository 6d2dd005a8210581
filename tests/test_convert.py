"""`gama-ds convert` writes one sample per clip, deterministically, resumably, with rejects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager

import numpy as np
import pytest
import soundfile
import webdataset as wds
import xxhash

from conftest import CLIPS, write_audio, write_json, write_jsonl
from gama_ds import audio
from gama_ds.cli import main
from gama_ds.data import sample_index
from gama_ds.data.convert import PROGRESS, ConvertError, ConvertOptions, convert
from gama_ds.data.shards import iter_samples, read_index
from gama_ds.errors import GamaDsError


def run(inputs, out, workers=1, **opts):
    return convert(
        inputs, str(out), ConvertOptions(**opts), workers=workers, progress=False, log=lambda m: None
    )


def shard_paths(out):
    return [os.path.join(out, s["file"]) for s in read_index(str(out))["shards"]]


def all_samples(out):
    return [s for p in shard_paths(out) for s in iter_samples(p)]


def tree_bytes(out) -> dict[str, bytes]:
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}


def test_one_sample_per_clip_holds_all_its_qa_pairs_and_exact_features(qa_set, tmp_path):
    result = run([qa_set["gama"], qa_set["aqa"]], tmp_path / "out", shard_samples=3)
    samples = all_samples(tmp_path / "out")
    assert len(samples) == len(CLIPS) == result.index["totals"]["samples"]
    assert len({s.key for s in samples}) == len(CLIPS)
    assert sum(len(s.meta["qa"]) for s in samples) == qa_set["qa_pairs"] == result.index["totals"]["qa_pairs"]
    by_audio = {s.meta["audio"]: s for s in samples}
    a = by_audio["audio/a.wav"]
    assert [q["instruction"] for q in a.meta["qa"]] == ["q0 about a.wav?", "What is it?"]
    assert a.meta["qa"][1]["source"] == f"{qa_set['aqa']}:1"
    for name, seconds, sr, channels, _ in CLIPS:
        sample = by_audio[f"audio/{name}"]
        feats, info = audio.load_features(qa_set["root"] / "audio" / name)
        np.testing.assert_array_equal(sample.fbank, feats.astype(np.float16))
        assert sample.meta["sample_rate"] == sr and sample.meta["channels"] == channels
        assert sample.meta["n_frames"] == len(feats) and sample.meta["duration"] == pytest.approx(
            seconds, abs=1e-3
        )
        assert sample.meta["truncated"] == (seconds > 10.24)
        assert sample.meta["path"] == os.path.realpath(qa_set["root"] / "audio" / name)
    assert [s["samples"] for s in result.index["shards"]] == [3, 3, 2]
    assert result.rejects == [] and not result.failed


def test_index_records_recipe_backend_and_provenance(qa_set, tmp_path):
    index = run([qa_set["gama"]], tmp_path / "out").index
    assert index["features"]["backend"] == "torchaudio"
    assert (
        index["features"]["fbank"]["num_mel_bins"] == 128
        and index["features"]["pad_value"] == audio.PAD_VALUE
    )
    prov = index["provenance"]
    assert [i["file"] for i in prov["inputs"]] == [qa_set["gama"]]
    assert len(prov["inputs"][0]["sha256"]) == 64 and "torchaudio" in prov["libraries"]
    assert prov["options"]["seed"] == 0 and "gama_ds" in prov


def test_same_inputs_give_byte_identical_output_whatever_the_worker_count(qa_set, tmp_path):
    inputs = [qa_set["gama"], qa_set["aqa"]]
    run(inputs, tmp_path / "one", workers=1, shard_samples=3, seed=5)
    run(inputs, tmp_path / "two", workers=2, shard_samples=3, seed=5)
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")
    run(inputs, tmp_path / "other", shard_samples=3, seed=6)
    keys = lambda out: [s.key for s in all_samples(out)]  # noqa: E731
    assert keys(tmp_path / "one") != keys(tmp_path / "other")
    assert sorted(keys(tmp_path / "one")) == sorted(keys(tmp_path / "other"))


@pytest.mark.parametrize("limit", [100_000, 128 * 1024, 152_576, 300_000])
def test_shards_never_pass_the_size_limit_unless_one_sample_does(qa_set, tmp_path, limit):
    result = run([qa_set["gama"]], tmp_path / "out", shard_bytes=limit)
    shards = result.index["shards"]
    assert len(shards) > 1
    for shard in shards:
        assert shard["bytes"] == os.path.getsize(tmp_path / "out" / shard["file"])
        assert shard["bytes"] <= limit or shard["samples"] == 1, shard


def test_stock_webdataset_and_tar_read_the_shards(qa_set, tmp_path):
    out = tmp_path / "out"
    run([qa_set["gama"]], out, shard_samples=4)
    urls = shard_paths(out)
    seen = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(seen) == len(CLIPS)
    for sample in seen:
        assert sample["fbank.npy"].dtype == np.float16 and sample["fbank.npy"].shape[1] == 128
        assert sample["json"]["n_frames"] == sample["fbank.npy"].shape[0] and sample["json"]["qa"]
    listing = subprocess.run(["tar", "-tvf", urls[0]], capture_output=True, text=True, check=True).stdout
    names = [line.split()[-1] for line in listing.splitlines()]
    assert len(names) == 8 and all(n.endswith((".fbank.npy", ".json")) for n in names)
    with tarfile.open(urls[0]) as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_each_shard_has_a_sample_index_that_locates_and_checksums_its_samples(qa_set, tmp_path):
    out = tmp_path / "out"
    run([qa_set["gama"]], out, shard_samples=3)
    for entry in read_index(str(out))["shards"]:
        index = sample_index.load(str(out), entry)
        path = out / entry["file"]
        with open(path, "rb") as f:
            spans = list(zip(index.offsets[:-1].tolist(), index.offsets[1:].tolist(), strict=True))
            pieces = [os.pread(f.fileno(), end - start, start) for start, end in spans]
        # Each span is exactly one sample, in tar order, and its checksum (XXH3-64) is the stored one.
        in_tar = [(s.key, s.meta) for s in iter_samples(str(path))]
        cut = [sample_index.split_members(piece, entry["file"]) for piece in pieces]
        assert [key for key, _ in cut] == [key for key, _ in in_tar]
        assert [json.loads(m["json"]) for _, m in cut] == [meta for _, meta in in_tar]
        assert index.checksums == [xxhash.xxh3_64_hexdigest(piece) for piece in pieces]
        assert [len(q) for q in index.qa_bytes] == entry["qa_per_sample"]
        assert entry["sample_index"]["file"] == entry["file"].replace(".tar", ".idx.json")


def test_every_reject_reason_is_reported_and_valid_clips_are_kept(tmp_path):
    root = tmp_path / "data"
    write_audio(root / "good.wav", 1.0)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk" * 10)
    soundfile.write(root / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    soundfile.write(root / "short.wav", np.zeros(200, dtype=np.float32), 16000)
    nan = np.zeros(16000, dtype=np.float32)
    nan[5000] = np.nan
    soundfile.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    rows = [
        {"audio": n, "question": "Q?", "answer": "A"}
        for n in ("good.wav", "missing.wav", "corrupt.wav", "empty.wav", "short.wav", "short.wav", "nan.wav")
    ]
    rows.append({"audio": "good.wav", "question": "Q?"})
    path = write_jsonl(root / "in.jsonl", rows)
    out = tmp_path / "out"
    code = main(["convert", path, "--out", str(out), "--workers", "1", "--no-progress"])
    assert code == 1  # default --max-reject-fraction 0
    rejects = [json.loads(line) for line in open(out / "rejects.jsonl")]
    got = {(r["source"], r["reason"]): r for r in rejects}
    assert set(got) == {
        (f"{path}:8", "bad record"),
        (f"{path}:7", "non-finite features"),
        (f"{path}:2", "missing file"),
        (f"{path}:3", "unreadable audio"),
        (f"{path}:4", "empty audio"),
        (f"{path}:5", "shorter than one frame"),
    }
    assert got[(f"{path}:5", "shorter than one frame")]["records"] == [f"{path}:5", f"{path}:6"]
    assert got[(f"{path}:5", "shorter than one frame")]["qa_pairs"] == 2
    assert [s.meta["audio"] for s in all_samples(out)] == ["good.wav"]
    index = read_index(str(out))
    assert index["totals"]["rejected_qa_pairs"] == 7 and index["totals"]["qa_pairs"] == 1
    assert (
        main(
            [
                "convert",
                path,
                "--out",
                str(out),
                "--workers",
                "1",
                "--no-progress",
                "--max-reject-fraction",
                "0.9",
            ]
        )
        == 0
    )


def test_rerun_is_a_no_op_and_other_options_need_overwrite(qa_set, tmp_path):
    out = tmp_path / "out"
    run([qa_set["gama"]], out)
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    assert run([qa_set["gama"]], out).already_done
    assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == before
    with pytest.raises(ConvertError, match="other inputs or options"):
        run([qa_set["gama"]], out, seed=1)
    result = convert(
        [qa_set["gama"]], str(out), ConvertOptions(seed=1), workers=1, overwrite=True, progress=False
    )
    assert not result.already_done and result.index["provenance"]["options"]["seed"] == 1


def test_option_values_are_checked_before_work(qa_set, tmp_path):
    for bad, match in (
        ({"shard_samples": 0}, "--shard-samples"),
        ({"shard_bytes": 10}, "--shard-size"),
        ({"max_reject_fraction": 2.0}, "--max-reject-fraction"),
        ({"backend": "x"}, "backend"),
    ):
        with pytest.raises(GamaDsError, match=match):
            run([qa_set["gama"]], tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists()


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_killed_conversion_resumes_to_identical_output(tmp_path):
    """Kill the real CLI mid-run, corrupt a finished shard, rerun: identical to a clean run."""
    root = tmp_path / "data"
    names = [f"c{i}.wav" for i in range(7)]
    for i, name in enumerate(names[:-1]):
        write_audio(root / name, 1.0, seed=i)
    # The last clip is a FIFO: the converter blocks opening it, after two finished shards.
    os.mkfifo(root / names[-1])
    # A missing clip among the finished shards: its reject must survive the resume unchanged.
    listed = names[:2] + ["missing.wav"] + names[2:]
    path = write_json(root / "in.json", [{"audio_id": n, "instruction": "Q", "output": "A"} for n in listed])
    out = tmp_path / "out"

    def command(dest):
        options = "--order input --shard-samples 2 --workers 1 --no-progress --max-reject-fraction 0.5"
        return [sys.executable, "-m", "gama_ds", "convert", path, "--out", str(dest), *options.split()]

    with killed_on_exit(command(out)) as proc:
        _wait_for(lambda: finished_shards(out) >= 2, 120, "two finished shards")
        _wait_for(lambda: (out / "shard-000002.tar.tmp").exists(), 30, "the third shard to start")
        proc.kill()
        proc.wait(timeout=30)
    assert not (out / "index.json").exists()
    os.remove(root / names[-1])
    write_audio(root / names[-1], 1.0, seed=6)
    kept = os.stat(out / "shard-000000.tar")
    damaged = bytearray((out / "shard-000001.tar").read_bytes())
    damaged[700] ^= 0xFF
    (out / "shard-000001.tar").write_bytes(bytes(damaged))

    rerun = subprocess.run(command(out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming after 1 finished shard(s)" in rerun.stderr
    again = os.stat(out / "shard-000000.tar")
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert not any(n.endswith(".tmp") or n == PROGRESS for n in os.listdir(out))
    clean = tmp_path / "clean"
    assert subprocess.run(command(clean), capture_output=True, timeout=300).returncode == 0
    assert tree_bytes(out) == tree_bytes(clean)
    assert [json.loads(line)["reason"] for line in open(out / "rejects.jsonl")] == ["missing file"]


def test_a_dead_worker_stops_the_run_with_a_clear_error(tmp_path):
    """The worker blocked on a FIFO is killed, as the out-of-memory killer would kill it:
    the run must end with an error naming the clip, not hang."""
    import psutil

    root = tmp_path / "data"
    write_audio(root / "a.wav", 1.0)
    os.mkfifo(root / "stuck.wav")
    rows = [{"audio_id": n, "instruction": "Q", "output": "A"} for n in ("a.wav", "stuck.wav")]
    path = write_json(root / "in.json", rows)
    options = "--order input --workers 2 --no-progress"
    command = [
        sys.executable,
        "-m",
        "gama_ds",
        "convert",
        path,
        "--out",
        str(tmp_path / "out"),
        *options.split(),
    ]

    def stuck_worker():
        children = psutil.Process(proc.pid).children(recursive=True)
        return next((c for c in children if _blocked_opening_fifo(c.pid)), None)

    with killed_on_exit(command) as proc:
        _wait_for(lambda: stuck_worker() is not None, 120, "a worker blocked opening the FIFO")
        stuck_worker().kill()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "a feature worker died" in err and "stuck.wav" in err


def finished_shards(out) -> int:
    path = out / PROGRESS
    return sum('"shard"' in line for line in open(path)) if path.exists() else 0


def _blocked_opening_fifo(pid: int) -> bool:
    """Linux names the kernel function a sleeping process waits in; open() on a FIFO with no
    writer waits in wait_for_partner."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip() == "wait_for_partner"
    except OSError:
        return False


@contextmanager
def killed_on_exit(command):
    """Run `command` in its own process group and kill the whole group afterwards, so no
    worker blocked on a FIFO outlives the test."""
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
