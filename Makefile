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

.PHONY: run test lint typecheck check dev clean install browser strace bench

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

dev: $(STAMP) $(TINY_STAMP)
	tools/dev_setup.sh $(PY) $(DEV) $(TINY) models/real

run: dev
	$(PY) -m appliance serve --policy $(POLICY)

test: $(STAMP) $(TINY_STAMP) $(TOOLS_STAMP) browser strace
	$(PY) -m pytest -q

# tests/test_console.py drives Debian's Chromium (never a downloaded browser or driver) with a client certificate
# from an NSS database (certutil, pk12util); a CJK font makes the Chinese UI legible in its screenshots.
BROWSER_PKGS := chromium chromium-driver libnss3-tools fonts-wqy-microhei
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ] || ! command -v pk12util >/dev/null \
		|| [ ! -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]; then \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BROWSER_PKGS); fi

# tests/test_egress.py traces the daemon's system calls in a loopback-only network namespace (unshare -n).
strace:
	@command -v strace >/dev/null || { $(SUDO) apt-get update -q \
		&& $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q strace; }

# Side-by-side benchmark (tools/bench.py): its own environment for llama_cpp.server's extras and matplotlib, and
# llama-server built once from the llama.cpp vendored in the same llama-cpp-python sdist. BENCH_ARGS e.g.
# "--model M.gguf --mmproj P.gguf --threads 4" for a real model; "--wait-quiet 600" waits for an idle machine.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-$(BUILD_ID)
SERVER_DIR ?= $(HOME)/.cache/qwen-appliance/llama-server/$(BUILD_ID)
BENCH_ARGS ?=
$(BENCH_STAMP): | $(STAMP)
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --find-links "$(WHEEL_DIR)" \
		"llama-cpp-python[server]==$(LLAMA_VERSION)" matplotlib httpx psutil pillow
	rm -f $(BENCH_VENV)/.installed-*
	touch $@

bench: $(STAMP) $(TINY_STAMP) $(BENCH_STAMP)
	CMAKE_ARGS="$(CMAKE_ARGS)" SERVER_DIR="$(SERVER_DIR)" tools/build_llama_server.sh $(PY) $(LLAMA_VERSION)
	$(BENCH_VENV)/bin/python tools/bench.py --llama-server $(SERVER_DIR)/llama-server $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check appliance tools tests
	$(VENV)/bin/ruff format --check appliance tools tests
	$(VENV)/bin/bandit -r appliance -ll -q  # medium and high; exceptions carry `# nosec BXXX` and why

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) $(TOOLS_VENV) $(BENCH_VENV) $(TINY) $(DEV) .pytest_cache .mypy_cache .ruff_cache

# --- make install: the branch server under systemd (README, "Installing on the branch server") -----------
# Needs root. DESTDIR=/tmp/stage lays out the same tree under a staging root without touching this host
# (no sysusers, tmpfiles or systemctl; chown only where the qwen-appliance user exists here).
APP_DIR ?= /opt/qwen-appliance
CONF_DIR ?= /etc/qwen-appliance
UNIT_DIR ?= /etc/systemd/system
SVC_USER := qwen-appliance
LISTEN ?= 0.0.0.0:8443
# The manifest's default pair, where `qwen-appliance model pull` / `model import` put it.
MODEL ?= /var/lib/qwen-appliance/models/Qwen3VL-2B-Instruct-Q4_K_M.gguf
MMPROJ ?= /var/lib/qwen-appliance/models/mmproj-Qwen3VL-2B-Instruct-F16.gguf
AUDIT_DIR ?= /var/log/qwen-appliance
PIP_ARGS ?=
D := $(DESTDIR)
IVENV := $(D)$(APP_DIR)/.venv
CHOWN = if id -u $(SVC_USER) >/dev/null 2>&1; then chown $(1) $(2); \
	else echo "note: no user $(SVC_USER) on this host, not running chown $(1)"; fi

