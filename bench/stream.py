"""Training input: the shard stream + collator versus the reference-style loader, and bucketing.

Same clips, same QA pairs, same tokenizer, same micro-batch, 2 DataLoader workers each, in
this one script. Ours: `StreamLoader` over shards (safe decode, pad, tokenise, bucket). The
reference's way (GAMA's collator): a map-style dataset of JSON records whose collate function
decodes each audio file, resamples, computes the fbank, pads and tokenises. The QA lengths
follow OpenAQA's mix: 40% closed questions with answers of a few words, 60% open questions
with answers of 20-60 words (reference/gama.md §3.4).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feature_path import reference_item  # noqa: E402

from common import machine, write_clips  # noqa: E402
from gama_ds.data.collate import Collator, Example  # noqa: E402
from gama_ds.data.convert import ConvertOptions, convert  # noqa: E402
from gama_ds.data.stream import StreamConfig, StreamLoader, TrainStream, open_sets  # noqa: E402
from gama_ds.data.tokenizer import byte_tokenizer  # noqa: E402

WORDS = "the a dog barks loudly while rain falls on metal roof and cars pass by in distance".split()
MICRO = 8
GLOBAL = 64  # bucketing sorts runs of micro-batches inside a global batch


def qa_records(clips: list[str], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for path in clips:
        for _ in range(4):
            closed = rng.random() < 0.4
            words = rng.integers(1, 5) if closed else rng.integers(20, 61)
            answer = " ".join(rng.choice(WORDS, words))
            question = "What is the sound?" if closed else "Describe the scene and explain what is happening."
            rows.append({"audio_id": path, "instruction": question, "input": "", "output": answer})
    return rows


class ReferenceStyle(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class ReferenceCollate:
    """Decode and featurise inside the collator, per sample, as the reference does."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        examples = [Example(str(i), None, r) for i, r in enumerate(rows)]
        batch = self.collator(examples, with_audio=False)
        batch["fbank"] = torch.stack([reference_item(r["audio_id"]) for r in rows])
        return batch


def timed(loader) -> tuple[int, float, float]:
    start = time.perf_counter()
    first = None
    n = 0
    for _ in loader:
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return n, end - start, (n - 1) / (end - first)


def main(n_clips: int = 96, repeats: int = 2) -> None:
    print(f"training input, {n_clips} clips of 10 s (44.1 kHz flac) x 4 QA, micro-batch {MICRO}, 2 workers")
    print(f"  {machine()}")
    collator = Collator(byte_tokenizer(), cutoff_len=108)
    with tempfile.TemporaryDirectory() as tmp:
        clips = write_clips(os.path.join(tmp, "audio"), n_clips, sr=44100, ext="flac")
        rows = qa_records(clips)
        src = os.path.join(tmp, "in.json")
        json.dump(rows, open(src, "w"))
        out = os.path.join(tmp, "shards")
        convert([src], out, ConvertOptions(shard_samples=8), workers=1, progress=False, log=lambda m: None)
        sets = open_sets([(out, 1.0)])

        results = {"shards": [], "reference": []}
        for _ in range(repeats):
            stream = TrainStream(
                sets, StreamConfig(micro_batch=MICRO, global_batch=GLOBAL), collator, 0, 1, 2
            )
            results["shards"].append(timed(StreamLoader(stream)))
            ref = DataLoader(
                ReferenceStyle(rows),
                batch_size=MICRO,
                shuffle=True,
                num_workers=2,
                collate_fn=ReferenceCollate(collator),
                multiprocessing_context="forkserver",
                generator=torch.Generator().manual_seed(0),
            )
            results["reference"].append(timed(ref))
        for name, runs in results.items():
            overall = statistics.median(n / t for n, t, _ in runs)
            steady = statistics.median(s for _, _, s in runs)
            print(f"  {name:9}: {overall:7.2f} batches/s overall, {steady:7.2f} after the first batch")
        ratio = statistics.median(s for *_, s in results["shards"]) / statistics.median(
            s for *_, s in results["reference"]
        )
        print(f"  ratio shards / reference after the first batch: {ratio:.1f}x")

        for bucket in (1, 8):
            stream = TrainStream(
                sets,
                StreamConfig(micro_batch=MICRO, global_batch=GLOBAL, bucket_batches=bucket),
                collator,
                0,
                1,
                0,
            )
            pads = [float(b["pad_fraction"]) for b in StreamLoader(stream)]
            print(f"  padded text-token fraction, bucket_batches={bucket}: {statistics.mean(pads):.3f}")


if __name__ == "__main__":
    main()
