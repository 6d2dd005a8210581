"""GPU check: the GPU path end to end on one GPU, one line per check (PASS/FAIL/SKIP + figures).

    python bench/gpu_check.py              # on a GPU: bf16; without one: one SKIP line, exit 0
    python bench/gpu_check.py --device cpu # the same checks in fp32 on CPU (the logic, proven here)

The checks, all on the tiny recipe and synthetic shards (no downloads):
  attention     eager, sdpa and (where it loads) flash_attention_2: same loss and gradients on
                right-padded batches, with and without audio
  checkpointing gradient checkpointing on and off: same loss and gradients
  zero2, zero3  the real trainer (world size 1): a run stopped at a step and resumed gives the
                uninterrupted run's losses
  no-build      the optimizer is torch's AdamW (fused on CUDA) and nothing was compiled into the
                runs' fresh TORCH_EXTENSIONS_DIR (on CPU: nothing but DeepSpeed's CPU collective)
  usr1, term    the signal to a training rank ends in a COMPLETE checkpoint and a clean exit
  export        the ZeRO-2 run's export loads onto the device in its dtype (every parameter
                checked), evaluates (held-out loss) and generates in-process, and `gama-ds eval`
                picks the same device and dtype by default (bf16 on CUDA) and scores the same loss
  suite         `gama-ds eval --suite` on that export with default flags: the held-out questions
                from their audio files, on the device in its default dtype
  mfu           the trainer's metrics carry an MFU (on CPU against GAMA_DS_PEAK_TFLOPS=1)
  tags          `gama-ds tag` with a tiny AST tagger on the device's defaults gives the scores
                of an fp32 CPU tagging of the same shards, and the set verifies
  soft          a soft-prompt ZeRO-3 run on those tagged shards, exported: `gama-ds generate` and
                `gama-ds eval --suite` with the default flags run its tagger on a raw clip and
                give the same tags and greedy answer; the hint's embeddings moved in training
Exit status 1 if any check fails. Where it runs on a GPU, its lines go into docs/BENCHMARKS.md
with the device and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import TAGGER_LABELS, synth_shards, write_tiny_tagger  # noqa: E402
from gama_ds.model.build import build_model, tiny_config  # noqa: E402
from gama_ds.model.gama import IGNORE  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []


def report(status: str, name: str, figures: str) -> None:
    RESULTS.append((status, name, figures))
    print(f"{status} {name}: {figures}", flush=True)


def check(name: str):
    """Runs the decorated check; an exception is its FAIL line, with the error's last words."""

    def wrap(fn):
        def run(*args):
            started = time.perf_counter()
            try:
                status, figures = fn(*args)
            except Exception as err:  # noqa: BLE001 - every check reports, the next one runs
                traceback.print_exc(file=sys.stderr)
                last = (str(err).strip().splitlines() or [""])[-1][:300]
                status, figures = "FAIL", f"{type(err).__name__}: {last}"
            report(status, name, f"{figures} ({time.perf_counter() - started:.1f} s)")

        return run

    return wrap


