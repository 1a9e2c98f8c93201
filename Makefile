# Two commands set up everything on a fresh machine:  make run  |  make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
# CPU build without -march=native (AMX faults in these VMs). GPU box: make run CMAKE_ARGS=-DGGML_CUDA=on
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
BUILD_ID := $(shell printf '%s' "$(LLAMA_VERSION) $(CMAKE_ARGS)" | sha256sum | cut -c1-12)
WHEEL_DIR ?= $(HOME)/.cache/qwen-appliance/wheels/$(BUILD_ID)
STAMP := $(VENV)/.installed-$(BUILD_ID)
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed
TINY := models/tiny
TINY_STAMP := $(TINY)/.made
DEV := dev
POLICY ?= $(DEV)/policy.toml
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test lint typecheck check dev clean

$(STAMP): pyproject.toml constraints.txt tools/build_llama_wheel.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(CMAKE_ARGS)" WHEEL_DIR="$(WHEEL_DIR)" tools/build_llama_wheel.sh $(PY) $(LLAMA_VERSION)
	$(PY) -m pip install --quiet -c constraints.txt --find-links "$(WHEEL_DIR)" \
		"llama-cpp-python==$(LLAMA_VERSION)" -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# Test-only TLS scanner in its own environment: sslyze pins an older cryptography than the appliance uses.
$(TOOLS_STAMP): tools/constraints-tools.txt
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet -c tools/constraints-tools.txt sslyze
	touch $@

$(TINY_STAMP): tools/make_tiny_model.py | $(STAMP)
	$(PY) tools/make_tiny_model.py $(TINY)
	touch $@

$(DEV)/policy.toml: | $(STAMP) $(TINY_STAMP)
	$(PY) -m appliance init $(DEV) --listen 127.0.0.1:8443 --client dev-client \
		--model $(TINY)/tiny-qwen3vl-q8_0.gguf --mmproj $(TINY)/tiny-qwen3vl-mmproj.gguf \
		--token-file $(DEV)/clients/dev-client/token

dev: $(STAMP) $(TINY_STAMP) $(DEV)/policy.toml

run: dev
	$(PY) -m appliance serve --policy $(POLICY)

test: $(STAMP) $(TINY_STAMP) $(TOOLS_STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check appliance tools tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) $(TOOLS_VENV) $(TINY) $(DEV) .pytest_cache .mypy_cache .ruff_cache
