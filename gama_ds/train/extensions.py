"""DeepSpeed's compiled ops: none built at start for the default recipes; CPU Adam (offload) built
once per node, without ever waiting on a lock whose builder is gone.

DeepSpeed JIT-compiles an op on first use into `TORCH_EXTENSIONS_DIR` through torch's extension
loader, which guards each op's folder with a `lock` file that it creates and deletes itself. A
builder killed in between leaves the file behind, and torch then waits for it forever without a
word. Every gama_ds process therefore builds or loads an op only while holding an flock on
`<dir>/gama_ds-build.lock`, which the kernel releases when its holder dies: whoever holds it is
the only gama_ds process touching the folder, so a torch `lock` found then is stale, and is
removed with a message naming it.

Which ops compile (DeepSpeed 0.19.8): on GPUs, none, now that the optimizer is torch's fused
AdamW (engine.py); with `deepspeed.offload`, CPU Adam (a host op, no nvcc needed); on CPU ranks,
the shared-memory collective (`deepspeed_shm_comm`, about 35 s once per extensions folder), which
`deepspeed.init_distributed` builds for its inference all-reduce. `make` builds it at set-up
(`python -m gama_ds.train.extensions`), so that neither the demo nor the tests pay for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile

log = logging.getLogger("gama_ds.train")

TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton, in each op's build folder
OUR_LOCK = "gama_ds-build.lock"
SHM_COMM = "ShareMemCommBuilder"  # the CPU accelerator's deepspeed_shm_comm


def default_extensions_dir() -> str:
    """Node-local: torch's default (~/.cache/torch_extensions) is a home folder that a cluster's
    nodes share, where every rank of every node would contend for one lock."""
    return os.path.join(tempfile.gettempdir(), f"gama_ds-torch-extensions-{os.getuid()}")


def extensions_dir() -> str:
    """`TORCH_EXTENSIONS_DIR`, set to the node-local default when unset (before DeepSpeed reads it)."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())


def build_comm_op() -> None:
    """Before `deepspeed.init_distributed`: DeepSpeed's CPU accelerator builds its shared-memory
    all-reduce there, through torch's lock alone. Built (or loaded) here first, under our lock,
    DeepSpeed's own `load()` then takes the cached module. GPU accelerators have no such op."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().create_op_builder(SHM_COMM) is not None:
        load_op(SHM_COMM)


@contextlib.contextmanager
def build_lock(root: str):
    """This node's gama_ds builders one at a time; released by the kernel if the holder dies."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, OUR_LOCK), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clear_stale_lock(root: str, op_name: str) -> str | None:
    """Under `build_lock`: remove a torch `lock` left in the op's folder by a builder that died;
    returns its path if there was one."""
    path = os.path.join(root, op_name, TORCH_LOCK)
    if not os.path.exists(path):
        return None
    log.warning(
        "%s: stale torch extension lock (its builder died mid-build; no gama_ds process holds %s): "
        "removed, building %s afresh",
        path,
        os.path.join(root, OUR_LOCK),
        op_name,
    )
    os.remove(path)
    return path


def load_op(builder_name: str):
    """DeepSpeed's op `builder_name` (e.g. "CPUAdamBuilder"), built or loaded under our lock.
    DeepSpeed caches the module, so its own later `load()` (DeepSpeedCPUAdam's) takes this one."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(builder_name)
    root = extensions_dir()
    with build_lock(root):
        clear_stale_lock(root, builder.name)
        return builder.load(verbose=False)


if __name__ == "__main__":
    # `make` set-up: this node's ops for CPU ranks, built once into TORCH_EXTENSIONS_DIR.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_comm_op()
    log.info("DeepSpeed's ops for this node are built in %s", extensions_dir())
