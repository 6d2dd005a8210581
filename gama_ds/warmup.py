"""The demo's stand-in for a pretrained CAV-MAE: the tiny encoder trained on the clips' labels.

GAMA starts from a CAV-MAE that AudioSet has already taught to hear; the demo has no such
checkpoint and nothing to download, and a random CAV-MAE cannot learn the demo's questions
through the LLM in minutes: its output is averaged over the 8 frequency rows, which folds
the mel axis and loses which row (pitch) carried the energy (docs/DEMO.md has the probes).
So the demo first trains the encoder alone as a clip classifier, one small head per
question type, on the training shards' own answers (what CAV-MAE's AudioSet fine-tuning
does with tags), and writes the result as an export that the demo stage starts from.

Each head reads the encoder's 64 time tokens. Events are a few tokens out of 64 (most are
padding or quiet), so a head that averages first dilutes them; a presence question takes
the max of per-token logits over the clip's tokens, and a counting question sums a per-token
feature over time, since every burst lasts equally long.
"""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from .audio import pad_features
from .data.shards import iter_samples, read_index
from .errors import UsageError
from .model.encoder import FRAMES, PATCH
from .synth import QUESTIONS

SUMMED = {"count"}  # tasks answered by how much of the clip is an event, not whether one is
HEAD_LR_SCALE = 10.0  # the heads' learning rate over the encoder's (see warm_up)


class MaxHead(nn.Module):
    """Per-token logits, max over the clip's own tokens: at the start every padding token
    looks alike, and a max that can pick one sends the step's gradient nowhere useful."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.out = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        logits = self.out(tokens).masked_fill(~real[..., None], float("-inf"))
        return logits.amax(dim=1)


class SumHead(nn.Module):
    def __init__(self, width: int, classes: int):
        super().__init__()
        self.per_token = nn.Linear(width, width)
        self.out = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        # Divided by a fixed 64, padding included, this is a sum over the clip: a mean over
        # the clip's own tokens would change with its length for the same count.
        return self.out(F.gelu(self.per_token(tokens)).mean(dim=1))


def load_clips(root: str) -> list[tuple[torch.Tensor, dict[str, str], torch.Tensor]]:
    """(padded fbank, {task: answer}, which of the 64 time tokens hold audio) per clip."""
    clips = []
    for entry in read_index(root)["shards"]:
        for sample in iter_samples(f"{root}/{entry['file']}"):
            answers = {qa["task"]: qa["output"] for qa in sample.meta["qa"] if qa.get("task") in QUESTIONS}
            real = torch.arange(FRAMES // PATCH) < -(-len(sample.fbank) // PATCH)
            clips.append((pad_features(torch.from_numpy(sample.fbank)), answers, real))
    if not clips:
        raise UsageError(f"{root}: no clips to warm the encoder up on")
    return clips


def warm_up(
    model,
    train_root: str,
    eval_root: str | None = None,
    steps: int = 700,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    log=print,
) -> dict:
    """Train `model.audio.encoder` in place on the clips' answers; returns held-out accuracy by task."""
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise UsageError(f"warm-up needs steps, batch size and lr > 0; got {steps}, {batch_size}, {lr}")
    train = load_clips(train_root)
    tasks = sorted({t for _, answers, _ in train for t in answers})
    classes = {t: sorted({a[t] for _, a, _ in train if t in a}) for t in tasks}
    encoder = model.audio.encoder
    width = encoder.norm_a.normalized_shape[0]
    torch.manual_seed(seed)
    heads = nn.ModuleDict({t: (SumHead if t in SUMMED else MaxHead)(width, len(classes[t])) for t in tasks})
    frozen = {p: p.requires_grad for p in encoder.parameters()}  # the stage's own setting, restored below
    for p in frozen:
        p.requires_grad_(True)
    params = [*encoder.parameters(), *heads.parameters()]
    # The heads start from nothing and must grow large readouts of small pooled differences (one
    # burst more is about 2.5 of 64 tokens): at the encoder's rate, 450 steps of 8 clips left
    # the count at 33% held-out, at 10x it 58%, the other questions at 97-100% either way.
    optim = torch.optim.AdamW(
        [
            {"params": list(encoder.parameters())},
            {"params": list(heads.parameters()), "lr": lr * HEAD_LR_SCALE},
        ],
        lr=lr,
        weight_decay=0.0,
    )
    warmup = min(20, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1.0 - s / steps)
    )

    def tokens(fbank: torch.Tensor) -> torch.Tensor:
        (last,) = encoder(fbank, with_taps=False)
        return F.layer_norm(last, last.shape[-1:])  # undo the reference's / 50 for the heads

    def loss_of(batch) -> torch.Tensor:
        x = tokens(torch.stack([fbank for fbank, _, _ in batch]))
        real = torch.stack([r for _, _, r in batch])
        loss = x.new_zeros(())
        for t in tasks:
            rows = [i for i, (_, a, _) in enumerate(batch) if t in a]
            if rows:
                target = torch.tensor([classes[t].index(batch[i][1][t]) for i in rows])
                loss = loss + F.cross_entropy(heads[t](x[rows], real[rows]), target)
        return loss

    rng = random.Random(seed)
    encoder.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        loss = loss_of(rng.sample(train, min(batch_size, len(train))))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            seconds = time.perf_counter() - started
            log(f"[warm-up] step {step}/{steps} loss {loss.item():.3f} ({seconds:.0f} s)")
    encoder.eval()
    for p, wanted in frozen.items():
        p.requires_grad_(wanted)
    return {} if eval_root is None else accuracy(tokens, heads, classes, load_clips(eval_root))


@torch.no_grad()
def accuracy(tokens, heads, classes, clips) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(clips), 32):
        chunk = clips[i : i + 32]
        x = tokens(torch.stack([fbank for fbank, _, _ in chunk]))
        real = torch.stack([r for _, _, r in chunk])
        for t, head in heads.items():
            guesses = head(x, real).argmax(dim=1).tolist()
            for (_, answers, _), guess in zip(chunk, guesses, strict=True):
                if t in answers:
                    hits.setdefault(t, []).append(classes[t][guess] == answers[t])
    return {t: round(sum(h) / len(h), 3) for t, h in sorted(hits.items())}
