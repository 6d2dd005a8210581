"""Real DeepSpeed, 2 CPU ranks (gloo), the tiny recipe, real shards: the engine and the loop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import psutil
import pytest
import torch
from cluster import wait_for

from conftest import synth_shards, train_env
from gama_ds.config import ConfigError, load_recipe
from gama_ds.train.checkpoint import COMPLETE, complete_tags
from gama_ds.train.loop import recipe_hash
from gama_ds.train.preflight import preflight

BIN = os.path.dirname(sys.executable)
SAME = [
    "logging.every_steps=1",
    "logging.tensorboard=false",
    "logging.plot=false",
    "checkpoint.every_steps=1000",
]
# Dropout on (the aggregator's 0.1 and LoRA's 0.05), so that resuming must restore the RNG too.
DROPOUT = ["model.lora.dropout=0.05"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    synth_shards(tmp, clips=32, test_clips=8, seed=0)
    return tmp  # 8 training shards x 4 clips x 4 QA = 128 examples: 8 steps of 16


env = train_env


def free_port() -> str:
    """A port no one listens on now: fixed numbers collide with other test runs on the machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(shards, out, launcher, overrides=(), extra=(), ranks=2, workers=0):
    """Train; this run's losses by step, and its run.json. Batches are made in the ranks
    (`workers`=0) unless a test is about the workers: a spawned worker costs a rank seconds of
    start-up at every epoch, and the trajectory does not depend on them (test_resume_world runs
    with 0, 1 and 2)."""
    args = [
        "tiny",
        f"data.train=[{{path: {shards / 'train'}}}]",
        f"data.eval=[{{path: {shards / 'test'}}}]",
        f"train.output_dir={out}",
        *SAME,
        f"data.num_workers={workers}",
        *overrides,
        *extra,
    ]
    port = free_port()
    launchers = {
        "torchrun": ["torchrun", "--nproc_per_node", str(ranks), "--master_port", port, "-m"],
        "deepspeed": ["deepspeed", "--num_gpus", str(ranks), "--master_port", port, "--module"],
    }
    name, *flags = launchers[launcher]
    cmd = [os.path.join(BIN, name), *flags, "gama_ds.train", *args]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    # A resumed run appends to the same file: keep this run's lines only.
    mine = records[run.seen.get(str(out), 0) :]
    run.seen[str(out)] = len(records)
    return {r["step"]: r["loss"] for r in mine if "loss" in r}, json.load(open(os.path.join(out, "run.json")))


run.seen = {}


@pytest.fixture(scope="module")
def zero2(shards):
    return run(shards, shards / "zero2", "deepspeed", DROPOUT)


@pytest.fixture(scope="module")
def zero3(shards):
    """ZeRO-3 with the frozen LLM partitioned and gradient checkpointing on."""
    overrides = [
        *DROPOUT,
        "deepspeed.zero_stage=3",
        "deepspeed.param_persistence_threshold=0",
        "model.gradient_checkpointing=true",
    ]
    return run(shards, shards / "zero3", "torchrun", overrides)


def test_zero2_and_zero3_train_the_same_trajectory(zero2, zero3):
    losses2, run2 = zero2
    losses3, run3 = zero3
    assert sorted(losses2) == list(range(1, 9))
    assert losses2[8] < losses2[1] - 0.1  # it learns (tiny model, 8 steps: about 6.30 -> 6.07)
    for step in losses2:
        assert losses3[step] == pytest.approx(losses2[step], rel=2e-4), step
    assert run2["llm_share_on_rank0"] == 1.0
    assert run3["llm_share_on_rank0"] == pytest.approx(0.5, abs=0.02)  # the frozen LLM is partitioned
    assert run2["deepspeed_config"]["gradient_accumulation_steps"] == 2
    assert run2["deepspeed_config"]["train_batch_size"] == 16


