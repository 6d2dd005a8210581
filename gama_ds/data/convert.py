"""Records -> tar shards of precomputed features, with index.json and rejects.jsonl.

The flow: read and validate every input record, group QA pairs by audio clip, fix the clip
order (sorted, then a seeded shuffle), compute features in worker processes in that order,
and write shards in the main process, rolling over by sample count or bytes. Every
finished shard is checksummed and appended to `.progress.jsonl`, so a rerun of the same
command keeps the finished shards and continues where the last one ended; the result is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass

import numpy as np

from .. import __version__, audio
from ..errors import GamaDsError
from . import tag_sidecar
from .formats import Clip, Reject, group_by_clip, read_inputs
from .pool import default_workers, ordered_map
from .shards import (
    FBANK,
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    META,
    OPTIONAL_FIELDS,
    REJECTS,
    SAMPLE_INDEX_PATTERN,
    SHARD_FIELDS,
    SHARD_PATTERN,
    encode_features,
    encode_meta,
    sha256_file,
    shard_name,
)
from .writer import ShardWriter

PROGRESS = ".progress.jsonl"
MISSING = "missing file"
ORDERS = ("shuffle", "input")  # of the clips: sorted then seeded shuffle, or first-seen


class ConvertError(GamaDsError, RuntimeError):
    """The conversion cannot start or continue; the message says what to change."""


@dataclass
class ConvertOptions:
    """Everything that decides the bytes of the output. Worker count is not among them."""

    shard_samples: int | None = None  # at most this many clips per shard
    shard_bytes: int | None = 256 * 2**20  # roll over before a shard passes this size
    seed: int = 0  # seeds the clip order
    order: str = "shuffle"  # "shuffle": sorted then seeded shuffle; "input": first-seen order
    backend: str = "auto"  # feature backend: auto, torchaudio, transformers
    audio_root: str | None = None  # base for relative audio paths (default: the JSON's folder)
    max_reject_fraction: float = 0.0  # exit non-zero above this fraction of rejected QA pairs

    def check(self) -> None:
        if self.shard_samples is None and self.shard_bytes is None:
            raise ConvertError("set --shard-samples or --shard-size (or both)")
        if self.shard_samples is not None and self.shard_samples < 1:
            raise ConvertError(f"--shard-samples must be at least 1, got {self.shard_samples}")
        if self.shard_bytes is not None and self.shard_bytes < 64 * 1024:
            raise ConvertError(f"--shard-size must be at least 64KiB, got {self.shard_bytes} bytes")
        if self.order not in ORDERS:
            raise ConvertError(f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ConvertError(f"--max-reject-fraction must be in [0, 1], got {self.max_reject_fraction}")
        if self.audio_root is not None and not os.path.isdir(self.audio_root):
            raise ConvertError(f"--audio-root {self.audio_root} is not a directory")
        audio.resolve_backend(self.backend)


@dataclass
class ConvertResult:
    index: dict
    rejects: list[dict]
    rejected_fraction: float
    kept_shards: int = 0  # shards found complete and reused from an interrupted run
    already_done: bool = False
    elapsed: float = 0.0
    first_clip: float = 0.0  # seconds until the first clip came back (reading inputs, worker start-up)
    clips_done: int = 0  # clips processed by this run
    max_reject_fraction: float = 0.0

    @property
    def failed(self) -> bool:
        return self.rejected_fraction > self.max_reject_fraction


def order_clips(clips: list[Clip], options: ConvertOptions) -> list[Clip]:
    if options.order == "input":
        return list(clips)
    ordered = sorted(clips, key=lambda c: c.path)
    random.Random(options.seed).shuffle(ordered)
    return ordered


def clip_key(clip: Clip) -> str:
    return hashlib.sha1(clip.path.encode("utf-8")).hexdigest()[:20]


def _featurize(job: tuple[str, str]):
    path, backend = job
    if not os.path.exists(path):
        return None, (MISSING, f"{path} does not exist")
    try:
        feats, info = audio.load_features(path, backend)
    except audio.AudioError as err:
        return None, (err.reason, err.detail)
    except Exception as err:  # a decoder failing in a way soundfile does not wrap
        return None, ("unreadable audio", f"{path}: {type(err).__name__}: {err}")
    return encode_features(feats), info


def _single_thread() -> None:
    # Identical bytes whatever the worker count: keep torch's reductions on one thread.
    import torch

    torch.set_num_threads(1)


def _library_versions(backend: str) -> dict:
    import soundfile

    versions = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "soundfile": soundfile.__version__,
        "libsndfile": soundfile.__libsndfile_version__,
        "webdataset": importlib.metadata.version("webdataset"),
    }
    if backend == "torchaudio":
        import torch
        import torchaudio

        versions.update(torch=torch.__version__, torchaudio=torchaudio.__version__)
    else:
        import scipy
        import transformers

        versions.update(transformers=transformers.__version__, scipy=scipy.__version__)
    return versions


def _our_files(out: str) -> list[str]:
    names = os.listdir(out) if os.path.isdir(out) else []
    ours = {INDEX, REJECTS, PROGRESS}
    patterns = (SHARD_PATTERN, SAMPLE_INDEX_PATTERN, tag_sidecar.PATTERN)
    return [n for n in names if n in ours or any(p.match(n.removesuffix(".tmp")) for p in patterns)]


def _files_of(entry: dict) -> list[str]:
    return [entry["file"]] + ([entry["sample_index"]["file"]] if "sample_index" in entry else [])


def _sample_index_intact(out: str, entry: dict) -> bool:
    ref = entry.get("sample_index")
    path = os.path.join(out, ref["file"]) if ref else ""
    return ref is None or (os.path.isfile(path) and sha256_file(path) == ref["sha256"])


def _read_progress(out: str, plan: str) -> tuple[list[dict], list[dict]] | None:
    """The finished shards (and the clip rejects before them) of an interrupted run."""
    path = os.path.join(out, PROGRESS)
    if not os.path.exists(path):
        return None
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the run died while writing this line
    if not lines or lines[0].get("plan") != plan:
        raise ConvertError(
            f"{out} holds an unfinished conversion of other inputs or options; "
            "rerun that command to finish it, choose another --out, or pass --overwrite"
        )
    kept, rejects = [], []
    for entry in lines[1:]:
        shard = entry["shard"]
        path = os.path.join(out, shard["file"])
        valid = (
            shard["file"] == shard_name(len(kept))
            and os.path.isfile(path)
            and os.path.getsize(path) == shard["bytes"]
            and sha256_file(path) == shard["sha256"]
            and _sample_index_intact(out, shard)
        )
        if not valid:
            break
        # the index's field order
        entry["shard"] = {k: shard[k] for k in SHARD_FIELDS + OPTIONAL_FIELDS if k in shard}
        kept.append(entry)
        rejects.extend(entry["rejects"])
    return kept, rejects


def convert(
    inputs: list[str],
    out: str,
    options: ConvertOptions | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log=lambda msg: print(msg, file=sys.stderr),
    tagging=None,
) -> ConvertResult:
    """`tagging` (a tags.options.TagOptions): tag the clips once their shards are written, as
    `gama-ds tag` does; the tagger is loaded, and so checked, before any clip is converted."""
    options = options or ConvertOptions()
    options.check()
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ConvertError(f"--workers must be at least 1, got {workers}")
    backend = audio.resolve_backend(options.backend)
    tagger = tagging.load() if tagging is not None else None
    started = time.perf_counter()

    records, record_rejects = read_inputs(inputs, options.audio_root)
    clips = order_clips(group_by_clip(records), options)
    keys = [clip_key(c) for c in clips]
    if len(set(keys)) != len(keys):
        raise RuntimeError("two audio paths hash to the same sample key; please report this as a bug")
    input_files = [{"file": p, "sha256": sha256_file(p)} for p in inputs]
    recorded = {k: v for k, v in asdict(options).items() if k != "max_reject_fraction"}
    plan = hashlib.sha256(
        json.dumps(
            {"version": __version__, "backend": backend, "inputs": input_files, "options": recorded},
            sort_keys=True,
        ).encode()
    ).hexdigest()
    total_qa = sum(len(c.qa) for c in clips) + len(record_rejects)

    if os.path.exists(out) and not os.path.isdir(out):
        raise ConvertError(f"--out {out} exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    if overwrite:
        for name in _our_files(out):
            os.remove(os.path.join(out, name))
    done = _finished_index(out, plan, options, started, total_qa)
    if done is not None:
        log(f"{out}: already converted by this command; `gama-ds verify {out}` rechecks it")
        if tagger is not None and not tagging.matches(done.index["provenance"].get("tagger"), tagger):
            from ..tags.tag_set import tag_set

            done.index = tag_set(out, tagging, workers, progress, log, tagger)
        return done
    progress_state = _read_progress(out, plan)
    if progress_state is None and _our_files(out):
        raise ConvertError(
            f"{out} already holds shards from another conversion; choose another --out or pass --overwrite"
        )
    kept, clip_rejects = progress_state or ([], [])
    start_clip = kept[-1]["next_clip"] if kept else 0
    for name in _our_files(out):
        if name != PROGRESS and name not in {f for e in kept for f in _files_of(e["shard"])}:
            os.remove(os.path.join(out, name))
    # Rewritten atomically: a crash here must not lose the record of the kept shards.
    _write_atomic(
        os.path.join(out, PROGRESS), "".join(json.dumps(line) + "\n" for line in [{"plan": plan}, *kept])
    )
    progress_file = open(os.path.join(out, PROGRESS), "a", encoding="utf-8")
    if kept:
        log(f"{out}: resuming after {len(kept)} finished shard(s), at clip {start_clip} of {len(clips)}")

    shards = [e["shard"] for e in kept]
    pending: list[dict] = []  # clip rejects since the last finished shard

    def on_shard(entry: dict, next_clip: int) -> None:
        shards.append(entry)
        line = {"shard": entry, "next_clip": next_clip, "rejects": list(pending)}
        clip_rejects.extend(pending)
        pending.clear()
        progress_file.write(json.dumps(line) + "\n")
        progress_file.flush()
        os.fsync(progress_file.fileno())

    from tqdm import tqdm

    sink = ShardWriter(out, len(kept), options.shard_samples, options.shard_bytes, on_shard)
    jobs = [(c.path, backend) for c in clips[start_clip:]]
    bar = tqdm(total=len(clips), initial=start_clip, unit="clip", desc="convert", disable=not progress)
    first_clip = 0.0
    with ordered_map(_featurize, jobs, workers, initializer=_single_thread) as results:
        for i, (feats, info) in _guard(enumerate(results, start=start_clip), clips, out):
            if i == start_clip:
                first_clip = time.perf_counter() - started
            clip = clips[i]
            if feats is None:
                reason, detail = info
                pending.append(
                    Reject(clip.sources[0], reason, detail, clip.audio, clip.sources, len(clip.qa)).to_json()
                )
            else:
                meta = {
                    "audio": clip.audio,
                    "path": clip.path,
                    "sample_rate": info.sample_rate,
                    "channels": info.channels,
                    "duration": round(info.duration, 6),
                    "n_frames": info.n_frames,
                    "truncated": info.truncated,
                    "qa": clip.qa,
                }
                sink.add(keys[i], {FBANK: feats, META: encode_meta(meta)}, len(clip.qa), i)
            bar.update(1)
            bar.set_postfix(rejects=len(record_rejects) + len(clip_rejects) + len(pending), refresh=False)
    bar.close()
    sink.finish(next_clip=len(clips))
    clip_rejects.extend(pending)
    progress_file.close()
    tagger_provenance = None
    if tagger is not None:  # the tag files come before the index that names them
        from ..tags.tag_set import provenance, tag_entries

        shards = tag_entries(out, shards, tagger, tagging, 1, workers, progress)
        tagger_provenance = provenance(tagger, tagging, 1)

    rejects = [r.to_json() for r in record_rejects] + clip_rejects
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "members": {
            "fbank.npy": "float16 [n_frames, 128], normalised, unpadded",
            "json": "clip metadata and qa list",
        },
        "shards": shards,
        "totals": {
            "shards": len(shards),
            "samples": sum(s["samples"] for s in shards),
            "qa_pairs": sum(s["qa_pairs"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "rejected_qa_pairs": sum(r["qa_pairs"] for r in rejects),
            "rejected_records": len(rejects),
        },
        "features": {**audio.RECIPE, "backend": backend},
        "provenance": {
            "gama_ds": __version__,
            "plan": plan,
            "libraries": _library_versions(backend),
            "inputs": input_files,
            "options": recorded,
        },
    }
    if tagger_provenance is not None:
        index["provenance"]["tagger"] = tagger_provenance
    _write_atomic(
        os.path.join(out, REJECTS), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    )
    _write_atomic(os.path.join(out, INDEX), json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    os.remove(os.path.join(out, PROGRESS))
    return ConvertResult(
        index,
        rejects,
        _fraction(index, total_qa),
        kept_shards=len(kept),
        elapsed=time.perf_counter() - started,
        first_clip=first_clip,
        clips_done=len(clips) - start_clip,
        max_reject_fraction=options.max_reject_fraction,
    )


def _guard(results, clips: list[Clip], out: str):
    """Turn a dead worker into an error that says which clips and how to go on."""
    i = -1
    try:
        for i, result in results:
            yield i, result
    except BrokenProcessPool as err:
        near = ", ".join(c.path for c in clips[i + 1 : i + 5])
        raise ConvertError(
            f"a feature worker died (a crashing decoder or the out-of-memory killer?) near: {near}. "
            f"Finished shards in {out} are kept: fix or remove the clip and rerun the same command"
        ) from err


def _fraction(index: dict, total_qa: int) -> float:
    return index["totals"]["rejected_qa_pairs"] / total_qa if total_qa else 0.0


def _finished_index(out: str, plan: str, options: ConvertOptions, started: float, total_qa: int):
    path = os.path.join(out, INDEX)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    if index.get("provenance", {}).get("plan") != plan:
        raise ConvertError(
            f"{out} holds a finished conversion of other inputs or options; "
            "choose another --out or pass --overwrite"
        )
    try:
        with open(os.path.join(out, REJECTS), encoding="utf-8") as f:
            rejects = [json.loads(line) for line in f]
    except (OSError, json.JSONDecodeError) as err:
        raise ConvertError(f"{out} has {INDEX} but no readable {REJECTS} ({err}); pass --overwrite") from err
    return ConvertResult(
        index,
        rejects,
        _fraction(index, total_qa),
        already_done=True,
        elapsed=time.perf_counter() - started,
        max_reject_fraction=options.max_reject_fraction,
    )


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def summary(result: ConvertResult) -> str:
    t = result.index["totals"]
    by_reason: dict[str, int] = {}
    for r in result.rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + r["qa_pairs"]
    speed = ""
    if result.clips_done > 1 and result.elapsed > result.first_clip:
        rate = (result.clips_done - 1) / (result.elapsed - result.first_clip)
        speed = f", {result.elapsed:.1f}s ({rate:.1f} clips/s after {result.first_clip:.1f}s start-up)"
    lines = [
        f"{t['samples']} clips, {t['qa_pairs']} QA pairs in {t['shards']} shard(s), "
        f"{t['bytes'] / 2**20:.1f} MiB, backend {result.index['features']['backend']}" + speed,
        f"rejected: {t['rejected_qa_pairs']} QA pairs ({100 * result.rejected_fraction:.2f}%)"
        + "".join(f"\n  {reason}: {n}" for reason, n in sorted(by_reason.items())),
    ]
    tagger = result.index["provenance"].get("tagger")
    if tagger:
        lines.append(
            f"tagged by {tagger['path']}: at most {tagger['top_k']} tags per clip scoring at least "
            f"{tagger['threshold']} ({tagger['activation']})"
        )
    if result.failed:
        lines.append(
            f"FAILED: {100 * result.rejected_fraction:.2f}% rejected exceeds --max-reject-fraction "
            f"{result.max_reject_fraction}; see {REJECTS}"
        )
    return "\n".join(lines)
