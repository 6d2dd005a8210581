"""`gama-ds demo` end to end at a reduced size: every stage runs and leaves what a user looks at."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_env


def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "gama_ds", "demo", "--out", str(out), "--clips", "48", "--test-clips", "8",
         "--epochs", "1", "--warmup-steps", "30", "--min-accuracy", "0"],
        env=train_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((out / "demo.json").read_text())
    assert summary["ranks"] == 2 and summary["passed"] is True
    assert set(summary["accuracy_by_task"]) == {"count", "pitch", "kind", "loudness"}
    assert set(summary["timings"]) == {"synthesise", "convert", "warm-up", "train", "export", "evaluate"}
    # Each phase's CPU time counts the processes it waited for: the demo itself only waits while
    # the launcher's ranks train (each imports torch and DeepSpeed alone for seconds of CPU).
    assert set(summary["cpu_seconds"]) == set(summary["timings"])
    assert summary["cpu_seconds"]["train"] > 2.0
    assert set(summary["warm_up_accuracy_by_task"]) == {"count", "pitch", "kind", "loudness"}
    # Training ran with the DeepSpeed launcher on 2 ranks, ZeRO-2, on the set's own tokenizer.
    run = json.loads((out / "run" / "run.json").read_text())
    assert run["world_size"] == 2 and run["recipe"]["deepspeed"]["zero_stage"] == 2
    assert run["recipe"]["data"]["tokenizer"].endswith("tokenizer")
    # The stage started from the warmed-up encoder and kept it: the final export's encoder is the
    # warm-up's, while the modules after it trained.
    assert run["recipe"]["train"]["init"].endswith("encoder")
    warmed = load_file(str(out / "encoder" / "audio.safetensors"))
    final = load_file(str(out / "export" / "audio.safetensors"))
    assert all(torch.equal(t, final[n]) for n, t in warmed.items() if n.startswith("encoder."))
    assert not all(torch.equal(warmed[n], final[n]) for n in warmed if n.startswith("proj_"))
    # What eval loaded from the export scores the loss the run itself measured last.
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["eval_loss"] == pytest.approx(metrics[-1]["eval_loss"], abs=1e-5)
    assert "held-out accuracy" in done.stdout and "clip_00048" in done.stdout  # answers from raw audio
    # An evaluation suite on the demo's export: every held-out question asked from its audio file,
    # greedy as the demo's own evaluation, scored by text, gives the demo's held-out accuracy.
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "batch_size: 32\nnum_workers: 0\ngeneration: {do_sample: false, max_new_tokens: 4}\n"
        f"datasets: [{{dataset: clothoaqa, name: held-out, eval: {out / 'data' / 'test.json'}}}]\n"
    )
    evaluated = subprocess.run(
        [sys.executable, "-m", "gama_ds", "eval", "--model", str(out / "export"), "--suite", str(suite),
         "--out", str(tmp_path / "eval"), "--json"],
        env=train_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    held_out = json.loads(evaluated.stdout.strip().splitlines()[-1])["sets"][0]
    assert held_out["rows"] == 8 * 4 and held_out["generated"] == 32
    # The same 32 questions in one batch of 32 as the demo's, in another order: a row's answer may
    # differ only by floating-point noise between the two batch layouts; one row in 32 allows it.
    assert held_out["score"]["value"] == pytest.approx(summary["accuracy"], abs=1 / 32 + 1e-9)
    # The target is enforced: an impossible one makes the command fail after reporting.
    again = subprocess.run(
        [sys.executable, "-m", "gama_ds", "demo", "--min-accuracy", "1.5"],
        env=train_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 2 and "--min-accuracy" in again.stderr
