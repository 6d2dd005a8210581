"""The language model: shape presets, the attention kernel choice, and loading.

Any `AutoModelForCausalLM` works; presets name the shapes of common ones so that a model can
be built without its weights (`gama-ds estimate`, tests) and checked against a weights folder.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ..config import ConfigError, ModelConfig, choices

log = logging.getLogger(__name__)

PRESETS = {
    # Llama-2-7b(-chat): the LLM of the reference GAMA.
    "llama-2-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    # Vicuna-7B (LLaMA-1 shapes): the LLM of the reference LTU.
    "vicuna-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    # A few-hundred-thousand-parameter Llama for tests and the CPU demo. Initialised at std 0.1
    # (about 1/sqrt(64)), not Llama's 0.02, which suits 4096-wide layers: at 64 wide the random
    # LLM's signals are then too small for the demo to learn through in minutes (docs/DEMO.md).
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.1,
    ),
}  # fmt: skip

DTYPES = {name: getattr(torch, name) for name in choices(ModelConfig, "dtype")}  # model.dtype -> torch


def is_preset(name: str) -> bool:
    return name in PRESETS


def llm_config(name: str, vocab_size: int | None = None):
    """The HF config of a preset or of a model folder."""
    if is_preset(name):
        kwargs = dict(PRESETS[name])
        if vocab_size is not None:
            kwargs["vocab_size"] = vocab_size
        return LlamaConfig(**kwargs)
    if os.path.isdir(name):
        return AutoConfig.from_pretrained(name)
    raise ConfigError(f"model.llm {name!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder")


def flash_attention_usable() -> bool:
    """flash-attn installed, an Ampere or newer GPU, and its CUDA extension loads (transformers'
    check looks at the package only, so a wheel built for another torch or CUDA passes it)."""
    from transformers.utils import is_flash_attn_2_available

    if not (torch.cuda.is_available() and is_flash_attn_2_available()):
        return False
    if torch.cuda.get_device_capability()[0] < 8:
        return False
    return flash_extension_loads()


@functools.cache
def flash_extension_loads(module: str = "flash_attn_2_cuda") -> bool:
    """Whether flash-attn's compiled kernels import; says why once when they do not."""
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as err:
        log.warning("flash-attn's CUDA extension %s does not load (%s): attention uses sdpa", module, err)
        return False
    return True


def choose_attention(requested: str, compute_dtype: torch.dtype) -> str:
    """'auto' -> flash_attention_2 where it can run (flash-attn on an Ampere+ GPU, 16-bit
    compute), else sdpa. `compute_dtype` is the training or inference precision, which may
    differ from the dtype the weights are built in (DeepSpeed casts them for bf16)."""
    half = compute_dtype in (torch.bfloat16, torch.float16)
    if requested == "auto":
        choice = "flash_attention_2" if half and flash_attention_usable() else "sdpa"
    else:
        if requested == "flash_attention_2" and not flash_attention_usable():
            raise ConfigError(
                "model.attn_implementation flash_attention_2 needs flash-attn, with a CUDA extension that "
                "loads, on an Ampere or newer GPU; install gama_ds[flash] there (built for this torch), "
                "or use sdpa"
            )
        if requested == "flash_attention_2" and not half:
            raise ConfigError(
                "model.attn_implementation flash_attention_2 runs in bf16 or fp16 only; "
                "train in bf16 or use sdpa"
            )
        choice = requested
    log.info("attention implementation: %s", choice)
    return choice


def build_llm(
    name: str,
    dtype: str = "float32",
    attn: str = "auto",
    vocab_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
    load_weights: bool = True,
    preset_weights: dict[str, torch.Tensor] | None = None,
):
    """A causal LM: the folder's weights for a path, random weights for a preset (or for any
    model when `load_weights` is False, as on the meta device).

    `preset_weights` gives a preset the state dict of one built earlier (same name, vocabulary
    and dtype): drawn once from the seed and handed in, rather than drawn here. Only their
    names and shapes are used wherever the loader reads values on one process alone (the
    others may pass meta tensors)."""
    torch_dtype = DTYPES[dtype]
    attn_impl = choose_attention(attn, compute_dtype or torch_dtype)
    if preset_weights is not None:
        if not is_preset(name):
            raise ValueError(f"preset_weights are for an LLM preset, not for the folder {name}")
        config = llm_config(name, vocab_size)  # every preset is a Llama
        return LlamaForCausalLM.from_pretrained(
            None, config=config, state_dict=preset_weights, attn_implementation=attn_impl, dtype=torch_dtype
        )
    if is_preset(name) or not load_weights:
        config = llm_config(name, vocab_size)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_impl, dtype=torch_dtype)
    return AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn_impl, dtype=torch_dtype)
