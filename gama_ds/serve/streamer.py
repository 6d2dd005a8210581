"""Streaming and stopping per row of one batched `generate` call.

transformers' TextIteratorStreamer follows a batch of one; here every row is its own request,
with its own token limit and its own listener, so each row's text is released as its tokens
arrive and each row stops on EOS or its own `max_tokens` (the batch runs to the longest).
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

REPLACEMENT = "\ufffd"  # what a token that ends inside a UTF-8 character decodes to, for now


class RowText:
    """One answer's tokens -> text, released only once it cannot change.

    The answer is the decoded text stripped of surrounding white space, as `gama_ds.infer.generate`
    returns it, so trailing white space, and a character whose bytes have not all arrived, wait
    for the next token; the pieces released always add up to the final answer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self._text()
        if text.endswith(REPLACEMENT) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def finish(self) -> tuple[str, str]:
        """(the whole answer, what of it was not yet released)"""
        text = self._text()
        piece = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent = text
        return text, piece


class BatchStreamer(BaseStreamer):
    """Hands each row's new text to its job (`job.delta(text)`, `job.finish(text, reason, n)`)
    as `generate` produces it; rows past EOS or their limit get nothing more."""

    def __init__(self, tokenizer, jobs: list, eos_token_id: int):
        self.jobs = jobs
        self.rows = [RowText(tokenizer) for _ in jobs]
        self.counts = [0] * len(jobs)
        self.done = [False] * len(jobs)
        self.eos = eos_token_id
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt ([B, 0] with embeddings)
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            self.counts[i] += 1
            if token == self.eos:
                self._finish(i, "stop")
                continue
            piece = self.rows[i].add(token)
            if piece:
                self.jobs[i].delta(piece)
            if self.counts[i] >= self.jobs[i].max_tokens:
                self._finish(i, "length")
            elif self.jobs[i].cancelled:
                self._finish(i, "cancelled")

    def end(self) -> None:
        for i in range(len(self.jobs)):
            if not self.done[i]:
                self._finish(i, "length")

    def _finish(self, i: int, reason: str) -> None:
        self.done[i] = True
        text, piece = self.rows[i].finish()
        if piece:
            self.jobs[i].delta(piece)
        self.jobs[i].finish(text, reason, self.counts[i])


class RowLimits(StoppingCriteria):
    """Stops each row at its own token limit, or once its client has gone."""

    def __init__(self, jobs: list):
        self.jobs = jobs

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        # With prompt embeddings, generate()'s input_ids hold the new tokens only.
        n = input_ids.shape[1]
        stop = [n >= job.max_tokens or job.cancelled for job in self.jobs]
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)
