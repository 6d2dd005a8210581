"""Storage: bytes per QA pair, one sample per clip versus one sample per QA pair.

OpenAQA has 6.32M QA pairs over 1.67M clips, 3.8 per clip (reference/gama.md §3.4). Both
layouts are written as real shards from the same 10 s clips and QA text: ours by `gama-ds
convert`, the per-QA layout by repeating each clip's features in every QA's sample. The
reference's own cache option, padded float32 [1024, 128] per QA, is printed for scale.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import webdataset as wds

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_clips, write_gama_json  # noqa: E402
from gama_ds.data.convert import ConvertOptions, convert  # noqa: E402
from gama_ds.data.shards import encode_sample, iter_samples, read_index  # noqa: E402

PATTERN = (4, 4, 4, 4, 4, 4, 4, 4, 3, 3)  # 3.8 QA pairs per clip


def main(n: int = 100) -> None:
    print(f"storage, {n} clips of 10 s, {sum(PATTERN) / len(PATTERN):.1f} QA pairs per clip, {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        clips = write_clips(os.path.join(tmp, "audio"), n)
        src = write_gama_json(os.path.join(tmp, "in.json"), clips, lambda i: PATTERN[i % len(PATTERN)])
        out = os.path.join(tmp, "per_clip")
        convert([src], out, ConvertOptions(), workers=1, progress=False, log=lambda m: None)
        index = read_index(out)
        qa = index["totals"]["qa_pairs"]
        per_clip = index["totals"]["bytes"]

        per_qa_path = os.path.join(tmp, "per_qa.tar")
        with open(per_qa_path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as writer:
            for entry in index["shards"]:
                for sample in iter_samples(os.path.join(out, entry["file"])):
                    for j, pair in enumerate(sample.meta["qa"]):
                        meta = {**sample.meta, "qa": [pair]}
                        writer.write({"__key__": f"{sample.key}_{j}", **encode_sample(sample.fbank, meta)})
        per_qa = os.path.getsize(per_qa_path)
        padded_fp32 = 1024 * 128 * 4

        print(f"  one sample per clip : {per_clip / qa / 1024:7.1f} KiB per QA pair")
        print(f"  one sample per QA   : {per_qa / qa / 1024:7.1f} KiB per QA pair")
        print(f"  padded fp32 per QA  : {padded_fp32 / 1024:7.1f} KiB per QA pair (features only)")
        print(
            f"  ratio per-QA / per-clip: {per_qa / per_clip:.2f}x; padded fp32 / per-clip: "
            f"{padded_fp32 * qa / per_clip:.2f}x"
        )
        print("  " + json.dumps({"qa_pairs": qa, "per_clip_bytes": per_clip, "per_qa_bytes": per_qa}))


if __name__ == "__main__":
    main()
