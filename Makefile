# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install
# pinned dependencies. torch comes from pip's configured sources (the CPU wheel on our CI machines);
# set TORCH_INDEX_URL to PyTorch's CPU or CUDA wheel index to choose the build elsewhere.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed

.PHONY: install browser demo test clean

install: $(STAMP)

INSTALL_LOG := $(VENV)/install.log

# pip's output goes to a log file (its last lines are shown if it fails): a person reads the steps.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned dependencies into $(VENV) (log: $(INSTALL_LOG))"
	@( $(PY) -m pip install torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) \
	   && DS_BUILD_OPS=0 $(PY) -m pip install -e '.[cluster,dev]' ) > $(INSTALL_LOG) 2>&1 \
	   || (tail -n 30 $(INSTALL_LOG); echo "install failed: see $(INSTALL_LOG)"; exit 1)
	@touch $@

demo: install
	@$(PY) jobs/demo.py

# The playground test drives headless Chromium (Debian's package).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

browser:
	@command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)

# Lint first: a finding fails the target before the (long) suite runs.
test: install browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
