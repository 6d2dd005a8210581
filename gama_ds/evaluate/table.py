"""A suite's scores shaped like the paper's Table 1: one column per set, "Cls avg" over the
classification columns (single- and multi-label, as the paper's 53.9 is the mean of its twelve),
"Cap avg" over the captioning columns, every value x100."""

from __future__ import annotations

METRIC_NAMES = {"acc": "Acc", "micro_f1": "Mi-F1", "map": "mAP", "cider_d": "CIDEr-D", "spice": "SPICE"}


def table_summary(sets: list[dict]) -> dict:
    """`sets`: the report's entries ({name, title, kind, score: {metric, value}})."""
    columns = [
        {
            "name": s["name"],
            "title": s["title"],
            "kind": s["kind"],
            "metric": s["score"]["metric"],
            "value": 100 * s["score"]["value"],
        }
        for s in sets
    ]
    cls = [c["value"] for c in columns if c["kind"] in ("single", "multi")]
    caps = [c for c in columns if c["kind"] == "caption"]
    summary = {
        "columns": columns,
        "cls_avg": sum(cls) / len(cls) if cls else None,
        "cap_avg": None,
        "notes": [],
    }
    metrics = {c["metric"] for c in caps}
    if len(metrics) == 1:
        summary["cap_avg"] = sum(c["value"] for c in caps) / len(caps)
        summary["cap_metric"] = metrics.pop()
    elif metrics:
        summary["notes"].append(f"no Cap avg: the captioning columns mix {' and '.join(sorted(metrics))}")
    return summary


def format_table(report: dict) -> str:
    summary = report["table"]
    cells = [(f"{c['name']} ({METRIC_NAMES[c['metric']]})", f"{c['value']:.1f}") for c in summary["columns"]]
    if summary["cls_avg"] is not None:
        cells.append(("Cls avg", f"{summary['cls_avg']:.1f}"))
    if summary["cap_avg"] is not None:
        cells.append((f"Cap avg ({METRIC_NAMES[summary['cap_metric']]})", f"{summary['cap_avg']:.1f}"))
    widths = [max(len(head), len(value)) for head, value in cells]
    lines = [
        " | ".join(head.rjust(w) for (head, _), w in zip(cells, widths, strict=True)),
        " | ".join(value.rjust(w) for (_, value), w in zip(cells, widths, strict=True)),
    ]
    gen = report["generation"]
    sampling = (
        "greedy"
        if not gen["do_sample"]
        else f"T {gen['temperature']}, top-p {gen['top_p']}, top-k {gen['top_k']}"
    )
    embedder = report["embedder"]
    used = (
        f"{report['model']['path']} on {report['world_size']} rank(s), {report['device']} {report['dtype']}; "
    )
    used += f"{sampling}, repetition penalty {gen['repetition_penalty']}, {gen['max_new_tokens']} new tokens"
    if embedder:
        used += f"; embedder {embedder['path']} ({embedder['pooling']} pooling)"
    lines.append(used)
    for s in report["sets"]:
        score = s["score"]
        line = f"{s['name']}: {s['rows']} rows, parse {score['parse']['rule']}, prompt {s['prompt']!r}"
        if score.get("spice_not_computed"):
            line += f"; SPICE not computed ({score['spice_not_computed']})"
        lines.append(line)
        lines += [f"  note: {n}" for n in score["notes"]]
    lines += [f"note: {n}" for n in summary["notes"]]
    return "\n".join(lines)