def test_stopped_and_resumed_run_continues_the_same_losses(shards, zero2):
    losses2, _ = zero2
    out = shards / "resumed"
    # A periodic save at step 3, and --stop-at 5's save, which then dies half-way: its files are
    # there, cut short, but it has no COMPLETE.
    saves = ["checkpoint.every_steps=3"]
    first, _ = run(shards, out, "torchrun", DROPOUT, extra=[*saves, "--stop-at", "5"])
    assert sorted(first) == [1, 2, 3, 4, 5]
    ckpts = out / "checkpoints"
    assert complete_tags(str(ckpts)) == ["step-00000003", "step-00000005"]
    os.remove(ckpts / "step-00000005" / COMPLETE)
    states = sorted((ckpts / "step-00000005").glob("*optim_states.pt"))
    states[0].write_bytes(states[0].read_bytes()[:100])
    run.seen[str(out)] = 3  # the resumed run drops what the run logged past its checkpoint
    second, _ = run(shards, out, "torchrun", DROPOUT, extra=[*saves, "--resume", "auto"])
    assert sorted(second) == [4, 5, 6, 7, 8]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == list(range(1, 9))  # steps 4-5 past the checkpoint were dropped, not kept twice
    for step in range(1, 9):  # equal to the uninterrupted run, dropout masks included
        got = first[step] if step <= 3 else second[step]
        assert got == pytest.approx(losses2[step], rel=2e-4), step


def test_every_check_fires_before_training(shards, tmp_path):
    base = [f"data.train=[{{path: {shards / 'train'}}}]", f"train.output_dir={tmp_path / 'out'}"]

    def check(overrides, world=2, resume=None):
        recipe = load_recipe("tiny", base + overrides)
        return preflight(recipe, world, resume, recipe_hash(recipe))

    assert check([]).accumulation == 2
    cases = [
        (["train.global_batch_size=12"], 2, "not divisible by train.micro_batch_size 4 x 2 ranks = 8"),
        (["deepspeed.zero_stage=1"], 2, "deepspeed.zero_stage must be one of 2, 3"),
        (["model.attn_implementation=flash_attention_2"], 2, "needs flash-attn"),
        (["train.precision=fp16"], 2, "fp16 needs a GPU"),
        (["train.global_batch_size=256"], 2, "128 examples in an epoch, less than one global batch of 256"),
        ([f"train.init={tmp_path / 'nowhere'}"], 2, "does not exist"),
        (["data.tokenizer=null"], 2, "data.tokenizer is needed"),
        (["model.lora.r=0"], 2, "model.lora.r must be at least 1"),
        (["deepspeed.offload=true"], 2, "offload needs deepspeed.zero_stage 3"),
        # A soft prompt needs the clips' tags: untagged shards are named, with the command to tag them.
        (["model.soft_prompt={tokens: 2}"], 2, rf"data.train: {shards / 'train'} has no tags.*gama-ds tag "),
    ]
    # More ranks than shards, and a held-out set smaller than one micro-batch per rank, both run.
    evals = [
        f"data.eval=[{{path: {shards / 'test'}}}]",
        "train.global_batch_size=128",
        "train.micro_batch_size=1",
    ]
    assert check(evals, world=64).accumulation == 2
    for overrides, world, message in cases:
        with pytest.raises(ConfigError, match=message):
            check(overrides, world)
    # An LLM preset whose shapes disagree with the weights given as init.
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"vocab_size": 32000, "hidden_size": 4096}))
    with pytest.raises(ConfigError, match="preset 'tiny' disagrees with the weights"):
        check([f"train.init={folder}"])
    # An output directory that holds another run.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds another run; pass --resume auto"):
        check([])
    assert check([], resume="auto").accumulation == 2


def wait_for_progress(proc, err, steps: int, seconds: float) -> None:
    """Until rank 0's progress bar (on stderr, in `err`) counts `steps` optimizer steps, whatever
    the logging interval; a run that exits first fails the test."""

    def done() -> bool:
        assert proc.poll() is None, f"the run exited with {proc.returncode} before step {steps}"
        counts = re.findall(r"\| *(\d+)/\d+ \[", err.read_text(errors="replace"))
        return bool(counts) and max(map(int, counts)) >= steps

    wait_for(done, seconds, f"step {steps} on the progress bar", every=0.05)


