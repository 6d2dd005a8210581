"""Generation and evaluation from an export: the same front end, prompt and masks as training."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import synth_shards, train_env
from gama_ds.exported import load_export
from gama_ds.infer import (
    TextEmbedder,
    classification_accuracy,
    classify_by_embedding,
    classify_by_string,
    evaluate,
    exact_match,
    generate,
    normalise,
)
from gama_ds.train.export import export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model trained for 2 steps on one CPU process, exported. As the demo does, the stage
    starts from an export whose base LLM is inside it (`train.init`), and every path the run is
    given is relative to the folder it runs in, not to where it is exported or used."""
    from gama_ds.config import load_recipe
    from gama_ds.model.build import build_model
    from gama_ds.train.export import write_export

    tmp = tmp_path_factory.mktemp("infer")
    data = synth_shards(tmp, clips=16, test_clips=4, seed=3)
    recipe = load_recipe("tiny")
    write_export(build_model(recipe.model), recipe, str(tmp / "start"), source={"test": "start"})
    args = [
        "tiny",
        "data.train=[{path: train}]",
        "data.eval=[{path: test}]",
        "train.output_dir=run",
        "train.init=start",
        "train.max_steps=2",
        "data.num_workers=0",
        "logging.plot=false",
        "logging.tensorboard=false",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "gama_ds", "train", *args],
        cwd=tmp,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    export(str(tmp / "run"), str(tmp / "export"))
    return {
        "tmp": tmp,
        "data": data,
        "export": str(tmp / "export"),
        "eval_loss": json.loads(done.stdout.strip().splitlines()[-1])["eval_loss"],
    }


def test_batched_generation_equals_one_by_one_from_audio_files(exported):
    model, tokenizer, info = load_export(exported["export"])
    rows = json.load(open(exported["data"]["test"]))
    root = os.path.dirname(exported["data"]["test"])
    clips = [os.path.join(root, r["audio_id"]) for r in rows[:3]]
    qas = [{"instruction": q, "input": ""} for q in ("How many beeps?", "Is this a tone or noise?", "Loud?")]
    together = generate(model, tokenizer, clips, qas, batch_size=3, max_new_tokens=5, do_sample=False)
    alone = [
        generate(model, tokenizer, [c], [q], max_new_tokens=5, do_sample=False)[0]
        for c, q in zip(clips, qas, strict=True)
    ]
    assert together == alone and all(isinstance(a, str) for a in together)


