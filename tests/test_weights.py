"""Trainable groups per stage, import of the reference's checkpoints, and `gama-ds estimate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gama_ds.config import load_recipe
from gama_ds.errors import WeightsError
from gama_ds.model.build import build_model, tiny_config
from gama_ds.model.estimate import build_on_meta
from gama_ds.model.weights import count_parameters, import_reference, load_reference_file, map_name

INVENTORY = json.load(open(os.path.join(os.path.dirname(__file__), "data", "reference_inventory.json")))


def trainable_groups(model) -> set[str]:
    return {g for g, c in count_parameters(model).items() if c["trainable"]}


@pytest.mark.parametrize(
    "overrides,groups",
    [
        (dict(trainable="qformer", lora=None), {"aggregator", "projections"}),  # stage 1
        (dict(trainable="qformer_all"), {"audio_encoder", "aggregator", "qformer", "projections", "lora"}),
        (dict(trainable="proj", lora=None), {"projections"}),
        (dict(variant="ltu", trainable="all"), {"audio_encoder", "projections", "lora"}),
        (dict(trainable="all_but_encoder"), {"aggregator", "qformer", "projections", "lora"}),  # the demo
    ],
    ids=["stage1", "stage2-5", "proj", "ltu-all", "all-but-encoder"],
)
def test_each_stage_trains_its_groups_and_nothing_else(overrides, groups):
    from gama_ds.model.weights import parameter_groups, unused_parameters

    model = build_model(tiny_config(**overrides))
    group_of = parameter_groups(model)
    dead = unused_parameters(model)
    for name, p in model.named_parameters():
        assert p.requires_grad == (group_of[name] in groups and name not in dead), name
    assert trainable_groups(model) == groups


def test_parameters_that_cannot_get_a_gradient_are_never_trainable():
    model = build_model(tiny_config(aggregator="released"))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and not n.startswith("llm.")}
    assert frozen and all(".crossattention." in n or ".norm_j." in n or ".norm_k." in n for n in frozen)
    b = {"fbank": torch.randn(1, 1024, 128), "input_ids": torch.randint(3, 500, (1, 8))}
    model(**b, attention_mask=torch.ones(1, 8, dtype=torch.long), labels=b["input_ids"]).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    no_grad = {n for n in trainable if dict(model.named_parameters())[n].grad is None}
    assert no_grad == set()  # and every trainable parameter really receives one
    paper = build_model(tiny_config(aggregator="paper"))
    assert all(p.requires_grad for n, p in paper.named_parameters() if ".crossattention." in n)


def meta_state(inventory: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in inventory.items() if shape is not None}


@pytest.fixture(scope="module")
def gama_7b():
    return build_on_meta(load_recipe("stage2").model)  # paper mode: every audio tensor is live


def live_names(model) -> set[str]:
    from gama_ds.model.weights import parameter_groups, unused_parameters

    groups = parameter_groups(model)
    dead = unused_parameters(model)
    return {n for n in groups if groups[n] != "llm" and n not in dead}


def test_a_stage_checkpoint_maps_every_live_tensor(gama_7b):
    report = import_reference(gama_7b, meta_state(INVENTORY["gama_stage"]))
    assert report.ok, report.problems()
    assert set(report.loaded) == live_names(gama_7b)  # every live audio and LoRA tensor
    assert len([n for n in report.loaded if ".lora_" in n]) == 128
    skipped = set(report.never_used)
    assert len(skipped) + len(report.loaded) == len(INVENTORY["gama_stage"])
    assert all(map_name(n) is None for n in skipped)
    assert any("intermediate_query" in n for n in skipped) and any("norm1_a" in n for n in skipped)


def test_released_mode_does_not_require_the_tensors_it_never_uses():
    released = build_on_meta(load_recipe("stage2", ["model.aggregator=released"]).model)
    state = {
        k: v
        for k, v in meta_state(INVENTORY["gama_stage"]).items()
        if not ("aggregator" in k and ".crossattention." in k) and ".norm_j." not in k and ".norm_k." not in k
    }
    report = import_reference(released, state)
    assert report.ok, report.problems()
    assert set(report.loaded) == live_names(released)


def test_the_base_folder_maps_and_leaves_only_new_modules_fresh(gama_7b):
    state = meta_state({**INVENTORY["gama_base"], **INVENTORY["gama_base_extra"]})
    report = import_reference(
        gama_7b,
        state,
        allow_fresh={"aggregator", "projections", "lora"},
        fresh_prefixes=("audio.encoder.norm_j.", "audio.encoder.norm_k."),
    )
    assert report.ok, report.problems()
    fresh_modules = {n.split(".")[1] for n in report.fresh if n.startswith("audio.")}
    assert fresh_modules == {"aggregator", "proj_qformer", "proj_aggregator", "encoder"}
    assert {n for n in report.fresh if n.startswith("audio.encoder.")} == {
        f"audio.encoder.norm_{t}.{w}" for t in "jk" for w in ("weight", "bias")
    }
    assert all(map_name(n) is None for n in INVENTORY["gama_base_extra"])
    # Nothing fresh may slip through without being asked for.
    strict = import_reference(gama_7b, state)
    assert not strict.ok and any("aggregator" in n for n in strict.missing)


def test_an_ltu_checkpoint_maps_every_live_tensor():
    model = build_on_meta(
        load_recipe("stage2", ["model.variant=ltu", "model.trainable=all", "model.llm=vicuna-7b"]).model
    )
    report = import_reference(model, meta_state(INVENTORY["ltu_stage"]))
    assert report.ok, report.problems()
    assert set(report.loaded) == live_names(model)


def test_missing_unexpected_and_misshapen_tensors_are_reported(gama_7b):
    state = meta_state(INVENTORY["gama_stage"])
    del state["base_model.model.model.audio_proj_qformer.2.weight"]
    state["base_model.model.model.audio_decoder.weight"] = torch.empty(3, device="meta")
    state["base_model.model.model.query_tokens"] = torch.empty(1, 16, 768, device="meta")
    report = import_reference(gama_7b, state)
    assert not report.ok
    assert sorted(report.missing) == ["audio.proj_qformer.3.weight", "audio.qformer.query_tokens"]
    assert report.unexpected == ["base_model.model.model.audio_decoder.weight"]
    assert report.mismatched == ["base_model.model.model.query_tokens: [1, 16, 768] vs ours [1, 32, 768]"]
    assert report.loaded == []  # nothing is half-loaded


def test_real_values_land_in_the_right_places(tmp_path):
    """Every reference name that the tiny model also has gets a random tensor; after a round
    trip through a .bin file each of our parameters holds exactly its reference tensor."""
    torch.manual_seed(0)
    model = build_model(tiny_config())
    params = dict(model.named_parameters())
    ref = {}
    for name in INVENTORY["gama_stage"]:
        ours = map_name(name)
        if ours in params:
            ref[name] = torch.randn(params[ours].shape)
    torch.save(ref, tmp_path / "pytorch_model.bin")
    report = import_reference(model, load_reference_file(str(tmp_path / "pytorch_model.bin")))
    assert report.ok, report.problems()
    assert set(report.loaded) == live_names(model)
    for name, tensor in ref.items():
        torch.testing.assert_close(params[map_name(name)].detach(), tensor, msg=name)


def test_a_base_folder_and_a_stage_checkpoint_import_from_disk(tmp_path):
    """The two shapes the reference ships: a base folder of safetensors (LLM and audio
    tensors mixed) and checkpoint-N/pytorch_model.bin; stage 1's has no LoRA."""
    from safetensors.torch import save_file

    from gama_ds.model.weights import import_reference_path

    torch.manual_seed(0)
    model = build_model(tiny_config())
    params = dict(model.named_parameters())
    base, stage1 = {}, {}
    for name in {**INVENTORY["gama_base"], **INVENTORY["gama_stage"]}:
        ours = map_name(name)
        if ours in params:
            tensor = torch.randn(params[ours].shape)
            if name in INVENTORY["gama_base"]:
                base[name] = tensor
            elif ".lora_" not in name:
                stage1[name] = tensor
    base["model.layers.0.self_attn.q_proj.weight"] = torch.randn(64, 64)  # the LLM's own, not ours
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model-00004-of-00002.safetensors")
    report = import_reference_path(model, str(tmp_path / "base"))
    assert report.ok, report.problems()
    assert {n.split(".")[1] for n in report.fresh} >= {"aggregator", "proj_qformer", "proj_aggregator"}
    (tmp_path / "checkpoint-500").mkdir()
    torch.save(stage1, tmp_path / "checkpoint-500" / "pytorch_model.bin")
    report = import_reference_path(model, str(tmp_path / "checkpoint-500"))
    assert report.ok, report.problems()
    assert report.fresh and all(".lora_" in n for n in report.fresh)
    torch.testing.assert_close(
        params["audio.proj_qformer.3.weight"].detach(),
        stage1["base_model.model.model.audio_proj_qformer.2.weight"],
    )
    with pytest.raises(WeightsError, match="not a base folder"):
        import_reference_path(model, str(tmp_path / "nothing"))


