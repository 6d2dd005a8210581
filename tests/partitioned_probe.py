"""One rank of tests/test_train.py, started by torchrun: builds a run's model as its training
did (ZeRO-3, partitioned), reports what this rank holds, and writes the whole weights, gathered.

usage: partitioned_probe.py RUN_DIR OUT_DIR BUILD...   (fp32 | bf16 | fp32+llm | bf16+llm, one build each)
A build named +llm uses the LLM folder PROBE_LLM (in the environment) instead of the run's LLM.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch


def base_name(name: str) -> str:
    """peft's name of a base LLM weight -> the LLM's own (as in its saved folder)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def main(run_dir: str, out: str, builds: list[str]) -> None:
    import deepspeed
    from safetensors.torch import save_file

    from gama_ds.config import Recipe, from_dict
    from gama_ds.model.weights import parameter_groups
    from gama_ds.train.distributed import seed_everything
    from gama_ds.train.partitioned import build_for_training

    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    report = {}
    for build in builds:
        precision, own_llm = build.removesuffix("+llm"), build.endswith("+llm")
        recipe = from_dict(Recipe, run["recipe"])
        if own_llm:
            recipe.model.llm = os.environ["PROBE_LLM"]
        ds_config = copy.deepcopy(run["deepspeed_config"])
        ds_config["bf16"]["enabled"] = precision == "bf16"
        seed_everything(recipe.train.seed)
        model, keep = build_for_training(recipe.model, ds_config)
        groups = parameter_groups(model)
        llm = {n: p for n, p in model.named_parameters() if groups[n] == "llm"}
        rest = {n: p for n, p in model.named_parameters() if groups[n] != "llm"}
        report[build] = {
            "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "llm_partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in llm.values()),
            "llm_elements_held": sum(p.ds_tensor.numel() for p in llm.values()),
            "llm_elements": sum(p.ds_numel for p in llm.values()),
            "rest_partitioned": any(hasattr(p, "ds_id") for p in rest.values()),
            "model_dtype": recipe.model.dtype,
        }
        whole = {}
        for name, p in llm.items():
            with deepspeed.zero.GatheredParameters([p]):
                whole[base_name(name.removeprefix("llm."))] = p.detach().clone()
        whole.update({n: p.detach().clone() for n, p in rest.items()})
        save_file(whole, os.path.join(out, f"{build}-rank{rank}.safetensors"))
        del model, keep
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"world": world, **report}, f)
    # Ended explicitly: left to interpreter exit, gloo's threads once aborted a rank there
    # ("terminate called without an active exception") after all of the above was written.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
