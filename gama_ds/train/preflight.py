"""Every check that can fail a run, made before any process group starts.

Each message says what to change. Runs on every rank (cheap: it reads recipe, indexes and
configs, never weights), so no rank starts collectives that another rank will never join.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..config import ConfigError, Recipe
from ..data.plan import EpochPlan, PlanError
from ..data.shards import ShardError, read_index
from ..data.stream import StreamConfig, StreamError, open_sets
from ..data.tokenizer import BYTES
from ..exported import base_llm_folder, is_export, read_info
from ..model.llm import PRESETS, choose_attention, is_preset
from .checkpoint import complete_tags
from .engine import accumulation_steps, resolve_ds_config, resolve_precision

RUN_FILE = "run.json"
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class Plan:
    """What preflight resolved, for the trainer to use."""

    precision: str
    accumulation: int
    llm_source: str  # a preset name or a model folder
    tokenizer: str
    ds_config: dict
    tagger: dict | None = None  # the training shards' tagger (their index's provenance), with a soft prompt


def _is_hf_folder(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def llm_source(recipe: Recipe) -> str:
    """Where the LLM's weights come from: model.llm, or, for a preset, the weights that the
    init brings (a reference base folder, or the base LLM saved in a gama-ds export)."""
    m, init = recipe.model.llm, recipe.train.init
    # A folder by absolute path: run.json records it, and the run's export and anything after it
    # (another working directory, another machine's mount) must find the same folder.
    if not is_preset(m) or init is None:
        return m if is_preset(m) else os.path.abspath(m)
    if _is_hf_folder(init):
        return os.path.abspath(init)
    if is_export(init):  # its base LLM, inside it or named by path, checked by fingerprint
        return os.path.abspath(base_llm_folder(init, read_info(init)))
    return m


def check_llm_shapes(recipe: Recipe) -> None:
    init = llm_source(recipe)
    if not (is_preset(recipe.model.llm) and _is_hf_folder(init)):
        return
    with open(os.path.join(init, "config.json"), encoding="utf-8") as f:
        found = json.load(f)
    preset = PRESETS[recipe.model.llm]
    wrong = [f"{k} {preset[k]} vs {found.get(k)}" for k in _SHAPE_KEYS if found.get(k) != preset[k]]
    if wrong:
        raise ConfigError(
            f"model.llm preset {recipe.model.llm!r} disagrees with the weights in {init}: "
            f"{'; '.join(wrong)}; set model.llm to {init} or to the matching preset"
        )


def check_shards(recipe: Recipe, world_size: int) -> None:
    d = recipe.data
    if not d.train:
        raise ConfigError("data.train lists no shard sets; e.g. 'data.train=[{path: shards/train}]'")
    for sources, what in ((d.train, "data.train"), (d.eval, "data.eval")):
        if not sources:
            continue
        for source in sources:
            if not os.path.isdir(source.path):
                raise ConfigError(f"{what}: {source.path} is not a directory")
        try:
            sets = open_sets([(s.path, s.weight) for s in sources])
            if what == "data.train":
                cfg = stream_config(recipe)
            else:
                cfg = eval_stream_config(recipe, world_size)
            EpochPlan(sets, cfg, 0).accumulation(world_size)
        except (StreamError, ShardError, PlanError) as err:
            raise ConfigError(f"{what}: {err}") from None


def check_tags(recipe: Recipe) -> dict | None:
    """With a soft prompt, every shard set must carry tags from one tagger, tagged with a top_k
    and threshold no stricter than the recipe's; returns that tagger's provenance entry."""
    soft = recipe.model.soft_prompt
    if soft is None:
        return None
    found = None
    for sources, what in ((recipe.data.train, "data.train"), (recipe.data.eval, "data.eval")):
        for source in sources:
            tagger = read_index(source.path).get("provenance", {}).get("tagger")
            retag = f"gama-ds tag {source.path} --tagger DIR"
            if tagger is None:
                raise ConfigError(
                    f"{what}: {source.path} has no tags (its index.json names no tagger) and "
                    f"model.soft_prompt needs them; tag it first: {retag}"
                )
            if tagger.get("top_k", 0) < soft.top_k or tagger.get("threshold", 1.0) > soft.threshold:
                raise ConfigError(
                    f"{what}: {source.path} was tagged with top_k {tagger.get('top_k')} and threshold "
                    f"{tagger.get('threshold')}; model.soft_prompt asks for top_k {soft.top_k} and threshold "
                    f"{soft.threshold}: tag it again ({retag} --top-k {soft.top_k} --threshold "
                    f"{soft.threshold}), or loosen model.soft_prompt"
                )
            if found is not None and tagger.get("fingerprint") != found[1].get("fingerprint"):
                raise ConfigError(
                    f"{what}: {source.path} was tagged by {tagger.get('path')}, {found[0]} by "
                    f"{found[1].get('path')}: one model learns one tagger's tags; tag both with the same one"
                )
            found = found or (source.path, tagger)
    return found[1]


def stream_config(recipe: Recipe) -> StreamConfig:
    """The training stream's settings, from the recipe: the same on every world size."""
    d = recipe.data
    return StreamConfig(
        micro_batch=recipe.train.micro_batch_size,
        global_batch=recipe.train.global_batch_size,
        seed=recipe.train.seed,
        shuffle_buffer=d.shuffle_buffer,
        examples_per_clip=d.examples_per_clip,
        bucket_batches=d.bucket_batches,
        on_bad_sample=d.on_bad_sample,
    )