install:
	@test -n "$(DESTDIR)" || test "$$(id -u)" = 0 \
		|| { echo "make install needs root (or DESTDIR=...)" >&2; exit 1; }
	@base=$$($(PYTHON) -c 'import sys; print(sys.base_prefix)'); case $$base in /root*|/home*) \
		echo "$(if $(D),warning,error): $(PYTHON) lives in $$base, which the service (ProtectHome=yes)" \
		"cannot reach; use PYTHON=/usr/bin/python3" >&2; $(if $(D),,exit 1);; esac
	$(if $(D),,systemd-sysusers $(CURDIR)/systemd/qwen-appliance.sysusers)
	install -d -m 0755 $(D)$(APP_DIR)
	tar -c --exclude=__pycache__ appliance pyproject.toml constraints.txt README.md docs systemd \
		$(wildcard models/manifest.toml) \
		| tar -x --no-same-owner -C $(D)$(APP_DIR)
	test -x $(IVENV)/bin/python || $(PYTHON) -m venv $(IVENV)
	CMAKE_ARGS="$(CMAKE_ARGS)" WHEEL_DIR="$(WHEEL_DIR)" \
		tools/build_llama_wheel.sh $(IVENV)/bin/python $(LLAMA_VERSION)
	$(IVENV)/bin/python -m pip install --quiet -c constraints.txt --find-links "$(WHEEL_DIR)" $(PIP_ARGS) \
		"llama-cpp-python==$(LLAMA_VERSION)" $(D)$(APP_DIR)
	rm -rf $(D)$(APP_DIR)/build $(D)$(APP_DIR)/*.egg-info
	@# Under DESTDIR, scripts must name the interpreter where it will live, not the staging path.
	$(if $(D),grep -lI '$(IVENV)' $(IVENV)/bin/* $(IVENV)/pyvenv.cfg \
		| xargs -r sed -i 's|$(IVENV)|$(APP_DIR)/.venv|g')
	chmod -R u=rwX,go=rX $(D)$(APP_DIR)
	test -e $(D)$(CONF_DIR)/policy.toml || { $(IVENV)/bin/python -m appliance init $(D)$(CONF_DIR) \
		--listen $(LISTEN) --model $(MODEL) --mmproj $(MMPROJ) \
		&& sed -i 's|^dir = "audit"|dir = "$(AUDIT_DIR)"|' $(D)$(CONF_DIR)/policy.toml; }
	cd $(D)$(CONF_DIR) && chmod 0750 . tls data && chmod 0700 clients && chmod 0640 policy.toml tls/*.crt \
		&& chmod 0600 tls/*.key audit.key
	cd $(D)$(CONF_DIR) && $(call CHOWN,root:$(SVC_USER),. tls data policy.toml tls/*.crt)
	cd $(D)$(CONF_DIR) && $(call CHOWN,$(SVC_USER):$(SVC_USER),tls/server.key audit.key)
	install -d -m 0755 $(D)$(UNIT_DIR) $(D)/etc/sysusers.d $(D)/etc/tmpfiles.d
	for u in service socket; do f=$(D)$(UNIT_DIR)/qwen-appliance.$$u; \
		sed 's|/opt/qwen-appliance|$(APP_DIR)|g; s|/etc/qwen-appliance|$(CONF_DIR)|g' \
		systemd/qwen-appliance.$$u > $$f && chmod 0644 $$f; done
	install -m 0644 systemd/qwen-appliance.sysusers $(D)/etc/sysusers.d/qwen-appliance.conf
	install -m 0644 systemd/qwen-appliance.tmpfiles $(D)/etc/tmpfiles.d/qwen-appliance.conf
	$(if $(D),,systemd-tmpfiles --create /etc/tmpfiles.d/qwen-appliance.conf)
	$(if $(D),,systemctl daemon-reload)
	@echo "Installed. Put the model pair into /var/lib/qwen-appliance/models/ (qwen-appliance model import"
	@echo "or model pull, or a root-owned 0644 copy), then:"
	@echo "  $(APP_DIR)/.venv/bin/qwen-appliance policy check $(CONF_DIR)/policy.toml"
	@echo "  systemctl enable --now qwen-appliance.socket qwen-appliance.service"
