"""DeepSpeed: the config resolved from the recipe, the optimizer, and `deepspeed.initialize`.

The JSON files in gama_ds/ds_configs/ say "auto" for everything the recipe owns; `resolve_ds_config`
fills those in from the recipe and the real world size, and refuses a JSON whose concrete
value disagrees with the recipe, so the two can never drift apart. The global batch is the
recipe's number: accumulation = global / (micro x world size), whatever the node count.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from ..config import ConfigError, Recipe
from ..model.weights import parameter_groups
from ..placement import native_bf16
from .extensions import load_op

# Inside the package, so that an installed gama_ds (not only a checkout) finds them.
DS_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def resolve_precision(recipe: Recipe) -> str:
    """bf16 | fp16 | fp32, checked against the device."""
    requested = recipe.train.precision
    if requested == "auto":
        return "bf16" if native_bf16() else "fp32"
    if requested == "bf16" and on_gpu() and not native_bf16():
        raise ConfigError(
            f"train.precision bf16: {torch.cuda.get_device_name()} has no bf16 in hardware (only "
            "emulated); use fp16, or auto for fp32"
        )
    if requested == "fp16" and not on_gpu():
        raise ConfigError("train.precision fp16 needs a GPU (its loss scaling is GPU-only); use fp32 or bf16")
    return requested


def accumulation_steps(recipe: Recipe, world_size: int) -> int:
    t = recipe.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} is not divisible by train.micro_batch_size "
            f"{t.micro_batch_size} x {world_size} ranks = {per_step}; choose a global batch that is a "
            f"multiple of {per_step}, or another micro-batch"
        )
    return t.global_batch_size // per_step


def ds_config_path(recipe: Recipe) -> str:
    d = recipe.deepspeed
    if d.config:
        return d.config
    name = "zero3_offload.json" if d.offload else f"zero{d.zero_stage}.json"
    return os.path.join(DS_CONFIGS, name)


def _fill(section: dict, key: str, value, where: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(
            f"{where}.{key} is {current!r} in the DeepSpeed JSON but the recipe says {value!r}; "
            'set it to "auto" there and change the recipe instead'
        )


def resolve_ds_config(recipe: Recipe, world_size: int) -> dict:
    path = ds_config_path(recipe)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"deepspeed.config {path}: {err}") from err
    cfg = copy.deepcopy(cfg)
    precision = resolve_precision(recipe)
    t = recipe.train
    _fill(cfg, "train_micro_batch_size_per_gpu", t.micro_batch_size, "top")
    _fill(cfg, "gradient_accumulation_steps", accumulation_steps(recipe, world_size), "top")
    _fill(cfg, "train_batch_size", t.global_batch_size, "top")
    _fill(cfg, "gradient_clipping", recipe.optim.grad_clip, "top")
    cfg.setdefault("bf16", {})
    cfg.setdefault("fp16", {})
    _fill(cfg["bf16"], "enabled", precision == "bf16", "bf16")
    _fill(cfg["fp16"], "enabled", precision == "fp16", "fp16")
    # Gradients summed over micro-batches and averaged over ranks in fp32, whatever the weights'
    # precision: DeepSpeed's default is the weights' dtype, and bf16 sums lose the small terms.
    # A JSON may say otherwise on purpose; one that says nothing gets fp32.
    cfg.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    cfg.setdefault("communication_data_type", "fp32")
    zero = cfg.setdefault("zero_optimization", {})
    _fill(zero, "stage", recipe.deepspeed.zero_stage, "zero_optimization")
    if zero["stage"] == 3:
        _fill(
            zero,
            "stage3_param_persistence_threshold",
            recipe.deepspeed.param_persistence_threshold,
            "zero_optimization",
        )
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise ConfigError(f"{path}: no recipe value for {', '.join(leftover)}; give it a number")
    return cfg


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def param_groups(model, recipe: Recipe) -> list[dict]:
    """Trainable parameters grouped by their recipe learning rate."""
    groups = parameter_groups(model)
    by_lr: dict[float, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = recipe.optim.group_lr.get(groups[name], recipe.optim.lr)
            by_lr.setdefault(lr, []).append(p)
    return [
        {"params": ps, "lr": lr, "weight_decay": recipe.optim.weight_decay}
        for lr, ps in sorted(by_lr.items())
    ]


def build_optimizer(model, recipe: Recipe, offload: bool):
    """torch's AdamW, which needs no compiling on the node: its fused CUDA kernel on GPUs (ZeRO
    steps it on the fp32 master partitions, on the GPU), its default on CPU. DeepSpeed's CPU
    Adam only with offload, where the optimizer steps on the host; it is built once per node,
    under gama_ds's lock (extensions.py). All three are the same AdamW: decoupled weight decay
    from each group, bias correction, no amsgrad."""
    o = recipe.optim
    groups = param_groups(model, recipe)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        load_op("CPUAdamBuilder")
        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True if on_gpu() else None)


def initialize(model, recipe: Recipe, config: dict, total_steps: int):
    """(engine, scheduler) with the recipe's optimizer and warm-up + linear-decay schedule."""
    import deepspeed
    from transformers import get_linear_schedule_with_warmup

    optimizer = build_optimizer(model, recipe, offload=recipe.deepspeed.offload)
    warmup = min(recipe.optim.warmup_steps, total_steps)

    def schedule(opt):
        return get_linear_schedule_with_warmup(opt, warmup, max(total_steps, 1))

    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=config,
    )
    return engine, scheduler
