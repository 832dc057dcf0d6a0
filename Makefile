# Two set-up commands: `make demo` and `make test`. Both create .venv when needed.
PY ?= python3
# Older GPUs (1080 Ti sm_61, Titan X Maxwell sm_52): make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_INDEX ?=
PIP_TORCH := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes. torch first, so that DeepSpeed's sdist
# builds against it without downloading a second torch into an isolated build env.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade setuptools wheel
	$(BIN)/python -m pip install -q $(PIP_TORCH) -e '.[dev]'
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation -e '.[dev,deepspeed]'
	touch $(STAMP)

# Two pytest workers: most tests wait on subprocess start-up (torch imports), so two files at a
# time fill the 2-core CI box (12.5 -> 8.3 min there). loadfile keeps a file's fixtures in one worker.
XDIST := -n 2 --dist loadfile

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra $(XDIST)

# The inner loop: everything but the multi-process runs (CI runs `make test`, all of it).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra $(XDIST) -m "not slow"

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

clean:
	rm -rf runs/demo shards/demo
