"""The command line: entry points, size parsing, and the synth -> convert -> show path."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from gama_ds import __version__
from gama_ds.cli import main, parse_size
from gama_ds.data.shards import read_index


def test_module_and_console_script_both_run():
    script = os.path.join(os.path.dirname(sys.executable), "gama-ds")  # installed beside this python
    for cmd in ([sys.executable, "-m", "gama_ds", "--version"], [script, "--version"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
        assert out.stdout.strip() == f"gama_ds {__version__}"


@pytest.mark.parametrize(
    "text,value", [("4096", 4096), ("256MB", 256 * 10**6), ("1GiB", 2**30), ("1.5k", 1500), ("64KiB", 65536)]
)
def test_sizes_parse(text, value):
    assert parse_size(text) == value


def test_bad_sizes_and_counts_are_refused_by_the_parser(capsys):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")
    for argv in (
        ["convert", "x.json", "--out", "o", "--workers", "0"],
        ["convert", "x.json", "--out", "o", "--shard-size", "big"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_an_unreadable_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    assert main(["convert", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert f"gama-ds convert: error: {bad}: line 1 column 3" in capsys.readouterr().err


def test_synth_convert_verify_show(tmp_path, capsys):
    assert (
        main(["synth", "--out", str(tmp_path / "d"), "--clips", "6", "--test-clips", "2", "--seed", "1"]) == 0
    )
    paths = json.loads(capsys.readouterr().out)
    train = json.load(open(paths["train"]))
    assert len(train) == 24 and {r["task"] for r in train} == {"count", "pitch", "kind", "loudness"}
    out = str(tmp_path / "shards")
    assert (
        main(["convert", paths["train"], paths["test"], "--out", out, "--workers", "1", "--no-progress"]) == 0
    )
    assert read_index(out)["totals"] == {
        "shards": 1,
        "samples": 8,
        "qa_pairs": 32,
        "bytes": read_index(out)["totals"]["bytes"],
        "rejected_qa_pairs": 0,
        "rejected_records": 0,
    }
    assert main(["verify", out]) == 0
    capsys.readouterr()
    assert main(["show", out, "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "8 clips, 32 QA pairs" in shown and "fbank [" in shown and shown.count("    Q: ") == 4


def _gama_ds(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gama_ds", *argv], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_a_project_error_is_one_line_and_exit_code_2(tmp_path):
    # Raised deep inside the model's build, not by the recipe parser: the CLI still reports it plainly.
    missing = tmp_path / "no-such-llm"
    done = _gama_ds("estimate", "tiny", f"model.llm={missing}")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"gama-ds estimate: error: model.llm '{missing}' is neither a preset" in done.stderr


def test_any_other_exception_keeps_its_traceback(tmp_path):
    """A library's ValueError is not one of our errors: today's users must see where it came from."""
    from transformers import LlamaConfig

    from gama_ds.model.llm import PRESETS

    # A model folder whose config.json transformers accepts but which has no layers for LoRA
    # to attach to: peft raises its own ValueError while the model is built.
    LlamaConfig(**{**PRESETS["tiny"], "num_hidden_layers": -1}).save_pretrained(tmp_path / "llm")
    done = _gama_ds("estimate", "tiny", f"model.llm={tmp_path / 'llm'}")
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "Error" in last.split(":")[0] and "gama-ds estimate: error" not in done.stderr


def test_every_project_error_derives_from_the_base():
    import inspect
    import pkgutil

    import gama_ds
    from gama_ds.errors import GamaDsError

    found = {}
    for info in pkgutil.walk_packages(gama_ds.__path__, "gama_ds."):
        if info.name.endswith("__main__"):
            continue
        module = __import__(info.name, fromlist=["_"])
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, Exception) and not name.startswith("_"):
                found[name] = cls
    assert {"ConfigError", "ShardError", "StreamError", "ConvertError", "InputError"} <= set(found)
    assert [name for name, cls in found.items() if not issubclass(cls, GamaDsError)] == []


@pytest.mark.parametrize("command", ["generate --audio x.wav --question q", "eval --shards s"])
def test_a_folder_that_is_not_an_export_is_named(tmp_path, capsys, command):
    assert main([*command.split(), "--model", str(tmp_path)]) == 2
    assert f"--model {tmp_path} is not a gama-ds export" in capsys.readouterr().err
