"""The tagging settings a user gives, and the tagger folder's config.json, checked without
loading torch or the model: `gama-ds convert` and `gama-ds tag` refuse bad ones before work."""

from __future__ import annotations

import json
import os

from ..errors import GamaDsError

DEFAULT_TOP_K = 10
DEFAULT_THRESHOLD = 0.05
DEFAULT_BATCH = 16


class TaggerError(GamaDsError, ValueError):
    """A tagger folder or tagging setting that cannot be used; the message names it."""


ACTIVATIONS = ("auto", "sigmoid", "softmax")
BY_PROBLEM = {"multi_label_classification": "sigmoid", "single_label_classification": "softmax"}


def check_tagging(top_k, threshold, batch_size: int = 1) -> None:
    """The numbers a user sets for a tagging, checked before anything loads."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise TaggerError(f"--top-k must be a whole number of at least 1, got {top_k!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise TaggerError(f"--threshold must be a score in [0, 1], got {threshold!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TaggerError(f"--batch-size must be at least 1, got {batch_size!r}")


def read_config(folder: str) -> dict:
    """The folder's config.json, checked to be a classifier with label names."""
    if not os.path.isdir(folder):
        raise TaggerError(f"--tagger {folder}: not a directory")
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise TaggerError(f"--tagger {folder}: no config.json; give a transformers model folder") from None
    except (OSError, json.JSONDecodeError) as err:
        raise TaggerError(f"{path}: unreadable: {err}") from None
    labels = config.get("id2label") if isinstance(config, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise TaggerError(f"{path}: no id2label: a tagger needs its label names")
    if sorted(labels) != sorted(str(i) for i in range(len(labels))):
        raise TaggerError(f"{path}: id2label's ids are not 0..{len(labels) - 1}")
    return config


def label_names(config: dict) -> list[str]:
    """id2label's names in class order (read_config checked the ids)."""
    return [str(config["id2label"][str(i)]) for i in range(len(config["id2label"]))]


def resolve_activation(config: dict, activation: str, folder: str) -> tuple[str, str]:
    """(activation, why) from the override or the config's problem_type."""
    if activation not in ACTIVATIONS:
        raise TaggerError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if activation != "auto":
        return activation, "set by the user"
    problem = config.get("problem_type")
    if problem is None:
        return "sigmoid", "config has no problem_type: taken as multi-label"
    if problem not in BY_PROBLEM:
        raise TaggerError(f"--tagger {folder}: problem_type {problem!r} is not a classification")
    return BY_PROBLEM[problem], f"config problem_type {problem}"
