"""The soft prompt's cost: the tokens its sentence adds, and a training step with it against without.

A real LLM and tokenizer (SmolLM2-135M-Instruct, the tests' cached copy; fetched as tests do
when missing) under the tiny recipe's audio modules and LoRA, fp32 on CPU, one thread. The same
16 audio QA pairs, with AudioSet-style tags, are tokenised and trained on twice, side by side:
baseline without `model.soft_prompt`; ours with stage5_soft's settings (1 soft token, top 5 tags
at threshold 0.1, the paper's sentence). Printed: text tokens per example (Collator, as training
counts them) and the median time of a forward + backward + AdamW step over micro-batches of 8,
alternated, with each ratio against the baseline. The sentence is the cost; the soft embedding
itself is one [1, hidden] lookup.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from common import machine  # noqa: E402
from conftest import fetch_real_llm  # noqa: E402

ROUNDS, STEPS = 3, 4
QUESTIONS = [
    ("What sound events can be heard in the audio?", "A dog barks twice while rain falls on a roof."),
    ("Describe the audio in detail.", "A man speaks over music, then a car horn honks in the distance."),
    ("Is there speech in this clip?", "Yes, a woman talks briefly."),
    (
        "What could be the source of the low rumble?",
        "Most likely an idling engine of a large vehicle nearby.",
    ),
]
TAGS = [
    [
        ["Dog", 0.92],
        ["Rain", 0.71],
        ["Rain on surface", 0.44],
        ["Bark", 0.40],
        ["Animal", 0.31],
        ["Music", 0.02],
    ],
    [["Speech", 0.88], ["Music", 0.52], ["Vehicle horn, car horn, honking", 0.33], ["Car", 0.12]],
    [["Speech", 0.95], ["Female speech, woman speaking", 0.61], ["Inside, small room", 0.09]],
    [["Engine", 0.66], ["Vehicle", 0.58], ["Idling", 0.41], ["Truck", 0.22], ["Rumble", 0.18], ["Bus", 0.11]],
]


def examples():
    import numpy as np

    from gama_ds.data.collate import Example

    fbank = np.zeros((1024, 128), dtype=np.float16)
    out = []
    for i in range(16):
        question, answer = QUESTIONS[i % 4]
        out.append(
            Example(
                f"clip{i}", fbank, {"instruction": question, "input": "", "output": answer}, tags=TAGS[i % 4]
            )
        )
    return out


def setup(llm: str, soft: bool):
    import torch

    from gama_ds.config import load_recipe
    from gama_ds.data.collate import Collator
    from gama_ds.data.soft_prompt import init_ids
    from gama_ds.data.tokenizer import load_tokenizer
    from gama_ds.model.build import build_model

    overrides = [f"model.llm={llm}", f"data.tokenizer={llm}"]
    if soft:
        overrides.append("model.soft_prompt={tokens: 1, top_k: 5, threshold: 0.1}")
    recipe = load_recipe("tiny", overrides)
    tokenizer = load_tokenizer(llm)
    torch.manual_seed(0)
    model = build_model(recipe.model)
    if soft:
        model.soft_prompt.init_from(
            model.llm.get_input_embeddings().weight, init_ids(tokenizer, recipe.model.soft_prompt)
        )
    collator = Collator(tokenizer, 176, soft_prompt=recipe.model.soft_prompt)
    keys = ("fbank", "input_ids", "attention_mask", "labels", "has_audio", "hint_mask")
    batches = []
    for start in range(0, 16, 8):
        batch = collator(examples()[start : start + 8])
        batches.append({k: batch[k] for k in keys})
    tokens = statistics.mean(len(collator.example_tokens(e)[0]) for e in examples())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, batches, optimizer, tokens


def step_time(model, batches, optimizer) -> float:
    times = []
    for i in range(STEPS):
        started = time.perf_counter()
        optimizer.zero_grad()
        model(**batches[i % len(batches)]).loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    import torch

    torch.set_num_threads(1)
    llm = fetch_real_llm()
    runs = {name: setup(llm, name == "soft prompt") for name in ("baseline", "soft prompt")}
    times = {name: [] for name in runs}
    for _ in range(ROUNDS):  # alternated, so drift in the machine's load falls on both
        for name, (model, batches, optimizer, _) in runs.items():
            times[name].append(step_time(model, batches, optimizer))
    print(
        f"# soft prompt cost, {machine()}; SmolLM2-135M + tiny audio modules, fp32, 1 thread, micro-batch 8"
    )
    base_tokens, base_time = runs["baseline"][3], statistics.median(times["baseline"])
    print("| | text tokens / example | ratio | step (s) | ratio |")
    print("|---|---|---|---|---|")
    for name, (*_, tokens) in runs.items():
        t = statistics.median(times[name])
        print(f"| {name} | {tokens:.1f} | {tokens / base_tokens:.2f}x | {t:.3f} | {t / base_time:.2f}x |")


if __name__ == "__main__":
    main()
