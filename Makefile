# Two set-up commands: `make demo` and `make test`. Both create .venv when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean lint

setup: $(STAMP)

# Re-installs only when pyproject.toml changes. torch first, so that DeepSpeed's sdist
# builds against it without downloading a second torch into an isolated build env.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev]'
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation -e '.[dev,deepspeed]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

clean:
	rm -rf runs/demo shards/demo
