"""Dynamic batching: requests queue up, one thread runs them through `generate` in batches.

The event loop never runs the model. A batch starts with the oldest waiting request and takes
every queued request with the same sampling settings (chat.Question.batch_key) up to
--max-batch, waiting at most --batch-wait-ms after the oldest one arrived for more to come.
Requests with other settings wait for a later batch, in arrival order. Rows may ask for
different `max_tokens`: each stops at its own (streamer.RowLimits).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import StoppingCriteriaList

from ..infer import prompt_batch
from .api_errors import ApiError
from .streamer import BatchStreamer, RowLimits

log = logging.getLogger("gama_ds.serve")


@dataclass(eq=False)
class Job:
    """One request on its way through the queue; the generation thread reports to it through
    thread-safe calls onto the request's event loop."""

    features: np.ndarray | None
    qa: dict
    settings: dict
    max_tokens: int
    seed: int | None
    batch_key: tuple
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    tags: list | None = None  # with a soft prompt: the clip's tags its prompt was given
    cancelled: bool = False  # set by the request's handler when its client has gone

    def _send(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def delta(self, text: str) -> None:
        self._send(("delta", text))

    def finish(self, text: str, reason: str, completion_tokens: int) -> None:
        self._send(("done", text, reason, completion_tokens))

    def fail(self, error: ApiError) -> None:
        self._send(("error", error))


def tag_clips(tagger, jobs: list[Job], soft_prompt) -> None:
    heard = [j for j in jobs if j.features is not None]
    if heard:
        found = tagger.tag([j.features for j in heard], soft_prompt.top_k, soft_prompt.threshold)
        for job, tags in zip(heard, found, strict=True):
            job.tags = [[label, score] for label, score in tags]


class Stats:
    """Counters for /metrics: the proof that requests were batched, and how busy the server is."""

    def __init__(self):
        self.lock = threading.Lock()
        self.batch_sizes: Counter[int] = Counter()
        self.requests = 0
        self.generated_tokens = 0
        self.rejected: Counter[int] = Counter()

    def batch(self, size: int, tokens: int) -> None:
        with self.lock:
            self.batch_sizes[size] += 1
            self.requests += size
            self.generated_tokens += tokens

    def reject(self, status: int) -> None:
        with self.lock:
            self.rejected[status] += 1


class Batcher:
    def __init__(
        self,
        model,
        tokenizer,
        template: str,
        max_batch: int,
        batch_wait_ms: float,
        soft_prompt=None,
        tagger=None,
    ):
        self.model = model
        self.soft_prompt, self.tagger = soft_prompt, tagger  # an export with a soft prompt has both
        self.tokenizer = tokenizer
        self.template = template
        self.max_batch = max_batch
        self.wait_s = batch_wait_ms / 1000.0
        self.stats = Stats()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._deferred: deque[Job] = deque()  # taken from the queue for another batch's settings
        self._thread = threading.Thread(target=self._work, name="gama-ds-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def waiting(self) -> int:
        return self._queue.qsize() + len(self._deferred)

    def _work(self) -> None:
        while True:
            self._run(self._next_batch())

    def _next_batch(self) -> list[Job]:
        first = self._deferred.popleft() if self._deferred else self._queue.get()
        batch = [first]
        for job in list(self._deferred):
            if len(batch) < self.max_batch and job.batch_key == first.batch_key:
                self._deferred.remove(job)
                batch.append(job)
        deadline = first.arrived + self.wait_s
        while len(batch) < self.max_batch:
            try:
                # Past the deadline, still take what is queued already: it has waited anyway.
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job.batch_key == first.batch_key:
                batch.append(job)
            else:
                self._deferred.append(job)
        return batch

    def _run(self, batch: list[Job]) -> None:
        live = [job for job in batch if not job.cancelled]
        if not live:
            return
        start = time.perf_counter()
        tok = self.tokenizer
        try:
            if self.soft_prompt is not None:  # the tagger on the features the model gets, batched too
                tag_clips(self.tagger, live, self.soft_prompt)
            fbank, input_ids, attention_mask, has_audio, hint_mask = prompt_batch(
                tok,
                [j.features for j in live],
                [j.qa for j in live],
                self.template,
                self.soft_prompt,
                [j.tags for j in live],
            )
            for i, job in enumerate(live):
                audio_tokens = self.model.num_audio_tokens if job.features is not None else 0
                job.prompt_tokens = int(attention_mask[i].sum()) + audio_tokens
            streamer = BatchStreamer(tok, live, tok.eos_token_id)
            settings = live[0].settings
            if settings.get("do_sample") and live[0].seed is not None:
                torch.manual_seed(live[0].seed)  # a seeded sampled request is always a batch of one
            self.model.generate(
                fbank,
                input_ids,
                attention_mask,
                has_audio,
                hint_mask,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                max_new_tokens=max(j.max_tokens for j in live),
                stopping_criteria=StoppingCriteriaList([RowLimits(live)]),
                streamer=streamer,
                **settings,
            )
        except Exception as err:  # the server keeps serving; these requests get a 500
            log.exception("generation failed for a batch of %d", len(live))
            error = ApiError(
                500,
                f"generation failed: {type(err).__name__}: {err}",
                type="server_error",
                code="generation_failed",
            )
            for job in live:
                job.fail(error)
            return
        tokens = sum(streamer.counts)
        self.stats.batch(len(live), tokens)
        log.info(
            "batch of %d (%s): %d tokens in %.2f s",
            len(live),
            "sampled" if settings.get("do_sample") else "greedy",
            tokens,
            time.perf_counter() - start,
        )
