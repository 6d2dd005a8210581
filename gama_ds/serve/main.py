"""`gama-ds serve`: check the options, load the export, serve until stopped."""

from __future__ import annotations

import json
import logging
import os
import sys

from .options import ServeOptions


def serve(options: ServeOptions) -> int:
    import uvicorn

    from ..data.collate import ensure_pad_token
    from ..exported import INFO, export_tagger, load_export, soft_prompt_settings
    from ..infer import export_generation
    from .app import build_app
    from .batcher import Batcher

    device, dtype = options.check()
    info_path = os.path.join(options.model, INFO)
    with open(info_path, encoding="utf-8") as f:
        # The export's sampling settings (`gama-ds import` writes the reference's), else the
        # reference's: checked, as the options are, before the model loads.
        sampling = export_generation(recorded := json.load(f), info_path)
    max_new_tokens = sampling.pop("max_new_tokens")
    soft = soft_prompt_settings(recorded)
    # With a soft prompt, each clip's tags come from the tagger its training clips were tagged by
    # (loaded first: a moved or wrong one is named before the model loads, minutes for a 7B one).
    tagger = export_tagger(options.model, recorded, options.tagger, device)
    model, tokenizer, info = load_export(options.model, device, dtype, llm=options.llm)
    ensure_pad_token(tokenizer)  # a Llama tokenizer has none; padding is masked
    template = info["prompt"]["template"]
    batcher = Batcher(model, tokenizer, template, options.max_batch, options.batch_wait_ms, soft, tagger)
    max_positions = int(getattr(model.llm.config, "max_position_embeddings", 0) or 1 << 20)
    created = int(os.path.getmtime(info_path))
    app = build_app(options, batcher, sampling, max_new_tokens, max_positions, created)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s", stream=sys.stderr)
    print(
        f"gama-ds serve: {options.model} as {options.name!r} on http://{options.host}:{options.port}/ "
        f"({device}, {str(dtype).removeprefix('torch.')}, max batch {options.max_batch}, "
        f"wait {options.batch_wait_ms:g} ms"
        f"{', API key required' if options.api_key else ''})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=options.host, port=options.port, log_level="info")
    return 0
