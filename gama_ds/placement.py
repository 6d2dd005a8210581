"""Where and in what precision inference runs: `--device` and `--dtype` of generate, eval, serve.

Defaults follow training: the GPU when there is one, bf16 where the GPU has it in hardware,
fp32 otherwise (the precision the trainer picks for `train.precision: auto`).
"""

from __future__ import annotations

import torch

from .errors import UsageError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def native_bf16() -> bool:
    """bf16 in hardware (Ampere and newer). torch's plain `is_bf16_supported()` also says yes on
    V100 and T4, which only emulate it, many times slower than their fp16."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def choose_device(name: str | None) -> torch.device:
    """None: "cuda" when a GPU is visible, else "cpu"; "cpu", "cuda" or "cuda:N" as given."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {name}: only cpu and cuda[:N] run inference here")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA GPU on this machine; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(
            f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def choose_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """None: bf16 on a GPU with bf16 in hardware, else fp32; "bf16", "fp16" or "fp32" as given,
    checked against the device."""
    gpu = device.type == "cuda"
    if name is None:
        return torch.bfloat16 if gpu and _bf16_on(device) else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    if name == "bf16" and gpu and not _bf16_on(device):
        raise UsageError(
            f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 in hardware (only emulated, "
            "many times slower); use --dtype fp16 or fp32"
        )
    if name == "fp16" and not gpu:
        raise UsageError("--dtype fp16 runs on a GPU only (CPUs have no fast fp16); use bf16 or fp32 on CPU")
    return DTYPES[name]


def _bf16_on(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return native_bf16()
