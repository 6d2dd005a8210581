"""What a GPU node needs and a CPU can show: nothing compiled at start but the CPU collective, a
stale extension lock never waited on, checkpoints durable before they count, the MFU peak from
exact device names, flash-attn only with a CUDA extension that loads."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import synth_shards, train_env
from gama_ds.model.llm import flash_extension_loads
from gama_ds.train.checkpoint import COMPLETE, _own_step_tensors, complete_tags
from gama_ds.train.extensions import OUR_LOCK, TORCH_LOCK
from gama_ds.train.metrics import PEAK_ENV, peak_flops


def free_port() -> str:
    # Other test runs share this machine: a plain process's default 29500 may be taken.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# torch builds every extension with ninja (and CUDA sources with nvcc), in the op's own folder;
# it runs ninja on every load too, a no-op when the op is built. `ninja --version` and a compiler
# run on its own are capability probes (DeepSpeed 0.19.0 test-compiles a test.c for async_io at
# import), not builds.
COMPILERS = re.compile(r'^(\d+) +execve\("[^"]*/(nvcc|ninja)", (?!\["ninja", "--version"\]).*= 0$')
CHDIR = re.compile(r'^(\d+) +chdir\("([^"]*)"\) += 0$')
CPU_ONLY_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU collective (extensions.py); no GPU node builds it


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """One tiny ZeRO-2 run (the default recipes' stage) from a fresh TORCH_EXTENSIONS_DIR, every
    process traced by strace for program starts, folder changes, fsyncs and renames. The fresh
    folder holds only the CPU ranks' collective, copied from the checkout's when `make` built it
    there (a 35 s build otherwise)."""
    if shutil.which("strace") is None:
        pytest.fail("strace is needed to watch the run's system calls (apt-get install strace)")
    tmp = tmp_path_factory.mktemp("gpuready")
    synth_shards(tmp, clips=8, test_clips=4, seed=3)
    ext = tmp / "extensions"
    built = os.path.join(train_env()["TORCH_EXTENSIONS_DIR"], CPU_ONLY_OP)
    if os.path.exists(os.path.join(built, CPU_ONLY_OP + ".so")):
        shutil.copytree(built, ext / CPU_ONLY_OP)
    out = tmp / "run"
    trace = tmp / "strace.log"
    env = dict(train_env(), TORCH_EXTENSIONS_DIR=str(ext), MASTER_PORT=free_port())
    cmd = [
        "strace", "-f", "--seccomp-bpf", "-qq", "-y", "-s", "300", "-o", str(trace),
        "-e", "trace=execve,chdir,fsync,fdatasync,rename,renameat,renameat2",
        sys.executable, "-m", "gama_ds", "train", "tiny",
        f"data.train=[{{path: {tmp / 'train'}}}]",
        f"train.output_dir={out}",
        "train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.keep=5",
        "train.global_batch_size=4", "data.num_workers=0",
        "logging.tensorboard=false", "logging.plot=false",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return {"ext": ext, "ckpt": out / "checkpoints", "trace": trace.read_text().splitlines()}


def test_a_run_from_a_fresh_extensions_dir_compiles_nothing_but_the_cpu_collective(traced):
    """On a GPU node no op compiles at start; on CPU ranks only DeepSpeed's CPU collective may."""
    cwd: dict[str, str] = {}  # pid -> folder of its last chdir
    compiled = []
    for line in traced["trace"]:
        if m := CHDIR.search(line):
            cwd[m.group(1)] = m.group(2)
        elif m := COMPILERS.search(line):
            compiled.append((cwd.get(m.group(1), "?"), line))
    assert compiled, "torch runs ninja on each load of an op: the CPU collective was not loaded"
    elsewhere = [line for folder, line in compiled if os.path.basename(folder) != CPU_ONLY_OP]
    assert not elsewhere, elsewhere[:5]
    assert sorted(p.name for p in traced["ext"].iterdir()) == [CPU_ONLY_OP, OUR_LOCK]


def test_complete_is_written_only_after_every_file_and_folder_is_durable(traced):
    ckpt = traced["ckpt"]
    assert complete_tags(str(ckpt)) == ["step-00000001", "step-00000002"]
    events = []  # (index, kind, path) in the order the kernel saw them
    for i, line in enumerate(traced["trace"]):
        if m := re.search(r"\bf(?:data)?sync\(\d+<([^>]*)>\)\s*=\s*0", line):
            events.append((i, "fsync", m.group(1)))
        elif m := re.search(r'rename(?:at2?)?\(.*"[^"]*COMPLETE\.tmp".*"([^"]*COMPLETE)".*= 0$', line):
            events.append((i, "rename", m.group(1)))
    for tag in ("step-00000001", "step-00000002"):
        folder = str(ckpt / tag)
        marker = os.path.join(folder, COMPLETE)
        renamed = [i for i, kind, path in events if kind == "rename" and path == marker]
        assert len(renamed) == 1, events
        synced = {path: i for i, kind, path in events if kind == "fsync"}  # the last fsync of each
        first_sync = {}
        for i, kind, path in events:
            if kind == "fsync":
                first_sync.setdefault(path, i)
        files = [os.path.join(folder, n) for n in os.listdir(folder) if n != COMPLETE]
        assert len(files) >= 3, files  # DeepSpeed's model and optimizer states, the RNG state
        for path in files:
            assert first_sync.get(path, renamed[0]) < renamed[0], f"{path} not fsynced before {COMPLETE}"
        assert first_sync.get(folder, renamed[0]) < renamed[0], "the tag folder's entries before COMPLETE"
        assert first_sync.get(str(ckpt), renamed[0]) < renamed[0], "the tag's own entry before COMPLETE"
        assert first_sync.get(marker + ".tmp", renamed[0]) < renamed[0], "the marker's own data"
        assert synced[folder] > renamed[0], "the folder fsynced after the marker's rename"


def run_load_op(ext, env_extra=None, timeout=120):
    code = (
        "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from gama_ds.train.extensions import load_op\n"
        "load_op('CPUAdamBuilder')\n"
    )
    env = dict(train_env(), TORCH_EXTENSIONS_DIR=str(ext), **(env_extra or {}))
    cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_stale_torch_extension_lock_is_reported_and_removed_not_waited_on(tmp_path):
    """A builder killed mid-build leaves torch's `lock` in the op's folder; torch alone would
    wait on it forever. Here the build itself fails at once (CXX=false, no 50 s compile): what
    counts is that it starts, past the lock, and that the message names the file."""
    ext = tmp_path / "ext"
    lock = ext / "cpu_adam" / TORCH_LOCK
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    done = run_load_op(ext, {"CXX": "false"})
    said = done.stdout + done.stderr
    assert f"{lock}: stale torch extension lock" in said, said[-3000:]
    # torch's builder started, past the lock, and failed on the compiler (torch 2.11 asks it for
    # `--version`, torch 2.6 for `-v`)
    assert "CalledProcessError: Command '['false', '-" in said, said[-3000:]
    assert not lock.exists()  # torch released its own lock after the failed build
    assert (ext / OUR_LOCK).exists()


def test_an_unset_extensions_dir_defaults_to_node_local_storage(tmp_path):
    env = dict(train_env(), TMPDIR=str(tmp_path))
    env.pop("TORCH_EXTENSIONS_DIR")
    code = "from gama_ds.train.extensions import extensions_dir; print(extensions_dir())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(tmp_path / f"gama_ds-torch-extensions-{os.getuid()}")


# Names exactly as torch.cuda.get_device_name() reports them, where a near name is another device.
KNOWN = {
    "NVIDIA H100 80GB HBM3": 989.4,  # SXM
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA L40S": 362.05,
    "NVIDIA L40": 181.05,
    "NVIDIA L4": 121.0,
}
# Names that contain a known one and are another device: substring matching would misread them.
UNKNOWN = ["NVIDIA RTX A1000", "NVIDIA A10G", "NVIDIA H100", "NVIDIA H20"]


def test_the_mfu_peak_comes_from_the_exact_device_name_or_the_environment():
    for name, tflops in KNOWN.items():
        assert peak_flops(name, {}) == pytest.approx(tflops * 1e12), name
    for name in UNKNOWN:
        assert peak_flops(name, {}) is None, name
    assert peak_flops("NVIDIA RTX A1000", {PEAK_ENV: "25.5"}) == pytest.approx(25.5e12)
    assert peak_flops("NVIDIA H200", {PEAK_ENV: "700"}) == pytest.approx(700e12)  # a site's own clocks
    with pytest.raises(ValueError, match=PEAK_ENV):
        peak_flops("NVIDIA H200", {PEAK_ENV: "fast"})


def test_flash_attention_counts_only_when_its_cuda_extension_imports(tmp_path, monkeypatch, caplog):
    """A flash-attn wheel built for another torch installs fine and fails when its extension
    loads: here an extension module whose shared object is not one."""
    (tmp_path / "broken_flash_cuda.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not an ELF file")
    (tmp_path / "broken_flash_cuda.so").write_bytes(b"not an ELF file")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert flash_extension_loads("broken_flash_cuda") is False
    assert "broken_flash_cuda does not load" in caplog.text
    assert flash_extension_loads("json") is True


@pytest.mark.parametrize("fused", [False, True])
def test_a_universal_resume_gives_each_adam_state_its_own_step_where_adamw_wants_it(fused):
    """DeepSpeed's universal loader hands every partition one shared step tensor, as read from
    the file: plain AdamW then advances it once per partition, fused AdamW (our GPU optimizer;
    torch has it on CPU too) refuses a step of another dtype or device."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    opt = torch.optim.AdamW(params, fused=fused or None)
    for p in params:
        p.grad = torch.ones(3)
    opt.step()
    shared = torch.tensor(1, dtype=torch.int64 if fused else torch.float32)
    for state in opt.state.values():
        state["step"] = shared
    _own_step_tensors(opt)
    opt.step()
    steps = [state["step"] for state in opt.state.values()]
    assert [float(s) for s in steps] == [2.0, 2.0] and steps[0] is not steps[1]
    if fused:
        assert all(s.dtype == torch.float32 for s in steps)
