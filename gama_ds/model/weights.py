"""Parameter groups, what each stage trains, and import of the reference's checkpoints.

Groups are decided by module membership, never by substrings of names: `llm` (the frozen
base LM), `lora` (peft's adapter tensors: LoRA matrices and `modules_to_save` copies),
`audio_encoder`, `aggregator`, `qformer` (the Q-Former with its queries and input norm),
`projections` and `soft_prompt` (GAMA-IT's hint, trained whenever it exists). The stage settings are the
reference's (reference/gama.md §2.2), with one fix: parameters the forward pass never
touches (the aggregator's cross-attention and the tap norms in `released` mode) are never
trainable.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from ..config import GROUP_NAMES, TRAINABLE_GROUPS
from ..errors import WeightsError

GROUPS = GROUP_NAMES  # the recipe names them (optim.group_lr, model.trainable)
AUDIO_GROUPS = {"encoder": "audio_encoder", "aggregator": "aggregator", "qformer": "qformer"}
TRAINABLE = TRAINABLE_GROUPS  # model.trainable setting -> the groups it trains


def parameter_groups(model) -> dict[str, str]:
    """Full parameter name -> group."""
    lora_ids = set()
    for module in model.llm.modules():
        # LoRA matrices, and the trained copies of `lora.modules_to_save` (e.g. lm_head).
        if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
            for attr in module.adapter_layer_names:
                lora_ids.update(id(p) for p in getattr(module, attr).parameters())
    groups = {}
    for name, p in model.llm.named_parameters():
        groups[f"llm.{name}"] = "lora" if id(p) in lora_ids else "llm"
    for child, module in model.audio.named_children():
        group = AUDIO_GROUPS.get(child, "projections")
        for name, _ in module.named_parameters():
            groups[f"audio.{child}.{name}"] = group
    if getattr(model, "soft_prompt", None) is not None:
        for name, _ in model.soft_prompt.named_parameters():
            groups[f"soft_prompt.{name}"] = "soft_prompt"
    return groups


def unused_parameters(model) -> set[str]:
    return {f"audio.{n}" for n in model.audio.unused_parameters()}


def set_trainable(model, setting: str) -> dict[str, dict[str, int]]:
    """Freeze everything but `setting`'s groups, LoRA and the soft prompt; returns counts per group."""
    if setting not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}; got {setting!r}")
    wanted = TRAINABLE[setting] | {"lora", "soft_prompt"}
    groups = parameter_groups(model)
    dead = unused_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(groups[name] in wanted and name not in dead)
    return count_parameters(model, groups)


def count_parameters(model, groups: dict[str, str] | None = None) -> dict[str, dict[str, int]]:
    groups = groups or parameter_groups(model)
    # The soft prompt's group only where there is one: every other model reports as before.
    names = [g for g in GROUPS if g != "soft_prompt" or getattr(model, "soft_prompt", None) is not None]
    counts = {g: {"total": 0, "trainable": 0} for g in names}
    for name, p in model.named_parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 partitions hold [0] shapes
        counts[groups[name]]["total"] += n
        if p.requires_grad:
            counts[groups[name]]["trainable"] += n
    return counts


# ---------------------------------------------------------------------------------------
# Import of the reference's weights.