def test_the_generate_command_answers_a_file_and_a_question_list(exported, tmp_path):
    root = os.path.dirname(exported["data"]["test"])
    first = json.load(open(exported["data"]["test"]))[0]
    audio_file = os.path.join(root, first["audio_id"])
    cmd = [
        sys.executable,
        "-m",
        "gama_ds",
        "generate",
        "--model",
        exported["export"],
        "--max-new-tokens",
        "4",
    ]
    one = subprocess.run(
        [*cmd, "--audio", audio_file, "--question", "How many beeps?", "--greedy"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    line = json.loads(one.stdout.strip().splitlines()[-1])
    assert line["audio"] == audio_file and line["instruction"] == "How many beeps?" and "answer" in line
    out = tmp_path / "answers.jsonl"
    many = subprocess.run(
        [*cmd, "--input", exported["data"]["test"], "--out", str(out), "--beams", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert many.returncode == 0, many.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 16 and all("answer" in x and x["output"] for x in lines)  # 4 clips x 4 questions


def test_eval_reports_the_trained_models_loss_and_exact_match(exported):
    model, tokenizer, info = load_export(exported["export"], "cpu", "fp32")  # as training ran
    result = evaluate(
        model,
        tokenizer,
        [str(exported["tmp"] / "test")],
        info["prompt"]["cutoff_len"],
        info["prompt"]["template"],
        max_new_tokens=3,
    )
    assert result["examples"] == 16
    assert result["loss"] == pytest.approx(exported["eval_loss"], abs=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(result["loss"]).exp().item(), rel=1e-6)
    assert 0.0 <= result["exact_match"] <= 1.0 and set(result["exact_match_by_task"]) == {
        "count",
        "pitch",
        "kind",
        "loudness",
    }


def test_exact_match_on_known_answers():
    assert normalise("  Four. ") == "four" and normalise("A dog, barking!") == "a dog barking"
    assert exact_match(["Four.", "two", "high pitch"], ["four", "three", "High pitch"]) == pytest.approx(
        2 / 3
    )


def test_classification_by_string_names_the_label_the_answer_says():
    labels = ["dog bark", "dog", "siren"]
    assert classify_by_string("Dog bark.", labels) == "dog bark"
    assert classify_by_string("it is a dog barking loudly", labels) == "dog"  # whole words only
    assert classify_by_string("the sound of a dog bark nearby", labels) == "dog bark"  # longest match
    assert classify_by_string("a car engine", labels) is None
    refs = ["siren", "dog", "dog bark", "siren"]
    preds = ["Siren!", "a dog", "cat", "dog"]
    acc = classification_accuracy(preds, refs, ["a", "a", "b", "b"])
    assert acc == {"a": 1.0, "b": 0.0}  # task b's labels: {dog bark, siren}; "dog" names neither


@pytest.fixture(scope="module")
def bert_embedder(tmp_path_factory):
    """A small BERT text encoder written to a folder, as a user's SentenceBERT would be."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert")
    words = "sound of a the dog bark siren car engine rain loud quiet high low tone noise one two".split()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join([*specials, *words]) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(folder)
    return TextEmbedder(str(folder))


def test_classification_by_embedding_picks_the_nearest_label(bert_embedder):
    labels = ["dog bark", "siren", "car engine", "rain"]
    vectors = bert_embedder([f"sound of {x}" for x in labels])
    assert torch.allclose(vectors.norm(dim=1), torch.ones(4), atol=1e-5)
    # An answer that is a label's own text has cosine 1 with it, so it must be classified as that label,
    # whatever the (random) encoder weights.
    preds = ["siren", "rain", "dog bark", "car engine"]
    assert classify_by_embedding(preds, labels, bert_embedder) == preds
    acc = classification_accuracy(preds, ["siren", "rain", "rain", "car engine"], ["t"] * 4, bert_embedder)
    assert acc == {"t": 0.75}


def test_eval_cli_reports_classification_with_an_embedder(exported, bert_embedder, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("one\ntwo\nthree\nfour\nhigh\nlow\ntone\nnoise\nloud\nquiet\n")
    done = subprocess.run(
        [
            sys.executable, "-m", "gama_ds", "eval", "--model", exported["export"],
            "--shards", str(exported["tmp"] / "test"), "--metric", "exact", "classify",
            "--embedder", bert_embedder.model.name_or_path, "--labels", str(labels),
            "--max-new-tokens", "3", "--json",
        ],
        env=train_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["classify_by"] == "embedding" and "loss" not in result
    assert set(result["classify_by_task"]) == {"count", "pitch", "kind", "loudness"}
    assert all(0.0 <= v <= 1.0 for v in result["classify_by_task"].values())
    bad = subprocess.run(
        [sys.executable, "-m", "gama_ds", "eval", "--model", exported["export"], "--shards", "x",
         "--labels", "y"],
        env=train_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "--metric classify" in bad.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    for path, message in ((tmp_path / "missing.txt", "cannot read the labels file"), (empty, "no labels")):
        bad = subprocess.run(
            [sys.executable, "-m", "gama_ds", "eval", "--model", exported["export"], "--shards", "x",
             "--metric", "classify", "--labels", str(path)],
            env=train_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert bad.returncode != 0 and f"{path}: {message}" in bad.stderr, bad.stderr[-2000:]


def test_every_module_runs_in_the_dtype_asked_for_and_bf16_answers_like_fp32(exported):
    from gama_ds.data.collate import Collator, Example
    from gama_ds.infer import _loss

    rows = json.load(open(exported["data"]["test"]))
    root = os.path.dirname(exported["data"]["test"])
    clips = [os.path.join(root, r["audio_id"]) for r in rows[:2]]
    qas = [{"instruction": "How many beeps?", "input": ""}] * 2
    losses = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, tokenizer, info = load_export(exported["export"], device="cpu", dtype=name)
        params = dict(model.named_parameters())
        assert len(params) > 100 and {(p.dtype, p.device.type) for p in params.values()} == {(dtype, "cpu")}
        # Buffers as transformers and DeepSpeed keep them in training: the rotary frequencies
        # stay fp32 (positions as precise as trained); every other floating buffer is in dtype.
        floating = {n: b.dtype for n, b in model.named_buffers() if b.is_floating_point()}
        assert floating and {d for n, d in floating.items() if "rotary_emb" not in n} <= {dtype}
        assert {d for n, d in floating.items() if "rotary_emb" in n} == {torch.float32}
        answers = generate(model, tokenizer, clips, qas, max_new_tokens=3, do_sample=False)
        assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
        prompt = info["prompt"]
        collator = Collator(tokenizer, prompt["cutoff_len"], prompt["template"], prompt["train_on_inputs"])
        examples = [Example(s.key, s.fbank, qa) for s in _test_samples(exported) for qa in s.meta["qa"]][:8]
        losses[name] = _loss(model, collator, examples, batch_size=4)
    assert losses["fp32"] == pytest.approx(losses["bf16"], rel=0.02)  # the same model, in 8-bit mantissas


def _test_samples(exported):
    from gama_ds.data.shards import iter_samples, read_index

    root = str(exported["tmp"] / "test")
    return [s for e in read_index(root)["shards"] for s in iter_samples(f"{root}/{e['file']}")]


def test_device_and_dtype_flags_are_checked_before_anything_loads(exported, tmp_path, capsys):
    from gama_ds.cli import main

    first = json.load(open(exported["data"]["test"]))[0]
    audio_file = os.path.join(os.path.dirname(exported["data"]["test"]), first["audio_id"])
    ask = ["--audio", audio_file, "--question", "How many beeps?"]
    not_an_export = str(tmp_path)  # refused only after the flags: they are checked first
    for argv, message in (
        (["generate", "--model", not_an_export, *ask, "--device", "mps"], "--device mps: only cpu and cuda"),
        (["generate", "--model", not_an_export, *ask, "--device", "gpu0"], "--device 'gpu0' is not a device"),
        (["eval", "--model", not_an_export, "--shards", "x", "--device", "cpu", "--dtype", "fp16"],
         "--dtype fp16 runs on a GPU only"),
    ):  # fmt: skip
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", "--model", exported["export"], *ask, "--greedy", "--max-new-tokens", "2",
                 "--device", "cpu", "--dtype", "bf16"]) == 0  # fmt: skip
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["audio"] == audio_file and isinstance(line["answer"], str)


def test_a_moved_and_a_copied_run_answer_from_any_working_directory(exported, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    from gama_ds.cli import main

    original = exported["tmp"]
    export_dir = original / "export"
    info = json.load(open(export_dir / "gama_ds.json"))
    assert info["base_llm"]["inside"] and info["model"]["llm"] == "llm"
    # Stock PEFT finds the base on its own, from what the adapter names (the export's llm/).
    named = json.load(open(export_dir / "adapter" / "adapter_config.json"))["base_model_name_or_path"]
    assert named == str(export_dir / "llm")
    stock = AutoPeftModelForCausalLM.from_pretrained(str(export_dir / "adapter")).eval()
    model, tokenizer, _ = load_export(str(export_dir), "cpu", "fp32")
    ids = torch.tensor([tokenizer("### Instruction:\nHow many beeps?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, model.llm(input_ids=ids).logits)
    rows = json.load(open(exported["data"]["test"]))
    clips = [os.path.join(os.path.dirname(exported["data"]["test"]), r["audio_id"]) for r in rows[:2]]
    qas = [{"instruction": "How many beeps?", "input": ""}] * 2
    before = generate(model, tokenizer, clips, qas, max_new_tokens=4, do_sample=False)

    moved = tmp_path / "moved"
    shutil.move(original, moved)  # the whole run folder: start export, run, export, audio
    try:
        shutil.copytree(moved, tmp_path / "copied")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        for root in (moved, tmp_path / "copied"):
            model, tokenizer, _ = load_export(str(root / "export"))
            clips_here = [str(root / os.path.relpath(c, original)) for c in clips]
            assert generate(model, tokenizer, clips_here, qas, max_new_tokens=4, do_sample=False) == before
        clip = str(moved / os.path.relpath(clips[0], original))
        ask = ["--audio", clip, "--question", "How many beeps?", "--greedy", "--max-new-tokens", "4"]
        assert main(["generate", "--model", str(moved / "export"), *ask]) == 0
    finally:
        shutil.move(moved, original)


def test_a_base_llm_outside_the_export_is_named_by_path_and_checked_by_fingerprint(
    exported, tmp_path, monkeypatch
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from gama_ds.config import load_recipe
    from gama_ds.errors import WeightsError
    from gama_ds.model.build import build_model
    from gama_ds.model.llm import llm_config
    from gama_ds.model.llm_folder import fingerprint
    from gama_ds.train import export as export_module
    from gama_ds.train.preflight import llm_source

    users_llm = tmp_path / "models" / "llama"
    shutil.copytree(exported["tmp"] / "export" / "llm", users_llm)  # a user's model folder
    recipe = load_recipe("tiny", [f"model.llm={users_llm}"])
    monkeypatch.setattr(export_module, "SMALL_LLM_BYTES", 0)  # as a 7B LLM would be: named, not copied
    out = tmp_path / "export"
    info = export_module.write_export(build_model(recipe.model), recipe, str(out), source={"test": "outside"})
    assert not info["base_llm"]["inside"] and info["base_llm"]["folder"] == str(users_llm)
    assert not (out / "llm").exists()
    adapter_base = json.load(open(out / "adapter" / "adapter_config.json"))["base_model_name_or_path"]
    assert adapter_base == str(users_llm)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter_base), str(out / "adapter"))

    shutil.move(users_llm, tmp_path / "moved_llm")
    with pytest.raises(WeightsError, match=f"its base LLM {users_llm} is not there.*--llm DIR"):
        load_export(str(out))
    model, _, _ = load_export(str(out), llm=str(tmp_path / "moved_llm"))  # the same model, elsewhere: fine
    assert model.llm.get_base_model().config.num_hidden_layers == 2

    other = tmp_path / "other_llm"
    LlamaForCausalLM(llm_config("tiny", vocab_size=300)).save_pretrained(other)
    with pytest.raises(WeightsError) as err:
        load_export(str(out), llm=str(other))
    assert f"{other} is not the base LLM that {out} was trained on ({users_llm})" in str(err.value)
    assert "config.json and weight files" in str(err.value)

    carried = tmp_path / "carried"  # --include-llm: inside whatever its size, the same model
    recipe.model.llm = str(tmp_path / "moved_llm")
    info = export_module.write_export(build_model(recipe.model), recipe, str(carried), {}, include_llm=True)
    assert info["base_llm"]["inside"] and info["base_llm"]["fingerprint"] == fingerprint(recipe.model.llm)
    # The next stage (a preset LLM, train.init an export) trains on the export's base LLM, not on a
    # preset's random weights: the one inside, or the named one, which must still be there.
    assert llm_source(load_recipe("tiny", [f"train.init={carried}"])) == str(carried / "llm")
    with pytest.raises(WeightsError, match=f"its base LLM {users_llm} is not there"):
        llm_source(load_recipe("tiny", [f"train.init={out}"]))


def _suite(tmp_path, exported, bert_embedder, **extra) -> str:
    """A suite over the held-out set: every question by text (our ClothoAQA rule) and the "kind"
    question as a single-label set scored by the embedder against a label CSV."""
    labels = tmp_path / "kind_labels.csv"
    labels.write_text("index,mid,display_name\n0,/m/tone,'tone'\n1,/m/noise,'noise'\n")
    suite = {
        "embedder": bert_embedder.model.name_or_path,
        "batch_size": 3,
        "num_workers": 0,
        "generation": {"do_sample": False, "max_new_tokens": 4},
        "datasets": [
            {"dataset": "clothoaqa", "name": "all", "eval": exported["data"]["test"]},
            {"dataset": "plain", "name": "kind", "eval": exported["data"]["test"], "task": "kind",
             "labels": str(labels)},
        ],
        **extra,
    }  # fmt: skip
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(suite))  # JSON is YAML
    return str(path)


def test_an_eval_suite_runs_data_parallel_keeps_its_answers_and_resumes_on_another_rank_count(
    exported, bert_embedder, tmp_path
):
    suite, out = _suite(tmp_path, exported, bert_embedder), tmp_path / "out"
    command = ["-m", "gama_ds", "eval", "--model", exported["export"], "--suite", suite, "--out", str(out),
               "--json"]  # fmt: skip
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *command],
        env=train_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    report = json.loads(two.stdout.strip().splitlines()[-1])  # rank 0 alone prints it
    assert report["world_size"] == 2 and report["generation"]["do_sample"] is False
    held_out = json.load(open(exported["data"]["test"]))
    questions = [(r["audio_id"], qa) for r in held_out for qa in r["instruction_output"]]
    assert [s["name"] for s in report["sets"]] == ["all", "kind"]
    assert [s["rows"] for s in report["sets"]] == [len(questions), len(held_out)]
    # LTU-format rows in the eval file's order, each rank having answered its slice ...
    rows = json.load(open(out / "all.json"))
    assert [(r["audio_id"], r["prompt"], r["ref"]) for r in rows] == [
        (a, qa["instruction"], qa["output"]) for a, qa in questions
    ]
    parts = sorted((out / "parts").iterdir())
    assert len(parts) == 2 and {p.name for p in parts[0].iterdir()} == {"rank00000.jsonl", "rank00001.jsonl"}
    # ... with the answers one process gives for the same batches: rank r answers rows r, r + 2, ...
    # in batches of 3 (greedy answers hang on the batch only through floating-point noise, which
    # flips near-ties of this barely trained model), under the report's settings: the suite's
    # greedy decoding over the export's others (LTU's repetition penalty).
    settings = dict(report["generation"])
    assert settings.pop("max_new_tokens") == 4 and settings["repetition_penalty"] == 1.1
    model, tokenizer, _ = load_export(exported["export"])
    root = os.path.dirname(exported["data"]["test"])
    alone = [None] * len(questions)
    for rank in (0, 1):
        mine = list(range(rank, len(questions), 2))
        clips = [os.path.join(root, questions[i][0]) for i in mine]
        qas = [{**questions[i][1], "input": ""} for i in mine]
        for i, answer in zip(mine, generate(model, tokenizer, clips, qas, batch_size=3, max_new_tokens=4,
                                            **settings), strict=True):  # fmt: skip
            alone[i] = answer
    assert [r["pred"] for r in rows] == alone
    # Scored by gama-ds score's rules: the text rule for "all", the embedder over the label CSV for "kind".
    # (the answer's words, punctuation aside, begin with the reference's: "tone." and "tone, high" for "tone")
    words = [re.sub(r"[^\w\s]", " ", p.lower()).split() for p in alone]
    hits = sum(
        w[: len(qa["output"].split())] == qa["output"].split()
        for w, (_, qa) in zip(words, questions, strict=True)
    )
    assert report["sets"][0]["score"]["value"] == pytest.approx(hits / len(questions))
    kind = report["sets"][1]["score"]
    assert (
        kind["metric"] == "acc"
        and kind["classes"] == 2
        and kind["embedder"]["path"] == bert_embedder.model.name_or_path
    )
    assert report["table"]["cls_avg"] == pytest.approx(100 * kind["value"])
    # A run that lost one rank's part file generates exactly those answers again, on one process.
    lost = parts[0] / "rank00001.jsonl"
    n_lost = len(lost.read_text().splitlines())
    lost.unlink()
    # Without --json it prints the table; the report is in OUT/report.json either way.
    one = subprocess.run(
        [sys.executable, *command[:-1]], env=train_env(), capture_output=True, text=True, timeout=600
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert "all (Acc) | kind (Acc) | Cls avg" in one.stdout
    again = json.load(open(out / "report.json"))
    assert again["world_size"] == 1 and again["sets"][0]["generated"] == n_lost
    assert again["sets"][1]["generated"] == 0 and again["sets"][1]["kept"] == len(held_out)
    assert json.load(open(out / "all.json")) == rows


def test_an_eval_suite_names_what_is_wrong_before_answering(exported, bert_embedder, tmp_path):
    from gama_ds.errors import UsageError
    from gama_ds.evaluate.suite import read_suite
    from gama_ds.evaluate.suite_run import run_suite

    good = json.loads(open(_suite(tmp_path, exported, bert_embedder)).read())
    cases = [
        ({"batch_size": 0}, "batch_size: a whole number >= 1"),
        ({"datasets": [{**good["datasets"][1], "labels": None}]}, "datasets[0].labels: any single-label set"),
        ({"datasets": [{**good["datasets"][0], "dataset": "esc-50"}]}, "datasets[0].dataset 'esc-50'"),
        ({"datasets": [good["datasets"][0]] * 2}, "datasets[1]: name 'all' is used twice"),
        ({"datasets": [{**good["datasets"][0], "metric": "map"}]}, "datasets[0].metric 'map'"),
        ({"embedder": None}, "embedder: a text-encoder folder is needed to score kind"),
        ({"generations": {}}, "generations: not a suite key"),
    ]
    for change, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(UsageError, match=re.escape(f"{path}: {message}")):
            read_suite(str(path))
    # An audio file that is not where the eval file says: named with its row, nothing generated.
    moved = [{"audio_id": "gone/clip.wav", "output": "tone", "instruction": "Is this a tone or noise?"}]
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    path = tmp_path / "moved.yaml"
    path.write_text(json.dumps({"datasets": [{"dataset": "clothoaqa", "eval": "moved.json"}]}))
    with pytest.raises(
        UsageError, match=re.escape(f"moved.json[0]: audio 'gone/clip.wav' -> {tmp_path}/gone")
    ):
        run_suite(read_suite(str(path)), exported["export"], str(tmp_path / "o"), "cpu")
    assert not (tmp_path / "o" / "clothoaqa.json").exists()
    with pytest.raises(UsageError, match="--tagger: .* has no soft prompt, so no use for a tagger"):
        run_suite(read_suite(str(path)), exported["export"], str(tmp_path / "o"), "cpu", tagger=str(tmp_path))
