"""ZeRO-3: the model built already partitioned, so that no rank ever holds the whole LLM.

Everything DeepSpeed-specific about building lives here; the model package knows nothing of it.
With an `HfDeepSpeedConfig` alive, transformers creates the LLM inside `deepspeed.zero.Init`:
each weight is cut into its ranks' shares as its module is constructed. Then:

- a safetensors folder whose names are the model's: each rank reads only the rows of each
  weight that hold its share, and writes them in place (`load_shares`); nothing is gathered;
- any other folder: transformers' ZeRO-3 loading, in which rank 0 alone reads the files and,
  module by module, copies the values into the gathered weights, which DeepSpeed broadcasts and
  cuts back into shares (`GatheredParameters(modifier_rank=0)`);
- a preset LLM (random weights: tests, the demo): drawn once, on rank 0 and on its CPU, exactly
  as a one-process build draws it from the seed, and loaded as above. So it is the same on every
  world size, on CPU or GPU, and the same that `gama-ds export` rebuilds without DeepSpeed.

The audio modules and LoRA are small and built outside `zero.Init` (`deepspeed.initialize`
partitions them); they draw from the same random state on every rank, the state a one-process
build leaves after the LLM. docs/TRAINING.md has the measurements.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os

import torch
import torch.distributed as dist

from ..model.build import build_model
from ..model.llm import DTYPES, build_llm, is_preset
from ..model.weights import parameter_groups

log = logging.getLogger(__name__)


def zero3(ds_config: dict) -> bool:
    return ds_config.get("zero_optimization", {}).get("stage") == 3


def init_dtype(ds_config: dict) -> str:
    """The dtype `zero.Init` gives every parameter it partitions: the engine's precision."""
    if ds_config.get("bf16", {}).get("enabled"):
        return "bfloat16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "float16"
    return "float32"


def build_for_training(cfg, ds_config: dict, compute_dtype=None):
    """(model, keep): the model the engine will train, and an object to hold until
    `deepspeed.initialize` has run (transformers reads the ZeRO-3 config through a weak
    reference to it). Without ZeRO-3 that is the plain build, and `keep` is None."""
    if not zero3(ds_config):
        return build_model(cfg, compute_dtype=compute_dtype), None
    dtype = init_dtype(ds_config)
    if cfg.dtype != dtype:
        # zero.Init casts the LLM to the engine's dtype; the audio modules and LoRA follow it, and
        # the recipe (run.json, and so the export's rebuild) says what the model was built in.
        log.info("model.dtype %s -> %s: ZeRO-3 builds the model in the engine's precision", cfg.dtype, dtype)
        cfg.dtype = dtype
    args = (cfg.llm, cfg.dtype, cfg.attn_implementation, None, compute_dtype)
    with _whole_weights_given_back():
        llm, keep = _build_llm(cfg, ds_config, args)
    model = build_model(cfg, compute_dtype=compute_dtype, llm=llm)
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.dtype != DTYPES[dtype]}
    if wrong:
        name = next(iter(wrong))
        raise RuntimeError(
            f"ZeRO-3 build: {len(wrong)} parameters are not in {dtype}, e.g. {name} ({wrong[name]})"
        )
    return model, keep


def _build_llm(cfg, ds_config: dict, args: tuple):
    """(the LLM, partitioned; the HfDeepSpeedConfig that made it so)."""
    from transformers.integrations import HfDeepSpeedConfig

    if is_preset(cfg.llm):
        weights = _preset_on_rank0(cfg)
        keep = HfDeepSpeedConfig(ds_config)  # transformers' from_config/from_pretrained now use zero.Init
        llm = build_llm(*args, preset_weights=weights)
        del weights
    else:
        files = shard_files(cfg, ds_config)
        keep = HfDeepSpeedConfig(ds_config)
        if files is None:  # transformers' loader: rank 0 reads the files whole
            llm = build_llm(*args)
        else:
            # Created empty under zero.Init; transformers' random init of it (one module at a time,
            # rank 0 drawing) is thrown away, and must not move the state the rest draws from.
            with torch.random.fork_rng(devices=_accelerator()):
                llm = build_llm(*args, load_weights=False)
            load_shares(llm, files)
    return llm, keep


