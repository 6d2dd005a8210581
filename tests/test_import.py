"""`gama-ds import`: the released checkpoints' full key inventory, at small widths, to an export.

The real checkpoints cannot be fetched here, so the sources are written the way the reference
ships them, key for key (tests/data/reference_inventory.json: every name of the 7B release),
with the widths shrunk: a base folder with a real Llama config, a Llama-2-style tokenizer (no
pad token) and sharded safetensors plus the Q-Former file beside them, and a stage checkpoint
`pytorch_model.bin` written by torch.save. Depths and counts stay the reference's (12 encoder
blocks, 12 Q-Former layers, 32 queries, 32 LLM layers with LoRA r 8 on q and v), so every name is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import synth_shards, train_env, write_audio
from gama_ds.cli import main
from gama_ds.infer import REFERENCE_GENERATION
from gama_ds.model.weights import map_name

INVENTORY = json.load(open(os.path.join(os.path.dirname(__file__), "data", "reference_inventory.json")))
WIDTH, HIDDEN = 32, 32  # audio width and LLM hidden size; the reference's are 768 and 4096
# 768 -> WIDTH and its multiples (qkv, FFN), 4096 -> HIDDEN; every other size is the reference's.
SCALE = {768: WIDTH, 2304: 3 * WIDTH, 3072: 4 * WIDTH, 4096: HIDDEN}
OVERRIDES = [f"model.audio.width={WIDTH}", "model.audio.heads=2", f"model.audio.ffn={4 * WIDTH}"]
UNKNOWN = "base_model.model.model.audio_soft_prompt.weight"  # no reference module has it


def small(shape) -> list[int]:
    return [SCALE.get(d, d) for d in (shape or [100, 768])]  # null: a vocabulary-sized table


def tensors(inventory: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in inventory.items():
        if name.endswith("position_ids"):
            out[name] = torch.arange(shape[-1]).expand(*shape).clone()
        else:
            out[name] = torch.randn(small(shape), generator=g)
    return out


def llama_tokenizer():
    """Llama-2's special-token layout (<unk> 0, <s> 1, </s> 2, BOS added, no pad token) over
    byte-level pieces, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_llm(folder, max_rope: int = 4096) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = llama_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=32,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_rope,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    # Sharded with an index, as Llama-2-7b-chat-hf is.
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="1MB")
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The GAMA release: base folder + stage checkpoint (+ one unknown tensor), imported once
    with the command, as a user would."""
    tmp = tmp_path_factory.mktemp("released")
    base = tmp / "Llama-2-7b-chat-hf-qformer"
    write_llm(base)
    assert sorted(p.name for p in base.glob("model-*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    base_audio = tensors({**INVENTORY["gama_base"], **INVENTORY["gama_base_extra"]}, seed=1)
    save_file(base_audio, base / "model-00004-of-00002.safetensors")  # the Q-Former file's name
    checkpoint = {**tensors(INVENTORY["gama_stage"], seed=2), UNKNOWN: torch.randn(4)}
    (tmp / "checkpoint-2500").mkdir()
    torch.save(checkpoint, tmp / "checkpoint-2500" / "pytorch_model.bin")
    out = tmp / "export"
    run = subprocess.run(
        [sys.executable, "-m", "gama_ds", "import", "--base", str(base), "--checkpoint",
         str(tmp / "checkpoint-2500" / "pytorch_model.bin"), "--out", str(out), *OVERRIDES],
        capture_output=True, text=True, timeout=300, env=train_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return {
        "tmp": tmp,
        "base": base,
        "checkpoint": checkpoint,
        "base_audio": base_audio,
        "out": out,
        "stdout": json.loads(run.stdout.strip().splitlines()[-1]),
        "stderr": run.stderr,
    }


def exported_tensors(out) -> dict[str, torch.Tensor]:
    """Our full parameter names -> the export's tensors (audio modules and the PEFT adapter)."""
    found = {f"audio.{k}": v for k, v in load_file(out / "audio.safetensors").items()}
    for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items():
        found["llm." + k.replace(".weight", ".default.weight")] = v
    return found


