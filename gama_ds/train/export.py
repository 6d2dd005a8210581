"""Export a training checkpoint to files that stock libraries load, and load them back.

An export folder holds:
  gama_ds.json         the architecture, aggregator mode, feature recipe, prompt settings, base LLM
  audio.safetensors    every audio module (encoder, aggregator, Q-Former, projections)
  adapter/             the LoRA adapter, for `peft.PeftModel.from_pretrained(base_llm, adapter)`
  llm/                 the base LLM, when it was a preset rather than a model folder
  tokenizer/           the tokenizer
  merged/              with --merge: the LLM with LoRA merged, for `AutoModelForCausalLM`
It is what the next stage's `train.init` names, and what generation loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from .. import __version__, audio
from ..config import ConfigError, ModelConfig, Recipe, from_dict
from ..data.tokenizer import load_tokenizer
from ..model.build import build_model
from ..model.llm import build_llm, is_preset
from ..model.weights import import_reference_path
from .checkpoint import COMPLETE, latest_complete

INFO = "gama_ds.json"
FORMAT = "gama_ds.export"


def is_export(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, INFO))


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


def load_init(model, path: str) -> None:
    """A gama-ds export or a reference GAMA/LTU checkpoint, into a freshly built model."""
    if is_export(path):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        model.audio.load_state_dict(load_file(os.path.join(path, "audio.safetensors")))
        adapter = os.path.join(path, "adapter", "adapter_model.safetensors")
        if os.path.exists(adapter) and hasattr(model.llm, "peft_config"):
            result = set_peft_model_state_dict(model.llm, load_file(adapter))
            if result.unexpected_keys:
                raise RuntimeError(
                    f"{path}: adapter tensors the model has no place for: {result.unexpected_keys[:4]}"
                )
        return
    report = import_reference_path(model, path)
    if not report.ok:
        raise RuntimeError(f"train.init {path}: {report.problems()}")


def export(path: str, out: str, merge: bool = False) -> dict:
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
        raise RuntimeError(
            f"{ckpt_dir}/{tag} does not match its recipe's model: missing {missing[:4]}, extra {extra[:4]}"
        )
    with torch.no_grad():
        for name, tensor in trained.items():
            params[name].copy_(tensor.to(params[name].dtype))

    source = {"run": os.path.abspath(run_dir), "checkpoint": tag, "recipe_hash": run["recipe_hash"]}
    return write_export(model, recipe, out, source, merge)


def write_export(model, recipe: Recipe, out: str, source: dict, merge: bool = False) -> dict:
    """Write `model` (built from `recipe`) as an export folder; `source` says where it came from."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.audio.state_dict().items()},
        os.path.join(out, "audio.safetensors"),
    )
    lora = recipe.model.lora is not None
    if lora:
        model.llm.save_pretrained(os.path.join(out, "adapter"))
    llm = recipe.model.llm
    if is_preset(llm):  # a preset has no folder to point at: write its (seeded) weights
        from .distributed import seed_everything

        seed_everything(recipe.train.seed)
        build_llm(llm, recipe.model.dtype, "sdpa").save_pretrained(os.path.join(out, "llm"))
        llm = "llm"
    tokenizer = load_tokenizer(recipe.data.tokenizer or recipe.model.llm)
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    if merge:
        merged = model.llm.merge_and_unload() if lora else model.llm
        merged.save_pretrained(os.path.join(out, "merged"))
    info = {
        "format": FORMAT,
        "gama_ds": __version__,
        "model": {**asdict(recipe.model), "llm": llm, "lora": None},
        "lora": lora,
        "features": audio.RECIPE,
        "prompt": {
            "template": recipe.data.template,
            "cutoff_len": recipe.data.cutoff_len,
            "train_on_inputs": recipe.data.train_on_inputs,
        },
        "source": source,
    }
    with open(os.path.join(out, INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return info


def load_export(path: str):
    """(model, tokenizer, info) from an export folder, with stock transformers and peft."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ..model.gama import GamaAudio, GamaModel, LtuAudio

    with open(os.path.join(path, INFO), encoding="utf-8") as f:
        info = json.load(f)
    cfg = from_dict(ModelConfig, info["model"])
    llm_dir = (
        cfg.llm
        if os.path.isabs(cfg.llm) or not os.path.isdir(os.path.join(path, cfg.llm))
        else os.path.join(path, cfg.llm)
    )
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, attn_implementation="sdpa")
    if info["lora"]:
        llm = PeftModel.from_pretrained(llm, os.path.join(path, "adapter"))
    audio_cls = GamaAudio if cfg.variant == "gama" else LtuAudio
    audio_modules = audio_cls(cfg, llm.config.hidden_size)
    audio_modules.load_state_dict(load_file(os.path.join(path, "audio.safetensors")))
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    return GamaModel(audio_modules, llm).eval(), tokenizer, info
