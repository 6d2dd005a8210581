"""Resume on another world size: a checkpoint written by N ranks continues on M ranks, ZeRO-2 and
ZeRO-3 (real DeepSpeed on CPU ranks, the tiny recipe, real shards), with GAMA-IT's soft prompt (its
own trainable group, fed by tags from a tiny tagger) in every run; and the export of such a run
answers as the run did.

Each run goes through tests/train_and_dump.py, the trainer unchanged plus a dump of the gathered
trainable weights, Adam moments, optimizer steps and learning rates right after every checkpoint
save and load, so that the state a resumed engine holds is compared with the state that was saved.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import synth_shards, train_env
from gama_ds.train.checkpoint import COMPLETE, UNIVERSAL, saved_world_size

BIN = os.path.dirname(sys.executable)
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_and_dump.py")
EPOCH, EPOCHS = 4, 2  # 16 clips x 4 QA pairs = 64 examples per epoch, global batch 16: 4 steps
FIRST, SECOND = 3, 6  # the stops: in mid-epoch, in the first epoch and in the second
COMMON = [
    f"train.epochs={EPOCHS}",
    "logging.every_steps=1",
    "logging.tensorboard=false",
    "logging.plot=false",
    "checkpoint.every_steps=1000",
    "checkpoint.keep=3",  # the hops' checkpoints stay for the checks
    # Groups of their own learning rate: ZeRO-3's universal loader would give them all the first's.
    "optim.group_lr={projections: 2.0e-3, lora: 5.0e-4, soft_prompt: 3.0e-3}",
    "model.audio.aggregator_dropout=0.0",  # dropout off: 1 and 2 ranks draw different masks
    "logging.trace_examples=true",  # examples/rank<r>.jsonl: which examples each step trained on
    # The soft prompt: 2 tokens, a short sentence and 1 tag, so that byte tokens stay few.
    "model.soft_prompt={tokens: 2, template: 'By <hint>: {tags}', top_k: 1}",
    "data.cutoff_len=140",
]
STAGES = {2: [], 3: ["deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0"]}
# Each stage's job, requeued twice on another world size: (ranks, DataLoader workers per rank) of
# its three attempts. ZeRO-2 starts afresh on one rank with two workers, ZeRO-3 on two ranks
# (batches made in the ranks): the trajectory depends on neither, and every hop is taken both ways.
ATTEMPTS = {2: [(1, 2), (2, 1), (1, 0)], 3: [(2, 0), (1, 0), (2, 0)]}


def free_port() -> int:
    # Other test runs share this machine: ask the system for a port nobody holds.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tagger):
    tmp = tmp_path_factory.mktemp("resume_world")
    synth_shards(tmp, clips=16, test_clips=4, seed=0)
    # Tags for the soft prompt, as `gama-ds tag` adds them (in-process: one tagger for both sets).
    from gama_ds.tags.options import TagOptions
    from gama_ds.tags.tag_set import tag_set

    options = TagOptions(tagger=tiny_tagger, device="cpu", dtype="fp32")
    tagger = options.load()
    for name in ("train", "test"):
        tag_set(str(tmp / name), options, threads=1, progress=False, log=lambda m: None, tagger=tagger)
    return tmp  # 4 training shards x 4 clips


def run(shards, out, ranks: int, overrides=(), extra=(), workers=0) -> dict[int, dict]:
    """Train under `ranks` processes; this run's metrics records by step."""
    args = ["tiny", f"data.train=[{{path: {shards / 'train'}}}]", f"train.output_dir={out}", *COMMON]
    args += [f"data.num_workers={workers}", *overrides, *extra]
    port = str(free_port())
    if ranks > 1:
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(ranks), "--master_port", port]
        cmd += [RUNNER, *args]
    else:
        cmd = [sys.executable, RUNNER, *args]
    metrics = os.path.join(out, "metrics.jsonl")
    before = len(open(metrics).readlines()) if os.path.exists(metrics) else 0
    env = dict(train_env(), MASTER_PORT=port)  # the port of a plain one-rank process too
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:  # not an AssertionError: the expected failure below must not cover it
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-5000:])
    records = [json.loads(line) for line in open(metrics).readlines()[before:]]
    return {r["step"]: r for r in records if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(shards):
    """Two epochs on two ranks, ZeRO-2 (ZeRO-3 follows the same trajectory: test_train.py)."""
    return run(shards, shards / "uninterrupted", 2, STAGES[2])


@pytest.fixture(scope="module")
def requeued(shards):
    """stage -> (output folder, records by step): a job requeued twice on another node count, in
    mid-epoch (ATTEMPTS): stopped at step 3, continued to step 6, finished. Runs once."""
    done = {}

    def get(stage: int):
        if stage not in done:
            out = shards / f"zero{stage}"
            (n0, w0), (n1, w1), (n2, w2) = ATTEMPTS[stage]
            records = run(shards, out, n0, STAGES[stage], ["--stop-at", str(FIRST)], w0)
            resume = ["--resume", "auto", "--stop-at", str(SECOND)]
            records.update(run(shards, out, n1, STAGES[stage], resume, w1))
            records.update(run(shards, out, n2, STAGES[stage], ["--resume", "auto"], w2))
            assert sorted(records) == list(range(1, EPOCHS * EPOCH + 1))
            done[stage] = out, records
        return done[stage]

    return get


# (stage, the step of the checkpoint, the world size that wrote it, the one that resumed it)
HOPS = [
    (stage, step, ATTEMPTS[stage][k][0], ATTEMPTS[stage][k + 1][0])
    for stage in STAGES
    for k, step in enumerate((FIRST, SECOND))
]


@pytest.mark.parametrize("stage, step, saved_on, resumed_on", HOPS)
def test_the_state_crosses_world_sizes_intact(requeued, uninterrupted, stage, step, saved_on, resumed_on):
    out, records = requeued(stage)
    ckpt, tag = out / "checkpoints", f"step-{step:08d}"
    assert saved_world_size(str(ckpt), tag) == saved_on  # recorded in the COMPLETE marker
    assert json.loads((ckpt / tag / COMPLETE).read_text())["world_size"] == saved_on
    assert (ckpt / tag / UNIVERSAL).is_dir()  # converted for the other world size
    dumps = out / "dumps"
    saved = load_file(dumps / f"save-{tag}.safetensors")
    loaded = load_file(dumps / f"load-{tag}.safetensors")
    # Trainable weights and both Adam moments, gathered, bit for bit: nothing is recomputed.
    assert sorted(saved) == sorted(loaded)
    names = [k.split("/", 1)[1] for k in saved if k.startswith("fp32/")]
    assert any(".lora_A." in n for n in names) and any(n.startswith("audio.") for n in names)
    assert "soft_prompt.weight" in names  # its own group, with its own learning rate
    assert not any("embed_tokens" in n for n in names)  # the frozen LLM is not part of it
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert all(saved[f"exp_avg_sq/{n}"].abs().sum() > 0 for n in names)  # real moments, not fresh zeros
    before = json.loads((dumps / f"save-{tag}.json").read_text())
    after = json.loads((dumps / f"load-{tag}.json").read_text())
    assert (before["world_size"], after["world_size"]) == (saved_on, resumed_on)
    assert before["optimizer_steps"] == after["optimizer_steps"] == [step]  # Adam's bias correction
    assert after["lr"] == before["lr"] and after["global_steps"] == step
    # The schedule goes on as in the uninterrupted run.
    for s in range(step + 1, min(step + EPOCH, EPOCHS * EPOCH) + 1):
        assert records[s]["lr"] == pytest.approx(uninterrupted[s]["lr"], rel=1e-9), s


@pytest.mark.parametrize("stage", STAGES)
def test_losses_after_each_resume_follow_the_uninterrupted_run(requeued, uninterrupted, stage):
    out, records = requeued(stage)
    for step, record in records.items():
        # fp32, dropout off, the same global batches: only the order of the reductions differs
        # (1 vs 2 ranks, ZeRO-2 vs 3, 0, 1 or 2 workers).
        assert record["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=2e-4), step
    # The last attempt's world: one rank accumulates twice as many micro-batches as each of two
    # did, for the same global batch of 16.
    last = json.loads((out / "run.json").read_text())
    ranks = ATTEMPTS[stage][-1][0]
    assert last["world_size"] == ranks
    assert last["deepspeed_config"]["gradient_accumulation_steps"] == 4 // ranks


def traced(out) -> dict[int, list[str]]:
    """step -> the examples all ranks trained on in it, from examples/rank<r>.jsonl."""
    steps: dict[int, list[str]] = {}
    for path in (out / "examples").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(record["keys"])
    return {s: sorted(k) for s, k in steps.items()}


@pytest.mark.parametrize("stage", STAGES)
def test_every_step_after_a_resume_trains_the_uninterrupted_runs_examples(requeued, uninterrupted, stage):
    out, _ = requeued(stage)
    mine, whole = traced(out), traced(out.parent / "uninterrupted")
    assert sorted(mine) == sorted(whole) == list(range(1, EPOCHS * EPOCH + 1))
    assert all(len(mine[s]) == 16 for s in mine)  # one global batch each, every rank's share traced
    assert mine == whole  # the same examples at every step: none repeated or skipped by the hops
    for epoch in range(EPOCHS):
        seen = [k for s in range(epoch * EPOCH + 1, (epoch + 1) * EPOCH + 1) for k in mine[s]]
        assert len(seen) == len(set(seen)) == 64  # every example of the epoch once


def test_the_world_size_of_a_checkpoint_is_read_from_its_marker_or_its_files(tmp_path):
    ckpt = tmp_path / "checkpoints"
    new, old, cut = ckpt / "step-00000002", ckpt / "step-00000004", ckpt / "step-00000006"
    for folder in (new, old, cut):
        folder.mkdir(parents=True)
    (new / COMPLETE).write_text(json.dumps({"step": 2, "recipe": "x", "world_size": 16}))
    # Written before the marker recorded it: one ZeRO optimizer file per rank tells.
    (old / COMPLETE).write_text(json.dumps({"step": 4, "recipe": "x"}))
    for rank in range(3):
        (old / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (old / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert saved_world_size(str(ckpt), new.name) == 16
    assert saved_world_size(str(ckpt), old.name) == 3
    # A save that died half-way is refused by name, with the ones that can be resumed.
    with pytest.raises(RuntimeError, match=r"step-00000006 is not a complete checkpoint.*step-00000002"):
        saved_world_size(str(ckpt), cut.name)


def test_an_export_with_a_soft_prompt_answers_as_the_run_did(requeued, shards, tmp_path):
    """The ZeRO-3 run (soft prompt partitioned, resumed twice): its export, loaded back, gives the
    logits and greedy answers of the model the run held at its last save, left-padded batches of
    clips with their tags, and the soft prompt is part of what it computes; on raw audio files,
    `gama-ds generate`, `gama-ds serve` and `gama-ds eval --suite` run the export's tagger and
    show the tags they used."""
    from gama_ds.train.export import export

    out, _ = requeued(3)
    export(str(out), str(tmp_path / "export"))
    port, log = free_port(), open(tmp_path / "server.log", "w")
    cmd = [sys.executable, "-m", "gama_ds", "serve", "--model", str(tmp_path / "export"), "--port", str(port)]
    server = subprocess.Popen(cmd, env=train_env(), stdout=log, stderr=subprocess.STDOUT)  # loads meanwhile
    try:
        soft, tagger = export_equals_run(out, shards, tmp_path / "export")
        wav = str(sorted((shards / "audio").rglob("*.wav"))[0])
        row = generate_on_audio(tmp_path / "export", wav, soft, tagger, tmp_path / "answers.jsonl")
        suite_on_audio(tmp_path / "export", shards / "audio", row, soft, tagger, tmp_path / "suite")
        # gama-ds serve answers a stock openai client the same, and says which tags it used.
        reply = ask_server(server, port, wav, row["instruction"], tmp_path / "server.log")
        assert reply.choices[0].message.content == row["answer"] and reply.model_extra["tags"] == row["tags"]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def export_equals_run(out, shards, folder):
    """The export against the run's own model; returns the export's soft prompt settings and the
    training shards' tagger."""
    from gama_ds.config import Recipe, from_dict
    from gama_ds.data.collate import Collator, Example
    from gama_ds.data.shards import iter_samples, read_index
    from gama_ds.data.soft_prompt import init_ids
    from gama_ds.data.tokenizer import load_tokenizer
    from gama_ds.exported import load_export, soft_prompt_settings
    from gama_ds.infer import generate
    from gama_ds.train.export import rebuild

    exported, tokenizer, info = load_export(str(folder), "cpu", "fp32")
    run = json.loads((out / "run.json").read_text())
    recipe = from_dict(Recipe, run["recipe"])
    soft = soft_prompt_settings(info)
    assert soft == recipe.model.soft_prompt and soft.tokens == 2
    tagger = read_index(str(shards / "train"))["provenance"]["tagger"]
    assert info["tagger"] == run["tagger"] == tagger  # what tagged its training clips
    # The run's own model: built as training built it, with the weights its last save held.
    in_run = rebuild(recipe).eval()
    saved = load_file(out / "dumps" / "save-step-00000008.safetensors")
    with torch.no_grad():
        for name, p in in_run.named_parameters():
            if p.requires_grad:
                p.copy_(saved[f"fp32/{name}"])
    run_tokenizer = load_tokenizer(recipe.data.tokenizer)
    start = in_run.llm.get_input_embeddings().weight[init_ids(run_tokenizer, soft)]
    assert (in_run.soft_prompt.weight - start).abs().max() > 1e-3  # trained away from its init rule

    rows = []
    for entry in read_index(str(shards / "test"))["shards"]:
        for sample in iter_samples(str(shards / "test" / entry["file"])):
            rows += [(sample.fbank, qa, sample.meta["tags"]) for qa in sample.meta["qa"][:2]]
    assert all(tags for _, _, tags in rows)
    fbanks, qas, tags = map(list, zip(*rows, strict=True))
    args = dict(template="alpaca_short", batch_size=3, max_new_tokens=6, soft_prompt=soft, do_sample=False)
    answers = generate(exported, tokenizer, fbanks, qas, tags=tags, **args)
    assert answers == generate(in_run, run_tokenizer, fbanks, qas, tags=tags, **args)

    batch = Collator(tokenizer, recipe.data.cutoff_len, soft_prompt=soft)(
        [Example(str(i), f, qa, tags=t) for i, (f, qa, t) in enumerate(rows)]
    )
    assert batch["hint_mask"].sum(dim=1).tolist() == [2] * len(rows)
    inputs = {
        k: batch[k] for k in ("fbank", "input_ids", "attention_mask", "labels", "has_audio", "hint_mask")
    }
    with torch.no_grad():
        logits = exported(**inputs).logits
        torch.testing.assert_close(logits, in_run(**inputs).logits, rtol=1e-5, atol=1e-5)
        exported.soft_prompt.weight.zero_()  # without its trained hint the model computes otherwise
        assert (exported(**inputs).logits - logits).abs().max() > 1e-3
    return soft, tagger


def generate_on_audio(folder, wav: str, soft, tagger, out) -> dict:
    """`gama-ds generate` on a raw audio file (the command, in-process): the export's tagger runs
    on the clip's features, the answer row shows its tags, and the answer is the one those tags give."""
    from gama_ds.audio import load_features
    from gama_ds.cli import main
    from gama_ds.exported import load_export
    from gama_ds.infer import generate
    from gama_ds.tags import Tagger

    question = "What do you hear?"
    args = ["generate", "--model", str(folder), "--audio", wav, "--question", question, "--out", str(out)]
    assert main([*args, "--greedy", "--max-new-tokens", "6", "--device", "cpu", "--dtype", "fp32"]) == 0
    (row,) = [json.loads(line) for line in open(out)]
    features = load_features(wav)[0]
    (tags,) = Tagger(tagger["path"]).tag([features], soft.top_k, soft.threshold)
    assert row["tags"] == [list(t) for t in tags] and len(tags) == soft.top_k
    model, tokenizer, _ = load_export(str(folder), "cpu", "fp32")
    qa = {"instruction": question, "input": ""}
    (answer,) = generate(
        model,
        tokenizer,
        [features],
        [qa],
        soft_prompt=soft,
        tags=[row["tags"]],
        max_new_tokens=6,
        do_sample=False,
    )
    assert row["answer"] == answer and row["instruction"] == question
    return row


def suite_on_audio(folder, root, row: dict, soft, tagger, tmp_path) -> None:
    """`gama-ds eval --suite` (in-process, one rank): each clip tagged by the export's tagger, the
    tags kept with the answer in the result rows and across a rerun that reuses every answer."""
    from gama_ds.audio import load_features
    from gama_ds.evaluate.suite import read_suite
    from gama_ds.evaluate.suite_run import run_suite
    from gama_ds.tags import Tagger

    wavs = sorted(root.rglob("*.wav"))[:2]
    assert str(wavs[0]) == row["audio"]
    tmp_path.mkdir()
    question = row["instruction"]
    rows = [{"audio_id": str(w.relative_to(root)), "instruction": question, "output": "x"} for w in wavs]
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    # gama-ds generate --greedy's settings, one clip a batch: the same answer for the same clip
    greedy = {"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": 6}
    clotho = {"dataset": "clothoaqa", "eval": "eval.json", "audio_root": str(root)}
    suite = {"batch_size": 1, "generation": greedy, "datasets": [clotho]}
    (tmp_path / "suite.yaml").write_text(json.dumps(suite))
    out, copy = tmp_path / "out", shutil.copytree(tagger["path"], tmp_path / "tagger")  # a moved tagger
    suite = read_suite(str(tmp_path / "suite.yaml"))
    report = run_suite(suite, str(folder), str(out), "cpu", "fp32", None, copy)
    assert report["tagger"]["fingerprint"] == tagger["fingerprint"] and report["sets"][0]["generated"] == 2
    results = json.load(open(out / "clothoaqa.json"))
    assert (results[0]["pred"], results[0]["tags"]) == (row["answer"], row["tags"])
    expected = Tagger(tagger["path"]).tag([load_features(str(wavs[1]))[0]], soft.top_k, soft.threshold)[0]
    assert results[1]["tags"] == [list(t) for t in expected]
    again = run_suite(suite, str(folder), str(out), "cpu", "fp32")
    assert again["sets"][0]["kept"] == 2 and json.load(open(out / "clothoaqa.json")) == results
    # An export that names no tagger takes one from --tagger; answers one tagger's tags made are
    # never kept for another's.
    from gama_ds.errors import WeightsError

    bare = shutil.copytree(folder, tmp_path / "bare")
    info = json.load(open(bare / "gama_ds.json"))
    del info["tagger"]
    json.dump(info, open(bare / "gama_ds.json", "w"))
    with pytest.raises(WeightsError, match="names no tagger; give one with --tagger DIR"):
        run_suite(suite, str(bare), str(tmp_path / "bare-out"), "cpu", "fp32")
    relabelled = shutil.copytree(tagger["path"], tmp_path / "relabelled")
    config = json.load(open(relabelled / "config.json"))
    config["id2label"] = {k: f"{v} (relabelled)" for k, v in config["id2label"].items()}
    json.dump(config, open(relabelled / "config.json", "w"))
    for used in (copy, relabelled):
        report = run_suite(suite, str(bare), str(tmp_path / "bare-out"), "cpu", "fp32", None, str(used))
        assert report["sets"][0]["generated"] == 2 and report["sets"][0]["kept"] == 0
    assert all(
        label.endswith("(relabelled)")
        for label, _ in json.load(open(report["sets"][0]["results"]))[0]["tags"]
    )


def ask_server(server, port: int, wav: str, question: str, log):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=60)
    deadline = time.monotonic() + 120
    while True:  # until it answers, or has died
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            assert time.monotonic() < deadline, "the server did not come up in 120 s"
            time.sleep(0.2)
    clip = base64.b64encode(open(wav, "rb").read()).decode()
    content = [
        {"type": "text", "text": question},
        {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}},
    ]
    return client.chat.completions.create(
        model="export", temperature=0, max_tokens=6, messages=[{"role": "user", "content": content}]
    )
