"""`gama-ds eval --suite`: every set's answers generated data-parallel, kept, gathered and scored.

Each rank answers a slice of every set and appends each batch's answers to its own part file
(`OUT/parts/<set>-<stamp>/rank<r>.jsonl`), so a run that dies keeps what it generated: run the
same command again and only the missing rows are generated, on any number of ranks. The stamp
hashes everything the answers depend on (export, precision, prompt, generation settings, eval
file, audio paths, seed, the tagger of a soft prompt), so answers of another model or setting
are never reused. Rank 0 gathers the answers, writes LTU-format rows per set (`OUT/<set>.json`)
and scores them with `gama-ds score`'s rules.

An export with a soft prompt needs each clip's tags in its prompt: every rank runs the export's
tagger (the one its training clips were tagged with, checked by fingerprint) on each batch's
features, and the tags a prompt was given are kept beside its answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch

from .. import __version__, audio
from ..errors import GamaDsError, UsageError
from .eval_file import EvalRow, audio_path, read_eval_rows
from .ranks import Ranks
from .suite import Suite, SuiteSet
from .table import table_summary

SAMPLING_ONLY = ("temperature", "top_p", "top_k")
PROGRESS_S = 30.0


def run_suite(
    suite: Suite,
    model_path: str,
    out: str,
    device=None,
    dtype=None,
    llm=None,
    tagger: str | None = None,
    log=print,
) -> dict | None:
    """The report on rank 0 (also written to OUT/report.json); None on the other ranks. `tagger`:
    a copy of a soft-prompt export's tagger, for one moved from where the export names it."""
    from ..exported import export_tagger, load_export, read_info, soft_prompt_settings
    from ..placement import choose_dtype
    from ..train.distributed import dist_env

    # Before any process group: the placement, and a soft prompt's tagger (a moved or wrong one
    # is named before the model loads, minutes for a 7B one).
    device = _rank_device(device, dist_env()[2])
    dtype = choose_dtype(dtype, device)
    recorded = read_info(model_path)
    found = export_tagger(model_path, recorded, tagger, device)
    tagging = None if found is None else Tagging(soft_prompt_settings(recorded), found)
    ranks = Ranks(suite.timeout_s)
    try:
        model, tokenizer, info = load_export(model_path, device, dtype, llm)
        settings = generation_settings(info, suite)
        template = info["prompt"]["template"]
        base_stamp = {
            "export": _export_stamp(model_path),
            "llm": llm and os.path.abspath(llm),
            "dtype": str(dtype),
            "generation": settings,
            "template": template,
            "seed": suite.seed,
            # what decides the tags in the prompts (not where the tagger lies, nor its device)
            "tagger": None if tagging is None else tagging.stamp(),
        }
        os.makedirs(out, exist_ok=True)
        produced = []
        for s in suite.sets:
            rows = read_eval_rows(s.eval, s.task, s.limit)
            if s.prompt is None:
                bare = next((r for r in rows if not r.instruction), None)
                if bare is not None:
                    raise UsageError(
                        f"{bare.where}: no instruction, and {suite.path} sets no `prompt:` for {s.name}"
                    )
            parts = os.path.join(out, "parts", f"{s.name}-{_set_stamp(s, base_stamp)}")
            started = time.monotonic()
            preds, counts = _answer_set(
                s, rows, parts, ranks, model, tokenizer, template, settings, tagging, suite, log
            )
            if ranks.main:
                counts["seconds"] = round(time.monotonic() - started, 3)  # every rank's share, gathered
                produced.append((s, rows, _write_results(out, s, rows, preds), counts))
        if not ranks.main:
            return None
        del model
        report = _report(
            suite, produced, model_path, info, device, dtype, ranks.world, settings, template, tagging
        )
        with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        return report
    finally:
        ranks.close()


def generation_settings(info: dict, suite: Suite) -> dict:
    """The export's generation settings (LTU's sampling unless it carries others) with the suite's
    `generation:` over them, checked; greedy decoding drops the sampling-only settings."""
    from ..infer import export_generation

    merged = {**(info.get("generation") or {}), **suite.generation}
    settings = export_generation({"generation": merged}, where=suite.path)
    if not settings["do_sample"]:
        settings = {k: v for k, v in settings.items() if k not in SAMPLING_ONLY}
    return settings


def _rank_device(name, local_rank: int) -> torch.device:
    """--device as given; with several GPUs and no index, this rank's own GPU."""
    from ..placement import choose_device
    from ..train.distributed import rank_device

    device = choose_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", rank_device(local_rank) or 0)
    return device


