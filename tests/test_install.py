"""A plain, non-editable install carries what the trainer reads at run time: the DeepSpeed
configs and the bundled recipes, found from any working directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

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
    assert found == {
        "zero2.json": [str(site / "gama_ds" / "ds_configs" / "zero2.json"), 2],
        "zero3.json": [str(site / "gama_ds" / "ds_configs" / "zero3.json"), 3],
        "zero3_offload.json": [str(site / "gama_ds" / "ds_configs" / "zero3_offload.json"), 3],
    }
