"""A base LLM's folder on disk: which files are its weights, how big they are, and a fingerprint
that tells two folders of the same model from two different ones without reading the weights.

The fingerprint is sha256 over what names the model, not over its values: config.json (parsed,
without the `transformers_version` a re-save rewrites) and, per weight file, its name and its
safetensors header (every tensor's name, dtype, shape and byte range) or, for other formats
(.bin, .pt), its size in bytes; the shard index files as they are. It reads kilobytes, not the
14 GB of a 7B model: it catches another model, another size, another dtype, other shards, a
re-trained model saved at other offsets; it does not catch values changed in place with the same
layout (fine-tuned weights written over the same files).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEX_SUFFIX = ".index.json"


def weight_files(folder: str) -> list[str]:
    """The weight files and shard indexes at the folder's top level, sorted."""
    names = sorted(os.listdir(folder))
    return [n for n in names if n.endswith(WEIGHT_SUFFIXES) or n.endswith(INDEX_SUFFIX)]


def weights_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in weight_files(folder))


def _safetensors_header(path: str) -> bytes:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return f.read(length)


def fingerprint(folder: str) -> dict:
    """{"config": sha256, "weights": sha256, "files": count} of an HF model folder."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.pop("transformers_version", None)
    weights = hashlib.sha256()
    files = weight_files(folder)
    for name in files:
        path = os.path.join(folder, name)
        weights.update(name.encode() + b"\0")
        if name.endswith(INDEX_SUFFIX):
            with open(path, "rb") as f:
                weights.update(f.read())
        elif name.endswith(".safetensors"):
            weights.update(_safetensors_header(path))
        else:
            weights.update(str(os.path.getsize(path)).encode())
        weights.update(b"\0")
    return {
        "config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "weights": weights.hexdigest(),
        "files": len(files),
    }


def copy_llm(src: str, dst: str) -> None:
    """The folder's files (not its hidden ones: .git, caches) into a fresh `dst`."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