def steps_of_resumed_run(cmd: list[str], metrics) -> list[int]:
    """Run `cmd --resume auto` to the end; the steps it logged a loss for."""
    before = len(metrics.read_text().splitlines())
    again = subprocess.run([*cmd, "--resume", "auto"], env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    return [r["step"] for r in map(json.loads, metrics.read_text().splitlines()[before:]) if "loss" in r]


def test_the_resource_tracker_survives_slurms_usr1_warning():
    # --signal=USR1@T reaches every process of a Slurm step; the tracker must ignore it or die.
    probe = (
        "from gama_ds.signals import start_resource_tracker_deaf_to_stop_signals as start\n"
        "from multiprocessing import resource_tracker\n"
        "start()\n"
        "status = open(f'/proc/{resource_tracker._resource_tracker._pid}/status').read()\n"
        "print(int(status.split('SigIgn:')[1].split()[0], 16))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) & (1 << (signal.SIGUSR1 - 1))


def test_groups_can_have_their_own_learning_rate():
    from gama_ds.model.build import build_model
    from gama_ds.train.engine import param_groups

    recipe = load_recipe("tiny", ["optim.lr=1e-4", "optim.group_lr={projections: 1e-3, lora: 5e-4}"])
    model = build_model(recipe.model)
    groups = {g["lr"]: sum(p.numel() for p in g["params"]) for g in param_groups(model, recipe)}
    proj = sum(p.numel() for n, p in model.named_parameters() if n.startswith("audio.proj_"))
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert groups[1e-3] == proj and groups[5e-4] == lora
    assert groups[1e-4] == sum(p.numel() for p in model.parameters() if p.requires_grad) - proj - lora


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_an_export_loads_in_stock_peft_and_reproduces_the_trained_model(
    shards, zero2, zero3, stage, tmp_path
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from gama_ds.data.collate import Collator
    from gama_ds.data.stream import StreamConfig, StreamLoader, TrainStream, open_sets
    from gama_ds.exported import load_export
    from gama_ds.train.export import export

    out = tmp_path / "export"
    export(str(shards / stage), str(out), merge=True)
    assert (out / "adapter" / "adapter_config.json").exists() and load_file(out / "audio.safetensors")
    model, tokenizer, info = load_export(str(out), "cpu", "fp32")  # stock from_pretrained + PeftModel
    assert (
        type(model.llm).__name__ == "PeftModelForCausalLM" and info["source"]["checkpoint"] == "step-00000008"
    )
    collate = Collator(tokenizer, info["prompt"]["cutoff_len"], info["prompt"]["template"])
    stream = TrainStream(
        open_sets([(str(shards / "test"), 1.0)]),
        StreamConfig(micro_batch=4, bucket_batches=1),
        collate,
        0,
        1,
        0,
    )
    total = count = 0.0
    with torch.no_grad():
        for b in StreamLoader(stream):
            loss = model(b["fbank"], b["input_ids"], b["attention_mask"], b["labels"], b["has_audio"]).loss
            n = (b["labels"][:, 1:] != -100).sum().item()
            total, count = total + loss.item() * n, count + n
    records = [json.loads(line) for line in open(shards / stage / "metrics.jsonl")]
    trained = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    assert total / count == pytest.approx(trained, abs=1e-5)  # the in-training model's held-out loss
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([tokenizer("### Instruction:\nHow many beeps?")["input_ids"]])
    torch.testing.assert_close(merged(ids).logits, model.llm(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_the_next_stage_starts_from_the_previous_export(shards, zero2, tmp_path):
    from safetensors.torch import load_file

    from gama_ds.exported import load_init
    from gama_ds.model.build import build_model
    from gama_ds.train.export import export

    export(str(shards / "zero2"), str(tmp_path / "stage_a"))
    model = build_model(load_recipe("tiny").model)
    load_init(model, str(tmp_path / "stage_a"))
    for name, tensor in load_file(tmp_path / "stage_a" / "audio.safetensors").items():
        torch.testing.assert_close(model.audio.state_dict()[name], tensor, msg=name)
    adapter = load_file(tmp_path / "stage_a" / "adapter" / "adapter_model.safetensors")
    lora = {n: p for n, p in model.llm.named_parameters() if ".lora_" in n}
    assert len(adapter) == len(lora) > 0
    for name, tensor in adapter.items():
        ours = name.replace(".weight", ".default.weight")
        torch.testing.assert_close(lora[ours], tensor, msg=name)
    # And a real next stage trains from it, on ZeRO-2 and on ZeRO-3 (the LLM built partitioned,
    # the init loaded before deepspeed.initialize): the same losses from the first step on.
    init = [f"train.init={tmp_path / 'stage_a'}", "train.max_steps=2", *DROPOUT]
    zero3 = ["deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0"]
    losses2, _ = run(shards, tmp_path / "stage_b2", "torchrun", init)
    losses3, run3 = run(shards, tmp_path / "stage_b3", "torchrun", [*init, *zero3])
    assert sorted(losses3) == [1, 2] and run3["llm_share_on_rank0"] == pytest.approx(0.5, abs=0.02)
    for step in (1, 2):
        assert losses3[step] == pytest.approx(losses2[step], rel=2e-4), step
    assert losses2[1] < zero2[0][1] - 0.1  # it starts where stage a ended (about 6.07), not afresh (6.30)


@pytest.fixture(scope="module")
def probed(shards, zero3, tmp_path_factory):
    """tests/partitioned_probe.py on 2 ranks, once for both tests below: the zero3 run's model
    built as its training built it, in fp32 and bf16, and in bf16 with a model folder of its own
    (fp16 on disk, 509 x 64: a share boundary falls inside a row of the embedding)."""
    from transformers import LlamaForCausalLM

    from gama_ds.model.llm import llm_config

    out = tmp_path_factory.mktemp("probed")
    torch.manual_seed(7)
    LlamaForCausalLM(llm_config("tiny", vocab_size=509)).half().save_pretrained(out / "llama")
    probe(shards / "zero3", out, ["fp32", "bf16", "bf16+llm"], llm=out / "llama")
    return out


def test_zero3_builds_the_llm_partitioned_and_as_one_process_does(shards, zero3, probed, tmp_path):
    """Each rank holds only its share of the LLM from the build on; gathered, the LLM, the audio
    modules and LoRA are what a one-process build draws from the seed, which is also what the
    export writes as the base LLM. In the engine's dtype, all of it."""
    from safetensors.torch import load_file

    from gama_ds.config import Recipe, from_dict
    from gama_ds.model.build import build_model
    from gama_ds.model.weights import parameter_groups
    from gama_ds.train.distributed import seed_everything
    from gama_ds.train.export import export

    export(str(shards / "zero3"), str(tmp_path / "export"))
    recipe = from_dict(Recipe, json.load(open(shards / "zero3" / "run.json"))["recipe"])
    for rank in (0, 1):
        report = json.load(open(probed / f"rank{rank}.json"))
        for precision, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
            built = report[precision]
            assert built["llm_partitioned"] and not built["rest_partitioned"]
            assert built["llm_elements_held"] <= built["llm_elements"] / 2 + 1000  # its share, padded
            assert built["dtypes"] == [f"torch.{dtype}"] and built["model_dtype"] == dtype
    exported_llm = load_file(tmp_path / "export" / "llm" / "model.safetensors")
    for precision, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        recipe.model.dtype = dtype
        seed_everything(recipe.train.seed)
        model = build_model(recipe.model)  # one process, no DeepSpeed: what the export rebuilds
        groups = parameter_groups(model)
        for rank in (0, 1):
            gathered = load_file(probed / f"{precision}-rank{rank}.safetensors")
            for name, p in model.named_parameters():
                key = name if groups[name] != "llm" else name[4:].removeprefix("base_model.model.")
                key = key.replace(".base_layer.", ".")
                torch.testing.assert_close(gathered[key], p.detach(), rtol=0, atol=0, msg=f"{rank} {key}")
                if precision == "fp32" and groups[name] == "llm":
                    torch.testing.assert_close(gathered[key], exported_llm[key], rtol=0, atol=0, msg=key)


def probe(run_dir, out, builds, llm=None):
    """tests/partitioned_probe.py on 2 ranks: the run's model built as its training built it."""
    script = os.path.join(os.path.dirname(__file__), "partitioned_probe.py")
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", free_port(), script]
    environment = dict(env(), **({"PROBE_LLM": str(llm)} if llm else {}))
    done = subprocess.run(
        [*cmd, str(run_dir), str(out), *builds],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def test_zero3_ranks_read_their_own_shares_of_a_model_folder(shards, zero3, probed):
    """A model folder (fp16 on disk, bf16 in training): each rank reads only its share of each
    weight, and gathered they are the folder's weights; audio modules and LoRA as one process
    draws them from the seed with that folder."""
    from safetensors.torch import load_file

    from gama_ds.config import Recipe, from_dict
    from gama_ds.model.build import build_model
    from gama_ds.train.distributed import seed_everything

    folder = probed / "llama"
    on_disk = load_file(folder / "model.safetensors")
    recipe = from_dict(Recipe, json.load(open(shards / "zero3" / "run.json"))["recipe"])
    recipe.model.llm, recipe.model.dtype = str(folder), "bfloat16"
    seed_everything(recipe.train.seed)
    model = build_model(recipe.model)  # one process: transformers' own loader
    for rank in (0, 1):
        report = json.load(open(probed / f"rank{rank}.json"))["bf16+llm"]
        assert report["llm_partitioned"] and report["dtypes"] == ["torch.bfloat16"]
        gathered = load_file(probed / f"bf16+llm-rank{rank}.safetensors")
        for name, tensor in on_disk.items():
            torch.testing.assert_close(gathered[name], tensor.to(torch.bfloat16), rtol=0, atol=0, msg=name)
        rest = [(n, p) for n, p in model.named_parameters() if n in gathered]  # audio modules, LoRA
        assert len(rest) > 100
        for name, p in rest:
            torch.testing.assert_close(gathered[name], p.detach(), rtol=0, atol=0, msg=name)


def test_a_signal_to_one_rank_stops_every_rank_at_the_next_step_and_resume_continues(shards):
    """SIGUSR1 to rank 1 alone: the ranks vote every step, whatever the logging interval (a
    SIGTERM leaves 30 s), so both stop after the same step, long before the 50-step logging
    interval or the end, save one complete checkpoint together, and exit 0."""

    out = shards / "one_rank_signalled"
    args = [
        "tiny",
        f"data.train=[{{path: {shards / 'train'}}}]",
        f"train.output_dir={out}",
        "train.epochs=2",
        *SAME,
        "logging.every_steps=50",
    ]
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", free_port(), "-m"]
    proc = subprocess.Popen(
        [*cmd, "gama_ds.train", *args],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=open(shards / "one_rank_signalled.err", "w"),
        text=True,
        start_new_session=True,
    )
    metrics = out / "metrics.jsonl"
    try:
        wait_for_progress(proc, shards / "one_rank_signalled.err", 1, 400)
        rank1 = [p.pid for p in psutil.Process(proc.pid).children(recursive=True) if _is_rank(p, b"RANK=1")]
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGUSR1)
        stdout, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    step = result["step"]
    # Rank 0 never had the signal: it stopped because rank 1 voted.
    assert result["stopped_by"] == "a signal on another rank" and step < 16, result
    tag = f"step-{step:08d}"
    assert complete_tags(str(out / "checkpoints")) == [tag]
    saved = sorted(p.name for p in (out / "checkpoints" / tag).iterdir())
    assert [n for n in saved if "optim_states" in n] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    cmd[4] = free_port()
    resumed = steps_of_resumed_run([*cmd, "gama_ds.train", *args], metrics)
    assert resumed == [16]  # the only logging step left: the last


def _is_rank(p, rank: bytes) -> bool:
    """A training rank (not a DataLoader worker) with this RANK."""
    try:
        if "gama_ds.train" not in p.cmdline():  # not a DataLoader worker or the resource tracker
            return False
        with open(f"/proc/{p.pid}/environ", "rb") as f:
            return rank in f.read().split(b"\0")
    except (OSError, psutil.Error):
        return False


@pytest.mark.parametrize(
    "stage",
    [
        ["deepspeed.zero_stage=2"],
        ["deepspeed.zero_stage=3"],
        ["deepspeed.zero_stage=3", "deepspeed.offload=true"],
    ],
)
def test_gradients_are_accumulated_and_reduced_in_fp32_under_bf16(stage):
    from gama_ds.train.engine import resolve_ds_config

    cfg = resolve_ds_config(load_recipe("tiny", ["train.precision=bf16", *stage]), 2)
    assert cfg["bf16"]["enabled"] is True
    assert cfg["data_types"]["grad_accum_dtype"] == "fp32" and cfg["communication_data_type"] == "fp32"


def test_deepspeed_takes_fp32_accumulation_and_reduction_in_a_bf16_run(tmp_path):
    """The real engine on CPU, bf16 weights: DeepSpeed's ZeRO-2 optimizer accumulates and
    reduces in fp32, and a step trains."""
    probe = """
import torch
from gama_ds.config import load_recipe
from gama_ds.model.build import build_model
from gama_ds.train.distributed import start_process_group
from gama_ds.train.engine import initialize, resolve_ds_config

recipe = load_recipe("tiny", ["train.precision=bf16", "train.global_batch_size=4"])
start_process_group(0, 60)
model = build_model(recipe.model, compute_dtype=torch.bfloat16)
engine, _ = initialize(model, recipe, resolve_ds_config(recipe, 1), 10)
ids = torch.randint(3, model.llm.config.vocab_size, (4, 12))
out = engine(
    fbank=torch.randn(4, 1024, 128),
    input_ids=ids,
    attention_mask=torch.ones_like(ids),
    labels=ids,
    has_audio=torch.ones(4, dtype=torch.bool),
)
engine.backward(out.loss)
engine.step()
print(out.loss.dtype, torch.isfinite(out.loss).item())
print(engine.optimizer.gradient_accumulation_dtype, engine.communication_data_type)
"""
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env(), "MASTER_PORT": "29644"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["True", "torch.float32", "torch.float32"], done.stdout
