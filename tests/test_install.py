"""A plain, non-editable install carries what the trainer reads at run time: the DeepSpeed
configs and the bundled recipes (and serve's web page), found from any working directory."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run from another directory against the installed copy only: which files the trainer found.
PROBE = """
import json, os
import gama_ds
from gama_ds.config import load_recipe
from gama_ds.train.engine import ds_config_path, resolve_ds_config

found = {"package": os.path.dirname(gama_ds.__file__)}
zero3 = ["deepspeed.zero_stage=3"]
for name, overrides in (("stage2", []), ("stage3", zero3), ("stage5", [*zero3, "deepspeed.offload=true"])):
    recipe = load_recipe(name, overrides)
    key = os.path.basename(ds_config_path(recipe))
    found[key] = [ds_config_path(recipe), resolve_ds_config(recipe, 8)["zero_optimization"]["stage"]]
from gama_ds.serve.app import STATIC
found["page"] = [STATIC, sorted(os.listdir(STATIC))]
print(json.dumps(found))
"""


def test_a_non_editable_install_finds_its_deepspeed_configs_and_recipes(tmp_path):
    # What an sdist holds: the package and the files setup.py reads; no checkout around it.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(
        os.path.join(ROOT, "gama_ds"), src / "gama_ds", ignore=shutil.ignore_patterns("__pycache__")
    )
    site = tmp_path / "site"
    # --no-deps and no build isolation: the dependencies are this environment's, nothing is fetched.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
         str(site), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    shutil.rmtree(src)  # nothing may be read from the source tree
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found.pop("package") == str(site / "gama_ds")
    assert found.pop("page") == [
        str(site / "gama_ds" / "serve" / "static"),
        ["app.js", "index.html"],
    ]  # serve's
    assert found == {
        "zero2.json": [str(site / "gama_ds" / "ds_configs" / "zero2.json"), 2],
        "zero3.json": [str(site / "gama_ds" / "ds_configs" / "zero3.json"), 3],
        "zero3_offload.json": [str(site / "gama_ds" / "ds_configs" / "zero3_offload.json"), 3],
    }


# setup.py declares ranges; constraints.txt pins the set CI installs (the top of each range) and
# constraints-lowest.txt the set tested at the bottom (README, "Installing by hand").
def declared() -> dict[str, list[Requirement]]:
    """install_requires and the dev extra, read from setup.py's source: no build, no metadata of
    whichever copy of the project happens to be installed."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"]
    wanted = ("install_requires", "extras_require")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in wanted}
    return {
        "install_requires": [Requirement(r) for r in kwargs["install_requires"]],
        "dev": [Requirement(r) for r in kwargs["extras_require"]["dev"]],
    }


def pins(name: str) -> dict[str, Version]:
    found = {}
    path = os.path.join(ROOT, name)
    for number, line in enumerate(open(path, encoding="utf-8"), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        exact = [s for s in req.specifier if s.operator == "=="]
        assert len(req.specifier) == 1 and exact, f"{name}:{number}: not an exact pin: {line}"
        found[canonicalize_name(req.name)] = Version(exact[0].version)
    return found


def bound(req: Requirement, operator: str) -> Version | None:
    versions = [Version(s.version) for s in req.specifier if s.operator == operator]
    assert len(versions) <= 1, f"{req}: more than one {operator} bound"
    return versions[0] if versions else None


def test_torch_is_a_range_that_keeps_a_sites_cuda_build():
    requires = {canonicalize_name(r.name): r for r in declared()["install_requires"]}
    top, lowest = pins("constraints.txt"), pins("constraints-lowest.txt")
    for name in ("torch", "torchaudio"):
        spec = requires[name].specifier
        assert not [s for s in spec if s.operator in ("==", "===", "~=")], f"{name} is pinned: {spec}"
        # The forms a site's CUDA builds report, at both tested ends of the range.
        for version in (f"{top[name]}+cu126", f"{lowest[name]}+cu124", f"{lowest[name]}+cu121"):
            assert spec.contains(version), f"{name}{spec} refuses a site build {version}"
    # torchaudio's wheels are built for one torch minor release: the two ends must pair up.
    for pinned in (top, lowest):
        assert pinned["torch"].release[:2] == pinned["torchaudio"].release[:2], pinned


def test_every_requirement_is_a_range_from_the_lowest_tested_to_the_pinned_minor():
    top, lowest = pins("constraints.txt"), pins("constraints-lowest.txt")
    requires = declared()["install_requires"]
    assert sorted(lowest) == sorted(canonicalize_name(r.name) for r in requires), "constraints-lowest.txt"
    for req in requires:
        name = canonicalize_name(req.name)
        assert name in top, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(top[name]), f"{req}: constraints.txt's {top[name]} is outside"
        assert bound(req, ">=") == lowest[name], f"{req}: the bottom is not the tested {lowest[name]}"
        # The top admits patch releases of the tested minor, never an untested minor or major.
        upper = bound(req, "<")
        assert upper is not None, f"{req}: no upper bound"
        next_minor = Version(f"{top[name].major}.{top[name].minor + 1}")
        assert upper <= next_minor, f"{req}: the top passes {top[name]}'s minor release"


def test_the_dev_tools_are_pinned_to_what_constraints_txt_installs():
    top = pins("constraints.txt")
    for req in declared()["dev"]:
        name = canonicalize_name(req.name)
        assert name in top and req.specifier.contains(top[name]), f"{req} vs constraints.txt {top.get(name)}"


@pytest.mark.skipif(
    os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")),
    reason="runs in the checkout's own .venv, the one `make` builds with constraints.txt",
)
def test_the_checkouts_venv_holds_exactly_the_constrained_set():
    top = pins("constraints.txt")
    for req in [*declared()["install_requires"], *declared()["dev"]]:
        name = canonicalize_name(req.name)
        installed = metadata.version(req.name)
        # A local build tag (+cu130) is the same release.
        assert SpecifierSet(f"=={top[name]}").contains(installed), f"{name} {installed}, pinned {top[name]}"
