"""Host memory of building the model on 2 ranks: ZeRO-2 (every rank builds it whole) versus
ZeRO-3 (built partitioned, gama_ds/train/partitioned.py), side by side.

The bench writes a ~1B-parameter Llama-shaped HF folder with random fp16 weights (safetensors,
two shards; fp16 as Llama-2-7b(-chat)-hf ships), then starts 2 CPU ranks (torchrun, gloo) once
per stage. Each rank builds the GAMA model as training does (`build_for_training`: the LLM from
the folder, the tiny recipe's audio modules and LoRA, bf16 as on GPUs), reads every LLM weight
it holds once (as the first forward pass does: safetensors are memory-mapped, and a page counts
as resident only once read), and reports its own peak resident memory (`ru_maxrss`, which
counts the file's pages it has read too) and, at the end, its proportional (PSS: file pages
shared between ranks split between them) and anonymous memory. Goal: ZeRO-3's peak at most 0.6x
ZeRO-2's, on the rank that holds the most.

    python bench/zero3_memory.py [--layers 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 2048, 5504, 16, 32000


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def smaps() -> dict[str, float]:
    """Now, in MiB: resident, proportional (shared file pages split between their users) and
    anonymous (this process's own) memory."""
    fields = {"Rss:": "rss_mib", "Pss:": "pss_mib", "Anonymous:": "anon_mib"}
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, value, *_ = line.split()
            if key in fields:
                out[fields[key]] = int(value) / 1024
    return out


def write_folder(path: str, layers: int) -> int:
    """A Llama-shaped folder of random fp16 weights (two safetensors shards)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, tie_word_embeddings=False, dtype="float16",
    )  # fmt: skip
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    index = {"metadata": {}, "weight_map": {}}
    # Random values, a block of 2^20 repeated: drawing a billion would take the bench minutes.
    block = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.float16)

    def random(shape) -> torch.Tensor:
        n = shape.numel()
        return block.repeat(-(-n // block.numel()))[:n].reshape(shape).clone()

    for i, part in enumerate(halves):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        tensors = {k: random(shapes[k]) for k in part}
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(part, file))
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return sum(s.numel() for s in shapes.values())


def rank_main(folder: str, stage: int, out: str) -> None:
    """One rank: build the model as training does, report the peak resident memory."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from gama_ds.config import load_recipe
    from gama_ds.train.loop import seed_everything
    from gama_ds.train.partitioned import build_for_training

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    cfg = load_recipe("tiny").model
    cfg.llm, cfg.dtype = folder, "bfloat16"
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": dist.get_world_size(),
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    }
    seed_everything(0)
    before = peak_mib()
    start = time.perf_counter()
    model, keep = build_for_training(cfg, ds_config)
    seconds = time.perf_counter() - start
    built = peak_mib()
    held = 0
    with torch.no_grad():  # read every weight this rank holds once, as the first forward pass will
        for p in model.llm.parameters():
            mine = p.ds_tensor if hasattr(p, "ds_tensor") else p
            held += mine.numel()
            mine.sum()
    dist.barrier()
    report = {
        "rank": rank, "before_mib": before, "built_mib": built, "peak_mib": peak_mib(), "seconds": seconds,
        "held": held, **smaps(),
    }  # fmt: skip
    with open(os.path.join(out, f"zero{stage}-rank{rank}.json"), "w") as f:
        json.dump(report, f)
    del model, keep
    dist.destroy_process_group()


def run_stage(folder: str, stage: int, out: str, port: int) -> list[dict]:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), os.path.abspath(__file__)]
    cmd += ["--rank-of", folder, "--stage", str(stage), "--out", out]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"ZeRO-{stage} ranks failed:\n{done.stderr[-4000:]}")
    return [json.load(open(os.path.join(out, f"zero{stage}-rank{r}.json"))) for r in (0, 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--keep", help="write the folder here and keep it (default: a temporary folder)")
    ap.add_argument("--rank-of", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_of:
        return rank_main(args.rank_of, args.stage, args.out)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or os.path.join(tmp, "llama")
        start = time.perf_counter()
        n = write_folder(folder, args.layers)
        print(f"{n / 1e9:.2f}B-parameter Llama ({args.layers} layers, fp16: {2 * n / 2**30:.2f} GiB) "
              f"written in {time.perf_counter() - start:.0f} s; {machine()}")  # fmt: skip
        results = {stage: run_stage(folder, stage, tmp, 29850 + stage) for stage in (2, 3)}
    header = ("stage", "rank", "peak RSS: before build", "after build", "after reading its weights")
    header += ("now: PSS", "now: anonymous", "LLM elements held", "build s")
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stage, ranks in results.items():
        for r in ranks:
            print(f"| ZeRO-{stage} | {r['rank']} | {r['before_mib']:.0f} MiB | {r['built_mib']:.0f} MiB | "
                  f"{r['peak_mib']:.0f} MiB | {r['pss_mib']:.0f} MiB | {r['anon_mib']:.0f} MiB | "
                  f"{r['held'] / 1e6:.0f} M | {r['seconds']:.1f} |")  # fmt: skip
    worst = {stage: max(r["peak_mib"] for r in ranks) for stage, ranks in results.items()}
    per_rank = [b["peak_mib"] / a["peak_mib"] for a, b in zip(results[2], results[3], strict=True)]
    print(f"ZeRO-3 / ZeRO-2 peak, rank that holds the most: {worst[3] / worst[2]:.2f}x (goal: at most 0.6x); "
          f"per rank: {', '.join(f'{x:.2f}x' for x in per_rank)}")  # fmt: skip


if __name__ == "__main__":
    main()
