"""Recipe choices: each choice field's Literal is the one list that loading, `check` and the
docs follow, and a value outside it is an error naming the key."""

from __future__ import annotations

import dataclasses
import os
import re
import typing

import pytest

from gama_ds.config import ConfigError, ModelConfig, Recipe, choices, load_recipe

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def choice_fields(cls=Recipe, prefix: str = ""):
    """(dotted key, section class, field name) of every Literal field in a recipe."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if typing.get_origin(hint) is typing.Literal:
            yield key, cls, f.name
        elif dataclasses.is_dataclass(hint) or inner:
            yield from choice_fields(hint if dataclasses.is_dataclass(hint) else inner[0], f"{key}.")


FIELDS = list(choice_fields())
COMPANIONS = {("model.variant", "ltu"): ["model.trainable=all"]}  # what a choice needs beside it


def test_the_choice_fields_are_the_ones_users_set():
    keys = {key for key, _, _ in FIELDS}
    assert {"model.variant", "model.trainable", "data.on_bad_sample", "data.template"} <= keys
    assert {"train.precision", "deepspeed.zero_stage", "data.start_method"} <= keys


@pytest.mark.parametrize("key,section,name", FIELDS, ids=[k for k, _, _ in FIELDS])
def test_a_value_outside_the_choices_is_refused_naming_the_key(key, section, name):
    allowed = choices(section, name)
    bad = 99 if isinstance(allowed[0], str) else "x"
    message = rf"{re.escape(key)} must be one of {re.escape(', '.join(map(str, allowed)))}; got"
    with pytest.raises(ConfigError, match=message):  # from YAML or a key=value override
        load_recipe("tiny", [f"{key}={bad}"])
    recipe = load_recipe("tiny")  # and in a recipe changed in code, at its check
    owner = recipe
    for part in key.split(".")[:-1]:
        owner = getattr(owner, part)
    setattr(owner, name, "nonsense" if isinstance(allowed[0], str) else 7)
    with pytest.raises(ConfigError, match=re.escape(key)):
        recipe.check()
    for value in allowed:  # and every choice is accepted
        load_recipe("tiny", [f"{key}={value}", *COMPANIONS.get((key, value), [])])


def test_the_model_docs_explain_every_choice():
    with open(os.path.join(DOCS, "MODEL.md"), encoding="utf-8") as f:
        rows = {m[1]: m[2] for m in re.finditer(r"^\| `([a-z_.]+)` \| (.*) \|$", f.read(), re.MULTILINE)}
    for _, section, name in FIELDS:
        if section is ModelConfig:
            assert name in rows, f"docs/MODEL.md has no row for model.{name}"
            missing = [c for c in choices(section, name) if f"`{c}`" not in rows[name]]
            assert missing == [], f"docs/MODEL.md, model.{name}: {missing}"


def test_dropouts_are_probabilities():
    for key in ("model.audio.qformer_dropout", "model.audio.aggregator_dropout", "model.lora.dropout"):
        with pytest.raises(ConfigError, match=rf"{re.escape(key)} is a dropout probability"):
            load_recipe("tiny", [f"{key}=1.5"])
