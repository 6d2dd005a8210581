"""The rows an evaluation suite asks about, read from an eval file.

Three record shapes, as `gama-ds convert` reads them, in a JSON list or JSON lines:
- LTU's eval files: `{audio_id, output[, instruction, task, ...]}`, one row per record;
- ours: `{audio, answer[, question, task]}`;
- CompA-R-test style: `{audio_id, instruction_output: [{instruction, output[, task]}, ...]}`,
  one row per question.
`audio_id` "empty" is LTU's text-only question.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import UsageError

TEXT_ONLY = "empty"


@dataclass(frozen=True)
class EvalRow:
    index: int  # position among the set's rows (after any task filter), the order results keep
    where: str  # "file[3]" / "file:4" (JSON lines), for messages
    audio_id: str  # as written, what results rows carry
    instruction: str | None
    ref: str
    task: str | None


def read_eval_rows(path: str, task: str | None = None, limit: int | None = None) -> list[EvalRow]:
    rows = []
    for where, record in _records(path):
        for audio_id, instruction, ref, row_task in _questions(record, where):
            if task is not None and row_task != task:
                continue
            rows.append(EvalRow(len(rows), where, audio_id, instruction, ref, row_task))
            if limit is not None and len(rows) == limit:
                return rows
    if not rows:
        only = f" of task {task!r}" if task is not None else ""
        raise UsageError(f"{path}: no rows{only} to evaluate")
    return rows


def audio_path(row: EvalRow, root: str, prefix: tuple[str, str] | None) -> str | None:
    """Where the row's audio is: an absolute id as written (after the prefix rewrite), a relative
    one under `root`; None for a text-only row."""
    if row.audio_id == TEXT_ONLY:
        return None
    audio = row.audio_id
    if prefix is not None and audio.startswith(prefix[0]):
        audio = prefix[1] + audio[len(prefix[0]) :]
    return os.path.normpath(audio if os.path.isabs(audio) else os.path.join(root, audio))


def _records(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise UsageError(f"{path}: cannot read the eval file: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text: {err}") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: line {err.lineno}: not JSON: {err.msg}") from None
        yield from ((f"{path}[{i}]", record) for i, record in enumerate(data))
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}:{number}: not JSON: {err.msg}") from None


def _questions(record, where: str):
    if not isinstance(record, dict):
        raise UsageError(f"{where}: an object was expected")
    if "instruction_output" in record:
        audio = _text(record, "audio_id", where)
        pairs = record["instruction_output"]
        if not isinstance(pairs, list) or not pairs:
            raise UsageError(f"{where}: instruction_output: a non-empty list was expected")
        for k, pair in enumerate(pairs):
            at = f"{where}.instruction_output[{k}]"
            if not isinstance(pair, dict):
                raise UsageError(f"{at}: an object {{instruction, output}} was expected")
            yield (
                audio,
                _text(pair, "instruction", at),
                _text(pair, "output", at),
                _optional(pair, "task", at),
            )
        return
    if "audio" in record:
        audio, instruction, ref = "audio", "question", "answer"
    else:
        audio, instruction, ref = "audio_id", "instruction", "output"
    yield (
        _text(record, audio, where),
        _optional(record, instruction, where),
        _text(record, ref, where),
        _optional(record, "task", where),
    )


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        state = "is missing" if key not in record else "is not a non-empty text"
        raise UsageError(f"{where}: '{key}' {state}")
    return value


def _optional(record: dict, key: str, where: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{where}: '{key}' is {type(value).__name__}, not text")
    return value
