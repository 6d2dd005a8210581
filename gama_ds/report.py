"""An evaluation result as a table for people: loss, per-task accuracies, sample answers.

`gama-ds eval` prints it (without --json) and the demo logs it.
"""

from __future__ import annotations


def report_table(result: dict) -> str:
    lines = [f"{result['examples']} QA pairs"]
    if "device" in result:
        lines[0] += f" on {result['device']} in {result['dtype']}"
    if "loss" in result:
        lines[0] += f": loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}"
    columns = [("exact match", result.get("exact_match_by_task"))]
    columns.append((f"classified ({result.get('classify_by')})", result.get("classify_by_task")))
    columns = [(name, col) for name, col in columns if col is not None]
    if columns:
        tasks = sorted(set().union(*(col for _, col in columns)))
        lines.append(f"  {'task':<12}" + "".join(f"{name:>24}" for name, _ in columns))
        for task in tasks:
            lines.append(f"  {task:<12}" + "".join(f"{100 * col[task]:>23.1f}%" for _, col in columns))
        if "exact_match" in result:
            lines.append(f"  {'all':<12}{100 * result['exact_match']:>23.1f}%")
    for s in result.get("samples", []):
        lines.append(f"  Q: {s['question']}  A: {s['answer']!r}  (reference: {s['reference']!r})")
    return "\n".join(lines)
