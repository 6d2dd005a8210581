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


def load_export(path: str, device=None, dtype=None, llm: str | None = None):
    """(model, tokenizer, info) from an export folder, with stock transformers and peft.

    Every parameter on `device` in `dtype` (names or torch objects; None: gama_ds.placement's
    defaults). Buffers stay as transformers and DeepSpeed keep them in training: the rotary
    frequencies in fp32, so positions are as precise as the model was trained with.
    `llm`: another folder holding the base LLM."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from .model.gama import GamaAudio, GamaModel, LtuAudio
    from .placement import choose_device, choose_dtype

    device = device if isinstance(device, torch.device) else choose_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else choose_dtype(dtype, device)
    with open(os.path.join(path, INFO), encoding="utf-8") as f:
        info = json.load(f)
    cfg = from_dict(ModelConfig, info["model"])
    llm_dir = llm or (
        cfg.llm
        if os.path.isabs(cfg.llm) or not os.path.isdir(os.path.join(path, cfg.llm))
        else os.path.join(path, cfg.llm)
    )
    # Straight onto a GPU in the target dtype: a 7B model never passes through host memory in fp32.
    placed = {} if device.type == "cpu" else {"device_map": {"": device}}
    base = AutoModelForCausalLM.from_pretrained(llm_dir, attn_implementation="sdpa", dtype=dtype, **placed)
    if info["lora"]:
        # peft would upcast a 16-bit adapter to fp32: keep it in the base's dtype, as training did.
        base = PeftModel.from_pretrained(
            base, os.path.join(path, "adapter"), autocast_adapter_dtype=False, torch_device=str(device)
        )
    audio_cls = GamaAudio if cfg.variant == "gama" else LtuAudio
    audio_modules = audio_cls(cfg, base.config.hidden_size)
    audio_modules.load_state_dict(load_file(os.path.join(path, "audio.safetensors")))
    model = GamaModel(audio_modules.to(device=device, dtype=dtype), base.to(device)).eval()
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    return model, tokenizer, info