def test_an_ltu_base_folder_of_sharded_bins_imports(tmp_path):
    from gama_ds.model.weights import import_reference_path

    model = build_model(tiny_config(variant="ltu", trainable="all"))
    params = dict(model.named_parameters())
    encoder = {}
    for name in INVENTORY["ltu_stage"]:
        ours = map_name(name)
        if ours in params and ours.startswith("audio.encoder."):
            encoder["model." + name.removeprefix("base_model.model.model.")] = torch.randn(params[ours].shape)
    (tmp_path / "vicuna_ltu").mkdir()
    torch.save(
        {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 4)},
        tmp_path / "vicuna_ltu" / "pytorch_model-00001-of-00002.bin",
    )
    torch.save(encoder, tmp_path / "vicuna_ltu" / "pytorch_model-00003-of-00002.bin")
    report = import_reference_path(model, str(tmp_path / "vicuna_ltu"))
    assert report.ok, report.problems()
    assert {n.split(".")[1] for n in report.fresh} == {"proj", "base_model"}  # projection and LoRA


def test_estimate_builds_a_model_folder_without_reading_its_weights(tmp_path, capsys):
    from transformers import LlamaConfig

    from gama_ds.cli import main
    from gama_ds.model.llm import PRESETS

    LlamaConfig(**PRESETS["tiny"]).save_pretrained(tmp_path / "llm")  # a config, no weights at all
    assert main(["estimate", "tiny", f"model.llm={tmp_path / 'llm'}", "--json", "--world-size", "2"]) == 0
    est = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert est["params"]["llm"]["total"] > 0


def test_bin_files_load_without_running_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.bin"
    torch.save({"x": Payload()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_reference_file(str(path))


def test_estimate_reports_the_reference_7b_counts():
    run = subprocess.run(
        [sys.executable, "-m", "gama_ds", "estimate", "stage2", "--json", "--world-size", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    est = json.loads(run.stdout)
    p = est["params"]
    assert p["llm"]["total"] == 6_738_415_616 and p["llm"]["trainable"] == 0
    assert p["lora"] == {"total": 4_194_304, "trainable": 4_194_304}
    assert p["projections"]["total"] == 39_862_272
    assert p["qformer"]["total"] == 99_239_424 + 32 * 768 + 2 * 768  # query path + queries + its norm
    assert set(p) == {"llm", "lora", "audio_encoder", "aggregator", "qformer", "projections"}
    assert est["total"] == sum(g["total"] for g in p.values())
    assert est["trainable"] == sum(g["trainable"] for g in p.values())
    zero2, zero3 = est["memory_gib"]["zero2"], est["memory_gib"]["zero3"]
    assert 12.5 < zero2 < 20 and 1 < zero3 < zero2  # the frozen 7B in bf16 alone is 12.55 GiB
