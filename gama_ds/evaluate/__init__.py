"""Scoring generated answers the way LTU's evaluation scripts (and so GAMA's Table 1) do.

`score.score_results` is the entry point; `datasets.DATASETS` names each set's answer, label
and truth rules, its decision rule and its metric. docs/EVAL.md states the protocol.
"""
