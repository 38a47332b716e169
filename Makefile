# Every target sets up .venv first, so each works on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-all run bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q $(TORCH) 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, torchvision, timm, tokenreduce"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

run: $(STAMP)
	$(BIN)/python -m tokenreduce.bench.demo

bench: $(STAMP)
	$(BIN)/python -m tokenreduce.bench

lint: $(STAMP)
	$(BIN)/ruff check tokenreduce tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
