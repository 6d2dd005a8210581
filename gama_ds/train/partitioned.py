"""ZeRO-3: the model built already partitioned, so that no rank ever holds the whole LLM.

Everything DeepSpeed-specific about building lives here; the model package knows nothing of it.
With an `HfDeepSpeedConfig` alive, transformers creates the LLM inside `deepspeed.zero.Init`
(each parameter is cut into its ranks' shares as its module is constructed) and, for a model
folder, loads the checkpoint module by module: rank 0 alone reads the files, and for each
module the ranks gather its parameters, rank 0 copies the values in, and DeepSpeed broadcasts
them and cuts them back into shares (`GatheredParameters(modifier_rank=0)`). The other ranks
read only the names and shapes.

A preset LLM (random weights: tests, the demo) is drawn once, on rank 0 and on its CPU, exactly
as a one-process build draws it from the seed, and loaded the same way. So it is the same on
every world size, on CPU or GPU, and the same that `gama-ds export` rebuilds without DeepSpeed.

The audio modules and LoRA are small and built outside `zero.Init` (`deepspeed.initialize`
partitions them); they draw from the random state rank 0's LLM build left, on every rank.
"""

from __future__ import annotations

import contextlib
import logging

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
    from transformers.integrations import HfDeepSpeedConfig

    dtype = init_dtype(ds_config)
    if cfg.dtype != dtype:
        # zero.Init casts the LLM to the engine's dtype; the audio modules and LoRA follow it, and
        # the recipe (run.json, and so the export's rebuild) says what the model was built in.
        log.info("model.dtype %s -> %s: ZeRO-3 builds the model in the engine's precision", cfg.dtype, dtype)
        cfg.dtype = dtype
    preset_weights = _preset_on_rank0(cfg) if is_preset(cfg.llm) else None
    keep = HfDeepSpeedConfig(ds_config)  # transformers' from_config/from_pretrained now use zero.Init
    model = build_model(cfg, compute_dtype=compute_dtype, preset_weights=preset_weights)
    del preset_weights
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.dtype != DTYPES[dtype]}
    if wrong:
        name = next(iter(wrong))
        raise RuntimeError(
            f"ZeRO-3 build: {len(wrong)} parameters are not in {dtype}, e.g. {name} ({wrong[name]})"
        )
    return model, keep


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
