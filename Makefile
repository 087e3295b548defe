# arlab: the two commands of the README, and a few helpers.
#   make quickstart   set up .venv and run the quickstart experiment on the embedded shapes set
#   make test         set up .venv and run the default (fast) test suite
#   make shapes-comparison   the docs/generator.md comparison: train, sweep, benchmark, table (hours on a CPU)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
QUICKSTART ?= shapes/quickstart
PYTEST_ARGS ?= -m "not slow"

# the shapes comparison of docs/generator.md: every experiment x seed, a sampling sweep per run, 10,000 samples at
# each run's best-FID setting of its sweep, one speed benchmark, two tables. Resumable: finished seeds are skipped,
# evaluations redraw only missing chunks.
CMP_EXPERIMENTS ?= raster tokenshuffle-s2 tokenshuffle-s4 nar var text-tokenshuffle-s2 mamba-raster mamba-tokenshuffle-s2 mvar
CMP_SEEDS ?= 0,1,2
CMP_N ?= 1000
CMP_EVAL ?= sweep1k-tk
CMP_BEST ?= best10k
CMP_BEST_N ?= 10000
CMP_OUT ?= runs/cmp/table

.PHONY: setup quickstart test test-all lint clean-runs shapes-comparison

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

# CFG 2 and 4 for the half-linear schedule (NAR also 6); next-scale models use VAR's ramp 1 + w k/(S-1): w = 1, 3, 5
# ends at 2, 4, 6 (the docs' sweep: its best settings are inside these grids)
shapes-comparison: setup
	set -e; for e in $(CMP_EXPERIMENTS); do \
	  $(BIN)/arlab train shapes/$$e --seeds $(CMP_SEEDS) run.dir=runs/cmp/$$e; \
	  case $$e in var|mvar) cfg=1,3,5;; nar) cfg=2,4,6;; *) cfg=2,4;; esac; \
	  for run in runs/cmp/$$e/seed*; do \
	    $(BIN)/arlab eval $$run --n $(CMP_N) --name $(CMP_EVAL) --cfg $$cfg --temperature 1,0.8 --top-k 0,20 --quiet; \
	    $(BIN)/arlab eval $$run --n $(CMP_BEST_N) --name $(CMP_BEST) --best-of $(CMP_EVAL) --quiet; \
	  done; \
	done
	$(BIN)/python benchmarks/bench_experiments.py --json $(CMP_OUT).speed.json
	$(BIN)/arlab compare $(addprefix runs/cmp/,$(CMP_EXPERIMENTS)) --eval $(CMP_EVAL) --speed $(CMP_OUT).speed.json \
	  --out $(CMP_OUT)
	$(BIN)/arlab compare $(addprefix runs/cmp/,$(CMP_EXPERIMENTS)) --eval $(CMP_BEST) --out $(CMP_OUT)-$(CMP_BEST)

lint: setup
	$(BIN)/ruff check arlab tests benchmarks

clean-runs:
	rm -rf runs lightning_logs
