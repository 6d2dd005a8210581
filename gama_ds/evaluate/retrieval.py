"""Multi-label scoring (FSD50K, AudioSet): per-class average precision with the cosine vector as
the score, as LTU's stats.calculate_stats gets it from sklearn's average_precision_score."""

from __future__ import annotations

import numpy as np


def average_precision(truth, scores) -> float:
    """AP of one class: sum over distinct score thresholds (high to low) of the recall gained
    times the precision there; tied scores form one threshold. 0 when the class has no positive
    (sklearn >= 1.1 returns 0 too, with a warning), so such a class pulls the mean down."""
    truth = np.asarray(truth, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    positives = truth.sum()
    if positives == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    scores, truth = scores[order], truth[order]
    # The last row of each run of equal scores closes a threshold.
    ends = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(truth)[ends]
    precision = tp / (ends + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def class_average_precisions(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    truth, scores = np.asarray(truth), np.asarray(scores)
    if truth.shape != scores.shape or truth.ndim != 2:
        raise ValueError(f"AP of {scores.shape} scores against {truth.shape} truths")
    return np.array([average_precision(truth[:, k], scores[:, k]) for k in range(truth.shape[1])])


def mean_average_precision(truth: np.ndarray, scores: np.ndarray) -> dict:
    """`map`: the mean over ALL classes, a class with no positive counting 0 (LTU's number);
    `map_present`: the mean over classes with at least one positive."""
    aps = class_average_precisions(truth, scores)
    present = np.asarray(truth).sum(axis=0) > 0
    return {
        "map": float(aps.mean()),
        "map_present": float(aps[present].mean()) if present.any() else 0.0,
        "classes": int(len(aps)),
        "classes_present": int(present.sum()),
    }
