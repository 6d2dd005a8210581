# Each target does all of its own set-up on a fresh machine: it creates .venv, installs the
# project into it, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
DEMO_DIR ?= demo_run
DEMO_ARGS ?=

.PHONY: demo test bench lint env clean cluster-packages gpu-check

env: $(STAMP)

# setup.py declares ranges; constraints.txt holds the exact set that is tested and that CI gets.
$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m gama_ds.train.extensions  # DeepSpeed's CPU collective, built once (~35 s)
	touch $(STAMP)

# The main job on the embedded default: synthesise a small audio QA set as real audio files,
# convert it to shards, train the demo recipe with DeepSpeed on 2 CPU ranks (ZeRO-2), export,
# evaluate on held-out clips and answer a few questions from the raw audio.
demo: $(STAMP)
	$(BIN)/gama-ds demo --out $(DEMO_DIR) $(DEMO_ARGS)

# The launch tests build two nodes from namespaces (iproute2, util-linux) and start real daemons
# on them (sshd + pdsh, a two-node Slurm with munge) from Debian's packages; test_gpu_ready
# watches a run's system calls with strace; test_serve drives the web page in a headless chromium
# through chromedriver. Install what is missing when root with apt-get;
# under `make test` a test that cannot run fails instead of skipping.
CLUSTER_PACKAGES := openssh-server openssh-client pdsh slurmctld slurmd slurm-client munge iproute2 util-linux strace chromium chromium-driver
CLUSTER_PROGRAMS := sshd ssh ssh-keygen pdsh slurmctld slurmd sbatch scontrol munged ip unshare nsenter strace chromium chromedriver

cluster-packages:
	@PATH="$$PATH:/usr/sbin:/sbin"; missing=; \
	for p in $(CLUSTER_PROGRAMS); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing $(CLUSTER_PACKAGES) for the launch and serve tests (missing:$$missing)"; \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
				--no-install-recommends $(CLUSTER_PACKAGES); \
		else \
			echo "missing$$missing: the launch tests will fail; as root: apt-get install $(CLUSTER_PACKAGES)"; \
		fi; \
	fi

test: $(STAMP) cluster-packages
	GAMA_DS_REQUIRE_CLUSTER_TESTS=1 $(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check gama_ds tests bench
	$(BIN)/ruff format --check gama_ds tests bench

bench: $(STAMP)
	$(BIN)/python bench/feature_path.py
	$(BIN)/python bench/convert_scaling.py
	$(BIN)/python bench/storage.py
	$(BIN)/python bench/stream.py
	$(BIN)/python bench/loop_overhead.py
	$(BIN)/python bench/epoch_coverage.py
	$(BIN)/python bench/zero3_memory.py
	$(BIN)/torchrun --nproc_per_node 2 bench/reshard.py
	$(BIN)/python bench/save_time.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/eval_suite.py
	$(BIN)/python bench/tagging.py
	$(BIN)/python bench/soft_prompt.py

# The GPU path on one GPU in under 8 minutes, one line per check (bench/gpu_check.py); a single
# SKIP line where there is no GPU. GPU_CHECK_ARGS="--device cpu" runs the same checks in fp32 on CPU.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) demo_data .torch_extensions bench_out