def _answer_set(
    s: SuiteSet, rows, parts: str, ranks: Ranks, model, tokenizer, template, settings, tagging, suite, log
):
    """{row index: {"pred": answer[, "tags": its prompt's tags]}} on rank 0 (None elsewhere), and
    how many were generated now / reused."""
    os.makedirs(parts, exist_ok=True)
    kept = _read_parts(parts, len(rows))
    held = ranks.all_gather(sorted(kept))
    owner: dict[int, int] = {}
    for r, indices in enumerate(held):
        for i in indices:
            owner.setdefault(i, r)
    todo = [row for row in rows if row.index not in owner]
    mine = todo[ranks.rank :: ranks.world]
    missing = [
        f"{row.where}: audio {row.audio_id!r} -> {p}"
        for row in mine
        if (p := audio_path(row, s.audio_root, s.audio_prefix)) is not None and not os.path.isfile(p)
    ]
    everywhere = [m for found in ranks.all_gather(missing) for m in found]
    if everywhere:
        raise UsageError(
            f"{s.name}: {len(everywhere)} audio file(s) not found, e.g. {everywhere[0]}; "
            f"set audio_root or audio_prefix for it in {suite.path}"
        )
    if ranks.main and len(owner):
        log(f"[eval] {s.name}: {len(owner)} of {len(rows)} answers kept from an earlier run ({parts})")
    torch.manual_seed(suite.seed + ranks.rank)
    new, errors = _generate(
        s, mine, parts, ranks, model, tokenizer, template, settings, tagging, suite, log, len(todo)
    )
    failed = [e for found in ranks.all_gather(errors) for e in found]
    if failed:
        raise GamaDsError(
            f"{s.name}: {len(failed)} clip(s) could not be read, e.g. {failed[0]}; the answers generated are "
            f"kept in {parts}: fix or drop those rows and run again to generate only the rest"
        )
    mine_kept = {i: kept[i] for i in kept if owner[i] == ranks.rank}
    gathered = ranks.gather({**mine_kept, **new})
    if not ranks.main:
        return None, None
    preds = {i: p for part in gathered for i, p in part.items()}
    lost = [row.where for row in rows if row.index not in preds]
    if lost:
        raise GamaDsError(f"{s.name}: no answer gathered for {len(lost)} row(s), e.g. {lost[0]}")
    return preds, {"generated": len(todo), "kept": len(owner)}


class Tagging:
    """A soft-prompt export's settings and its tagger."""

    def __init__(self, soft, tagger):
        self.soft, self.tagger = soft, tagger

    def stamp(self) -> dict:
        described = self.tagger.describe()
        return {k: described[k] for k in ("fingerprint", "activation", "dtype")}

    def described(self) -> dict:
        """The tagger for the report, its label list left out (527 names for AudioSet)."""
        return {k: v for k, v in self.tagger.describe().items() if k != "labels"}


def _generate(
    s, mine: list[EvalRow], parts, ranks, model, tokenizer, template, settings, tagging, suite, log, total
):
    from ..infer import generate, tag_clips

    new: dict[int, dict] = {}
    errors: list[str] = []
    if not mine:
        return new, errors
    rest = {k: v for k, v in settings.items() if k != "max_new_tokens"}
    loader = torch.utils.data.DataLoader(
        _Clips(mine, s.audio_root, s.audio_prefix),
        batch_size=suite.batch_size,
        num_workers=suite.num_workers,
        collate_fn=list,
        multiprocessing_context="spawn" if suite.num_workers else None,
    )
    started = last = time.monotonic()
    with open(os.path.join(parts, f"rank{ranks.rank:05d}.jsonl"), "a", encoding="utf-8") as part:
        for batch in loader:
            good = [(row, clip) for row, clip, error in batch if error is None]
            errors += [
                f"{row.where}: {row.audio_id}: {error}" for row, _, error in batch if error is not None
            ]
            if not good:
                continue
            qas = [{"instruction": s.prompt or row.instruction, "input": ""} for row, _ in good]
            clips, tags = [c for _, c in good], None
            if tagging is not None:
                clips, tags = tag_clips(tagging.tagger, clips, tagging.soft)
            answers = generate(
                model,
                tokenizer,
                clips,
                qas,
                template,
                len(good),
                settings["max_new_tokens"],
                None if tagging is None else tagging.soft,
                tags,
                **rest,
            )
            for i, ((row, _), answer) in enumerate(zip(good, answers, strict=True)):
                new[row.index] = {"pred": answer} if tags is None else {"pred": answer, "tags": tags[i]}
                part.write(json.dumps({"index": row.index, **new[row.index]}, ensure_ascii=False) + "\n")
            part.flush()
            now = time.monotonic()
            if ranks.main and (now - last >= PROGRESS_S or len(new) + len(errors) == len(mine)):
                last = now
                rate = len(new) / (now - started)
                log(
                    f"[eval] {s.name}: rank 0 answered {len(new)}/{len(mine)} ({rate:.2f} rows/s); "
                    f"{total} to answer over {ranks.world} rank(s)"
                )
    return new, errors


