"""Reading an export folder: what `gama-ds export` writes, loaded back with stock libraries.

An export folder holds:
  gama_ds.json         the architecture, aggregator mode, feature recipe, prompt settings, base LLM
  audio.safetensors    every audio module (encoder, aggregator, Q-Former, projections)
  soft_prompt.safetensors  with a soft prompt (model.soft_prompt in gama_ds.json): its embeddings;
                       gama_ds.json's `tagger` then describes the tagger its training tags came from
  adapter/             the LoRA adapter, for `peft.PeftModel.from_pretrained(base_llm, adapter)`
  llm/                 the base LLM, when the export carries it (presets, small LLMs, --include-llm);
                       else gama_ds.json names its folder by absolute path, with a fingerprint
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
from .errors import UsageError, WeightsError
from .model.weights import import_reference_path

INFO = "gama_ds.json"
FORMAT = "gama_ds.export"
LLM_DIR = "llm"  # the base LLM inside an export, named relative to the export folder itself
SOFT_PROMPT_FILE = "soft_prompt.safetensors"


def is_export(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, INFO))


def read_info(path: str) -> dict:
    with open(os.path.join(path, INFO), encoding="utf-8") as f:
        return json.load(f)


def soft_prompt_settings(info: dict):
    """An export's soft prompt settings (config.SoftPromptConfig), None when it has none."""
    return from_dict(ModelConfig, info["model"]).soft_prompt


def load_init(model, path: str) -> None:
    """A gama-ds export or a reference GAMA/LTU checkpoint, into a freshly built model.

    Writes the audio modules, LoRA (and peft's modules_to_save copies) and a soft prompt, never
    the base LLM, whose weights the model was built with. A model with a soft prompt keeps its
    own init where the export has none; an export's soft prompt is left out of a model without."""
    if is_export(path):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        model.audio.load_state_dict(load_file(os.path.join(path, "audio.safetensors")))
        soft = os.path.join(path, SOFT_PROMPT_FILE)
        if model.soft_prompt is not None and os.path.exists(soft):
            load_soft_prompt(model.soft_prompt, soft)
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
    from .model.soft_prompt import SoftPrompt
    from .placement import choose_device, choose_dtype

    device = device if isinstance(device, torch.device) else choose_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else choose_dtype(dtype, device)
    info = read_info(path)
    cfg = from_dict(ModelConfig, info["model"])
    llm_dir = base_llm_folder(path, info, llm)
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
    soft = None
    if cfg.soft_prompt is not None:
        soft = SoftPrompt(cfg.soft_prompt.tokens, base.config.hidden_size)
        load_soft_prompt(soft, os.path.join(path, SOFT_PROMPT_FILE))
        soft = soft.to(device=device, dtype=dtype)
    model = GamaModel(audio_modules.to(device=device, dtype=dtype), base.to(device), soft).eval()
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    return model, tokenizer, info


def export_tagger(path: str, info: dict, folder: str | None = None, device=None):
    """The tagger that tagged the training clips of an export with a soft prompt (gama_ds.json's
    `tagger`), from its recorded folder or `folder` (a copy, `--tagger`), checked by fingerprint;
    run as it ran then (its activation and dtype), on `device`. None for an export without a
    soft prompt, which has no use for `folder`."""
    from .model.llm_folder import fingerprint

    if soft_prompt_settings(info) is None:
        if folder:
            raise UsageError(f"--tagger: {path} has no soft prompt, so no use for a tagger")
        return None
    recorded = info.get("tagger") or {}
    if not recorded and not folder:
        raise WeightsError(f"{path}: it has a soft prompt but names no tagger; give one with --tagger DIR")
    where = folder or recorded["path"]
    if not os.path.isfile(os.path.join(where, "config.json")):
        flag = "--tagger" if folder else f"{path}'s tagger"
        raise WeightsError(
            f"{flag} {where} is not a model folder (moved or deleted?); point at a copy with --tagger DIR"
        )
    found = json.loads(json.dumps(fingerprint(where)))
    if recorded.get("fingerprint") not in (None, found):
        raise WeightsError(
            f"{where} is not the tagger that tagged {path}'s training clips ({recorded['path']}): their "
            "config.json or weight files differ; give --tagger a copy of that one"
        )
    from .tags import Tagger

    device = None if device is None else str(device)
    return Tagger(
        where, device=device, dtype=recorded.get("dtype"), activation=recorded.get("activation", "auto")
    )


def load_soft_prompt(module, file: str) -> None:
    from safetensors.torch import load_file

    if not os.path.isfile(file):
        raise WeightsError(f"{file} is missing: its gama_ds.json has a soft prompt (model.soft_prompt)")
    state = load_file(file)
    ours = module.state_dict()
    if set(state) != set(ours) or any(state[k].shape != ours[k].shape for k in ours):
        shapes = {k: list(v.shape) for k, v in state.items()}
        raise WeightsError(
            f"{file}: {shapes} does not fit a soft prompt of {module.tokens} tokens "
            f"({ {k: list(v.shape) for k, v in ours.items()} })"
        )
    module.load_state_dict(state)


def base_llm_folder(path: str, info: dict, llm: str | None = None) -> str:
    """The export's base LLM: the folder it names (inside it, or by absolute path), or `llm`,
    a copy elsewhere; checked against the fingerprint taken when the export was written."""
    from .model.llm_folder import fingerprint

    base = info.get("base_llm")
    if base is None:  # written before exports carried a fingerprint: as they were read then
        named = info["model"]["llm"]
        inside = os.path.join(path, named)
        recorded = inside if not os.path.isabs(named) and os.path.isdir(inside) else named
    else:
        recorded = os.path.join(path, base["folder"]) if base["inside"] else base["folder"]
    folder = llm or recorded
    if not os.path.isfile(os.path.join(folder, "config.json")):
        if llm:
            raise WeightsError(f"--llm {llm} is not a model folder (no config.json there)")
        raise WeightsError(
            f"{path}: its base LLM {recorded} is not there (moved or deleted?); point at a copy of it "
            "with --llm DIR (load_export(..., llm=DIR)), or export with --include-llm to carry it inside"
        )
    if base is not None:
        found, wanted = fingerprint(folder), base["fingerprint"]
        differs = [what for what in ("config", "weights") if found[what] != wanted[what]]
        if differs:
            parts = {"config": "config.json", "weights": "weight files (names, shapes, dtypes)"}
            raise WeightsError(
                f"{folder} is not the base LLM that {path} was trained on ({recorded}): their "
                f"{' and '.join(parts[d] for d in differs)} differ; give --llm a copy of {recorded}"
            )
    return folder
