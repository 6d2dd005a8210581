"""The decision of LTU's classification scripts: cosine similarity between the answer's and
each label's embedding, optionally clipped at 0, then the first class of highest score; and the
two single-label metrics it reports, top-1 accuracy and micro-F1."""

from __future__ import annotations

import numpy as np


def cosine_scores(answers, labels, clip: bool) -> np.ndarray:
    """(rows, classes) cosines in float64, each side normalised here so any vectors will do."""
    a = np.asarray(answers, dtype=np.float64)
    b = np.asarray(labels, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    scores = a @ b.T
    return np.maximum(scores, 0.0) if clip else scores


def top1(scores: np.ndarray) -> np.ndarray:
    """The class of highest score per row; on a tie the first such class (np.argmax's rule,
    which LTU relies on: a fully clipped row is all zeros and goes to class 0)."""
    return np.argmax(scores, axis=1)


def tied_rows(scores: np.ndarray) -> int:
    """Rows whose best score is shared by more than one class (decided by the first-class rule)."""
    return int(((scores == scores.max(axis=1, keepdims=True)).sum(axis=1) > 1).sum())


def accuracy(predicted, truth) -> float:
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape or predicted.ndim != 1 or len(truth) == 0:
        raise ValueError(f"accuracy of {predicted.shape} predictions against {truth.shape} truths")
    return float((predicted == truth).mean())


def one_hot(index, classes: int) -> np.ndarray:
    out = np.zeros((len(index), classes))
    out[np.arange(len(index)), np.asarray(index)] = 1.0
    return out


def micro_f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Micro-averaged F1 of 0/1 indicator matrices (rows, classes), as sklearn's
    f1_score(average='micro'): 2TP / (2TP + FP + FN) over every cell. For one-hot predictions
    against one-hot truth FP = FN = misses, so it equals top-1 accuracy."""
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape or predicted.ndim != 2:
        raise ValueError(f"micro-F1 of {predicted.shape} predictions against {truth.shape} truths")
    tp = np.sum(predicted & truth)
    fp = np.sum(predicted & ~truth)
    fn = np.sum(~predicted & truth)
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0
