"""One function that turns a model config into a GamaModel, ready for a trainer."""

from __future__ import annotations

import peft

from .gama import GamaAudio, GamaModel, LtuAudio
from .llm import DTYPES, build_llm
from .soft_prompt import SoftPrompt
from .weights import set_trainable


def build_model(
    cfg,
    vocab_size: int | None = None,
    compute_dtype=None,
    load_weights: bool = True,
    llm=None,
) -> GamaModel:
    """LLM (preset or folder) + audio modules + LoRA + soft prompt + trainable groups, on the
    current device.

    `compute_dtype` is the precision the model will run in (the engine's), which picks the
    attention kernel. With `load_weights=False` under `torch.device("meta")` nothing is
    allocated or read, which is how `gama-ds estimate` sizes a 7B model in seconds.
    `llm`: the LLM, built by the caller (`build_llm`) in its own way, e.g. partitioned as it is
    built (gama_ds/train/partitioned.py); the audio modules, initialised in place, stay out of that.

    The LLM is built first, then the audio modules and LoRA draw their initial values from the
    random state it leaves.
    """
    cfg.check()
    if llm is None:
        llm = build_llm(cfg.llm, cfg.dtype, cfg.attn_implementation, vocab_size, compute_dtype, load_weights)
    audio_cls = GamaAudio if cfg.variant == "gama" else LtuAudio
    audio = audio_cls(cfg, llm.config.hidden_size).to(DTYPES[cfg.dtype])
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing gives gradients to LoRA and audio inputs with a frozen LLM.
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        audio.encoder.gradient_checkpointing = True
    if cfg.lora is not None:
        lora = peft.LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            modules_to_save=list(cfg.lora.modules_to_save) or None,
            bias="none",
            task_type="CAUSAL_LM",
        )
        # LoRA in the LLM's dtype, as everything else: peft would upcast a 16-bit adapter to fp32,
        # and an engine given a model built partitioned (ZeRO-3) casts nothing afterwards.
        llm = peft.get_peft_model(llm, lora, autocast_adapter_dtype=False)
    soft = None
    if cfg.soft_prompt is not None:  # zeros until the trainer's init rule or an export fills it
        soft = SoftPrompt(cfg.soft_prompt.tokens, llm.config.hidden_size, DTYPES[cfg.dtype])
    model = GamaModel(audio, llm, soft)
    set_trainable(model, cfg.trainable)
    return model


def tiny_config(**overrides):
    """The bundled tiny recipe's model: every module of the real one, small enough for a CPU."""
    from ..config import load_recipe

    cfg = load_recipe("tiny").model
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg
