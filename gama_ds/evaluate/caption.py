"""Captioning scores as LTU reports them: CIDEr-D (COCO's definition) and, where Java and
Stanford CoreNLP are installed, SPICE; each the mean over five trials (the t-th prediction of
every clip against all of that clip's references)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import tempfile
from collections import Counter

import numpy as np

from .files import ScoreInputError


def _ngrams(sentence: str, n: int) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> np.ndarray:
    """Per-clip CIDEr-D (Vedantam et al. 2015, as coco-caption computes it): tf-idf vectors of
    1..n-grams with the idf taken from the references of these clips (log of clips over clips
    whose references hold the n-gram), the candidate's weights clipped at the reference's, a
    Gaussian length penalty of `sigma` words, averaged over n and references, times 10.
    Sentences are already tokenised: words split on whitespace."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
    if any(not refs for refs in references):
        raise ValueError("a clip without references")
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for refs in ref_counts:
        doc_freq.update({g for counts in refs for g in counts})
    log_clips = math.log(len(candidates))

    def vector(counts: Counter):
        vec: list[dict] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_clips - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
        return vec, norms

    scores = []
    for cand, refs, counts in zip(candidates, references, ref_counts, strict=True):
        vec_c, norm_c = vector(_ngrams(cand, n))
        length_c = len(cand.split())
        total = 0.0
        for ref, ref_count in zip(refs, counts, strict=True):
            vec_r, norm_r = vector(ref_count)
            penalty = math.exp(-((length_c - len(ref.split())) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_c[k].items())
                if norm_c[k] and norm_r[k]:
                    dot /= norm_c[k] * norm_r[k]
                total += dot * penalty / n
        scores.append(10.0 * total / len(refs))
    return np.array(scores)


def group_trials(clips: list[str], preds: list[str], refs: list[str], trials: int, where: str):
    """Rows -> (clip ids, per-trial candidate lists, per-clip references), rows of a clip in
    file order. Every clip must have exactly `trials` rows: LTU's script would otherwise fail
    (fewer) or score a different set per trial (more), and swallow the error."""
    by_clip: dict[str, list[int]] = {}
    for i, clip in enumerate(clips):
        by_clip.setdefault(clip, []).append(i)
    for clip, idx in by_clip.items():
        if len(idx) != trials:
            raise ScoreInputError(
                f"{where}: clip {clip!r} has {len(idx)} rows (rows {idx[0] + 1}..{idx[-1] + 1}), "
                f"captioning needs {trials}: one per reference caption"
            )
    ids = list(by_clip)
    candidates = [[preds[by_clip[c][t]] for c in ids] for t in range(trials)]
    references = [[refs[i] for i in by_clip[c]] for c in ids]
    return ids, candidates, references


CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def find_spice(jar: str | None = None) -> tuple[str | None, str]:
    """(the SPICE jar to run, '') when SPICE can run offline, else (None, why not). The jar is
    `jar`, else the one pycocoevalcap installs; SPICE needs Java and CoreNLP's two jars in its
    lib/ folder (pycocoevalcap downloads them on first use: we never do)."""
    if jar is None:
        spec = importlib.util.find_spec("pycocoevalcap")
        if spec is None or not spec.submodule_search_locations:
            return None, "no SPICE jar (give --spice-jar, or install pycocoevalcap, which ships one)"
        jar = os.path.join(list(spec.submodule_search_locations)[0], "spice", "spice-1.0.jar")
    if not os.path.isfile(jar):
        return None, f"no SPICE jar at {jar}"
    if shutil.which("java") is None:
        return None, "no java on PATH"
    missing = [n for n in CORENLP_JARS if not os.path.isfile(os.path.join(os.path.dirname(jar), "lib", n))]
    if missing:
        return None, f"Stanford CoreNLP is not installed beside the SPICE jar (missing lib/{missing[0]})"
    return jar, ""


def spice(
    jar: str, ids: list[str], candidates: list[str], references: list[list[str]], timeout: float = 7200
):
    """Per-clip SPICE F-scores from the jar (its -subset output, the 'All' tuple F-score)."""
    with tempfile.TemporaryDirectory(prefix="gama_ds_spice_") as tmp:
        src, out = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        items = [
            {"image_id": i, "test": c, "refs": r} for i, c, r in zip(ids, candidates, references, strict=True)
        ]
        with open(src, "w", encoding="utf-8") as f:
            json.dump(items, f)
        cmd = ["java", "-jar", "-Xmx8G", jar, src, "-out", out, "-subset", "-silent"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        if done.returncode != 0:
            raise RuntimeError(f"SPICE failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        with open(out, encoding="utf-8") as f:
            results = {str(r["image_id"]): r["scores"]["All"]["f"] for r in json.load(f)}
    return np.array([results[str(i)] for i in ids], dtype=np.float64)