class Setup:
    def __init__(self, device: str, work: str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.precision = "bf16" if self.cuda else "fp32"
        # bf16 keeps 8 bits of mantissa: kernels that sum in another order differ by ~1e-2.
        self.loss_tol = 2e-2 if self.cuda else 1e-5
        self.grad_tol = 5e-2 if self.cuda else 1e-4
        self.resume_tol = 1e-2 if self.cuda else 2e-4
        self.work = work
        self.ext = os.path.join(work, "torch_extensions")  # fresh: whatever lands here was compiled
        self.shards = os.path.join(work, "data")
        self.runs: dict[str, dict] = {}


# -- in-process model checks --------------------------------------------------------------------


def padded_batch(setup: Setup, has_audio: list[bool], seed: int = 0) -> dict:
    """Two samples of 12 and 7 text tokens, the shorter right-padded, labels -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    return {
        "fbank": torch.randn(2, 1024, 128, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.masked_fill(mask == 0, IGNORE),
        "has_audio": torch.tensor(has_audio),
    }


def loss_and_grads(setup: Setup, batch: dict, **model_overrides) -> tuple[float, dict]:
    torch.manual_seed(0)
    cfg = tiny_config(**model_overrides)
    cfg.audio.aggregator_dropout = 0.0  # dropout off, so that two models can match exactly
    model = build_model(cfg, compute_dtype=setup.dtype).to(setup.device, setup.dtype).train()
    out = model(**{k: v.to(setup.device) for k, v in batch.items()})
    out.loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), grads


def compare(ref: tuple[float, dict], other: tuple[float, dict]) -> tuple[float, float]:
    """(relative loss difference, relative difference of all gradients together). Not per
    parameter: some gradients are zero in exact arithmetic (attention's key biases, as softmax
    ignores a shift) and pure rounding noise in both runs."""
    (loss_a, grads_a), (loss_b, grads_b) = ref, other
    if grads_a.keys() != grads_b.keys():
        odd = sorted(grads_a.keys() ^ grads_b.keys())[:3]
        raise AssertionError(f"gradients for different parameters: {odd}")
    diff = sum(float((grads_a[n] - grads_b[n]).square().sum()) for n in grads_a) ** 0.5
    norm = sum(float(g.square().sum()) for g in grads_a.values()) ** 0.5
    return abs(loss_a - loss_b) / abs(loss_a), diff / norm


def kernels(setup: Setup) -> list[str]:
    from gama_ds.model.llm import flash_attention_usable

    names = ["eager", "sdpa"]
    if setup.cuda and flash_attention_usable():
        names.append("flash_attention_2")
    return names


@check("attention")
def check_attention(setup: Setup):
    parts, ok = [], True
    names = kernels(setup)
    for audio in ([True, True], [True, False]):
        batch = padded_batch(setup, audio)
        ref = loss_and_grads(setup, batch, attn_implementation="eager")
        for name in names[1:]:
            dl, dg = compare(ref, loss_and_grads(setup, batch, attn_implementation=name))
            ok &= dl <= setup.loss_tol and dg <= setup.grad_tol
            parts.append(f"{name} vs eager {'audio' if all(audio) else 'mixed'}: loss {dl:.1e} grad {dg:.1e}")
    missing = "" if "flash_attention_2" in names else "; flash_attention_2 not usable here"
    return ("PASS" if ok else "FAIL"), "; ".join(parts) + f" (tol {setup.loss_tol}/{setup.grad_tol}){missing}"


@check("checkpointing")
def check_checkpointing(setup: Setup):
    batch = padded_batch(setup, [True, False])
    off = loss_and_grads(setup, batch, attn_implementation="sdpa")
    on = loss_and_grads(setup, batch, attn_implementation="sdpa", gradient_checkpointing=True)
    dl, dg = compare(off, on)
    ok = dl <= setup.loss_tol and dg <= setup.grad_tol
    return ("PASS" if ok else "FAIL"), f"on vs off: loss {dl:.1e} grad {dg:.1e}"


@check("no-build")
def check_no_build(setup: Setup):
    """After the trainer runs: the optimizer they build, and what they left in TORCH_EXTENSIONS_DIR
    (on CPU ranks, by design, DeepSpeed's CPU collective and our lock for building it:
    gama_ds/train/extensions.py; on a GPU, nothing)."""
    from gama_ds.config import load_recipe
    from gama_ds.train.engine import build_optimizer
    from gama_ds.train.extensions import OUR_LOCK

    model = build_model(tiny_config()).to(setup.device)
    opt = build_optimizer(model, load_recipe("tiny"), offload=False)
    fused = opt.param_groups[0].get("fused")
    built = sorted(os.listdir(setup.ext)) if os.path.isdir(setup.ext) else []
    expected = set() if setup.cuda else {"deepspeed_shm_comm", OUR_LOCK}
    ok = type(opt) is torch.optim.AdamW and bool(fused) == setup.cuda and set(built) <= expected
    return (
        "PASS" if ok else "FAIL"
    ), f"optimizer {type(opt).__name__} fused={fused}; compiled ops: {built or 'none'}"


# -- the real trainer ---------------------------------------------------------------------------


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def trainer_env(setup: Setup) -> dict:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=setup.ext, MASTER_PORT=free_port(), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    if not setup.cuda:
        env["GAMA_DS_PEAK_TFLOPS"] = "1"  # CPU has no table entry: exercise the MFU path anyway
    return env


def trainer(setup: Setup, out: str, zero: int, extra=(), steps: int = 4) -> list[str]:
    """The tiny recipe, `steps` steps of 4 examples (0: until stopped)."""
    length = f"train.max_steps={steps}" if steps else "train.epochs=1000"
    args = [
        sys.executable, "-m", "gama_ds", "train", "tiny",
        f"data.train=[{{path: {os.path.join(setup.shards, 'train')}}}]",
        f"train.output_dir={out}", f"train.precision={setup.precision}", f"deepspeed.zero_stage={zero}",
        length, "train.global_batch_size=4", "data.num_workers=0",
        "logging.every_steps=1", "logging.tensorboard=false", "logging.plot=false",
        "checkpoint.every_steps=1000",
    ]  # fmt: skip
    if zero == 3:
        args.append("deepspeed.param_persistence_threshold=0")  # tiny tensors partitioned too
    return args + list(extra)


def run_trainer(setup: Setup, args: list[str]) -> dict:
    """A `trainer` command line run to its end; its result line."""
    return last_json(gama_ds(setup, *args[3:]))  # after `python -m gama_ds`


def gama_ds(setup: Setup, *args: str) -> str:
    """`python -m gama_ds ARGS` in the trainer's environment; its stdout, or a one-line error."""
    done = subprocess.run(
        [sys.executable, "-m", "gama_ds", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=trainer_env(setup),
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1][-300:]
        raise RuntimeError(f"gama-ds {args[0]} exited {done.returncode}: {tail}")
    return done.stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def zero_check(zero: int):
    @check(f"zero{zero}")
    def run(setup: Setup):
        full = os.path.join(setup.work, f"zero{zero}")
        started = time.perf_counter()
        run_trainer(setup, trainer(setup, full, zero))
        seconds = time.perf_counter() - started
        setup.runs[f"zero{zero}"] = {"out": full, "seconds": seconds}
        part = os.path.join(setup.work, f"zero{zero}-resumed")
        first = run_trainer(setup, trainer(setup, part, zero, ["--stop-at", "2"]))
        second = run_trainer(setup, trainer(setup, part, zero, ["--resume", "auto"]))
        want, got = losses(full), losses(part)
        worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
        ok = (
            first["step"] == 2
            and second["step"] == 4
            and sorted(got) == sorted(want)
            and worst <= setup.resume_tol
        )
        return ("PASS" if ok else "FAIL"), (
            f"{setup.precision}, losses {want[1]:.4f} -> {want[max(want)]:.4f}, resumed at 2: largest "
            f"relative difference {worst:.1e} (tol {setup.resume_tol}); uninterrupted run {seconds:.1f} s"
        )

    return run


def signal_check(sig: signal.Signals):
    @check(sig.name.lower().removeprefix("sig"))
    def run(setup: Setup):
        out = os.path.join(setup.work, f"signal-{sig.name}")
        args = trainer(setup, out, 2, steps=0)
        proc = subprocess.Popen(
            args, env=trainer_env(setup), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        metrics = os.path.join(out, "metrics.jsonl")
        try:
            deadline = time.monotonic() + 300
            while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the run logged no step (exit {proc.poll()})")
                time.sleep(0.05)
            sent = time.perf_counter()
            proc.send_signal(sig)  # the rank alone: no DataLoader workers here (num_workers 0)
            stdout, _ = proc.communicate(timeout=300)
            seconds = time.perf_counter() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
        from gama_ds.train.checkpoint import complete_tags

        result = json.loads(stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
        tags = complete_tags(os.path.join(out, "checkpoints"))
        ok = (
            proc.returncode == 0
            and result.get("stopped_by") == sig.name
            and tags == [f"step-{result['step']:08d}"]
        )
        return ("PASS" if ok else "FAIL"), (
            f"exit {proc.returncode}, stopped by {result.get('stopped_by')} at step {result.get('step')}, "
            f"COMPLETE: {tags or 'none'}, {seconds:.1f} s from signal to exit"
        )

    return run


@check("export")
def check_export(setup: Setup):
    """The ZeRO-2 run's export: loaded onto the device in its dtype (every parameter there), held-out
    loss and answers in-process, then `gama-ds eval` with the device's default flags (on CPU:
    --device cpu) reports the same device, dtype and loss."""
    from gama_ds.exported import load_export
    from gama_ds.infer import evaluate, generate
    from gama_ds.train.export import export

    if "zero2" not in setup.runs:
        return "SKIP", "no ZeRO-2 run to export"
    out = os.path.join(setup.work, "export")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's converter talks on stdout
        export(setup.runs["zero2"]["out"], out)
    model, tokenizer, info = load_export(out, device=setup.device, dtype=setup.dtype)
    placed = {(p.device.type, p.dtype) for p in model.parameters()}
    # Rotary frequencies stay fp32, as in training; every other floating buffer is in the dtype.
    buffers = {b.dtype for n, b in model.named_buffers() if b.is_floating_point() and "rotary_emb" not in n}
    if placed != {(setup.device.type, setup.dtype)} or not buffers <= {setup.dtype}:
        return "FAIL", f"parameters on {sorted(map(str, placed))}, buffers {sorted(map(str, buffers))}"
    started = time.perf_counter()
    shards = os.path.join(setup.shards, "test")
    result = evaluate(
        model, tokenizer, [shards], 108, info["prompt"]["template"],
        batch_size=4, max_new_tokens=8, metrics=("loss", "exact"),
    )  # fmt: skip
    clip = os.path.join(setup.shards, "audio")
    clip = next(os.path.join(dp, f) for dp, _, fs in os.walk(clip) for f in sorted(fs) if f.endswith(".wav"))
    answer = generate(model, tokenizer, [clip], [{"instruction": "What do you hear?", "input": ""}],
                      info["prompt"]["template"], max_new_tokens=8, do_sample=False)[0]  # fmt: skip
    seconds = time.perf_counter() - started
    flags = [] if setup.cuda else ["--device", "cpu"]  # on a GPU: the defaults must pick it, in bf16
    cli = last_json(gama_ds(setup, "eval", "--model", out, "--shards", shards, "--metric", "loss", "exact",
                            "--max-new-tokens", "4", "--batch-size", "4", "--json", *flags))  # fmt: skip
    wanted = (str(setup.device), str(setup.dtype).removeprefix("torch."))
    ok = (
        result["loss"] == result["loss"]
        and result["examples"] > 0
        and (cli["device"], cli["dtype"]) == wanted
        and abs(cli["loss"] - result["loss"]) <= setup.loss_tol * max(1.0, abs(result["loss"]))
    )
    return ("PASS" if ok else "FAIL"), (
        f"every parameter on {setup.device} in {setup.dtype}; {result['examples']} held-out QA: loss "
        f"{result['loss']:.3f}, exact {result['exact_match']:.2f}; answer {answer!r}; {seconds:.1f} s; "
        f"gama-ds eval {' '.join(flags) or '(default flags)'}: {cli['device']} {cli['dtype']}, "
        f"loss {cli['loss']:.3f}"
    )


@check("suite")
def check_suite(setup: Setup):
    """`gama-ds eval --suite` on the export, with the device's default flags: every held-out question
    from its audio file, greedy, scored by text; the report names the device and dtype it ran in."""
    out = os.path.join(setup.work, "export")
    if not os.path.isdir(out):
        return "SKIP", "no export (the export check did not run)"
    suite = os.path.join(setup.work, "suite.yaml")
    with open(suite, "w", encoding="utf-8") as f:
        test = os.path.join(setup.shards, "audio", "test.json")
        f.write("batch_size: 8\nnum_workers: 2\ngeneration: {do_sample: false, max_new_tokens: 8}\n")
        f.write(f"datasets: [{{dataset: clothoaqa, name: held-out, eval: {test}}}]\n")
    flags = [] if setup.cuda else ["--device", "cpu"]
    started = time.perf_counter()
    report = last_json(gama_ds(setup, "eval", "--model", out, "--suite", suite, "--out",
                               os.path.join(setup.work, "suite"), "--json", *flags))  # fmt: skip
    held_out = report["sets"][0]
    wanted = (str(setup.device) if not setup.cuda else "cuda:0", str(setup.dtype).removeprefix("torch."))
    ok = (report["device"], report["dtype"]) == wanted and held_out["generated"] == held_out["rows"] > 0
    return ("PASS" if ok else "FAIL"), (
        f"{held_out['rows']} questions on {report['device']} {report['dtype']} in "
        f"{time.perf_counter() - started:.1f} s (with start-up), exact {held_out['score']['value']:.2f}"
    )


@check("mfu")
def check_mfu(setup: Setup):
    if "zero2" not in setup.runs:
        return "SKIP", "no ZeRO-2 run"
    with open(os.path.join(setup.runs["zero2"]["out"], "metrics.jsonl"), encoding="utf-8") as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    mfu = [r["mfu"] for r in records if "mfu" in r]
    tokens = max(r["tokens_per_s"] for r in records)
    if not mfu:
        name = torch.cuda.get_device_name() if setup.cuda else "cpu"
        return (
            "FAIL",
            f"no mfu in the metrics on {name!r}: add it to metrics.PEAK_TFLOPS or set GAMA_DS_PEAK_TFLOPS",
        )
    against = "GAMA_DS_PEAK_TFLOPS=1" if not setup.cuda else torch.cuda.get_device_name()
    return "PASS", f"mfu {max(mfu):.2e} (tiny model, against {against}), {tokens:.0f} tokens/s"


@check("tags")
def check_tags(setup: Setup):
    """Tags from the stored features on the device (bf16 on CUDA) against fp32 on the CPU: every
    label's score, since a random tagger's scores lie too close together to compare orders."""
    import shutil

    from gama_ds.data.shards import iter_samples, read_index, verify

    tagger = write_tiny_tagger(os.path.join(setup.work, "tagger"))
    scores = {}
    for where, flags in (("device", [] if setup.cuda else ["--device", "cpu"]), ("cpu", ["--device", "cpu"])):
        root = os.path.join(setup.work, f"tagged-{where}")
        shutil.copytree(os.path.join(setup.shards, "train"), root, dirs_exist_ok=True)
        gama_ds(setup, "tag", root, "--tagger", tagger, "--no-progress", "--top-k", str(len(TAGGER_LABELS)),
                "--threshold", "0", *flags)  # fmt: skip
        problems, _ = verify(root)
        if problems:
            return "FAIL", f"verify after tagging: {problems[0]}"
        index = read_index(root)
        scores[where] = {
            (s.key, label): score
            for e in index["shards"]
            for s in iter_samples(os.path.join(root, e["file"]))
            for label, score in s.meta["tags"]
        }
        if where == "device":
            ran = index["provenance"]["tagger"]["device"], index["provenance"]["tagger"]["dtype"]
    if scores["device"].keys() != scores["cpu"].keys():
        return "FAIL", "the device's tagging holds other clips or labels than the CPU's"
    worst = max(abs(scores["device"][k] - scores["cpu"][k]) for k in scores["cpu"])
    ok = worst <= (2e-2 if setup.cuda else 1e-6)  # bf16 logits: ~1e-2, times sigmoid's slope <= 1/4
    figures = f"{len(scores['cpu'])} scores on {ran[0]} {ran[1]}, max diff from fp32 CPU {worst:.1e}"
    return ("PASS" if ok else "FAIL"), figures


@check("soft")
def check_soft(setup: Setup):
    """A soft-prompt ZeRO-3 run on the device's tagged shards, exported; `gama-ds generate` and
    `gama-ds eval --suite` with the device's default flags run the export's tagger on a raw clip
    and give the same tags and greedy answer, and the hint's embeddings moved in training."""
    from gama_ds.data.soft_prompt import init_ids
    from gama_ds.exported import load_export, soft_prompt_settings
    from gama_ds.train.export import export

    tagged = os.path.join(setup.work, "tagged-device")
    if not os.path.isdir(tagged):
        return "SKIP", "no tagged shards (the tags check did not run)"
    run, out = os.path.join(setup.work, "soft"), os.path.join(setup.work, "soft-export")
    soft = "model.soft_prompt={tokens: 2, template: 'By <hint>: {tags}', top_k: 2, threshold: 0.0}"
    started = time.perf_counter()
    # the byte tokenizer: a short sentence and room for it (the tiny recipe's cutoff is 108)
    # and the hint at 10x the tiny recipe's rate, so 4 warm-up steps move it well past rounding
    extra = [
        f"data.train=[{{path: {tagged}}}]",
        soft,
        "data.cutoff_len=200",
        "optim.group_lr={soft_prompt: 1.0e-2}",
    ]
    result = run_trainer(setup, trainer(setup, run, 3, extra))
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's converter talks on stdout
        export(run, out)
    # The hint left its init rule's rows (the frozen LLM's embeddings of "the audio tagger").
    model, tokenizer, info = load_export(out, "cpu", torch.float32)
    start = model.llm.get_input_embeddings().weight[init_ids(tokenizer, soft_prompt_settings(info))]
    moved = (model.soft_prompt.weight - start).abs().max().item()
    del model
    clip = os.path.join(setup.shards, "audio")
    clip = next(os.path.join(dp, f) for dp, _, fs in os.walk(clip) for f in sorted(fs) if f.endswith(".wav"))
    flags = [] if setup.cuda else ["--device", "cpu"]
    answers = os.path.join(setup.work, "soft-answers.jsonl")
    gama_ds(setup, "generate", "--model", out, "--audio", clip, "--question", "What do you hear?", "--greedy",
            "--max-new-tokens", "8", "--out", answers, *flags)  # fmt: skip
    with open(answers, encoding="utf-8") as f:
        (row,) = [json.loads(line) for line in f]
    suite, rows = os.path.join(setup.work, "soft-suite.yaml"), os.path.join(setup.work, "soft-eval.json")
    with open(rows, "w", encoding="utf-8") as f:
        json.dump([{"audio_id": clip, "instruction": "What do you hear?", "output": "-"}], f)
    with open(suite, "w", encoding="utf-8") as f:  # greedy as generate --greedy: no repetition penalty
        f.write("batch_size: 1\ngeneration: {do_sample: false, repetition_penalty: 1.0, max_new_tokens: 8}\n")
        f.write(f"datasets: [{{dataset: clothoaqa, eval: {rows}}}]\n")
    report = last_json(gama_ds(setup, "eval", "--model", out, "--suite", suite, "--out",
                               os.path.join(setup.work, "soft-suite"), "--json", *flags))  # fmt: skip
    with open(report["sets"][0]["results"], encoding="utf-8") as f:
        (suite_row,) = json.load(f)
    ok = (
        result["step"] == 4
        and moved > 5e-3
        and len(row["tags"]) == 2
        and (suite_row["pred"], suite_row["tags"]) == (row["answer"], row["tags"])
        and report["tagger"]["device"] == setup.device.type
    )
    return ("PASS" if ok else "FAIL"), (
        f"ZeRO-3 {setup.precision}, hint moved by up to {moved:.1e} (> 5e-3); tags "
        f"{[t[0] for t in row['tags']]} on {report['tagger']['device']} {report['tagger']['dtype']}; "
        f"generate and eval --suite agree: {suite_row['pred'] == row['answer']}; "
        f"{time.perf_counter() - started:.1f} s"
    )


# In this order: no-build looks at what the trainer runs left, export and mfu use the ZeRO-2 run,
# soft the tags check's tagged shards.
CHECKS = {
    "attention": check_attention,
    "checkpointing": check_checkpointing,
    "zero2": zero_check(2),
    "zero3": zero_check(3),
    "usr1": signal_check(signal.SIGUSR1),
    "term": signal_check(signal.SIGTERM),
    "no-build": check_no_build,
    "export": check_export,
    "suite": check_suite,
    "mfu": check_mfu,
    "tags": check_tags,
    "soft": check_soft,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--only", help="comma-separated checks to run (default: all): " + ", ".join(CHECKS))
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        if not torch.cuda.is_available():
            print("SKIP gpu-check: no CUDA device here (torch.cuda.is_available() is False); "
                  "`python bench/gpu_check.py --device cpu` runs the same checks in fp32 on CPU")  # fmt: skip
            return 0
        device = "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("FAIL gpu-check: --device cuda, but torch sees no CUDA device")
        return 1
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"gpu-check on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        setup = Setup(device, work)
        from pathlib import Path

        synth_shards(Path(setup.shards), clips=8, test_clips=4, seed=5)
        only = set(args.only.split(",")) if args.only else set(CHECKS)
        unknown = only - set(CHECKS)
        if unknown:
            parser.error(f"--only: no check {sorted(unknown)[0]!r}; checks: {', '.join(CHECKS)}")
        for name, run in CHECKS.items():
            if name in only:
                run(setup)
    failed = [n for s, n, _ in RESULTS if s == "FAIL"]
    passed = len(RESULTS) - len(failed)
    summary = f"gpu-check: {passed}/{len(RESULTS)} passed in {time.perf_counter() - started:.0f} s"
    print(summary + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