class _Clips(torch.utils.data.Dataset):
    """A rank's rows with their decoded features; a clip that cannot be read carries the reason."""

    def __init__(self, rows: list[EvalRow], root: str, prefix):
        self.rows, self.root, self.prefix = rows, root, prefix

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        path = audio_path(row, self.root, self.prefix)
        if path is None:
            return row, None, None
        try:
            return row, audio.load_features(path)[0], None
        except (GamaDsError, OSError) as err:
            return row, None, str(err)


def _read_parts(parts: str, n_rows: int) -> dict[int, dict]:
    """The answers (with their tags, for a soft prompt) earlier runs left in this set's part
    files (any rank count); a line cut off by a crash is ignored."""
    kept: dict[int, dict] = {}
    for name in sorted(os.listdir(parts)):
        if not (name.startswith("rank") and name.endswith(".jsonl")):
            continue
        with open(os.path.join(parts, name), encoding="utf-8") as f:
            for line in f:
                try:
                    item = json.loads(line)
                    index, pred = item["index"], item["pred"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
                if isinstance(index, int) and 0 <= index < n_rows and isinstance(pred, str):
                    kept[index] = {k: v for k, v in item.items() if k in ("pred", "tags")}
    return kept


def _write_results(out: str, s: SuiteSet, rows: list[EvalRow], preds: dict[int, dict]) -> str:
    """LTU's inference_batch.py rows: {prompt, pred, ref, audio_id}, in eval-file order; with a
    soft prompt, the tags its prompt held too."""
    path = os.path.join(out, f"{s.name}.json")
    results = [
        {
            "prompt": s.prompt or row.instruction,
            "pred": preds[row.index]["pred"],
            "ref": row.ref,
            "audio_id": row.audio_id,
            **({"tags": preds[row.index]["tags"]} if "tags" in preds[row.index] else {}),
        }
        for row in rows
    ]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def _export_stamp(path: str) -> dict:
    """The export folder and its files' sizes and times: an export rewritten in place is another."""
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            st = os.stat(os.path.join(folder, name))
            files[os.path.relpath(os.path.join(folder, name), path)] = [st.st_size, st.st_mtime_ns]
    return {"path": os.path.abspath(path), "files": dict(sorted(files.items()))}


def _set_stamp(s: SuiteSet, base: dict) -> str:
    h = hashlib.sha256()
    with open(s.eval, "rb") as f:
        h.update(f.read())
    stamp = {
        **base,
        "eval": h.hexdigest(),
        "prompt": s.prompt,
        "task": s.task,
        "limit": s.limit,
        "audio_root": s.audio_root,
        "audio_prefix": s.audio_prefix,
    }
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]


def _report(
    suite: Suite, produced, model_path, info, device, dtype, world, settings, template, tagging
) -> dict:
    from .embed import TextEmbedder
    from .score import score_results

    embedder = TextEmbedder(suite.embedder, suite.pooling) if suite.embedder else None
    sets = []
    for s, rows, results, counts in produced:
        labelled = s.dataset.kind in ("single", "multi")
        score = score_results(
            results,
            s.dataset.name,
            s.labels,
            embedder if labelled else None,
            s.parse,
            s.metric,
            suite.spice_jar,
        )
        sets.append(
            {
                "name": s.name,
                "dataset": s.dataset.name,
                "title": s.dataset.title,
                "kind": s.dataset.kind,
                "prompt": s.prompt if s.prompt is not None else "each row's own instruction",
                "eval": s.eval,
                "task": s.task,
                "limit": s.limit,
                "results": results,
                "rows": len(rows),
                **counts,
                "score": score,
            }
        )
    return {
        "gama_ds": __version__,
        "suite": {"path": suite.path, "sha256": suite.sha256()},
        "model": {"path": os.path.abspath(model_path), "source": info.get("source")},
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "world_size": world,
        "template": template,
        "generation": settings,
        "seed": suite.seed,
        "tagger": None if tagging is None else tagging.described(),
        "embedder": embedder.describe() if embedder is not None else None,
        "sets": sets,
        "table": table_summary(sets),
    }
