# arlab: the two commands of the README, and a few helpers.
#   make quickstart   set up .venv and run the quickstart experiment on the embedded shapes set
#   make test         set up .venv and run the default (fast) test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
QUICKSTART ?= shapes/quickstart
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup quickstart test test-all lint clean-runs

setup: $(VENV)/.installed

# torch first, pinned to the build on local disk (a newer torch would be a multi-GB download)
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install -q -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import arlab.cli, torch, pytorch_lightning, webdataset, omegaconf"
	touch $@

quickstart: setup
	$(BIN)/arlab train $(QUICKSTART) run.dir=runs/quickstart
	$(BIN)/arlab sample runs/quickstart/checkpoints/last.ckpt --n 100 --seed 0 --out runs/quickstart/samples
	@echo "done: runs/quickstart/samples/samples.png (one column per class), metrics.json; tokenizer in runs/shapes/tokenizer-quick"
	@echo "TensorBoard: $(BIN)/tensorboard --logdir runs"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check arlab tests benchmarks

clean-runs:
	rm -rf runs lightning_logs
