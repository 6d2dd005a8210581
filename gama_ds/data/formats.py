"""Input formats -> canonical QA records, grouped by audio clip.

Three formats are recognised per record, so several files (and even mixed files) convert
in one run:

- GAMA/LTU:  {"audio_id", "instruction", "output", ["input", "dataset", "task", ...]}
- audio QA:  {"audio", "question", "answer", ["dataset", "task", ...]}
- eval sets: {"audio_id", "instruction_output": [{"instruction", "output"}, ...], ...}

A file is a JSON list or JSON lines. Every record is named by its source, `file:line` for
JSON lines and `file[index]` for a list, so a bad one can be found and fixed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import GamaDsError

BAD_RECORD = "bad record"
OPTIONAL_TEXT = ("input", "dataset", "task")
# Fields each format consumes; anything else a record carries is kept as the QA's "extra".
_USED = {
    "gama": {"audio_id", "instruction", "output"},
    "aqa": {"audio", "question", "answer"},
    "eval": {"audio_id", "instruction", "output"},
}


class InputError(GamaDsError, ValueError):
    """A whole input file cannot be read; nothing in it can be converted."""


@dataclass
class Reject:
    source: str
    reason: str
    detail: str
    audio: str | None = None
    records: list[str] = field(default_factory=list)
    qa_pairs: int = 1

    def to_json(self) -> dict:
        out = {"reason": self.reason, "detail": self.detail, "source": self.source}
        if self.audio is not None:
            out["audio"] = self.audio
        if self.records:
            out["records"] = self.records
        out["qa_pairs"] = self.qa_pairs
        return out


@dataclass
class Record:
    audio: str  # as written in the input
    path: str  # resolved absolute path
    qa: list[dict]  # one or more {instruction, input, output, dataset, task, source[, extra]}
    source: str


@dataclass
class Clip:
    path: str
    audio: str
    qa: list[dict] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return [q["source"] for q in self.qa]


class _BadField(ValueError):
    pass


def _audio(rec: dict, name: str) -> str:
    audio = _text(rec, name, required=True)
    try:
        os.fsencode(audio).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise _BadField(f"field {name!r} is not a valid UTF-8 path") from None
    return audio


def _text(rec: dict, name: str, required: bool) -> str:
    if name not in rec or rec[name] is None:
        if required:
            raise _BadField(f"missing field {name!r}")
        return ""
    value = rec[name]
    if not isinstance(value, str):
        raise _BadField(f"field {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise _BadField(f"field {name!r} is empty")
    return value


def _qa(instruction: str, output: str, rec: dict, source: str, used: set[str]) -> dict:
    qa = {"instruction": instruction, "input": "", "output": output, "dataset": "", "task": ""}
    for name in OPTIONAL_TEXT:
        qa[name] = _text(rec, name, required=False)
    qa["source"] = source
    extra = {k: v for k, v in rec.items() if k not in used and k not in OPTIONAL_TEXT}
    if extra:
        qa["extra"] = extra
    return qa


def parse_record(rec, source: str) -> tuple[str, list[dict]]:
    """One input object -> (audio path as written, QA dicts). Raises _BadField."""
    if not isinstance(rec, dict):
        raise _BadField(f"expected a JSON object, got {type(rec).__name__}")
    if "audio" in rec and "audio_id" in rec:
        raise _BadField("has both 'audio' and 'audio_id'; keep one")
    if "instruction_output" in rec:
        audio = _audio(rec, "audio_id")
        pairs = rec["instruction_output"]
        if not isinstance(pairs, list) or not pairs:
            raise _BadField("field 'instruction_output' must be a non-empty list")
        clip_fields = {k: v for k, v in rec.items() if k != "instruction_output"}
        out = []
        for j, pair in enumerate(pairs):
            if not isinstance(pair, dict):
                raise _BadField(f"instruction_output[{j}] must be an object")
            # A pair's own fields (a per-question task, say) override the clip's.
            merged = {**clip_fields, **pair}
            try:
                ins = _text(pair, "instruction", required=True)
                ans = _text(pair, "output", required=True)
                out.append(_qa(ins, ans, merged, f"{source} instruction_output[{j}]", _USED["eval"]))
            except _BadField as err:
                raise _BadField(f"instruction_output[{j}]: {err}") from None
        return audio, out
    if "audio" in rec:
        audio = _audio(rec, "audio")
        ins = _text(rec, "question", required=True)
        ans = _text(rec, "answer", required=True)
        return audio, [_qa(ins, ans, rec, source, _USED["aqa"])]
    if "audio_id" in rec:
        audio = _audio(rec, "audio_id")
        ins = _text(rec, "instruction", required=True)
        ans = _text(rec, "output", required=True)
        return audio, [_qa(ins, ans, rec, source, _USED["gama"])]
    raise _BadField("no audio field: expected 'audio_id' (GAMA/LTU) or 'audio' (audio QA)")


def _objects(path: str):
    """Yield (source, parsed object or None, error) for every record in one file."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the JSON
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read: {err}") from err
    stripped = text.lstrip()
    if not stripped:
        raise InputError(f"{path}: empty file, no records")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        if stripped[0] == "[":
            raise InputError(f"{path}: line {err.lineno} column {err.colno}: {err.msg}") from err
        whole = None
    if isinstance(whole, list):
        if not whole:
            raise InputError(f"{path}: an empty list, no records")
        for i, obj in enumerate(whole):
            yield f"{path}[{i}]", obj, None
        return
    if whole is not None:
        yield f"{path}:1", whole, None
        return
    # Split on newlines only: str.splitlines() also splits on U+2028 and friends, which JSON
    # allows unescaped inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line), None
        except json.JSONDecodeError as err:
            yield f"{path}:{lineno}", None, f"invalid JSON at column {err.colno}: {err.msg}"


def resolve_audio(audio: str, json_path: str, audio_root: str | None) -> str:
    audio = os.path.expanduser(audio)
    if not os.path.isabs(audio):
        base = audio_root if audio_root is not None else os.path.dirname(os.path.abspath(json_path))
        audio = os.path.join(base, audio)
    return os.path.realpath(audio)


def read_inputs(paths: list[str], audio_root: str | None = None) -> tuple[list[Record], list[Reject]]:
    """Parse every input file; malformed records become rejects, unreadable files raise."""
    seen: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise InputError(
                f"{path}: given twice (also as {seen[real]}); each QA pair would be stored twice"
            )
        seen[real] = path
    records: list[Record] = []
    rejects: list[Reject] = []
    for path in paths:
        for source, obj, error in _objects(path):
            if error is None:
                try:
                    audio, qa = parse_record(obj, source)
                except _BadField as err:
                    error = str(err)
            if error is not None:
                audio = obj.get("audio_id", obj.get("audio")) if isinstance(obj, dict) else None
                rejects.append(Reject(source, BAD_RECORD, error, audio if isinstance(audio, str) else None))
                continue
            records.append(Record(audio, resolve_audio(audio, path, audio_root), qa, source))
    return records, rejects


def group_by_clip(records: list[Record]) -> list[Clip]:
    """One clip per resolved audio file, holding all its QA pairs in input order."""
    clips: dict[str, Clip] = {}
    for rec in records:
        clip = clips.get(rec.path)
        if clip is None:
            clip = clips[rec.path] = Clip(rec.path, rec.audio)
        clip.qa.extend(rec.qa)
    return list(clips.values())
