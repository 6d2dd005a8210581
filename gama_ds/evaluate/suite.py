"""An evaluation suite: the YAML file `gama-ds eval --suite` reads (docs/EVAL.md, "Suites").

Every key and number is checked here, before a model loads or a process group starts, and an
error names the suite file and the key (`datasets[2].labels`). Relative paths are relative to
the suite file, so a suite travels with its eval files.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import yaml

from ..errors import UsageError
from .datasets import DATASETS, Dataset
from .embed import POOLINGS
from .score import METRICS, PARSES

TOP_KEYS = {
    "datasets",
    "embedder",
    "pooling",
    "batch_size",
    "num_workers",
    "seed",
    "generation",
    "spice_jar",
    "timeout_s",
}
SET_KEYS = {"dataset", "name", "eval", "labels", "audio_root", "audio_prefix", "prompt", "parse", "metric"}
SET_KEYS |= {"task", "limit"}


@dataclass(frozen=True)
class SuiteSet:
    name: str  # the column in the report and the results file's name; unique in the suite
    dataset: Dataset  # the scoring rules (gama-ds score --dataset)
    eval: str  # the eval file, absolute
    labels: str | None
    audio_root: str  # relative audio ids are joined to it (default: the eval file's folder)
    audio_prefix: tuple[str, str] | None  # (from, to): rewrites absolute ids, as LTU's files hold
    prompt: str | None  # asked of every row; None: each row's own instruction
    parse: str | None
    metric: str | None
    task: str | None  # only the eval file's rows of this task
    limit: int | None  # only the first rows (after the task filter), for a quick look


@dataclass(frozen=True)
class Suite:
    path: str
    sets: tuple[SuiteSet, ...]
    embedder: str | None
    pooling: str | None
    batch_size: int = 8
    num_workers: int = 2  # audio decoding processes per rank
    seed: int = 0
    generation: dict = field(default_factory=dict)  # over the export's (LTU's sampling by default)
    spice_jar: str | None = None
    timeout_s: float = 3600.0  # how long a rank waits for the others at the gathers

    def sha256(self) -> str:
        with open(self.path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()


def read_suite(path: str) -> Suite:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise UsageError(f"--suite {path}: cannot read it: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"--suite {path}: not YAML: {err}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a mapping with a `datasets:` list was expected")
    _known(data, TOP_KEYS, path, "")
    base = os.path.dirname(os.path.abspath(path))
    sets = data.get("datasets")
    if not isinstance(sets, list) or not sets:
        raise UsageError(f"{path}: datasets: a non-empty list of sets was expected")
    parsed = tuple(_set(item, i, path, base) for i, item in enumerate(sets))
    names = [s.name for s in parsed]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise UsageError(
                f"{path}: datasets[{i}]: name {name!r} is used twice; give each set its own `name:`"
            )
    embedder = _path(data, "embedder", path, base, "", folder=True)
    needs = [s.name for s in parsed if s.dataset.kind in ("single", "multi")]
    if needs and embedder is None:
        raise UsageError(f"{path}: embedder: a text-encoder folder is needed to score {', '.join(needs)}")
    pooling = data.get("pooling")
    if pooling is not None and pooling not in POOLINGS:
        raise UsageError(f"{path}: pooling {pooling!r}: one of {', '.join(POOLINGS)}")
    generation = data.get("generation") or {}
    if not isinstance(generation, dict):
        raise UsageError(f"{path}: generation: a mapping of generation settings was expected")
    return Suite(
        path=os.path.abspath(path),
        sets=parsed,
        embedder=embedder,
        pooling=pooling,
        batch_size=_int(data, "batch_size", path, "", 8, low=1),
        num_workers=_int(data, "num_workers", path, "", 2, low=0),
        seed=_int(data, "seed", path, "", 0, low=0),
        generation=generation,
        spice_jar=_path(data, "spice_jar", path, base, "", folder=False),
        timeout_s=_seconds(data, "timeout_s", path),
    )


def _set(item, i: int, path: str, base: str) -> SuiteSet:
    where = f"datasets[{i}]."
    if not isinstance(item, dict):
        raise UsageError(f"{path}: datasets[{i}]: a mapping with `dataset:` and `eval:` was expected")
    _known(item, SET_KEYS, path, where)
    name = item.get("dataset")
    if name not in DATASETS:
        raise UsageError(f"{path}: {where}dataset {name!r}: one of {', '.join(DATASETS)}")
    ds = DATASETS[name]
    column = item.get("name", name)
    if not isinstance(column, str) or not column or not all(c.isalnum() or c in "-_." for c in column):
        raise UsageError(f"{path}: {where}name {column!r}: letters, digits, '-', '_' and '.' only")
    eval_file = _path(item, "eval", path, base, where, folder=False, required=True)
    labels = _path(item, "labels", path, base, where, folder=False)
    if ds.kind in ("single", "multi") and labels is None:
        raise UsageError(f"{path}: {where}labels: {ds.title} needs its label CSV (index,mid,display_name)")
    if ds.kind not in ("single", "multi") and labels is not None:
        raise UsageError(f"{path}: {where}labels: {ds.title} is not scored against labels")
    root = _path(item, "audio_root", path, base, where, folder=True) or os.path.dirname(eval_file)
    prefix = item.get("audio_prefix")
    if prefix is not None:
        if not (isinstance(prefix, dict) and set(prefix) == {"from", "to"} and all(
            isinstance(v, str) and v for v in prefix.values()
        )):  # fmt: skip
            raise UsageError(
                f"{path}: {where}audio_prefix: {{from: OLD/PREFIX, to: NEW/PREFIX}} was expected"
            )
        prefix = (prefix["from"], prefix["to"])
    prompt = item.get("prompt", ds.prompt)
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise UsageError(f"{path}: {where}prompt: a question text was expected")
    parse = item.get("parse")
    if parse is not None and parse not in PARSES:
        raise UsageError(f"{path}: {where}parse {parse!r}: one of {', '.join(PARSES)}")
    if parse == "ltu" and not ds.ltu:
        raise UsageError(f"{path}: {where}parse: {ds.title} has no LTU script, so no LTU rule; use plain")
    metric = item.get("metric")
    if metric is not None and metric not in METRICS[ds.kind]:
        raise UsageError(
            f"{path}: {where}metric {metric!r}: {ds.title} is scored by {' or '.join(METRICS[ds.kind])}"
        )
    task = item.get("task")
    if task is not None and not isinstance(task, str):
        raise UsageError(f"{path}: {where}task: a task name was expected")
    limit = _int(item, "limit", path, where, None, low=1)
    return SuiteSet(column, ds, eval_file, labels, root, prefix, prompt, parse, metric, task, limit)


def _known(data: dict, keys: set[str], path: str, where: str) -> None:
    unknown = sorted(set(data) - keys)
    if unknown:
        raise UsageError(f"{path}: {where}{unknown[0]}: not a suite key; keys: {', '.join(sorted(keys))}")


def _path(data: dict, key: str, path: str, base: str, where: str, folder: bool, required: bool = False):
    value = data.get(key)
    if value is None:
        if required:
            raise UsageError(f"{path}: {where}{key}: missing")
        return None
    if not isinstance(value, str) or not value:
        raise UsageError(f"{path}: {where}{key}: a path was expected")
    full = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    if not (os.path.isdir(full) if folder else os.path.isfile(full)):
        raise UsageError(f"{path}: {where}{key}: {full} is not {'a folder' if folder else 'a file'}")
    return full


def _int(data: dict, key: str, path: str, where: str, default, low: int):
    value = data.get(key, default)
    if value is default:
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UsageError(f"{path}: {where}{key}: a whole number >= {low} was expected, got {value!r}")
    return value


def _seconds(data: dict, key: str, path: str) -> float:
    value = data.get(key, 3600.0)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise UsageError(f"{path}: {key}: a number of seconds > 0 was expected, got {value!r}")
    return float(value)