# (pattern on the reference name without its prefix, replacement in our model); first match
# wins. Projections are plain prefix swaps in _PROJ: their Sequential indices shift by one.
_RENAMES = [
    (r"^audio_encoder\.", "audio.encoder."),
    (r"^audio_aggregator_layer_1\.", "audio.aggregator.layers.0."),
    (r"^audio_aggregator_layer_2\.", "audio.aggregator.layers.1."),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "audio.qformer.bert.layernorm."),
    (
        r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.",
        r"audio.qformer.bert.encoder.layer.\1.\2.attention.",
    ),
    (r"^Qformer\.bert\.encoder\.", "audio.qformer.bert.encoder."),
    (r"^query_tokens$", "audio.qformer.query_tokens"),
    (r"^qformer_proj_norm\.", "audio.qformer.input_norm."),
    (r"^(layers\.\d+\.self_attn\.\w+\.lora_[AB]\.\w+\.weight)$", r"llm.base_model.model.model.\1"),
]  # fmt: skip
_PROJ = {
    "audio_proj_qformer.0.": "audio.proj_qformer.1.",
    "audio_proj_qformer.2.": "audio.proj_qformer.3.",
    "audio_proj_audioenc.0.": "audio.proj_aggregator.1.",
    "audio_proj_audioenc.2.": "audio.proj_aggregator.3.",
    "audio_proj.1.": "audio.proj.1.",
}
# Tensors the reference holds but never uses in its forward pass (reference/gama.md §1.2-1.4).
_NEVER_USED = [
    r"^audio_encoder\.blocks_a\.\d+\.norm[12]_[av]\.",  # modality blocks run with the joint norms
    # The full audio-visual CAV-MAE's video side, joint final norm and classifier head.
    r"^audio_encoder\.(blocks_v|patch_embed_v|pos_embed_v|modality_v|norm_v|norm|mlp_head)\b",
    r"^audio_encoder\.blocks_u\.\d+\.norm[12](_v)?\.",  # the shared block runs with the audio norms
    r"^audio_aggregator_layer_[12]\.(intermediate_query|output_query)\.",  # a second FFN, never called
    r"^Qformer\.cls\.",
    r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)",
    r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",  # the pruned text FFN
]
PREFIXES = ("base_model.model.model.", "base_model.model.", "model.")
# Ours -> the reference's (without its prefix): the inverse of _RENAMES and _PROJ, so that a
# missing tensor is named as the user's checkpoint would spell it.
_REVERSE = [
    (r"^audio\.encoder\.", "audio_encoder."),
    (r"^audio\.aggregator\.layers\.0\.", "audio_aggregator_layer_1."),
    (r"^audio\.aggregator\.layers\.1\.", "audio_aggregator_layer_2."),
    (r"^audio\.qformer\.bert\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (
        r"^audio\.qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
        r"Qformer.bert.encoder.layer.\1.\2.self.",
    ),
    (r"^audio\.qformer\.bert\.encoder\.", "Qformer.bert.encoder."),
    (r"^audio\.qformer\.query_tokens$", "query_tokens"),
    (r"^audio\.qformer\.input_norm\.", "qformer_proj_norm."),
    (r"^llm\.base_model\.model\.model\.(layers\.\d+\.self_attn\.\w+\.lora_[AB]\.)", r"\1"),
]  # fmt: skip


@dataclass
class ImportReport:
    loaded: list[str] = field(default_factory=list)  # our names that received a tensor
    never_used: list[str] = field(default_factory=list)  # reference names skipped on purpose
    fresh: list[str] = field(default_factory=list)  # our names allowed to keep their initial values
    unexpected: list[str] = field(default_factory=list)  # reference names that map to nothing
    missing: list[str] = field(default_factory=list)  # our live names that nothing provided
    mismatched: list[str] = field(default_factory=list)  # name: shapes

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.mismatched)

    def problems(self) -> str:
        lines = []
        for what, names in (
            ("unexpected", self.unexpected),
            ("missing", self.missing),
            ("shape", self.mismatched),
        ):
            if names:
                shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
                lines.append(f"{len(names)} {what}: {shown}")
        return "; ".join(lines)


