"""launch/pipeline.sh on one node (NO_SSH=1, 2 CPU ranks): two tiny stages chained through the
first one's export; a pipeline killed during stage 2 skips stage 1 and resumes stage 2 when
run again; a finished pipeline run again skips everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from cluster import QUIET, free_port, tail, tiny_data, wait_for

from conftest import ROOT, train_env
from gama_ds.train.checkpoint import complete_tags

SCRIPT = os.path.join(ROOT, "launch", "pipeline.sh")
STEPS = 12


def test_pipeline_chains_skips_finished_stages_and_resumes_the_interrupted_one(tmp_path):
    data = tiny_data(tmp_path)
    for n in (1, 2):
        (tmp_path / "shards").mkdir(exist_ok=True)
        (tmp_path / "shards" / f"stage{n}").symlink_to(data["train"])
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=2\n")
    env = {
        **train_env(),
        "PYTHON": sys.executable,
        "NO_SSH": "1",
        "NODE_RANK": "0",
        "MASTER_PORT": str(free_port()),
        "STAGES": "tiny tiny",
        "DATA_ROOT": str(tmp_path / "shards"),
        "RUNS": str(tmp_path / "runs"),
    }
    args = [SCRIPT, f"train.max_steps={STEPS}", "checkpoint.every_steps=4", "logging.every_steps=1", *QUIET]
    runs = tmp_path / "runs"
    stage2 = runs / "stage2"

    # 1. Killed (SIGKILL, the whole process tree) once stage 2 has a complete checkpoint.
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(
            args, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for(
            lambda: complete_tags(str(stage2 / "checkpoints")) or first.poll() is not None,
            300,
            "a checkpoint of stage 2",
            every=0.05,
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, tail(str(log))
    assert (runs / "stage1" / "export" / "gama_ds.json").exists()
    assert not (stage2 / "export").exists()
    saved = int(complete_tags(str(stage2 / "checkpoints"))[-1].split("-")[1])
    assert 4 <= saved < STEPS

    # 2. Run again: stage 1 is skipped, stage 2 resumes from its checkpoint and is exported.
    again = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = again.stdout + again.stderr
    assert again.returncode == 0, tail(str(log)) + output[-4000:]
    assert f"stage 1 (tiny): {runs}/stage1/export is complete, skipped" in output
    assert f"resumed from step-{saved:08d} at step {saved}" in output
    assert f"stage 2 (tiny): exported to {stage2}/export" in output
    export = json.loads((stage2 / "export" / "gama_ds.json").read_text())
    assert export["source"]["run"] == str(stage2)
    assert not (stage2 / "export.partial").exists()
    run = json.loads((stage2 / "run.json").read_text())
    assert run["recipe"]["train"]["init"] == f"{runs}/stage1/export"
    assert run["launch"]["GAMA_DS_RESUME"] == "auto"
    # The resumed run logged every step after the checkpoint once; the killed one may have
    # logged a few past it, which the resumed run repeats.
    lines = (stage2 / "metrics.jsonl").read_text().splitlines()
    steps = [r["step"] for r in map(json.loads, lines) if "loss" in r]  # not the epochs' lines
    assert steps[-(STEPS - saved) :] == list(range(saved + 1, STEPS + 1))

    # 3. Run once more: nothing left to do.
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("is complete, skipped") == 2 and "training in" not in done.stderr