def eval_stream_config(recipe: Recipe, world_size: int) -> StreamConfig:
    """The held-out stream: every example once, in a fixed order, on any world size."""
    micro = recipe.train.micro_batch_size
    return StreamConfig(
        micro_batch=micro, global_batch=micro * world_size, seed=0, bucket_batches=1, cover_all=True
    )


def check_output_dir(recipe: Recipe, resume: str | None, recipe_hash: str) -> None:
    out = recipe.train.output_dir
    run_file = os.path.join(out, RUN_FILE)
    has_checkpoints = bool(complete_tags(os.path.join(out, "checkpoints")))
    if resume is None and (os.path.exists(run_file) or has_checkpoints):
        raise ConfigError(
            f"train.output_dir {out} holds another run; pass --resume auto to continue it, "
            "or choose another train.output_dir"
        )
    if resume is not None and os.path.exists(run_file):
        with open(run_file, encoding="utf-8") as f:
            previous = json.load(f).get("recipe_hash")
        if previous not in (None, recipe_hash):
            raise ConfigError(
                f"train.output_dir {out} was trained with another recipe; resuming needs the same recipe "
                "and overrides (see its run.json), or another train.output_dir"
            )


def check_resumed_tagger(recipe: Recipe, resume: str | None, tagger: dict | None) -> None:
    """A resumed soft-prompt run goes on with tags from the tagger it started with: shards
    re-tagged since by another model would change its prompts half-way through. (The same model
    at a stricter top_k or threshold is caught by check_tags; at a looser one the recipe's own
    top_k and threshold pick the same tags.)"""
    out = recipe.train.output_dir
    run_file = os.path.join(out, RUN_FILE)
    if resume is None or tagger is None or not os.path.exists(run_file):
        return
    if not complete_tags(os.path.join(out, "checkpoints")):
        return  # nothing saved yet: the run starts again from step 0 on the tags there are now
    with open(run_file, encoding="utf-8") as f:
        started = json.load(f).get("tagger") or {}
    if started.get("fingerprint") not in (None, tagger.get("fingerprint")):
        raise ConfigError(
            f"train.output_dir {recipe.train.output_dir} was trained on tags from {started.get('path')}; "
            f"its shards are now tagged by {tagger.get('path')}, another model (fingerprints differ): tag "
            "them again with the run's tagger to resume, or start a new run"
        )


def preflight(recipe: Recipe, world_size: int, resume: str | None, recipe_hash: str) -> Plan:
    recipe.check()
    if recipe.deepspeed.offload and recipe.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload needs deepspeed.zero_stage 3")
    accumulation = accumulation_steps(recipe, world_size)
    precision = resolve_precision(recipe)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    choose_attention(recipe.model.attn_implementation, compute)  # raises a ConfigError naming the key
    init = recipe.train.init
    if init is not None and not os.path.exists(init):
        raise ConfigError(
            f"train.init {init} does not exist; give the previous stage's export or a reference checkpoint"
        )
    check_llm_shapes(recipe)
    source = llm_source(recipe)
    tokenizer = recipe.data.tokenizer or (source if os.path.isdir(source) else None)
    if tokenizer is None:
        raise ConfigError(
            f"data.tokenizer is needed with the LLM preset {source!r}: an HF tokenizer folder or 'bytes'"
        )
    if tokenizer != BYTES and not os.path.isdir(tokenizer):
        raise ConfigError(f"data.tokenizer {tokenizer} is not a folder (or 'bytes')")
    tokenizer = tokenizer if tokenizer == BYTES else os.path.abspath(tokenizer)
    check_shards(recipe, world_size)
    tagger = check_tags(recipe)
    check_output_dir(recipe, resume, recipe_hash)
    check_resumed_tagger(recipe, resume, tagger)
    ds_config = resolve_ds_config(recipe, world_size)
    return Plan(precision, accumulation, source, tokenizer, ds_config, tagger)
