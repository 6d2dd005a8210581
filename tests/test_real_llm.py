"""Export and reload on a real pretrained Llama-class model (SmolLM2-135M-Instruct, conftest's
`real_llm`), where tiny random models prove only shapes: its LoRA target names, its tokenizer's
pad and eos, a base LLM copied into the export, and an adapter that stock PEFT loads onto it."""

from __future__ import annotations

import json

import torch

from gama_ds.config import load_recipe
from gama_ds.exported import load_export
from gama_ds.infer import generate
from gama_ds.model.build import build_model
from gama_ds.model.llm_folder import fingerprint
from gama_ds.train.export import write_export


def test_an_export_on_a_real_llama_reloads_in_stock_peft_and_still_answers(real_llm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = load_recipe("tiny", [f"model.llm={real_llm}", f"data.tokenizer={real_llm}"])
    model = build_model(recipe.model).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter is not the identity that peft starts from
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    out = tmp_path / "export"
    info = write_export(model, recipe, str(out), source={"test": "real llm"})
    # 270 MB of weights: small enough to travel inside the export, and the same model as the original.
    assert info["base_llm"]["inside"] and info["base_llm"]["fingerprint"] == fingerprint(real_llm)

    adapter = json.load(open(out / "adapter" / "adapter_config.json"))
    assert adapter["base_model_name_or_path"] == str(out / "llm")
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    base = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"], dtype=torch.float32)
    stock = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])  # any real token ids of its vocabulary
    with torch.no_grad():
        reloaded = stock(input_ids=ids).logits
        torch.testing.assert_close(reloaded, model.llm(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        with stock.disable_adapter():
            assert (stock(input_ids=ids).logits - reloaded).abs().max() > 1e-4  # the adapter acts

    exported, tokenizer, _ = load_export(str(out), device="cpu", dtype="bf16")
    assert tokenizer.pad_token is not None and tokenizer.eos_token == "<|im_end|>"
    question = {"instruction": "What is the capital of France?", "input": ""}  # text only: no audio
    (answer,) = generate(exported, tokenizer, [None], [question], max_new_tokens=8, do_sample=False)
    assert "Paris" in answer, answer
