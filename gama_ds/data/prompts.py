"""The prompt templates: the text around a question that the LLM is trained and asked with.

Plain strings, no dependencies, so that the recipe (`data.template`) can name its choices
from here without importing the tokenising side (collate.py).
"""

from __future__ import annotations

TEMPLATES = {
    "alpaca_short": {
        "with_input": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "no_input": "### Instruction:\n{instruction}\n\n### Response:\n",
    },
}


def prompt_text(qa: dict, template: str = "alpaca_short") -> str:
    parts = TEMPLATES[template]
    form = parts["with_input"] if qa.get("input") else parts["no_input"]
    return form.format(instruction=qa["instruction"], input=qa.get("input", ""))