@contextlib.contextmanager
def _whole_weights_given_back():
    """Under zero.Init each weight is allocated whole, broadcast and cut into its share, then
    freed. glibc serves allocations under its mmap threshold from the heap and raises that
    threshold (up to 32 MiB) as large blocks are freed, so those whole weights end up in heap
    memory it never gives back: 1 GiB per rank on a 1B Llama (bench/zero3_memory.py). With
    the threshold held at 1 MiB while building, they are mapped, and unmapped when freed."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        yield
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 1 << 20)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 32 << 20)  # where glibc's own adjustment tops out


def _accelerator() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def shard_files(cfg, ds_config: dict) -> dict[str, str] | None:
    """Weight name -> safetensors file, when every weight of the LLM is a tensor of its folder
    under the same name, so that each rank can read its own shares (`load_shares`); None
    otherwise (other formats, renamed keys, parameters swapped to NVMe, ZeRO++'s hpZ), for
    transformers."""
    folder = cfg.llm
    zero = ds_config.get("zero_optimization", {})
    if zero.get("offload_param", {}).get("device") == "nvme" or zero.get("zero_hpz_partition_size", 1) > 1:
        return None  # swapped-out shares, or ZeRO++'s second copy of each: transformers' loader fills those
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    elif os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            files = dict.fromkeys(f.keys(), single)
    else:
        return None
    with torch.device("meta"):
        llm = build_llm(cfg.llm, cfg.dtype, "sdpa", load_weights=False)
    names = {n for n, _ in llm.named_parameters()}
    persistent = set(llm.state_dict()) - names  # persistent buffers: leave those models to transformers
    if persistent or not names <= set(files):
        return None
    return files


def load_shares(llm, files: dict[str, str]) -> None:
    """Each rank reads, of every weight, the rows that hold its own share and nothing else, and
    writes its share in place: no gathering, nothing broadcast, and the folder read about once
    in all (ZeRO-3's layout: rank r of the partition group holds elements [r*n, (r+1)*n) of the
    flattened weight, n = ceil(elements / ranks), the last share padded)."""
    from safetensors import safe_open

    by_file: dict[str, list] = {}
    for name, p in llm.named_parameters():
        by_file.setdefault(files[name], []).append((name, p))
    with torch.no_grad():
        for file, params in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name, p in params:
                    source = f.get_slice(name)
                    shape = tuple(source.get_shape())
                    if shape != tuple(p.ds_shape):
                        raise ValueError(f"{file}: {name} is {list(shape)}, the model's {list(p.ds_shape)}")
                    share = p.ds_tensor
                    n = share.ds_numel
                    start = n * dist.get_rank(group=p.ds_process_group)
                    end = min(start + n, p.ds_numel)
                    if start >= end:
                        continue
                    row = math.prod(shape[1:])  # elements per index of the first dimension
                    first, last = start // row, -(-end // row)
                    rows = source[first:last].reshape(-1)
                    share.data[: end - start].copy_(rows[start - first * row : end - first * row])


def _preset_on_rank0(cfg) -> dict[str, torch.Tensor]:
    """The preset's seeded weights on rank 0 (names and meta shapes elsewhere); every rank then
    continues from rank 0's random state, as if each had drawn them."""
    if dist.get_rank() == 0:
        weights = build_llm(cfg.llm, cfg.dtype, "sdpa").state_dict()
    else:
        with torch.device("meta"):
            weights = build_llm(cfg.llm, cfg.dtype, "sdpa", load_weights=False).state_dict()
    # A plain dict: transformers' ZeRO-3 loader cannot carry a state_dict()'s `_metadata` over
    # its key renaming (5.23: AttributeError), and a Llama needs none of it.
    weights = dict(weights)
    state = [torch.get_rng_state()]
    dist.broadcast_object_list(state, src=0)
    torch.set_rng_state(state[0])
    return weights


def gathered_for_init(model):
    """Around `load_init`: the whole of every partitioned parameter that `train.init` may write
    (all but the base LLM's), with rank 0's values kept afterwards.

    Every rank loads the same files: the parameters built outside zero.Init (the audio
    modules, LoRA) are whole on every rank and must get the values on each. For partitioned ones,
    `modifier_rank=0` broadcasts rank 0's values before cutting them back into shares, so the
    ranks cannot disagree; with `None` the writes would be dropped. The base LLM is left out: its
    weights came with the build, and gathering it would put the whole LLM on every rank."""
    groups = parameter_groups(model)
    params = [p for n, p in model.named_parameters() if groups[n] != "llm" and hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def gathered_embeddings(model):
    """The LLM's input embeddings whole on every rank for reading (the soft prompt's init rule
    reads rows of it), whether ZeRO-3 built them partitioned or not."""
    weight = model.llm.get_input_embeddings().weight
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
