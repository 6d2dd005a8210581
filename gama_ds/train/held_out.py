"""The held-out loss: over every held-out example on any world size, every `eval_every_steps`
steps and at the end of a run that was not stopped."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .watchdog import Watchdog

MODEL_INPUTS = ("fbank", "input_ids", "attention_mask", "labels", "has_audio", "hint_mask")


def evaluate(engine, loader, device, dog: Watchdog) -> float:
    """Held-out loss per supervised token over every held-out example, on any world size."""
    engine.eval()
    loader.stream.epoch, loader.consumed = 0, 0
    total = torch.zeros(2, dtype=torch.float64, device=device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in dog.watch(loader, "eval"):
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS}
            out = engine(**inputs)
            n = (inputs["labels"][:, 1:] != -100).sum()
            # A micro-batch of padding only (the last global batch on many ranks) has no tokens
            # and a NaN loss: it counts for nothing.
            total += torch.stack([torch.where(n > 0, out.loss.double(), zero) * n, n.double()])
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


class HeldOut:
    """Decides for itself when the held-out loss is due, and logs it."""

    def __init__(self, engine, loader, device, dog: Watchdog, every_steps: int, metrics):
        self.engine, self.loader, self.device, self.dog = engine, loader, device, dog
        self.every, self.metrics = every_steps, metrics

    def step(self, step: int) -> None:
        if self.loader is not None and self.every and step % self.every == 0:
            self.log(step)

    def log(self, step: int) -> float | None:
        if self.loader is None:
            return None
        loss = evaluate(self.engine, self.loader, self.device, self.dog)
        self.metrics.log({"step": step, "eval_loss": loss})
        return loss
