"""Training metrics: JSON lines, TensorBoard, a PNG of the curves, and model FLOPs utilisation.

Only rank 0 writes. Throughput counts audio prefix tokens and text tokens; on GPUs MFU is the
model's FLOPs per second over the device's dense 16-bit peak (PEAK_TFLOPS, or GAMA_DS_PEAK_TFLOPS).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping

import numpy as np
import torch

# Dense 16-bit tensor-core peak, TFLOP/s per GPU, from the vendors' data sheets (no sparsity:
# the sheets' "*" figures halved), keyed by the exact name torch.cuda.get_device_name() reports.
# bf16 and fp16 peak alike from Ampere on; V100 and T4 have no bf16, their figure is fp16's.
# Exact names, not substrings: "NVIDIA L40" is not an "L4", "NVIDIA RTX A1000" not an "A100",
# and an H100 PCIe is not an SXM.
PEAK_TFLOPS = {
    "NVIDIA GB200": 2500.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA H200": 989.4,  # SXM
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA H100 80GB HBM3": 989.4,  # SXM5
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.05,
    "NVIDIA L40": 181.05,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
    "NVIDIA RTX A6000": 154.8,
    "NVIDIA RTX 6000 Ada Generation": 364.2,
    "Tesla V100-SXM2-16GB": 125.0,
    "Tesla V100-SXM2-32GB": 125.0,
    "Tesla V100-PCIE-16GB": 112.0,
    "Tesla V100-PCIE-32GB": 112.0,
    "Tesla V100S-PCIE-32GB": 130.0,
    "Tesla T4": 65.0,
}
PEAK_ENV = "GAMA_DS_PEAK_TFLOPS"  # a site's own figure, for a device the table lacks or clocks differently
log = logging.getLogger("gama_ds.train")


def peak_flops(device_name: str, env: Mapping[str, str] = os.environ) -> float | None:
    """FLOP/s to measure MFU against: the environment's figure, else the table's; None (with
    one line saying so, at the caller) for a device the table lacks."""
    override = env.get(PEAK_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            raise ValueError(f"{PEAK_ENV}={override!r}: give the peak in TFLOP/s, e.g. 989.4") from None
        if value <= 0:
            raise ValueError(f"{PEAK_ENV}={override!r}: the peak must be positive")
        return value * 1e12
    tflops = PEAK_TFLOPS.get(device_name.strip())
    return tflops * 1e12 if tflops else None


def device_peak_flops(precision: str) -> float | None:
    """This device's peak for a run in `precision`: the environment's figure wherever it is set
    (a CPU too); the table's for a GPU in bf16/fp16; None otherwise, and for a GPU the table
    lacks, which the log says once (rank 0's)."""
    if os.environ.get(PEAK_ENV):
        return peak_flops("", os.environ)
    if not torch.cuda.is_available() or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    if peak is None:
        log.info(
            "MFU: no peak known for the device %r, so the metrics carry no mfu; set %s to its "
            "dense bf16 TFLOP/s (the data sheet's figure without sparsity)",
            name,
            PEAK_ENV,
        )
    return peak


def _numel(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def _train_flops(params) -> float:
    """Forward + backward FLOPs per token through these parameters: 2N forward, 2N for the
    activation gradients, 2N more for the weight gradients of trainable ones."""
    return sum(4.0 * _numel(p) + (2.0 * _numel(p) if p.requires_grad else 0.0) for p in params)


def flops_per_token(model) -> float:
    """Per token of the LLM's sequence (audio prefix and text alike); the embedding table is
    a lookup, not a matrix product."""
    embed = {id(p) for p in model.llm.get_input_embeddings().parameters()}
    return _train_flops(p for p in model.llm.parameters() if id(p) not in embed)


def flops_per_sample(model) -> float:
    """The audio modules, per clip: each runs over its own number of tokens."""
    a = model.audio
    tokens = {"encoder": a.encoder.rows * a.encoder.cols, "aggregator": a.encoder.cols}
    if hasattr(a, "qformer"):
        tokens["qformer"] = a.qformer.num_queries
    total = 0.0
    for name, module in a.named_children():
        total += tokens.get(name, a.num_tokens) * _train_flops(module.parameters())
    return total


class Window:
    """One rank's running totals between two metrics lines, and what they come to.

    The loss stays a device tensor until the line is due: reading it each step (`.item()`)
    would make the host wait for the GPU every step."""

    def __init__(self, device, audio_tokens: int, flops_token: float, flops_sample: float, peak):
        self.device, self.audio_tokens = device, audio_tokens
        self.flops_token, self.flops_sample, self.peak = flops_token, flops_sample, peak
        self.bad_samples = 0  # this epoch's, for the epoch line
        self.reset()

    def reset(self) -> None:
        self.loss, self.batches, self.tokens, self.samples, self.pads = (
            torch.zeros((), device=self.device),
            0,
            0,
            0,
            [],
        )
        self.tick = time.perf_counter()

    def add(self, batch: dict, loss) -> None:
        self.loss += loss.detach().float()
        self.batches += 1
        self.tokens += int(batch["text_tokens"]) + self.audio_tokens * len(batch["keys"])
        self.samples += len(batch["keys"])
        self.pads.append(float(batch["pad_fraction"]))
        self.bad_samples += int(batch["bad_samples"])

    def rates(self) -> list[float]:
        """[mean loss, tokens/s, samples/s] on this rank, to be averaged over ranks."""
        elapsed = time.perf_counter() - self.tick
        return [self.loss.item() / self.batches, self.tokens / elapsed, self.samples / elapsed]

    def record(self, means: list[float], world: int) -> dict:
        """The metrics line's figures from the rates averaged over ranks; then starts afresh."""
        loss, tok_s, smp_s = means
        record = {
            "loss": loss,
            "samples_per_s": smp_s * world,
            "tokens_per_s": tok_s * world,
            "pad_fraction": float(np.mean(self.pads)),
        }
        if self.peak:  # per rank: every LLM token (audio prefix and text), plus the audio modules per clip
            record["mfu"] = (tok_s * self.flops_token + smp_s * self.flops_sample) / self.peak
        self.reset()
        return record


class Metrics:
    def __init__(self, out_dir: str, active: bool, tensorboard: bool, after_step: int = 0):
        """`after_step`: a resumed run drops what an earlier attempt logged past its checkpoint."""
        self.active = active
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.writer = None
        if active:
            os.makedirs(out_dir, exist_ok=True)
            kept = [r for r in read(self.path) if r["step"] <= after_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=after_step + 1)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self, plot: bool) -> str | None:
        if not self.active:
            return None
        if self.writer is not None:
            self.writer.close()
        return plot_curves(self.path) if plot else None


class ExampleTrace:
    """Which examples each rank trained on at each optimizer step (`logging.trace_examples`):
    `examples/rank<r>.jsonl`, one `{"step", "keys"}` line per step, to audit the data order.
    A resumed run drops what an earlier attempt traced past its checkpoint, as Metrics does."""

    def __init__(self, out_dir: str, rank: int, active: bool, after_step: int = 0):
        self.active, self.keys = active, []
        self.path = os.path.join(out_dir, "examples", f"rank{rank}.jsonl")
        if active:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            kept = [r for r in read(self.path) if r["step"] <= after_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def add(self, keys: list[str]) -> None:
        if self.active:
            self.keys.extend(keys)

    def step(self, step: int) -> None:
        if self.active:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "keys": self.keys}) + "\n")
            self.keys = []


def read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(path: str) -> str | None:
    records = [r for r in read(path) if "loss" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in records]
    ax_loss.plot(steps, [r["loss"] for r in records], label="train")
    evals = [r for r in read(path) if "eval_loss" in r]
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in records])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    out = os.path.join(os.path.dirname(path), "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
