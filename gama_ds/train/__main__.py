"""`python -m gama_ds.train RECIPE [key=value...] [--resume auto]`, for `deepspeed`, `torchrun`
and Slurm's srun (launch/slurm/rank.sh)."""

import sys

from ..signals import listen_for_stop

listen_for_stop()  # before the heavy imports: a stop signal while they load is kept, not fatal

from ..cli import main  # noqa: E402

# The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
raise SystemExit(main(["train", *[a for a in sys.argv[1:] if not a.startswith("--local_rank")]]))
