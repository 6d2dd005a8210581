"""`gama-ds import`: the released GAMA, GAMA-IT or LTU checkpoints, straight to an export.

The reference ships a base folder (GAMA's `Llama-2-7b-chat-hf-qformer`: Llama-2-7b-chat with
the CAV-MAE and Q-Former tensors beside it; LTU's `vicuna_ltu`) and stage checkpoints
(`checkpoint-N/pytorch_model.bin`: every audio tensor and the LoRA matrices). This builds the
model the stage recipes describe, with the LLM on the meta device (its weights stay in the base
folder, which the export names), maps every tensor as training's import does (the checkpoint's
value wins where both hold one), and writes a normal export that records the reference's prompt
and sampling settings (reference/gama.md §3.2, §4). Nothing is written unless every live tensor
maps; unknown tensors are listed, never silently dropped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from .config import load_recipe
from .data.collate import ensure_pad_token
from .data.tokenizer import load_tokenizer
from .errors import UsageError, WeightsError
from .infer import REFERENCE_GENERATION
from .model.weights import (
    base_folder_tensors,
    import_reference,
    load_reference_file,
    map_name,
    parameter_groups,
    reference_name,
    strip_prefix,
)

VARIANTS = ("gama", "ltu")
AGGREGATORS = ("released", "paper")
REPORT = "import.json"  # beside gama_ds.json: every tensor's fate
_FIX_BASE = (
    "the Drive copy of Llama-2-7b-chat-hf-qformer lacks the LLM's config.json, tokenizer and "
    "model-00002-of-00002.safetensors (GAMA issue #25): copy them in from meta-llama/Llama-2-7b-chat-hf"
)


def released_recipe(base: str, variant: str, aggregator: str | None, lora: bool, overrides=()):
    """The stage recipe of the released model: stage 5 (GAMA-IT; stages 2-5 share the model)
    or LTU's, with the base folder as its LLM and LoRA as the reference's inference builds it."""
    if variant not in VARIANTS:
        raise UsageError(f"--variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    if variant == "ltu" and aggregator is not None:
        raise UsageError("--aggregator is GAMA's: LTU has no aggregator")
    aggregator = aggregator or "released"
    if aggregator not in AGGREGATORS:
        raise UsageError(f"--aggregator must be one of {', '.join(AGGREGATORS)}; got {aggregator!r}")
    mine = [
        f"model.llm={base}",
        f"model.variant={variant}",
        "model.gradient_checkpointing=false",
        "model.lora.dropout=0.0",  # gama_inf.py's; dropout is off in eval mode anyway
    ]
    mine += ["model.trainable=all"] if variant == "ltu" else [f"model.aggregator={aggregator}"]
    for override in overrides:
        if override.split("=", 1)[0] in ("model.llm", "model.variant", "model.aggregator"):
            raise UsageError(f"{override}: give it as --base, --variant or --aggregator")
    recipe = load_recipe("stage5", mine + list(overrides))
    if not lora:
        recipe.model.lora = None
    recipe.model.check()
    return recipe


def checkpoint_file(path: str) -> str:
    file = os.path.join(path, "pytorch_model.bin") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UsageError(f"--checkpoint {path}: no such file (checkpoint-N/ or its pytorch_model.bin)")
    return file


def check_base(base: str) -> None:
    """A base folder that the LLM loader and the tokenizer can read, before anything is built."""
    if not os.path.isdir(base):
        raise UsageError(f"--base {base}: not a folder")
    for need in ("config.json", "tokenizer_config.json"):
        if not os.path.isfile(os.path.join(base, need)):
            raise WeightsError(f"--base {base}: no {need}; {_FIX_BASE}")


def llm_weight_names(base: str) -> set[str] | None:
    """The LLM tensor names the base folder's loader will read: its index's weight map (every
    shard it names must exist) or model.safetensors' header; None when only a pickled
    pytorch_model.bin would tell (not read here: it is the whole 7B)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(base, index)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            absent = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(base, f))})
            if absent:
                raise WeightsError(
                    f"--base {base}: {index} names {', '.join(absent)}, not there; {_FIX_BASE}"
                )
            return set(weight_map)
    single = os.path.join(base, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return set(f.keys())
    if os.path.isfile(os.path.join(base, "pytorch_model.bin")):
        return None
    raise WeightsError(f"--base {base}: no LLM weights (model.safetensors, an index, or pytorch_model.bin)")


def build_meta_llm_model(recipe):
    """The model with its LLM on the meta device and real audio modules and LoRA matrices: the
    import touches only those, and a 7B LLM is never read into memory."""
    from .model.build import build_model
    from .model.llm import build_llm

    cfg = recipe.model
    with torch.device("meta"):
        llm = build_llm(cfg.llm, cfg.dtype, "sdpa", load_weights=False)
    expected = set(llm.state_dict())
    if llm.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    model = build_model(cfg, llm=llm)
    groups = parameter_groups(model)
    for name, p in list(model.named_parameters()):
        if groups[name] == "lora":  # peft put them on the base layer's (meta) device
            owner, leaf = name.rsplit(".", 1)
            fresh = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
            setattr(model.get_submodule(owner), leaf, fresh)
    return model, expected


def import_released(
    base: str,
    checkpoint: str | None,
    out: str,
    variant: str = "gama",
    aggregator: str | None = None,
    overrides=(),
    log=print,
) -> dict:
    """Write the export of a released model; returns the import's summary."""
    from .train.export import write_export

    base = os.path.abspath(base)
    check_base(base)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"--out {out} exists and is not empty; give a new folder")
    ckpt = os.path.abspath(checkpoint_file(checkpoint)) if checkpoint else None
    from_base = {strip_prefix(k): v for k, v in (base_folder_tensors(base) or {}).items()}
    from_ckpt = {strip_prefix(k): v for k, v in (load_reference_file(ckpt) if ckpt else {}).items()}
    lora = any(".lora_" in k for k in from_ckpt)
    recipe = released_recipe(base, variant, aggregator, lora, overrides)
    llm_names = llm_weight_names(base)
    model, expected = build_meta_llm_model(recipe)
    if llm_names is not None and expected - llm_names:
        absent = sorted(expected - llm_names)
        raise WeightsError(
            f"--base {base}: the LLM's weights lack {len(absent)} tensors ({', '.join(absent[:3])}, ...); "
            + _FIX_BASE
        )

    state, unknown = {}, []
    for name, tensor in {**from_base, **from_ckpt}.items():  # the checkpoint's replaces the base's
        try:
            map_name(name)
        except KeyError:
            unknown.append(name)  # a name no reference module has: listed, not loaded
            continue
        state[name] = tensor
    report = import_reference(model, state)
    if not report.ok:
        raise WeightsError(_refusal(report, ckpt, base))

    loaded = {reference_name(n) for n in report.loaded}
    summary = {
        "base": base,
        "checkpoint": ckpt,
        "variant": recipe.model.variant,
        "aggregator": recipe.model.aggregator if recipe.model.variant == "gama" else None,
        "lora": lora,
        "loaded": len(report.loaded),
        "from_checkpoint": sorted(loaded & set(from_ckpt)),
        "from_base": sorted(loaded - set(from_ckpt)),
        "checkpoint_replaced_base": sorted(loaded & set(from_ckpt) & set(from_base)),
        "never_used": sorted(strip_prefix(n) for n in report.never_used),
        "unknown": sorted(unknown),
    }
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".import-", dir=parent)  # renamed to `out` once complete
    try:
        source = {k: summary[k] for k in ("base", "checkpoint", "variant", "aggregator", "lora", "unknown")}
        info = write_export(model, recipe, staging, {"imported": source})
        tokenizer = load_tokenizer(base)
        ensure_pad_token(tokenizer)  # Llama-2's has none; gama_inf.py pads with unk (id 0)
        shutil.rmtree(os.path.join(staging, "tokenizer"), ignore_errors=True)
        tokenizer.save_pretrained(os.path.join(staging, "tokenizer"))
        info["generation"] = dict(REFERENCE_GENERATION)
        with open(os.path.join(staging, "gama_ds.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        with open(os.path.join(staging, REPORT), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for line in describe(summary):
        log(line)
    return summary


def _refusal(report, ckpt: str | None, base: str) -> str:
    parts = []
    if report.missing:
        names = [reference_name(n) for n in sorted(report.missing)]
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        hint = "" if ckpt else " (the aggregator and projections come from a stage checkpoint: --checkpoint)"
        parts.append(f"{len(names)} missing: {shown}{hint}")
    if report.mismatched:
        parts.append(
            f"{len(report.mismatched)} of another shape: {', '.join(report.mismatched[:4])} "
            "(a model of other sizes: key=value overrides, e.g. model.audio.width=...)"
        )
    if report.unexpected:
        names = [strip_prefix(n) for n in report.unexpected]
        parts.append(
            f"{len(names)} for modules this model does not have: {', '.join(names[:4])} "
            "(other depths, layers or LoRA targets: key=value overrides)"
        )
    where = f"{ckpt} + {base}" if ckpt else base
    return f"{where}: nothing written; " + "; ".join(parts)


def describe(summary: dict) -> list[str]:
    lines = [
        f"imported {summary['loaded']} tensors: {len(summary['from_checkpoint'])} from the checkpoint, "
        f"{len(summary['from_base'])} from the base folder only"
    ]
    if summary["checkpoint_replaced_base"]:
        both = len(summary["checkpoint_replaced_base"])
        lines.append(
            f"the checkpoint's values replace the base folder's for {both} "
            "tensors held by both (its encoder and Q-Former were trained after the base was made)"
        )
    if not summary["lora"]:
        lines.append("no LoRA in the checkpoint: the LLM runs as the base folder has it (a stage-1 model)")
    lines.append(
        f"{len(summary['never_used'])} tensors the reference holds but never computes with were left out "
        f"(listed in {REPORT})"
    )
    if summary["unknown"]:
        lines.append(
            f"WARNING: {len(summary['unknown'])} tensors no reference module has were not loaded: "
            + ", ".join(summary["unknown"][:8])
            + (" ..." if len(summary["unknown"]) > 8 else "")
        )
    return lines
