"""Reading an export folder: what `gama-ds export` writes, loaded back with stock libraries.

An export folder holds:
  gama_ds.json         the architecture, aggregator mode, feature recipe, prompt settings, base LLM
  audio.safetensors    every audio module (encoder, aggregator, Q-Former, projections)
  adapter/             the LoRA adapter, for `peft.PeftModel.from_pretrained(base_llm, adapter)`
  llm/                 the base LLM, when it was a preset rather than a model folder
  tokenizer/           the tokenizer
  merged/              with --merge: the LLM with LoRA merged, for `AutoModelForCausalLM`
Inference (`load_export`) and the next stage's `train.init` (`load_init`) read it from here;
writing it is the training side's (gama_ds/train/export.py). Nothing here needs DeepSpeed.
"""

from __future__ import annotations

import json
import os

from .config import ModelConfig, from_dict
from .data.tokenizer import load_tokenizer
from .errors import WeightsError
from .model.weights import import_reference_path

INFO = "gama_ds.json"
FORMAT = "gama_ds.export"


def is_export(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, INFO))


def load_init(model, path: str) -> None:
    """A gama-ds export or a reference GAMA/LTU checkpoint, into a freshly built model.

    Writes the audio modules and LoRA (and peft's modules_to_save copies), never the base LLM,
    whose weights the model was built with."""
    if is_export(path):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        model.audio.load_state_dict(load_file(os.path.join(path, "audio.safetensors")))
        adapter = os.path.join(path, "adapter", "adapter_model.safetensors")
        if os.path.exists(adapter) and hasattr(model.llm, "peft_config"):
            result = set_peft_model_state_dict(model.llm, load_file(adapter))
            if result.unexpected_keys:
                raise WeightsError(
                    f"{path}: adapter tensors the model has no place for: {result.unexpected_keys[:4]}"
                )
        return
    report = import_reference_path(model, path)
    if not report.ok:
        raise WeightsError(f"train.init {path}: {report.problems()}")


def load_export(path: str):
    """(model, tokenizer, info) from an export folder, with stock transformers and peft."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from .model.gama import GamaAudio, GamaModel, LtuAudio

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
