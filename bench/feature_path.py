"""Feature path: reading shards and padding versus the reference's decode-and-fbank per sample.

Both sides produce the same thing, a float32 [1024, 128] tensor per clip, from the same 10 s
clips, single-threaded as in one DataLoader worker. The reference side is the GAMA collator's
per-sample work (reference/gama.md §1.1): decode the file, resample to 16 kHz when needed,
subtract the mean, Kaldi fbank, pad to 1024 frames, normalise. It reads with soundfile
because torchaudio.load needs FFmpeg, which these machines lack. Goal: at least 25x.
"""

from __future__ import annotations

import os
import sys
import tempfile

import soundfile
import torch
import torchaudio.functional
from torchaudio.compliance import kaldi

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved, machine, write_clips, write_gama_json  # noqa: E402
from gama_ds.audio import pad_features  # noqa: E402
from gama_ds.data.convert import ConvertOptions, convert  # noqa: E402
from gama_ds.data.plan import Ref  # noqa: E402
from gama_ds.data.stream import Reader, StreamConfig, open_sets  # noqa: E402


def reference_item(path: str) -> torch.Tensor:
    data, sr = soundfile.read(path, dtype="float32", always_2d=True)
    waveform = torch.from_numpy(data.T.copy())
    if sr != 16000:
        waveform = torchaudio.functional.resample(waveform, orig_freq=sr, new_freq=16000)
    waveform = waveform - waveform.mean()
    fbank = kaldi.fbank(
        waveform,
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
    fbank = torch.nn.ZeroPad2d((0, 0, 0, max(0, 1024 - fbank.shape[0])))(fbank)[:1024]
    return (fbank + 5.081) / 4.4849


def ours(root: str) -> None:
    """The training stream's path: one pread per sample at its indexed offset, its checksum
    checked against the conversion's, safe decoding, padding."""
    sets = open_sets([(root, 1.0)])
    reader = Reader(sets, StreamConfig(micro_batch=1), epoch=0, keep_clips=0)
    for shard, entry in enumerate(sets[0].shards):
        for sample in range(entry["samples"]):
            pad_features(torch.from_numpy(reader.example(Ref(0, 0, shard, sample, 0)).fbank))
    reader.close()


def reference(clips: list[str]) -> None:
    for path in clips:
        reference_item(path)


def main(n: int = 64, repeats: int = 5) -> None:
    torch.set_num_threads(1)
    print(f"feature path, {n} clips of 10 s, {machine()}, torch threads 1")
    with tempfile.TemporaryDirectory() as tmp:
        for sr, ext in ((16000, "wav"), (44100, "flac")):
            clips = write_clips(os.path.join(tmp, f"a{sr}"), n, sr=sr, ext=ext)
            src = write_gama_json(os.path.join(tmp, f"{sr}.json"), clips, lambda i: 1)
            out = os.path.join(tmp, f"shards{sr}")
            convert([src], out, ConvertOptions(), workers=1, progress=False, log=lambda m: None)
            t = interleaved(
                {"shards": lambda o=out: ours(o), "reference": lambda c=clips: reference(c)}, repeats
            )
            ratio = t["reference"] / t["shards"]
            print(
                f"  {sr} Hz {ext}: shards {n / t['shards']:8.1f} samples/s | reference "
                f"{n / t['reference']:7.1f} samples/s | ratio {ratio:5.1f}x"
            )


if __name__ == "__main__":
    main()
