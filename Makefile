# moecli — `make demo` runs the main job on the embedded default, `make test` runs the tests.
# torch==2.13.0 is installed first so pip takes the local CPU wheel instead of a multi-GB CUDA build;
# on a GPU machine, install your own torch into .venv first and `make install` keeps it.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: install demo test lint bench bench-quick bench-quality bench-speed clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	$(BIN)/moecli world export --n 100 --out $(DEMO_OUT)/edits.jsonl
	$(BIN)/moecli batch-edit --data $(DEMO_OUT)/edits.jsonl --batch-size 100 --out $(DEMO_OUT)/batch-edit

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check moecli tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --full

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py --full

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/speed.py --full

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
