"""The serve command's settings, checked as a whole before anything heavy happens."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..errors import UsageError

API_KEY_ENV = "GAMA_DS_API_KEY"


@dataclass
class ServeOptions:
    model: str
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str | None = None  # None: gama_ds.placement's defaults (the GPU, bf16 where it has it)
    dtype: str | None = None
    llm: str | None = None  # the export's base LLM from this folder (a moved or copied one)
    tagger: str | None = None  # a soft-prompt export's tagger from this folder (a moved or copied one)
    max_batch: int = 8
    batch_wait_ms: float = 20.0
    max_audio_s: float = 30.0
    max_request_mb: float = 25.0
    api_key: str | None = None

    def check(self):
        """Every number and name a user gave, before the model loads (minutes for a 7B export);
        returns the (torch.device, torch.dtype) to load it on."""
        from ..exported import is_export
        from ..placement import choose_device, choose_dtype

        if not is_export(self.model):
            raise UsageError(
                f"--model {self.model} is not a gama-ds export (made by `gama-ds export RUN --out DIR`)"
            )
        if not 1 <= self.port <= 65535:
            raise UsageError(f"--port must be within 1..65535, got {self.port}")
        if self.max_batch < 1:
            raise UsageError(f"--max-batch must be at least 1, got {self.max_batch}")
        for flag, value in (
            ("--batch-wait-ms", self.batch_wait_ms),
            ("--max-audio-s", self.max_audio_s),
            ("--max-request-mb", self.max_request_mb),
        ):
            if not math.isfinite(value) or value < 0 or (value == 0 and flag != "--batch-wait-ms"):
                low = "at least 0" if flag == "--batch-wait-ms" else "above 0"
                raise UsageError(f"{flag} must be a finite number {low}, got {value}")
        if self.batch_wait_ms > 10_000:
            raise UsageError(
                f"--batch-wait-ms {self.batch_wait_ms} would hold every request over 10 s; give at most 10000"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key is empty; give a key or leave the option out")
        if self.model_name is not None and not self.model_name.strip():
            raise UsageError("--model-name is empty")
        if self.llm is not None and not os.path.isdir(self.llm):
            raise UsageError(f"--llm {self.llm} is not a folder (the export's base LLM, moved or copied)")
        if self.tagger is not None and not os.path.isdir(self.tagger):
            raise UsageError(f"--tagger {self.tagger} is not a folder (the export's tagger, moved or copied)")
        device = choose_device(self.device)
        return device, choose_dtype(self.dtype, device)

    @property
    def name(self) -> str:
        """The model id clients send and /v1/models lists: --model-name, else the export folder's name."""
        return self.model_name or os.path.basename(os.path.normpath(os.path.abspath(self.model)))

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1_000_000)