def test_every_tensor_of_the_release_lands_in_the_export(released):
    found = exported_tensors(released["out"])
    mapped = {}
    for name, tensor in released["checkpoint"].items():
        ours = None if name == UNKNOWN else map_name(name)
        if ours is not None:
            mapped[ours] = tensor
    # Key for key: everything the export holds came from the checkpoint, with its value, and
    # every tensor of the checkpoint the model computes with is there.
    assert set(found) == set(mapped)
    for ours, tensor in mapped.items():
        torch.testing.assert_close(found[ours], tensor, rtol=0, atol=0, msg=ours)
    assert len([n for n in found if ".lora_" in n]) == 128  # 32 layers x q, v x A, B
    # Where the base folder holds the same tensor, the checkpoint's value won.
    base_q = released["base_audio"]["model.query_tokens"]
    assert not torch.equal(found["audio.qformer.query_tokens"], base_q)
    report = json.loads((released["out"] / "import.json").read_text())
    replaced = report["checkpoint_replaced_base"]
    assert len(replaced) > 400 and "query_tokens" in replaced and "audio_encoder.norm_a.weight" in replaced
    assert report["from_base"] == []
    # Tensors the reference never computes with are listed, and the unknown one is named.
    assert "audio_aggregator_layer_1.intermediate_query.dense.weight" in report["never_used"]
    assert "audio_encoder.blocks_v.0.attn.qkv.weight" in report["never_used"]  # the base's video side
    assert report["unknown"] == ["audio_soft_prompt.weight"]
    assert released["stdout"]["unknown"] == ["audio_soft_prompt.weight"]
    assert "audio_soft_prompt.weight" in released["stderr"] and "WARNING" in released["stderr"]
    assert not [p for p in released["tmp"].iterdir() if p.name.startswith(".import-")]