def strip_prefix(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def map_name(ref_name: str) -> str | None:
    """The reference's parameter name -> ours, None for never-used tensors.

    Raises KeyError for a name that is neither mapped nor known to be unused.
    """
    name = strip_prefix(ref_name)
    if any(re.match(p, name) for p in _NEVER_USED):
        return None
    for prefix, ours in _PROJ.items():
        if name.startswith(prefix):
            return ours + name[len(prefix) :]
    for pattern, repl in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(ref_name)


def reference_name(ours: str) -> str:
    """Our parameter name -> the reference's, without its prefix (ours when it has none)."""
    for reference, mine in _PROJ.items():
        if ours.startswith(mine):
            return reference + ours[len(mine) :]
    for pattern, repl in _REVERSE:
        if re.match(pattern, ours):
            return re.sub(pattern, repl, ours)
    return ours


def import_reference(
    model, state: dict[str, torch.Tensor], allow_fresh: set[str] = frozenset(), fresh_prefixes: tuple = ()
) -> ImportReport:
    """Load reference tensors into `model`, accounting for every tensor on both sides.

    `allow_fresh` names groups that may keep their initial values when the source has none
    of them (the base folder has no aggregator or projections; a stage-1 checkpoint has no
    LoRA); `fresh_prefixes` does the same for single modules (the base folder's CAV-MAE has
    no tap norms). Any other live parameter left without a tensor, any reference tensor that
    maps to nothing, and any shape disagreement is reported; `report.ok` says whether to go on.
    """
    report = ImportReport()
    ours = dict(model.named_parameters())
    groups = parameter_groups(model)
    dead = unused_parameters(model)
    mapped: dict[str, torch.Tensor] = {}
    for ref_name, tensor in state.items():
        try:
            name = map_name(ref_name)
        except KeyError:
            report.unexpected.append(ref_name)
            continue
        if name is None:
            report.never_used.append(ref_name)
        elif name not in ours:
            report.unexpected.append(ref_name)
        elif tuple(tensor.shape) != tuple(_shape(ours[name])):
            report.mismatched.append(f"{ref_name}: {list(tensor.shape)} vs ours {list(_shape(ours[name]))}")
        else:
            mapped[name] = tensor
    provided_groups = {groups[n] for n in mapped}
    for name in ours:
        # The reference released no soft prompt: it always starts from its init rule.
        if name in mapped or groups[name] in ("llm", "soft_prompt") or name in dead:
            continue
        if (
            groups[name] in allow_fresh
            and groups[name] not in provided_groups
            or name.startswith(fresh_prefixes)
        ):
            report.fresh.append(name)
        else:
            report.missing.append(name)
    # A parameter holding less than its shape is a ZeRO-3 share: copying into it would fail.
    partitioned = [n for n in mapped if ours[n].numel() != math.prod(_shape(ours[n]))]
    if partitioned:
        raise ValueError(
            f"{len(partitioned)} parameters (e.g. {partitioned[0]}) are ZeRO-3 partitions; import the "
            "reference weights before deepspeed.initialize, or inside deepspeed.zero.GatheredParameters"
        )
    if report.ok:
        with torch.no_grad():
            for name, tensor in mapped.items():
                if not tensor.is_meta:  # a shape-only inventory (a dry run) has nothing to copy
                    ours[name].copy_(tensor.to(ours[name].dtype))
        report.loaded = sorted(mapped)
    return report


def _shape(p: torch.Tensor):
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def load_reference_file(path: str) -> dict[str, torch.Tensor]:
    """A reference checkpoint file: safetensors, or a torch .bin read without unpickling code."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


_AUDIO_PREFIXES = ("audio_encoder.", "audio_", "Qformer.", "query_tokens", "qformer_proj_norm.")


def import_reference_path(model, path: str) -> ImportReport:
    """Import a reference GAMA/LTU checkpoint by what it is.

    - a base folder: GAMA's `Llama-2-7b-chat-hf-qformer` (safetensors) or LTU's `vicuna_ltu`
      (sharded `pytorch_model-*-of-*.bin`): the audio tensors among its files; the
      aggregator, projections, tap norms and LoRA are new in stage 1;
    - a stage checkpoint (`checkpoint-N/` or its `pytorch_model.bin`): every audio tensor and,
      when present, LoRA; a stage-1 checkpoint has none, so LoRA may start fresh.
    The LLM's own weights come from `model.llm` (a folder) when the model is built.
    """
    import os

    state = base_folder_tensors(path) if os.path.isdir(path) else None
    if state is not None:
        return import_reference(
            model,
            state,
            allow_fresh={"aggregator", "projections", "lora"},
            fresh_prefixes=("audio.encoder.norm_j.", "audio.encoder.norm_k."),
        )
    file = os.path.join(path, "pytorch_model.bin") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise WeightsError(
            f"{path}: not a base folder (safetensors or pytorch_model-*-of-*.bin) nor a stage checkpoint "
            "(pytorch_model.bin)"
        )
    return import_reference(model, load_reference_file(file), allow_fresh={"lora"})


def base_folder_tensors(path: str) -> dict[str, torch.Tensor] | None:
    """The audio tensors of a base folder's weight files (safetensors, or LTU's sharded
    `pytorch_model-*-of-*.bin`), under their own names; None for a folder with neither."""
    import glob
    import os

    safetensors = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    shards = sorted(glob.glob(os.path.join(path, "pytorch_model-*-of-*.bin")))
    if not (safetensors or shards):
        return None
    return {key: tensor for file in safetensors + shards for key, tensor in _audio_tensors(file)}


def _audio_tensors(file: str):
    """The audio-side tensors of one base-folder file; the LLM's are the LLM loader's."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if strip_prefix(key).startswith(_AUDIO_PREFIXES):
                    yield key, f.get_tensor(key)
        return
    for key, tensor in load_reference_file(file).items():
        if strip_prefix(key).startswith(_AUDIO_PREFIXES):
            yield key, tensor
