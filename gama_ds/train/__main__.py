"""`python -m gama_ds.train RECIPE [key=value...] [--resume auto]`, for `deepspeed` and `torchrun`."""

import sys

from ..cli import main

# The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
raise SystemExit(main(["train", *[a for a in sys.argv[1:] if not a.startswith("--local_rank")]]))
