"""Export a training checkpoint to files that stock libraries load.

The folder's layout, and reading it back (`load_export`, `load_init`), are gama_ds/exported.py's:
inference needs nothing from training. The export is what the next stage's `train.init` names,
and what generation loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from .. import __version__, audio
from ..config import ConfigError, Recipe, from_dict
from ..data.tokenizer import load_tokenizer
from ..errors import CheckpointError
from ..exported import FORMAT, INFO, LLM_DIR, SOFT_PROMPT_FILE, load_init
from ..model.build import build_model
from ..model.llm import build_llm, is_preset
from ..model.llm_folder import copy_llm, fingerprint, weights_bytes
from .checkpoint import COMPLETE, latest_complete


def find_checkpoint(path: str) -> tuple[str, str, str]:
    """(run directory, checkpoint directory, tag) for a run directory or one checkpoint."""
    if os.path.isfile(os.path.join(path, COMPLETE)):
        ckpt_dir, tag = os.path.split(os.path.normpath(path))
        return os.path.dirname(ckpt_dir), ckpt_dir, tag
    ckpt_dir = os.path.join(path, "checkpoints")
    tag = latest_complete(ckpt_dir)
    if tag is None:
        raise ConfigError(f"{path}: no complete checkpoint (neither a run directory nor a checkpoint)")
    return path, ckpt_dir, tag


def rebuild(recipe: Recipe) -> torch.nn.Module:
    """The model exactly as training built it: same seed, same init."""
    from .distributed import seed_everything

    seed_everything(recipe.train.seed)
    model = build_model(recipe.model)
    if recipe.train.init is not None:
        load_init(model, recipe.train.init)
    return model


def export(path: str, out: str, merge: bool = False, include_llm: bool = False) -> dict:
    """Write the export of a run's latest complete checkpoint (or of one checkpoint)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir, ckpt_dir, tag = find_checkpoint(path)
    with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    recipe = from_dict(Recipe, run["recipe"])
    model = rebuild(recipe)
    trained = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(trained) != expected:
        missing, extra = sorted(expected - set(trained)), sorted(set(trained) - expected)
        raise CheckpointError(
            f"{ckpt_dir}/{tag} does not match its recipe's model: missing {missing[:4]}, extra {extra[:4]}"
        )
    with torch.no_grad():
        for name, tensor in trained.items():
            params[name].copy_(tensor.to(params[name].dtype))

    source = {"run": os.path.abspath(run_dir), "checkpoint": tag, "recipe_hash": run["recipe_hash"]}
    return write_export(model, recipe, out, source, merge, include_llm, tagger=run.get("tagger"))


# A base LLM up to this size (its weight files) travels inside the export; a larger one is named
# by absolute path and fingerprint unless `include_llm` (gama-ds export --include-llm).
SMALL_LLM_BYTES = 2**30


def write_export(
    model,
    recipe: Recipe,
    out: str,
    source: dict,
    merge: bool = False,
    include_llm: bool = False,
    tagger: dict | None = None,
) -> dict:
    """Write `model` (built from `recipe`) as an export folder; `source` says where it came from,
    `tagger` what tagged its training data (the shards' provenance entry)."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.audio.state_dict().items()},
        os.path.join(out, "audio.safetensors"),
    )
    if model.soft_prompt is not None:
        save_file(
            {k: v.contiguous() for k, v in model.soft_prompt.state_dict().items()},
            os.path.join(out, SOFT_PROMPT_FILE),
        )
    base = place_base_llm(recipe, out, include_llm)
    named = os.path.join(os.path.abspath(out), LLM_DIR) if base["inside"] else base["folder"]
    lora = recipe.model.lora is not None
    if lora:
        save_adapter(model.llm, os.path.join(out, "adapter"), named)
    tokenizer = load_tokenizer(recipe.data.tokenizer or recipe.model.llm)
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    if merge:
        merged = model.llm.merge_and_unload() if lora else model.llm
        merged.save_pretrained(os.path.join(out, "merged"))
    info = {
        "format": FORMAT,
        "gama_ds": __version__,
        "model": {**asdict(recipe.model), "llm": base["folder"], "lora": None},
        "lora": lora,
        "base_llm": base,
        "features": audio.RECIPE,
        "prompt": {
            "template": recipe.data.template,
            "cutoff_len": recipe.data.cutoff_len,
            "train_on_inputs": recipe.data.train_on_inputs,
        },
        "source": source,
    }
    if recipe.model.soft_prompt is not None:  # its settings are in "model"; what made the tags, here
        info["tagger"] = tagger
    with open(os.path.join(out, INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return info


def place_base_llm(recipe: Recipe, out: str, include_llm: bool) -> dict:
    """The export's base LLM: saved or copied into out/llm (a preset, a small LLM, or any with
    `include_llm`), else named by absolute path; with its fingerprint either way."""
    inside = os.path.join(out, LLM_DIR)
    name = recipe.model.llm
    if is_preset(name):  # a preset has no folder to point at: write its (seeded) weights
        from .distributed import seed_everything

        seed_everything(recipe.train.seed)
        build_llm(name, recipe.model.dtype, "sdpa").save_pretrained(inside)
    else:
        folder = os.path.abspath(name)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ConfigError(f"model.llm {name}: no model folder there (no config.json) to export with")
        size = weights_bytes(folder)
        if not (include_llm or size <= SMALL_LLM_BYTES):
            return {"folder": folder, "inside": False, "fingerprint": fingerprint(folder), "bytes": size}
        if not (os.path.isdir(inside) and os.path.samefile(folder, inside)):  # not re-exporting in place
            copy_llm(folder, inside)
    size = weights_bytes(inside)
    return {"folder": LLM_DIR, "inside": True, "fingerprint": fingerprint(inside), "bytes": size}


def save_adapter(llm, out: str, base_folder: str) -> None:
    """The PEFT adapter, naming its base LLM by the absolute folder that stock
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)` reads."""
    configs = list(llm.peft_config.values())
    before = [c.base_model_name_or_path for c in configs]
    for c in configs:
        c.base_model_name_or_path = base_folder
    try:
        llm.save_pretrained(out)
    finally:
        for c, name in zip(configs, before, strict=True):
            c.base_model_name_or_path = name