def test_the_export_records_the_reference_prompt_and_sampling(released):
    info = json.loads((released["out"] / "gama_ds.json").read_text())
    assert info["prompt"]["template"] == "alpaca_short" and info["prompt"]["cutoff_len"] == 108
    assert info["generation"] == {
        "do_sample": True, "temperature": 0.1, "top_p": 0.95, "top_k": 500,
        "repetition_penalty": 1.1, "max_new_tokens": 400,
    }  # fmt: skip
    assert info["generation"] == REFERENCE_GENERATION
    assert info["model"]["aggregator"] == "released" and info["model"]["variant"] == "gama"
    assert info["source"]["imported"]["checkpoint"].endswith("checkpoint-2500/pytorch_model.bin")
    adapter = json.loads((released["out"] / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    # The LLM's own tokenizer had no pad token; the export pads with unk, as gama_inf.py does.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(released["out"] / "tokenizer")
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2


def test_generate_answers_from_an_audio_file_with_the_exports_settings(released, tmp_path, capsys):
    """`generate` runs the import unchanged and takes its defaults from the export: an export
    that says max_new_tokens 3 answers in at most 3 byte tokens; a bad setting is named."""
    copy = tmp_path / "export"
    shutil.copytree(released["out"], copy)
    info = json.loads((copy / "gama_ds.json").read_text())
    info["generation"]["max_new_tokens"] = 3
    (copy / "gama_ds.json").write_text(json.dumps(info))
    clip = write_audio(tmp_path / "clip.wav", seconds=2.0)
    assert main(["generate", "--model", str(copy), "--audio", clip, "--question", "What sound is this?"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["audio"] == clip and row["instruction"] == "What sound is this?"
    assert 1 <= len(row["answer"]) <= 3  # byte-level tokens: at most one character each
    info["generation"]["temperature"] = 0
    (copy / "gama_ds.json").write_text(json.dumps(info))
    assert main(["generate", "--model", str(copy), "--audio", clip, "--question", "What is it?"]) == 2
    assert "gama_ds.json: generation.temperature = 0 is out of range" in capsys.readouterr().err


def test_eval_scores_the_imported_model(released, tmp_path, capsys):
    synth_shards(tmp_path, clips=1, test_clips=2, seed=0, per_shard=(1, 2))
    argv = ["eval", "--model", str(released["out"]), "--shards", str(tmp_path / "test")]
    assert main([*argv, "--metric", "loss", "exact", "--max-new-tokens", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["examples"] >= 2 and torch.isfinite(torch.tensor(result["loss"]))
    assert 0.0 <= result["exact_match"] <= 1.0


def test_a_missing_or_misplaced_tensor_refuses_and_writes_nothing(released, tmp_path, capsys):
    ckpt = dict(released["checkpoint"])
    del ckpt["base_model.model.model.audio_proj_qformer.2.weight"]
    # A 13th encoder block: a deeper encoder than the model built, not an unused tensor.
    ckpt["base_model.model.model.audio_encoder.blocks_a.11.attn.qkv.bias"] = torch.randn(3 * WIDTH)
    torch.save(ckpt, tmp_path / "pytorch_model.bin")
    out = tmp_path / "export"
    argv = ["import", "--base", str(released["base"]), "--checkpoint", str(tmp_path), "--out", str(out)]
    assert main([*argv, *OVERRIDES]) == 2
    err = capsys.readouterr().err
    assert "nothing written" in err and "1 missing: audio_proj_qformer.2.weight" in err
    assert "audio_encoder.blocks_a.11.attn.qkv.bias" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".import-")]
    # The base folder alone has no aggregator or projections: refused, pointing at --checkpoint.
    assert main(["import", "--base", str(released["base"]), "--out", str(out), *OVERRIDES]) == 2
    err = capsys.readouterr().err
    assert "audio_aggregator_layer_1." in err and "--checkpoint" in err and not out.exists()


def test_a_base_folder_without_its_second_shard_is_named(released, tmp_path, capsys):
    """The Drive copy lacks model-00002-of-00002.safetensors (GAMA issue #25)."""
    base = tmp_path / "base"
    shutil.copytree(released["base"], base)
    (base / "model-00002-of-00002.safetensors").unlink()
    ckpt = released["tmp"] / "checkpoint-2500"
    argv = ["import", "--base", str(base), "--checkpoint", str(ckpt), "--out", str(tmp_path / "e")]
    assert main([*argv, *OVERRIDES]) == 2
    err = capsys.readouterr().err
    assert "model-00002-of-00002.safetensors" in err and "issue #25" in err
    assert not (tmp_path / "e").exists()


def test_an_ltu_release_imports_and_answers(tmp_path):
    """LTU's layout: vicuna_ltu with the CAV-MAE in pytorch_model-00003-of-00002.bin, and a
    stage checkpoint of LTU's names (one linear projection, no Q-Former or aggregator)."""
    from gama_ds.exported import load_export
    from gama_ds.infer import generate

    base = tmp_path / "vicuna_ltu"
    write_llm(base, max_rope=2048)
    checkpoint = tensors(INVENTORY["ltu_stage"], seed=3)
    encoder = {
        "model." + k.removeprefix("base_model.model.model."): torch.randn(v.shape)
        for k, v in checkpoint.items()
        if ".audio_encoder." in k
    }
    torch.save(encoder, base / "pytorch_model-00003-of-00002.bin")
    torch.save(checkpoint, tmp_path / "ltu_ori_paper.bin")
    out = tmp_path / "export"
    argv = ["import", "--base", str(base), "--checkpoint", str(tmp_path / "ltu_ori_paper.bin")]
    argv += ["--variant", "ltu", "--out", str(out), f"model.audio.width={WIDTH}", "model.audio.heads=2"]
    assert main(argv) == 0
    found = exported_tensors(out)
    mapped = {map_name(k): v for k, v in checkpoint.items() if map_name(k) is not None}
    assert set(found) == set(mapped) and "audio.proj.1.weight" in found
    for ours, tensor in mapped.items():
        torch.testing.assert_close(found[ours], tensor, rtol=0, atol=0, msg=ours)
    model, tokenizer, info = load_export(str(out))
    assert type(model.audio).__name__ == "LtuAudio" and model.num_audio_tokens == 32
    assert info["generation"] == REFERENCE_GENERATION
    clip = write_audio(tmp_path / "clip.wav", seconds=1.0)
    answers = generate(model, tokenizer, [clip], [{"instruction": "What is it?"}], max_new_tokens=2)
    assert len(answers) == 1 and isinstance(answers[0], str)
