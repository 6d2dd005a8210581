"""The package's layering: the model package knows nothing of DeepSpeed (docs/MODEL.md)."""

from __future__ import annotations

import ast
import pathlib

import gama_ds

MODEL = pathlib.Path(gama_ds.__file__).parent / "model"


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_model_package_imports_no_deepspeed():
    files = sorted(MODEL.glob("*.py"))
    assert files
    offenders = {
        f.name: sorted(m for m in imported_modules(f) if m.split(".")[0] == "deepspeed") for f in files
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}
