# Two commands that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NPROC ?= auto

.PHONY: demo test install tiny clean

$(BIN)/fluxtrain:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# A CPU build of torch where the machine has one (pip's local wheel); the GPU image brings its own.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.6"
	$(BIN)/pip install -q -e ".[test]"

install: $(BIN)/fluxtrain

# Renders synthetic data on the fly, trains the tiny default on 2 ranks (FULL_SHARD over gloo; all GPUs if any),
# writes runs/demo/ (metrics.jsonl, checkpoints/, samples/step-*.png, tb/).
demo: install
	$(BIN)/fluxtrain train --config configs/tiny.toml --nproc-per-node $(NPROC) --checkpoint.resume never

test: install
	$(BIN)/pytest -q -x -p no:cacheprovider

# Rebuilds the shipped tiny FLUX folder (trains its VAE on synthetic shapes; a few minutes on a CPU).
tiny: install
	$(BIN)/python -m fluxtrain.models.tiny --out fluxtrain/assets/tiny-flux

clean:
	rm -rf runs/demo
