"""Text rules: a generated answer -> the text that is embedded, a reference -> its classes, a
label-file name -> (the key references are matched to, the text that is embedded).

Each rule is LTU's, read from its src/ltu/eval/eval_*.py (docs/EVAL.md lists them), except the
`plain_*` ones, which are ours for answers to our own prompts: the whole answer, no cutting. A
rule is named and carries its own description, so that a report can say which one was used.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

SOUND_OF = "sound of "  # LTU embeds "sound of <text>" on both sides


@dataclass(frozen=True)
class Rule:
    name: str
    text: str  # what it does, as an expression a reader can check against LTU's scripts
    apply: Callable


# Generated answers. LTU's decoding leaves the tail of the prompt ("...Response:\n") in `pred`,
# which is why its rules cut after a ':' or "Audio caption" and drop one or two characters.
ANSWER_RULES = {
    r.name: r
    for r in (
        Rule("ltu_colon_lstrip", "pred.split(':')[-1].lstrip()", lambda p: p.split(":")[-1].lstrip()),
        Rule("ltu_colon_drop1", "pred.split(':')[-1][1:]", lambda p: p.split(":")[-1][1:]),
        Rule(
            "ltu_audio_caption_drop2",
            "pred.replace('\"', '').split('Audio caption')[-1][2:]",
            lambda p: p.replace('"', "").split("Audio caption")[-1][2:],
        ),
        Rule("plain_answer", "pred.strip()", lambda p: p.strip()),
    )
}

# References -> class keys (a list: AudioSet and FSD50K clips have several).
TRUTH_RULES = {
    r.name: r
    for r in (
        Rule("ltu_colon", "ref.split(':')[-1]", lambda r: [r.split(":")[-1]]),
        Rule(
            "ltu_colon_underscore",
            "ref.split(':')[-1].replace('_', ' ')",
            lambda r: [r.split(":")[-1].replace("_", " ")],
        ),
        Rule(
            "ltu_colon_no_shy_comma",
            "ref.split(':')[-1].replace('\\xad', '').replace(',', '')",
            lambda r: [r.split(":")[-1].replace("\xad", "").replace(",", "")],
        ),
        Rule(
            "ltu_colon_no_comma",
            "ref.split(':')[-1].replace(',', '')",
            lambda r: [r.split(":")[-1].replace(",", "")],
        ),
        Rule("ltu_colon_space_lower", "ref.split(': ')[-1].lower()", lambda r: [r.split(": ")[-1].lower()]),
        Rule(
            "ltu_colon_space_multi",
            "ref.split(': ')[-1].split('; ')",
            lambda r: r.split(": ")[-1].split("; "),
        ),
        Rule("plain_ref", "ref.strip()", lambda r: [r.strip()]),
        Rule("plain_ref_multi", "ref.strip().split('; ')", lambda r: r.strip().split("; ")),
    )
}

# Label-file names -> (key, embedded text).
LABEL_RULES = {
    r.name: r
    for r in (
        Rule(
            "ltu_name",
            "key = name; text = 'sound of ' + name.replace('_', ' ').lower()",
            lambda n: (n, SOUND_OF + n.replace("_", " ").lower()),
        ),
        Rule(
            "ltu_vgg",
            "key = name.replace('_', ', '); text = 'sound of ' + key.lower()",
            lambda n: (n.replace("_", ", "), SOUND_OF + n.replace("_", ", ").lower()),
        ),
        Rule(
            "ltu_fsd",
            "key = name.replace('_', ' '); text = 'sound of ' + key.lower()",
            lambda n: (n.replace("_", " "), SOUND_OF + n.replace("_", " ").lower()),
        ),
        Rule("ltu_as", "key = name; text = 'sound of ' + name.lower()", lambda n: (n, SOUND_OF + n.lower())),
    )
}


def embedded_answer(text: str) -> str:
    """What LTU embeds for an answer: 'sound of ' + the cut answer, lower-cased."""
    return SOUND_OF + text.lower()


def loose_key(text: str, plain: bool) -> str:
    """How a reference is matched to a label key. LTU matches exactly; we also forgive spacing
    (runs and ends), which only changes files on which LTU's lookup raises. The plain rule also
    ignores case and '_' vs ' ', since our own references are free text."""
    if plain:
        text = text.replace("_", " ").casefold()
    return " ".join(text.split())


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def caption_text(text: str) -> str:
    """LTU's caption normalisation: ASCII punctuation deleted (not spaced), lower-cased."""
    return text.translate(_PUNCTUATION).lower()
