"""`gama-ds score`: LTU-format result rows + a dataset's rules -> the number Table 1 reports."""

from __future__ import annotations

import os
import re

import numpy as np

from ..errors import UsageError
from . import caption, classify, retrieval
from .datasets import CAPTION_TRIALS, Dataset, get_dataset
from .files import Row, ScoreInputError, read_label_names, read_rows
from .parse import ANSWER_RULES, LABEL_RULES, TRUTH_RULES, caption_text, embedded_answer, loose_key

METRICS = {
    "single": ("acc", "micro_f1"),
    "multi": ("map",),
    "caption": ("cider_d", "spice"),
    "exact": ("acc",),
}
PARSES = ("ltu", "plain")


def score_results(
    results: str,
    dataset: str,
    labels: str | None = None,
    embedder=None,
    parse: str | None = None,
    metric: str | None = None,
    spice_jar: str | None = None,
) -> dict:
    """Score one results file. `embedder` is a callable texts -> vectors with a describe()
    (embed.TextEmbedder); `parse` "ltu" (LTU's cuts, the default for LTU's sets) or "plain"
    (the whole answer); `metric` one of the set's (default: what Table 1 reports for it)."""
    ds = get_dataset(dataset)
    parse = parse or ("ltu" if ds.ltu else "plain")
    if parse not in PARSES:
        raise UsageError(f"parse rule {parse!r}; one of {', '.join(PARSES)}")
    if parse == "ltu" and not ds.ltu:
        raise UsageError(f"{ds.name} has no LTU script, so no LTU parse rule; use the plain rule")
    metric = metric or ds.metric
    if metric not in METRICS[ds.kind]:
        raise UsageError(f"{ds.name} is scored by {' or '.join(METRICS[ds.kind])}, not {metric}")
    uses_labels = ds.kind in ("single", "multi")
    if uses_labels and (labels is None or embedder is None):
        raise UsageError(
            f"{ds.name} needs --labels (an LTU label CSV) and --embedder (a text-encoder folder)"
        )
    if not uses_labels and (labels is not None or embedder is not None):
        raise UsageError(f"{ds.name} uses no label file or embedder: drop --labels/--embedder")
    answer = ANSWER_RULES[ds.answer if parse == "ltu" else ds.plain_answer]
    if ds.kind == "caption":  # LTU cuts references as it cuts answers
        truth = ANSWER_RULES[ds.truth if parse == "ltu" else ds.plain_answer]
    else:
        truth = TRUTH_RULES[ds.truth if parse == "ltu" else ds.plain_truth]
    rows = read_rows(results)
    report = {
        "dataset": ds.name,
        "title": ds.title,
        "metric": metric,
        "value": None,
        "rows": len(rows),
        "results": os.path.abspath(results),
        "parse": {"rule": parse, "answer": answer.text, "reference": truth.text},
        "embedder": embedder.describe() if embedder is not None else None,
        "notes": [],
    }
    if ds.rows is not None and len(rows) != ds.rows:
        report["notes"].append(f"LTU scores all {ds.rows} {ds.title} clips; this file has {len(rows)} rows")
    if uses_labels:
        _classification(report, ds, rows, results, labels, embedder, answer, truth, parse)
    elif ds.kind == "caption":
        _captioning(report, rows, results, answer, truth, metric, spice_jar)
    else:
        _exact(report, rows, answer, truth)
    return report


def _classification(report, ds: Dataset, rows: list[Row], results, labels, embedder, answer, truth, parse):
    label_rule = LABEL_RULES[ds.labels]
    names = read_label_names(labels)
    keys, texts = zip(*(label_rule.apply(n) for n in names), strict=True)
    index: dict[str, int] = {}
    for i, key in enumerate(keys):
        loose = loose_key(key, parse == "plain")
        if loose in index:
            raise ScoreInputError(f"{labels}: labels {index[loose] + 1} and {i + 1} are both {key!r}")
        index[loose] = i
    report["labels"] = os.path.abspath(labels)
    report["parse"]["labels"] = label_rule.text
    report["parse"]["clip_at_0"] = ds.clip
    if ds.classes is not None and len(keys) != ds.classes:
        report["notes"].append(f"LTU's {ds.title} has {ds.classes} classes; {labels} has {len(keys)}")
    truth_index = []
    for row in rows:
        found = []
        for key in truth.apply(row.ref):
            i = index.get(loose_key(key, parse == "plain"))
            if i is None:
                raise ScoreInputError(
                    f"{results}: row {row.number}: reference {row.ref!r} names class {key!r} ({truth.text}), "
                    f"which is not in {labels}"
                )
            found.append(i)
        truth_index.append(found)
    answers = [embedded_answer(answer.apply(row.pred)) for row in rows]
    unique = list(dict.fromkeys(answers))  # LTU caches by text: embed each distinct answer once
    vectors = embedder(unique)
    position = {text: i for i, text in enumerate(unique)}
    answer_vectors = np.asarray(vectors, dtype=np.float64)[[position[a] for a in answers]]
    scores = classify.cosine_scores(answer_vectors, embedder(list(texts)), ds.clip)
    classes = len(keys)
    truth_hot = np.zeros((len(rows), classes))
    for r, found in enumerate(truth_index):
        truth_hot[r, found] = 1.0
    report["classes"] = classes
    if ds.kind == "multi":
        report.update(retrieval.mean_average_precision(truth_hot, scores))
        report["value"] = report["map"]
        return
    chosen = classify.top1(scores)
    report["accuracy"] = classify.accuracy(chosen, [f[0] for f in truth_index])
    report["micro_f1"] = classify.micro_f1(classify.one_hot(chosen, classes), truth_hot)
    report["value"] = report["accuracy"] if report["metric"] == "acc" else report["micro_f1"]
    report["tied_rows"] = classify.tied_rows(scores)
    if ds.clip:
        report["rows_all_clipped"] = int((scores.max(axis=1) == 0).sum())


def _captioning(report, rows: list[Row], results, answer, truth, metric, spice_jar):
    clips = [row.audio_id.split("/")[-1] for row in rows]  # LTU keys clips by file name
    preds = [caption_text(answer.apply(row.pred)) for row in rows]
    refs = [caption_text(truth.apply(row.ref)) for row in rows]
    ids, candidates, references = caption.group_trials(clips, preds, refs, CAPTION_TRIALS, results)
    report["clips"] = len(ids)
    report["parse"]["text"] = "punctuation deleted, lower-cased, split on whitespace"
    trials = [float(caption.cider_d(c, references).mean()) for c in candidates]
    report["cider_d"] = float(np.mean(trials))
    report["cider_d_trials"] = trials
    jar, why = caption.find_spice(spice_jar)
    if jar is None:
        if metric == "spice":
            raise UsageError(f"SPICE cannot run here: {why}")
        report["spice"] = None
        report["spice_not_computed"] = why
    else:
        spice_trials = [float(caption.spice(jar, ids, c, references).mean()) for c in candidates]
        report["spice"] = float(np.mean(spice_trials))
        report["spice_trials"] = spice_trials
    report["value"] = report[metric]


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _exact(report, rows: list[Row], answer, truth):
    """Ours (ClothoAQA): right when the normalised answer is the normalised reference or starts
    with it as whole words ("yes, a dog barks" for "yes")."""
    hits = 0
    for row in rows:
        a, r = _normal(answer.apply(row.pred)), _normal(truth.apply(row.ref)[0])
        hits += a == r or a.startswith(r + " ")
    report["parse"]["match"] = "normalised answer == reference, or starts with it as whole words"
    report["accuracy"] = report["value"] = hits / len(rows)
