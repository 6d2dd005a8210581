"""Reading the two inputs of `gama-ds score`: LTU-format result rows and LTU's label CSVs."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

from ..errors import GamaDsError


class ScoreInputError(GamaDsError, ValueError):
    """A results file or label file that cannot be scored; the message names file and row."""


@dataclass(frozen=True)
class Row:
    number: int  # 1-based position in the results file, for messages
    pred: str
    ref: str
    audio_id: str
    prompt: str | None


def read_rows(path: str) -> list[Row]:
    """A JSON list of {prompt, pred, ref, audio_id}, as LTU's inference_batch.py writes it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise ScoreInputError(f"{path}: cannot read the results: {err.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScoreInputError(f"{path}: not JSON: {err}") from None
    if not isinstance(data, list):
        raise ScoreInputError(f"{path}: a JSON list of {{prompt, pred, ref, audio_id}} rows was expected")
    if not data:
        raise ScoreInputError(f"{path}: no rows")
    rows = []
    for number, item in enumerate(data, 1):
        where = f"{path}: row {number}"
        if not isinstance(item, dict):
            raise ScoreInputError(f"{where}: an object {{prompt, pred, ref, audio_id}} was expected")
        for key in ("pred", "ref", "audio_id"):
            if not isinstance(item.get(key), str):
                state = "is missing" if key not in item else f"is {type(item[key]).__name__}, not text"
                raise ScoreInputError(f"{where}: '{key}' {state}")
        prompt = item.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ScoreInputError(f"{where}: 'prompt' is {type(prompt).__name__}, not text")
        rows.append(Row(number, item["pred"], item["ref"], item["audio_id"], prompt))
    return rows


def read_label_names(path: str) -> list[str]:
    """The display names of an LTU label CSV (header index,mid,display_name), in file order.

    LTU reads these with np.loadtxt and drops the first and last character (the quotes) for
    ESC-50/VS/TUT/BJO/DCASE, or with csv.DictReader for AudioSet; the csv module plus removing
    one pair of enclosing single quotes gives the same names for every file LTU ships.
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "display_name" not in reader.fieldnames:
                raise ScoreInputError(
                    f"{path}: line 1: no display_name column (LTU's header: index,mid,display_name)"
                )
            names = []
            for position, row in enumerate(reader):
                line = reader.line_num
                name = (row.get("display_name") or "").strip()
                if len(name) >= 2 and name[0] == name[-1] == "'":
                    name = name[1:-1]
                if not name:
                    raise ScoreInputError(f"{path}: line {line}: empty display_name")
                index = (row.get("index") or "").strip()
                if index and index != str(position):
                    raise ScoreInputError(
                        f"{path}: line {line}: index {index}, expected {position} (rows in index order)"
                    )
                names.append(name)
    except OSError as err:
        raise ScoreInputError(f"{path}: cannot read the labels: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ScoreInputError(f"{path}: not UTF-8 text: {err}") from None
    if not names:
        raise ScoreInputError(f"{path}: no labels")
    return names
