"""`gama-ds serve`: check the options, load the export, serve until stopped."""

from __future__ import annotations

import logging
import os
import sys

from .options import ServeOptions


def sampling_defaults(info: dict) -> dict:
    """The export's own sampling settings when it records them, else the reference's (infer.py)."""
    from ..infer import REFERENCE_SAMPLING

    return dict(info.get("sampling") or REFERENCE_SAMPLING)


def serve(options: ServeOptions) -> int:
    import uvicorn

    from ..exported import INFO, load_export
    from .app import build_app
    from .batcher import Batcher

    options.check()
    model, tokenizer, info = load_export(options.model)
    batcher = Batcher(model, tokenizer, info["prompt"]["template"], options.max_batch, options.batch_wait_ms)
    max_positions = int(getattr(model.llm.config, "max_position_embeddings", 0) or 1 << 20)
    created = int(os.path.getmtime(os.path.join(options.model, INFO)))
    app = build_app(options, batcher, sampling_defaults(info), max_positions, created)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s", stream=sys.stderr)
    print(
        f"gama-ds serve: {options.model} as {options.name!r} on http://{options.host}:{options.port}/ "
        f"(max batch {options.max_batch}, wait {options.batch_wait_ms:g} ms"
        f"{', API key required' if options.api_key else ''})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=options.host, port=options.port, log_level="info")
    return 0
