# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install
# pinned dependencies. torch comes from pip's configured sources (the CPU wheel on our CI machines);
# set TORCH_INDEX_URL to PyTorch's CPU or CUDA wheel index to choose the build elsewhere.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[cluster,dev]'
	touch $@

demo: install
	$(VENV)/bin/irg generate --model tests/fixtures/bagel_tiny --prompt "a red cube on the left of a blue ball" \
		--out out/demo --size 64 --steps 8 --rounds 2 --max-think-tokens 64

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
